"""What every study shares: a grid of runs in one output folder, resumed run by run, and its reports."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys

import pandas as pd

from experiments import checkpoints, cli
from experiments.claims import by_run
from experiments.config import MAX_SEED, UserError, differences, unit_warnings
from experiments.methods import METHODS, REGISTRY, how_strong
from experiments.models import MODELS
from experiments.train import (
    RunConfig,
    check_model_fits,
    check_run,
    divergence,
    finished_result,
    holds_run,
    is_finished,
    train,
)


def run_label(config: RunConfig) -> str:
    """The run's method label and strength (from the registry), e.g. ``ND l1 0.01``."""
    return REGISTRY[config.method].run_label(config.strength)


def run_folder(config: RunConfig, out: str) -> str:
    """``out/<model>/<method>-<strength>-<fingerprint>``: another seed, schedule or evaluation is another folder."""
    return os.path.join(out, config.model, f"{config.method}-{config.strength:g}-{config.fingerprint()}")


def run_grid(configs: list[RunConfig], out: str) -> list[dict]:
    """Train every config into its run folder; finished runs are read back, not rerun."""
    results = []
    for i, config in enumerate(configs, 1):
        folder = run_folder(config, out)
        state = "done" if is_finished(os.path.join(folder, "result.json"), config) else "training"
        line = f"[{i}/{len(configs)}] {config.model} {run_label(config)} seed {config.seed}: {state} ({folder})"
        print(line, file=sys.stderr, flush=True)
        result = train(config, folder, resume=True)
        result["label"] = run_label(config)
        results.append(result)
    return results


def finished(configs: list[RunConfig], out: str) -> tuple[list[dict], list[RunConfig]]:
    """Results of the runs that have finished (in the grid's order), and the runs still missing."""
    results, missing = [], []
    for config in configs:
        path = os.path.join(run_folder(config, out), "result.json")
        # Damaged, or another run's (copied in by hand, it went into the tables): set aside and
        # counted as missing, as a run of the study does (training it again evaluates it anew).
        result = finished_result(path, config) if os.path.exists(path) else None
        if result is not None:
            result["label"] = run_label(config)
            results.append(result)
        else:
            missing.append(config)
    return results, missing


def shared_options(configs: list[RunConfig]) -> dict:
    """The options a study's runs share, as the study was asked for them.

    ``skip_layers`` is the study-wide ``--released-skips``, which only the norm-decay runs carry:
    read off the first run (plain), a study with the switch was recorded and echoed as one
    without it, so the same command could not resume its folder and the other one could.
    """
    shared = {k: v for k, v in configs[0].as_dict().items() if k not in ("model", "method", "strength", "seed")}
    shared["skip_layers"] = "released" if any(c.skip_layers == "released" for c in configs) else "none"
    return shared


def identity(name: str, configs: list[RunConfig]) -> dict:
    """What makes a study: its name, the options its runs share (:func:`shared_options`), and its runs."""
    shared = shared_options(configs)
    shared["seeds"] = sorted({c.seed for c in configs})
    runs = sorted(f"{c.model} {c.method} {c.strength:g} seed {c.seed}" for c in configs)
    return {"study": name, "options": shared, "runs": runs, "fingerprints": sorted(c.fingerprint() for c in configs)}


def check_study(out: str, study: dict) -> None:
    """Check that ``out`` holds no study or this very one (writes nothing: a dry run's check).

    Raises:
        UserError: ``out`` holds another study; the differing options and runs are named.
    """
    path = os.path.join(out, "study.json")
    if not os.path.exists(path):
        return
    try:
        saved = checkpoints.read_json(path)
    except checkpoints.DamagedFile as error:
        raise UserError(f"{error}: which study {out!r} holds is unknown; choose another --out") from None
    changed = [f"study: {saved.get('study')!r} -> {study['study']!r}"] if saved.get("study") != study["study"] else []
    changed += differences(saved.get("options", {}), study["options"])
    before, now = saved.get("runs", []), study["runs"]
    if before != now:
        gone, added = [r for r in before if r not in now], [r for r in now if r not in before]
        changed.append(f"runs: {len(before)} -> {len(now)} (left out: {gone or 'none'}; added: {added or 'none'})")
    if changed:
        raise UserError(f"{out!r} holds another study ({'; '.join(changed)}); its outputs are kept: choose another --out")


def claim_study(out: str, study: dict) -> bool:
    """Write ``out/study.json``, or check that ``out`` holds this very study (shards wait for each
    other here). Returns whether it wrote the file.

    Raises:
        UserError: ``out`` holds another study; the differing options are named.
    """
    checkpoints.check_writable(out)
    with checkpoints.waiting_lock(os.path.join(out, ".study.lock")):
        check_study(out, study)
        if os.path.exists(os.path.join(out, "study.json")):
            return False
        checkpoints.write_json(os.path.join(out, "study.json"), study)
        return True


def diverged(result: dict) -> bool:
    """Whether a run diverged: marked so by train, or (a result.json written before runs were
    marked) with a non-finite loss or norm."""
    return bool(result.get("diverged") or divergence(result["history"], result["norms"]))


def draw_figures(results: list[dict], draw) -> None:
    """Print the paths of ``draw(results, norms)``'s figures, drawn from the runs that did not diverge.

    A diverged run's norms are NaN (or its model is): a study whose every run diverged ended in a
    traceback (a log axis of NaN norms); the figures leave such runs out, as the tables do, and say
    in one line when nothing is left to plot.
    """
    kept = [result for result in results if not diverged(result)]
    if not kept:
        print(f"figures: none drawn, every run ({len(results)}) diverged: nothing is left to plot", flush=True)
        return
    paths = [path for path in draw(kept, norms_table(kept)) if path]
    left = f" (leaving out {len(results) - len(kept)} diverged run(s))" if len(kept) < len(results) else ""
    print(f"figures{left}:", *paths, sep="\n  ", flush=True)


def summary_table(results: list[dict]) -> pd.DataFrame:
    """One row per run: accuracies, the final summed norms, and whether the run diverged.

    A diverged run (:func:`experiments.train.divergence`; also found in a result.json written before
    runs were marked) has NaN accuracies and NaN sums, never a sum that skipped its NaN norms, and
    ``diverged`` True: :func:`experiments.claims.by_run` leaves it out of means and seed counts.
    """
    rows = []
    for result in results:
        config, norms = result["config"], pd.DataFrame(result["norms"])
        last = norms[norms.epoch == norms.epoch.max()]
        linear = last[last.kind.isin(["conv", "linear"])]
        dead = diverged(result)
        row = {"model": config["model"], "method": config["method"], "strength": config["strength"], "seed": config["seed"]}
        # A NaN model's accuracies are chance or worse, not a measurement.
        row.update({f"{k} acc": math.nan if dead else v for k, v in result["accuracy"].items() if k != "sweep"})
        row.update({f"robust@{r}": math.nan if dead else v for r, v in result["accuracy"].get("sweep", {}).items()})
        # skipna=False: pandas' sum skips NaN, which wrote a diverged run's summed norm as 0. NaN
        # for a run that diverged through a buffer too (a non-finite running variance), whose
        # weights' norms stayed finite: 7.4e16 and 13.8 were tabled.
        row["sum l1"] = math.nan if dead else linear[linear.ord == "l1"].norm.sum(skipna=False)
        row["sum linf"] = math.nan if dead else linear[linear.ord == "linf"].norm.sum(skipna=False)
        bn = last[last.kind == "batchnorm"]
        row["max bn"] = bn[bn.ord == "l1"].norm.max(skipna=False) if len(bn) and not dead else math.nan
        row["diverged"] = dead
        rows.append(row)
    return pd.DataFrame(rows)


def norms_table(results: list[dict]) -> pd.DataFrame:
    frames = []
    for result in results:
        frame = pd.DataFrame(result["norms"])
        frame.insert(0, "seed", result["config"]["seed"])
        frame.insert(0, "strength", result["config"]["strength"])
        frame.insert(0, "method", result["config"]["method"])
        frame.insert(0, "run", result["label"])
        frame.insert(0, "model", result["config"]["model"])
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


_TEX_SPECIALS = {c: "\\" + c for c in "&%$#_{}"} | {"\\": "\\textbackslash{}", "~": "\\textasciitilde{}", "^": "\\^{}"}


def _tex(label: str) -> str:
    """Text in LaTeX: l1 and l_inf as ell norms, every other special character escaped (a bare
    ``_``, as in ``regnetx_200mf``, stops LaTeX with "Missing $ inserted").

    Example:
        >>> print(_tex("ND l_inf+bn, regnetx_200mf"))
        ND $\\ell_\\infty$+bn, regnetx\\_200mf
    """
    pieces = re.split(r"(?<![A-Za-z0-9])(l_inf|l1)(?![A-Za-z0-9])", label)  # as words: not in "cell1"
    norms = {"l_inf": "$\\ell_\\infty$", "l1": "$\\ell_1$"}
    return "".join(norms.get(p) or "".join(_TEX_SPECIALS.get(c, c) for c in p) for p in pieces)


def _percent(value: float, live: bool = True) -> str:
    """``value`` in percent; ``diverged`` for a run without a seed that did not diverge, ``n/a`` for
    a figure missing in a live seed (an evaluation that failed)."""
    if not live:
        return "diverged"
    return f"{100 * value:.1f}" if math.isfinite(value) else "n/a"


def paper_latex(results: pd.DataFrame) -> str:
    """The paper's accuracy table in LaTeX: per model, one column per run (plain first, then each
    method's strengths under a spanning method header), a ``Clean`` and a ``Robust`` row of
    accuracies in percent (one decimal, mean over the seeds that did not diverge; ``diverged``
    where every seed did; ``n/a`` where a seed that did not diverge has no figure, as the claims
    and sweep tables count it: :func:`experiments.claims.by_run`)."""
    runs = by_run(results)
    runs["live"] = runs.seeds > 0
    order = {name: i for i, name in enumerate(REGISTRY)}
    blocks = []
    for model, rows in runs.groupby("model", sort=False):
        # Weakest first in every method: SVC's bound ordered as its strength, decreasing.
        strength = how_strong(rows.method, rows.strength)
        rows = rows.assign(rank=rows.method.map(order), how_strong=strength).sort_values(["rank", "how_strong"])
        methods = list(dict.fromkeys(rows.method))
        spans = [(REGISTRY[m].label, len(rows[rows.method == m])) for m in methods]
        header = " & ".join(f"\\multicolumn{{{n}}}{{c}}{{{_tex(label)}}}" for label, n in spans)
        strengths = " & ".join(f"{s:g}" if REGISTRY[m].strength else "-" for m, s in zip(rows.method, rows.strength))
        clean = " & ".join(_percent(v, live) for v, live in zip(rows["clean acc"], rows.live))
        robust = " & ".join(_percent(v, live) for v, live in zip(rows["robust acc"], rows.live))
        blocks.append(
            "\n".join(
                [
                    f"% {_tex(model)}",
                    f"\\begin{{tabular}}{{l{'c' * len(rows)}}}",
                    "\\toprule",
                    f"{_tex(model)} & {header} \\\\",
                    f"strength & {strengths} \\\\",
                    "\\midrule",
                    f"Clean & {clean} \\\\",
                    f"Robust & {robust} \\\\",
                    "\\bottomrule",
                    "\\end{tabular}",
                ]
            )
        )
    return "\n\n".join(blocks) + "\n"


def _markdown(frame: pd.DataFrame) -> str:
    # Written here: pandas' to_markdown needs the tabulate package for one table.
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells]) + "\n"


def write_tables(frame: pd.DataFrame, out: str, name: str) -> str:
    """CSV, Markdown and LaTeX versions of a table; returns the Markdown."""
    frame.to_csv(os.path.join(out, f"{name}.csv"), index=False)
    markdown = _markdown(frame)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(markdown)
    # Escaped: pandas leaves "_" in names (regnetx_200mf, "exact l_inf ms") as LaTeX errors.
    frame.to_latex(os.path.join(out, f"{name}.tex"), index=False, float_format="%.4g", escape=True)
    if {"model", "method", "strength", "clean acc", "robust acc"} <= set(frame.columns):
        with open(os.path.join(out, f"{name}_paper.tex"), "w") as f:
            f.write(paper_latex(frame))
    return markdown


def common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="digits", choices=["digits", "cifar10"])
    parser.add_argument(
        "--models",
        help=f"comma-separated, from {', '.join(sorted(MODELS))} (default: the protocol's, small on digits, resnet18 on cifar10)",
    )
    parser.add_argument("--epochs", type=int, help="default: 15 (digits) or 120 (cifar10, the paper)")
    parser.add_argument("--eval-images", type=int, help="test images attacked (default 256 digits, 1024 cifar10)")
    parser.add_argument("--eval-iterations", type=int, help="APGD iterations (default 50 digits, 100 cifar10)")
    parser.add_argument("--eval-targets", type=int, help="APGD-T target classes, 1-9 (default 3 digits, 9 cifar10)")
    parser.add_argument(
        "--seeds", help="comma-separated seeds, each run once per seed (default 0; 1 on cifar10, the released scripts')"
    )
    parser.add_argument("--out", type=cli.out_folder, help="output folder (default runs/<study>-<dataset>)")
    parser.add_argument("--shard", help="K/N: train only the K-th of N disjoint shares of the runs (no tables)")
    parser.add_argument("--collect", action="store_true", help="train nothing: tables and figures from the finished runs")
    cli.protocol_options(parser)
    cli.evaluation_options(parser)
    cli.common_options(parser)


def seeds_of(text: str | None) -> list[int | None]:
    """``--seeds`` as a list of ints ([None]: the protocol's default seed)."""
    if text is None:
        return [None]
    try:
        seeds = [int(word) for word in text.split(",") if word]
    except ValueError:
        raise UserError(f"--seeds takes comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds needs distinct integers, got {text!r}")
    # Checked here, not by each run's RunConfig, whose message names --seed, an option studies lack.
    bad = [seed for seed in seeds if not 0 <= seed <= MAX_SEED]
    if bad:
        raise UserError(f"--seeds must be integers in [0, {MAX_SEED}], got {', '.join(map(str, bad))} in {text!r}")
    return seeds


def shard_of(text: str | None) -> tuple[int, int] | None:
    """``"K/N"`` as (K, N) with 1 <= K <= N."""
    if text is None:
        return None
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise UserError(f"--shard must look like K/N (e.g. 1/4), got {text!r}") from None
    if not 1 <= k <= n:
        raise UserError(f"--shard K/N needs 1 <= K <= N, got {text!r}")
    return k, n


def names_given(text: str | None, option: str, parser, known, kind: str) -> list[str] | None:
    """The comma-separated ``kind`` names given to ``option``, each one of ``known``, or None where
    it was not given. Given, but empty (an empty shell variable), is refused: it would run the
    study's whole default grid."""
    if text is None:
        return None
    # A name given twice is taken once, as --methods and --sweep take theirs: twice, its runs
    # entered the tables twice and every spread over n seeds shrank by sqrt(2 (n - 1) / (2n - 1)).
    names = list(dict.fromkeys(name for name in text.split(",") if name.strip()))
    if not names:
        parser.error(f"{option} needs at least one name, got {text!r}")
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"unknown {kind}(s) {unknown}; choose from {list(known)}")
    return names


def configs_for(args, parser, grid: dict[str, list[float]], **fixed) -> list[RunConfig]:
    """The study's grid as configs, with the command line's choices; bad names and numbers end in exit code 2."""
    # No --models: the protocol's model on this data set (cifar10 trained the digits CNN before).
    models = names_given(args.models, "--models", parser, sorted(MODELS), "model")
    models = models or [RunConfig.resolve(args.protocol, args.dataset).model]
    bad = [m for m in grid if m not in METHODS]
    if bad:
        parser.error(f"unknown method(s) {bad}; choose from {list(METHODS)}")
    common = {"data_dir": args.data_dir, "download": args.download, **fixed, **cli.protocol_changes(args)}
    common["verify_data"] = not args.skip_data_checksums
    if args.epochs is not None:
        common["epochs"] = args.epochs
        default = RunConfig.resolve(args.protocol, args.dataset).milestones
        common["milestones"] = tuple(m for m in default if m <= args.epochs) if args.dataset == "digits" else default
    for option in ("eval_images", "eval_iterations", "eval_targets"):
        if getattr(args, option) is not None:
            common[option] = getattr(args, option)
    seeds = cli.or_exit(lambda: seeds_of(args.seeds))
    # --released-skips is study-wide, but only norm decay reads it: the other runs of the study
    # (plain among them) stay the runs they are, and a study with no norm decay refuses it.
    skips = common.pop("skip_layers", "none")
    if skips != "none" and not any(REGISTRY[m].optimizer == "nd" for m in grid):
        parser.error(f"--released-skips is used only by norm decay, and no method of this study ({', '.join(grid)}) is one")

    def make(model, method, strength, seed):
        seeded = common if seed is None else {**common, "seed": seed}
        if REGISTRY[method].optimizer == "nd":
            seeded = {**seeded, "skip_layers": skips}
        return RunConfig.resolve(args.protocol, args.dataset, model=model, method=method, strength=strength, **seeded)

    configs = cli.or_exit(
        lambda: [make(m, method, s, seed) for seed in seeds for m in models for method, values in grid.items() for s in values]
    )
    cli.check_evaluation_options(args, configs[0].attacks)  # the study's runs share their attacks
    return configs


def run_study(name: str, module: str, argv: list[str], args, configs: list[RunConfig], out: str, report) -> str | None:
    """Run (a shard of) a study into ``out`` and, unless sharded, ``report(results, out)`` its tables.

    Echoes the resolved configuration; user errors end in one line and exit code 2, Ctrl-C in
    exit code 130 with the command that resumes.
    """
    world_size = os.environ.get("WORLD_SIZE", "1")
    if int(world_size) > 1:
        # Every rank would train every run as a DDP run and write the same tables at once.
        cli.fail(
            f"WORLD_SIZE={world_size} is set (torchrun or a launcher), and a study runs in one process: unset it, "
            "and to spread the study's runs over processes or machines give each its own --shard i/n (then "
            "--collect); torchrun -m experiments.train trains one run data-parallel"
        )
    cli.set_threads(args.threads)
    shard = cli.or_exit(lambda: shard_of(args.shard))
    if shard and args.collect:
        cli.fail("--collect gathers every shard's runs; use it without --shard")
    # Dealt from the runs in a fixed order, not the command line's: the study is the same one
    # whatever the order of --seeds, --models or --methods (see identity), and so must its shards be.
    dealt = sorted(configs, key=lambda c: (c.model, c.method, c.strength, c.seed))
    mine = dealt[shard[0] - 1 :: shard[1]] if shard else configs
    eprint = checkpoints.eprint
    # The first run's options with the study's --released-skips (that run, plain, has none); each
    # run's fingerprint is listed below.
    echoed = {**configs[0].as_dict(), "skip_layers": shared_options(configs)["skip_layers"]}
    eprint(f"{name} study, shared configuration: {' '.join(f'{k}={v}' for k, v in echoed.items())}")
    for warning in unit_warnings(configs[0]):  # the radii every run of the study shares
        eprint(f"warning: {warning}")
    eprint(f"runs ({len(mine)} of {len(configs)}{f', shard {shard[0]}/{shard[1]}' if shard else ''}):")
    for config in mine:
        eprint(f"  {config.model} {run_label(config)} seed {config.seed} [{config.fingerprint()}]")
    eprint(f"writing to {os.path.abspath(out)}")
    if args.dry_run:

        def check():  # the refusals the real run would meet, found without writing
            check_study(out, identity(name, configs))
            cli.dry_run([(c, run_folder(c, out)) for c in mine], lambda c, f: check_run(c, f, resume=True))

        cli.or_exit(check)
        return None
    cli.or_exit(lambda: [check_model_fits(c) for c in configs])  # before the study's folder is claimed
    if not args.collect:  # missing data left a study.json that refused every other study in --out
        cli.or_exit(lambda: cli.check_data(mine))
    with cli.friendly(cli.command_line(module, argv)):
        claimed = claim_study(out, identity(name, configs))
        # Taken back if the study fails before any of its runs holds a checkpoint or a result (its
        # first epoch crashed, or a --collect found nothing to collect); not by a shard: another
        # may be in its first epoch.
        holding = lambda: any(holds_run(run_folder(c, out)) for c in configs)
        study_json = os.path.join(out, "study.json")
        with checkpoints.taken_back_on_failure(study_json, holding) if claimed and not shard else contextlib.nullcontext():
            if not args.collect:
                run_grid(mine, out)
            if shard:
                eprint(
                    f"shard {shard[0]}/{shard[1]} done; once every shard is, "
                    "run the same command with --collect instead of --shard"
                )
                return out
            results, missing = finished(configs, out)
            if missing:
                eprint(f"{len(missing)} run(s) not finished yet, left out of the tables:")
                for config in missing:
                    eprint(f"  {config.model} {run_label(config)} seed {config.seed}")
            if not results:
                raise UserError(f"no finished runs in {out!r} yet")
        report(results, out)
    return out
