"""One training run: model, method (plain, norm decay, weight decay, SVC, adversarial training),
per-epoch metrics and layer norms, a checkpoint every epoch, resume, robust evaluation.

    python -m experiments.train --dataset digits --model small --method nd-linf --strength 0.1 --out runs/demo
    torchrun --nproc_per_node 2 -m experiments.train ...   # data parallel (gloo on CPU, nccl on GPU)

(--batch-size is per process, so a torchrun run resumes only with as many processes as it was
trained with; the first process alone evaluates it at the end.)

Runs on the GPU when one is present, otherwise on the CPU. --protocol released (default) or paper
resolves the run's values (experiments/protocol.py). The run folder holds config.json (the
resolved configuration and its fingerprint), the last two checkpoints and result.json (per-epoch
history and norms, every layer's norms every --norms-every steps, accuracies); --resume refuses a
folder whose configuration differs from the command line's. A run whose loss, layer norms, or any
parameter or buffer after an epoch end up NaN or infinite is marked "diverged" in result.json (with
the first epoch it happened), is not attacked (its accuracies are NaN), and the studies' tables
and figures leave it out.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import normopt
from experiments import checkpoints, cli
from experiments.attacks import robust_accuracy
from experiments.config import EVALUATION, RunConfig, UserError, describe, differences, single_run_defaults, unit_warnings
from experiments.data import dataset, loader, shape_of
from experiments.methods import METHODS, REGISTRY, CosineLinear, hypersphere, loss_of, make_optimizer
from experiments.models import MODELS, build_model

__all__ = ["RunConfig", "evaluate", "train"]


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _is_main() -> bool:
    """Rank 0, or the only process; before the process group starts, as torchrun numbered it (its
    ``RANK``), so that what one process should print is not printed by every rank. A ``RANK`` left
    in the environment of a single process (``WORLD_SIZE`` unset or 1) does not count: that process
    is the only one, and would otherwise write nothing."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return not _distributed() or int(os.environ.get("RANK", "0")) == 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def applied_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers by name, as :func:`normopt.layer_norms` reads them, with the
    weight of each hypersphere-embedding layer (:class:`~experiments.methods.CosineLinear`) replaced
    by the one it applies, ``scale * normalize(W)``: the raw ``W`` can be scaled at will without
    changing the model, so its norm says nothing about it."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, module in model.named_modules():
        if isinstance(module, CosineLinear):
            tensors[f"{name}.weight" if name else "weight"] = module.applied_weight()
    return tensors


def layer_norm_rows(model: nn.Module, specs, epoch: int) -> list[dict]:
    """Every layer's l1 and l_inf norm as table rows (of the applied weight for HE: :func:`applied_tensors`)."""
    rows = []
    with torch.no_grad():
        tensors = applied_tensors(model)
        for ord_name, ord in (("l1", 1), ("linf", math.inf)):
            for index, (name, norm) in enumerate(normopt.layer_norms(tensors, specs, ord).items()):
                kind = type(specs[name]).__name__.removesuffix("Spec").lower()
                rows.append({"epoch": epoch, "layer": name, "index": index, "kind": kind, "ord": ord_name, "norm": float(norm)})
    return rows


def non_finite(model: nn.Module) -> list[str]:
    """The names of the model's parameters and buffers holding a NaN or an infinity (one host sync).

    The loss and layer norms miss some: a NaN only in ``fc.bias`` or a batch-norm ``running_mean``
    changed no norm and no training loss, and the run was attacked and tabulated as measured.
    """
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    tensors = {name: t for name, t in tensors.items() if t.is_floating_point() or t.is_complex()}
    if not tensors:
        return []
    with torch.no_grad():
        finite = torch.stack([torch.isfinite(t).all() for t in tensors.values()]).cpu().tolist()
    return [name for name, ok in zip(tensors, finite) if not ok]


def divergence(history: list[dict], norms: list[dict]) -> str | None:
    """Why a run diverged, or None: the first epoch whose mean loss, any recorded layer norm, or any
    parameter or buffer at its end (``non-finite`` in the history, :func:`non_finite`) is not finite.
    Such a model's accuracies and summed norms mean nothing (a NaN model predicts one class), so the
    run is marked, not evaluated, and the studies' tables leave it out.
    """
    reasons = {}
    for row in history:
        if not math.isfinite(row["loss"]):
            reasons.setdefault(row["epoch"], f"loss {row['loss']} in epoch {row['epoch']}")
    for row in norms:
        if not math.isfinite(row["norm"]):
            reasons.setdefault(row["epoch"], f"{row['ord']} norm of {row['layer']} is {row['norm']} after epoch {row['epoch']}")
    for row in history:
        names = row.get("non-finite")  # absent in the history of a run checkpointed before it was recorded
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            reasons.setdefault(row["epoch"], f"non-finite {shown} after epoch {row['epoch']}")
    return reasons[min(reasons)] if reasons else None


def not_evaluated(config: RunConfig) -> dict:
    """The accuracies of a diverged run: the keys :func:`robust_evaluation` writes, every value NaN."""
    result = {"clean": math.nan, **dict.fromkeys(config.attacks, math.nan), "robust": math.nan, "clean subset": math.nan}
    if config.sweep:
        result["sweep"] = {f"{r:g}": math.nan for r in sorted({*config.sweep, config.eval_eps})}
    return result


def _report_divergence(result: dict) -> None:
    if result.get("diverged"):
        checkpoints.eprint(
            f"  run diverged ({result['diverged']}): accuracies not measured (NaN); the studies' tables leave it out"
        )


def claim_folder(config: RunConfig, out: str, resume: bool, write: bool = True) -> bool:
    """Write the run's configuration into ``out``, or check it against the one already there
    (``write=False``: check only, as a dry run does). Returns whether it wrote ``config.json``
    afresh (the folder held none), as :func:`experiments.study.claim_study` does ``study.json``.

    Raises:
        UserError: the folder holds a run of another configuration (the differing options are
            named), or holds a run and ``resume`` is off.
    """
    path = os.path.join(out, "config.json")
    wanted = {"config": config.as_dict(), "definition": config.definition(), "fingerprint": config.fingerprint()}
    holding, existed = holds_run(out), os.path.exists(path)
    if not existed and holding:
        raise UserError(
            f"{out!r} holds checkpoints or a result but no config.json: which run they belong to is unknown; choose another --out"
        )
    if existed:
        try:
            saved = checkpoints.read_json(path)
        except checkpoints.DamagedFile as error:
            raise UserError(f"{error}: which run {out!r} holds is unknown; choose another --out") from None
        changed = differences(saved.get("config", {}), wanted["config"])
        if saved.get("definition", wanted["definition"]) != wanted["definition"]:
            changed.append(f"definition of {config.method!r}: {saved['definition']} -> {wanted['definition']}")
        if changed:
            raise UserError(f"{out!r} holds a run of another configuration ({'; '.join(changed)}); choose another --out")
        if not resume and holding:
            raise UserError(f"{out!r} already holds this run; pass --resume to continue it, or choose another --out")
    if write:
        checkpoints.write_json(path, wanted)
    return write and not existed


def build(config: RunConfig, where: torch.device) -> SimpleNamespace:
    """Data, model, optimizer, scheduler and scaler of a run, freshly initialised from its seed."""
    torch.manual_seed(config.seed)
    run = SimpleNamespace(
        train_set=dataset(config.dataset, True, config.data_dir, download=config.download, verify=config.verify_data),
        test_set=dataset(config.dataset, False, config.data_dir, verify=config.verify_data),
    )
    channels, height, width = shape_of(config.dataset)
    run.model = build_model(config.model, 10, channels)
    if REGISTRY[config.method].he:
        run.model = hypersphere(run.model, config.he_scale)
    run.model = run.model.to(where)
    example = torch.zeros(1, channels, height, width, device=where)
    with warnings.catch_warnings():
        # CosineLinear overrides nn.Linear's forward; its norms are those of the weight it applies
        # (applied_tensors), so layer_specs' warning about such classes does not concern it.
        warnings.filterwarnings(
            "ignore", message=r"layers .* are experiments\.methods\.CosineLinear,", category=normopt.OverriddenForwardWarning
        )
        run.specs = normopt.layer_specs(run.model, example)
    run.net = nn.parallel.DistributedDataParallel(run.model) if dist.is_initialized() else run.model
    run.optimizer, run.svc = make_optimizer(config, run.net, example, run.specs)
    run.scheduler = torch.optim.lr_scheduler.MultiStepLR(run.optimizer, milestones=scheduler_milestones(config), gamma=0.1)
    run.scaler = torch.amp.GradScaler("cuda", enabled=config.amp and where.type == "cuda")
    run.history, run.norms, run.start = [], layer_norm_rows(run.model, run.specs, 0), 1
    run.step_norms = {"step": [], "layer": list(run.specs), "l1": [], "linf": []}
    return run


def check_svc_clips(config: RunConfig, train_size: int) -> None:
    """Refuse an SVC run that would never clip: with the released timing it clips at the second
    batch of each epoch (index 1 modulo ``svc_every``), which an epoch of one batch never reaches;
    it trained as plain SGD under the SVC label.

    Raises:
        UserError: the epoch holds one batch per process.
    """
    if config.method != "svc" or config.svc_timing != "released":
        return
    batches = math.ceil(train_size / _world_size() / config.batch_size)
    if batches < 2:
        raise UserError(
            f"--method svc clips at the second batch of each epoch (the released timing), and an epoch of "
            f"{train_size} images in batches of {config.batch_size} has {batches}: it would never clip; "
            "choose a smaller --batch-size"
        )


def scheduler_milestones(config: RunConfig) -> list[int]:
    """MultiStepLR milestones so that epoch ``m`` (1-based) of ``config.milestones`` is the first
    trained at the lowered rate, as the released scripts set the lr before each epoch: the
    scheduler steps after each epoch, so it must drop after epoch ``m - 1``."""
    return [m - 1 for m in config.milestones]


def step_norms(model: nn.Module, specs) -> torch.Tensor:
    """Every layer's l1 and l_inf norm now, as a (2, layers) tensor (no host sync; HE: :func:`applied_tensors`)."""
    with torch.no_grad():
        tensors = applied_tensors(model)
        return torch.stack(
            [torch.stack(list(normopt.layer_norms(tensors, specs, ord).values())).float() for ord in (1, math.inf)]
        )


def _load_state(run: SimpleNamespace, state: dict) -> None:
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    if run.svc is not None:
        run.svc.load_state_dict(state["svc"])
    run.history, run.norms, run.start = state["history"], state["norms"], state["epoch"] + 1
    run.step_norms = state.get("step_norms", run.step_norms)


def _misfit(error: Exception) -> bool:
    """Whether ``error``, raised loading a checkpoint's state into a freshly built run, says the state
    does not fit the run (another run's), rather than that loading failed (out of memory, a bug):
    only the former sets a checkpoint aside. A module's ``load_state_dict`` raises a RuntimeError
    of "Error(s) in loading state_dict"; an optimizer's a ValueError or KeyError."""
    if isinstance(error, (KeyError, ValueError, TypeError, IndexError)):
        return True
    return isinstance(error, RuntimeError) and str(error).startswith("Error(s) in loading state_dict")


def restore(config: RunConfig, out: str, where: torch.device) -> SimpleNamespace:
    """The run of ``config``, continued from the newest good checkpoint in ``out``: damaged ones, and
    ones of another run (copied in: another configuration recorded in it, or a state that does not
    fit this run), are reported and set aside, and the run is built anew before the next is tried
    (never resumed half-loaded). Any other error while loading (out of memory) stops the run, its
    checkpoints kept."""
    run = build(config, where)

    def accept(state: dict) -> None:
        nonlocal run
        _check_world_size(state.get("history", []), out)
        trained = lambda options: {k: v for k, v in options.items() if k not in EVALUATION}
        changed = differences(trained(state.get("config", config.as_dict())), trained(config.as_dict()))
        if state.get("definition", config.definition()) != config.definition():
            changed.append(f"definition of {config.method!r}")
        if changed:  # checkpoints written before runs recorded their configuration in them have none
            raise checkpoints.ForeignCheckpoint(f"another configuration: {'; '.join(changed)}")
        try:
            _load_state(run, state)
        except Exception as error:
            if not _misfit(error):
                raise
            run = build(config, where)
            raise checkpoints.ForeignCheckpoint(f"{type(error).__name__}: {' '.join(str(error).split())[:200]}") from None

    checkpoints.load_latest(out, map_location=where, report=checkpoints.eprint, accept=accept)
    return run


def _note_threads(history: list[dict], report: bool) -> None:
    """Say so where a run resumes with another thread count than its last epoch ran with: its
    figures move with the count (one run's clean accuracy 0.9867 at 2 threads, 0.9711 at 1)."""
    ran, now = (history[-1].get("threads") if history else None), torch.get_num_threads()
    if report and ran is not None and ran != now:
        checkpoints.eprint(
            f"note: epoch {history[-1]['epoch']} ran with {ran} threads and this resume with {now}: the figures move "
            f"with the thread count (--threads {ran} resumes as it ran); each epoch records its own"
        )


def _check_world_size(history: list[dict], out: str) -> None:
    """Refuse to resume a run with another number of processes than it was trained with.

    ``--batch-size`` is per process, so the number of processes is part of what a run trains: a
    two-process run resumed by one took half the images per step from there on, under the same
    fingerprint, without a word.

    Raises:
        UserError: the last epoch recorded ran with another number of processes.
    """
    trained = history[-1].get("world_size", 1) if history else None
    if trained is not None and trained != _world_size():
        how = f"torchrun --nproc_per_node {trained} -m experiments.train" if trained > 1 else "python -m experiments.train"
        raise UserError(
            f"{out} was trained with {trained} process{'es' if trained > 1 else ''} and this is {_world_size()}: "
            f"--batch-size is per process, so the run would go on with another batch; resume it with {how} ..., "
            "or start it in a new --out"
        )


def train_epoch(config: RunConfig, run: SimpleNamespace, epoch: int, where: torch.device) -> dict:
    """One pass over the training set; the epoch's row of the history."""
    # Seeded per epoch, so a resumed run draws the same batches and augmentations.
    torch.manual_seed(config.seed * 100_003 + epoch)
    batches = loader(
        run.train_set, config.batch_size, True, seed=config.seed * 100_003 + epoch, distributed=dist.is_initialized()
    )
    if dist.is_initialized():
        batches.sampler.set_epoch(epoch)
    run.net.train()
    # Summed on the device and read once per epoch: a float() of the loss every step waited for
    # the device at every step.
    total = correct = torch.zeros((), dtype=torch.float64, device=where)
    seen = steps = 0
    first = sum(row["steps"] for row in run.history)  # steps before this epoch
    recorded, at = [], []
    for x, y in batches:
        if (first + steps) % config.norms_every == 0:
            at.append(first + steps)
            recorded.append(step_norms(run.model, run.specs))
        x, y = x.to(where), y.to(where)
        run.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(where.type, enabled=config.amp and where.type == "cuda"):
            loss, logits = loss_of(config, run.net, x, y)
        run.scaler.scale(loss).backward()
        if run.svc is not None and config.svc_timing == "released" and steps % config.svc_every == 1:
            run.svc.clip()  # the released scripts clip after backward, before the step
        run.scaler.step(run.optimizer)
        run.scaler.update()
        total = total + loss.detach().to(total.dtype) * len(y)
        correct = correct + (logits.argmax(1) == y).sum()
        seen += len(y)
        steps += 1
    run.scheduler.step()
    if recorded:  # one host transfer per epoch
        values = torch.stack(recorded).cpu().tolist()
        run.step_norms["step"] += at
        run.step_norms["l1"] += [v[0] for v in values]
        run.step_norms["linf"] += [v[1] for v in values]
    test_accuracy = evaluate(run.model, run.test_set, where)
    sums = torch.stack([total, correct, torch.tensor(float(seen), dtype=total.dtype, device=where)])
    if dist.is_initialized():  # every rank's share of the epoch, not rank 0's alone
        dist.all_reduce(sums)
    total, correct, seen = sums.tolist()
    return {"epoch": epoch, "loss": total / seen, "train_accuracy": correct / seen, "test_accuracy": test_accuracy} | {
        "steps": steps,
        "world_size": _world_size(),
        # Not part of the run's identity (the same configuration on another machine), but its
        # figures move with it: recorded, so that a run says which counts made it.
        "threads": torch.get_num_threads(),
    }


def save(run: SimpleNamespace, out: str, epoch: int, config: RunConfig) -> None:
    """A checkpoint of ``run`` after ``epoch``, with the configuration that made it (so that a
    resume knows another run's checkpoint copied into the folder)."""
    state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict()}
    state.update(config=config.as_dict(), definition=config.definition())
    state.update(scaler=run.scaler.state_dict(), svc=run.svc.state_dict() if run.svc else None, epoch=epoch)
    checkpoints.save(out, epoch, {**state, "history": run.history, "norms": run.norms, "step_norms": run.step_norms})


def robust_evaluation(config: RunConfig, run: SimpleNamespace, where: torch.device) -> dict:
    """Clean accuracy on the full test set (as the released scripts report it), and clean and
    robust accuracy on a random subset drawn with the run's seed (the released scripts attack the
    first batch of a shuffled loader); attacks seeded from the run's seed. With ``config.sweep``,
    ``"sweep"`` maps each radius (1/255 units) to the robust accuracy there."""
    images, labels = _subset(run.test_set, config.eval_images, config.seed)

    def at(radius: float) -> dict:
        torch.manual_seed(config.seed)
        np.random.seed(config.seed % 2**32)  # ART draws its random starts from NumPy
        return robust_accuracy(
            run.model,
            images.to(where),
            labels.to(where),
            radius,
            attacks=config.attacks,
            iterations=config.eval_iterations,
            targets=config.eval_targets,
            seed=config.seed,
        )

    result = at(config.eval_eps)
    result["clean subset"] = result["clean"]
    result["clean"] = evaluate(run.model, run.test_set, where)
    if config.sweep:
        radii = sorted({*config.sweep, config.eval_eps})
        result["sweep"] = {f"{r:g}": (result["robust"] if r == config.eval_eps else at(r)["robust"]) for r in radii}
    return result


def _same_run(result: dict, config: RunConfig) -> bool:
    """Whether ``result`` is of the run ``config``: the same options (as :func:`claim_folder`
    compares them) and the same definition of its method. A result written before it recorded
    the definition is this run's if its fingerprint is, or if the method's definition has not
    gained what changed such results since (HE's last-layer norms, of the raw W before)."""
    if differences(result.get("config", {}), config.as_dict()):
        return False
    if "definition" in result:
        return result["definition"] == config.definition()
    return result.get("fingerprint") == config.fingerprint() or "last_layer_norms" not in config.definition()


def _result_of(path: str, config: RunConfig) -> dict:
    """The result in ``path`` of the run ``config`` (:func:`_same_run`).

    Raises:
        checkpoints.DamagedFile: the file is damaged, or another run's.
    """
    result = checkpoints.read_json(path)
    if "accuracy" not in result or not _same_run(result, config):
        raise checkpoints.DamagedFile(f"{path} is not the result of this run")
    return result


def is_finished(path: str, config: RunConfig) -> bool:
    """Whether :func:`finished_result` would take ``path``'s result, read only: what a study says of
    a run before training it (it said "done" of a damaged result, then evaluated the run again)."""
    try:
        return os.path.exists(path) and bool(_result_of(path, config))
    except checkpoints.DamagedFile:
        return False


def finished_result(path: str, config: RunConfig) -> dict | None:
    """The result in ``path`` of the run ``config`` (:func:`_same_run`), or None where the file is
    damaged or another run's: then it is renamed ``*.damaged`` (reported), and the run is
    evaluated again from its last checkpoint."""
    try:
        result = _result_of(path, config)
    except checkpoints.DamagedFile as error:
        kept = checkpoints.set_aside(path)
        checkpoints.eprint(f"warning: {error}; set aside as {kept}, evaluating the run again")
        return None
    return result


def check_device(config: RunConfig) -> None:
    """Refuse what this machine cannot run (a dry run meets it too)."""
    if config.amp and not torch.cuda.is_available():
        # It would train in float32 under the fingerprint of a mixed-precision run, whose scaler
        # state a GPU could then not load.
        raise UserError("--amp (mixed precision) needs a CUDA device, and there is none here: leave it out")


@functools.cache
def _model_input_error(model: str, dataset_name: str) -> str | None:
    """Why ``model`` cannot take one image of ``dataset_name`` (torch's error), or None."""
    channels, height, width = shape_of(dataset_name)
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # the runs' own draws stay as they were
        try:
            build_model(model, 10, channels).eval()(torch.zeros(1, channels, height, width))
        except RuntimeError as error:
            return str(error).splitlines()[0]
    return None


def check_model_fits(config: RunConfig) -> None:
    """Refuse a model that cannot take the data set's images (VGG's five max-pools need more than
    the digits' 8x8: a traceback, after the run folder was claimed)."""
    error = _model_input_error(config.model, config.dataset)
    if error is not None:
        _, height, width = shape_of(config.dataset)
        raise UserError(
            f"--model {config.model} cannot take the {config.dataset} images ({height}x{width}: {error}); choose "
            "another model or data set"
        )


def holds_run(out: str) -> bool:
    """Whether the folder ``out`` holds (part of) a run: a checkpoint or a result."""
    return bool(checkpoints.epochs(out)) or os.path.exists(os.path.join(out, "result.json"))


def check_run(config: RunConfig, out: str, resume: bool) -> None:
    """What :func:`train` would refuse before training, found without writing anything (dry runs)."""
    check_device(config)
    check_model_fits(config)
    claim_folder(config, out, resume, write=False)


def train(config: RunConfig, out: str, resume: bool = True, progress: bool = True) -> dict:
    """Train (or resume), evaluate, and write ``out/result.json``; returns the result.

    ``result["diverged"]`` is None, or why the run diverged (:func:`divergence`); a diverged run is
    not attacked, its accuracies are NaN.

    Raises:
        UserError: ``out`` is not writable, is locked by another process, or holds another
            configuration; or the model cannot take the data set's images.
    """
    check_device(config)
    check_model_fits(config)
    if _distributed() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():  # each process its own GPU, before the first collective (NCCL's objects go there)
            torch.cuda.set_device(device())
    result_path = os.path.join(out, "result.json")
    with contextlib.ExitStack() as stack:
        if _is_main():
            stack.enter_context(checkpoints.locked(out))
            if claim_folder(config, out, resume):
                # Taken back if the run fails before its first checkpoint (its data missing, say).
                stack.enter_context(checkpoints.taken_back_on_failure(os.path.join(out, "config.json"), lambda: holds_run(out)))
            for name in checkpoints.remove_temporaries(out):
                checkpoints.eprint(f"  removed {name}, left by a write that was cut short")
        # The main process alone decides whether the run is done (it holds the lock, and sets a
        # damaged result aside); the others follow its decision.
        done = _is_main() and resume and os.path.exists(result_path) and finished_result(result_path, config) is not None
        if dist.is_initialized():
            decision = [done]
            dist.broadcast_object_list(decision, src=0)
            done = decision[0]
        if done:
            result = checkpoints.read_json(result_path)
            if progress and _is_main():
                _report_divergence(result)
            return result
        where = device()
        run = restore(config, out, where) if resume else build(config, where)
        check_svc_clips(config, len(run.train_set))
        _note_threads(run.history, progress and _is_main())
        for epoch in range(run.start, config.epochs + 1):
            row = train_epoch(config, run, epoch, where)
            row["non-finite"] = non_finite(run.model)  # every parameter and buffer, once per epoch
            run.history.append(row)
            run.norms += layer_norm_rows(run.model, run.specs, epoch)
            if _is_main():
                save(run, out, epoch, config)
                if progress:
                    row = run.history[-1]
                    checkpoints.eprint(
                        f"  epoch {epoch}/{config.epochs}: loss {row['loss']:.4f}, test accuracy {row['test_accuracy']:.4f}"
                    )
        # The JSON form, so a fresh run returns exactly what a finished run reads back.
        result = {"config": config.as_dict(), "definition": config.definition(), "fingerprint": config.fingerprint()}
        result.update(history=run.history, norms=run.norms)
        result["step_norms"] = run.step_norms
        result["diverged"] = divergence(run.history, run.norms)
        if not _is_main():
            # Rank 0 evaluates alone, for minutes to hours (APGD on CIFAR-10). A rank waiting for
            # it in a collective met the process group's timeout (30 min on gloo, 10 on NCCL),
            # and torchrun then stopped rank 0 mid-evaluation, on every --resume as well; the
            # other ranks' work is done.
            return result
        result["accuracy"] = not_evaluated(config) if result["diverged"] else robust_evaluation(config, run, where)
        checkpoints.write_json(result_path, result)
        if progress:
            _report_divergence(result)
        return checkpoints.read_json(result_path)


def _subset(data, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[: min(count, len(data))]
    xs, ys = zip(*(data[int(i)] for i in order))
    return torch.stack(xs), torch.tensor(ys)


@torch.no_grad()
def evaluate(model: nn.Module, data, where: torch.device) -> float:
    model.eval()
    correct = 0
    for x, y in loader(data, 512, False):
        correct += int((model(x.to(where)).argmax(1) == y.to(where)).sum())
    return correct / len(data)


def parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="python -m experiments.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", choices=["digits", "cifar10"])
    p.add_argument("--model", choices=sorted(MODELS), help="default: small (digits) or resnet18 (cifar10, the released protocol)")
    p.add_argument("--method", default="plain", choices=list(METHODS))
    cli.protocol_options(p)
    p.add_argument(
        "--strength",
        type=float,
        default=0.0,
        help="beta (norm decay), weight decay, or SVC bound (> 0); needed by those methods, refused by the others",
    )
    p.add_argument("--epochs", type=int, help="default: 15 (digits) or 120 (cifar10)")
    p.add_argument("--lr", type=float, help="default: the dataset's (cifar10: 0.01, or 0.1 for adversarial training)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int, help="seeds training, the evaluation subset and the attacks (default 0; 1 cifar10)")
    p.add_argument("--eval-images", type=int, help="test images attacked")
    p.add_argument("--eval-iterations", type=int, help="APGD iterations")
    p.add_argument("--eval-targets", type=int, help="APGD-T target classes (1-9)")
    p.add_argument("--eval-eps", type=float, help="attack radius in 1/255 (8 means 8/255; default 1, 8 for adversarial training)")
    cli.evaluation_options(p)
    p.add_argument("--bn-radius", type=float, help="batch-norm projection radius (nd-*+bn only)")
    p.add_argument("--amp", action="store_true", help="mixed precision (GPU only)")
    p.add_argument("--out", default="runs/train", type=cli.out_folder)
    p.add_argument("--resume", action="store_true", help="continue the run in OUT (its configuration must match)")
    cli.common_options(p)
    return p


def parse_args(argv=None) -> tuple[RunConfig, argparse.Namespace]:
    p = parser()
    args = p.parse_args(argv)
    names = set(RunConfig.__dataclass_fields__) - {"protocol", "dataset"}
    changes = {k: v for k, v in vars(args).items() if v is not None and k in names}
    changes.update(cli.protocol_changes(args))
    changes = {**single_run_defaults(changes.get("method"), args.dataset), **changes}
    config = cli.or_exit(
        lambda: RunConfig.resolve(args.protocol, args.dataset, **{**changes, "verify_data": not args.skip_data_checksums})
    )
    cli.check_evaluation_options(args, config.attacks)
    return config, args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    config, args = parse_args(argv)
    cli.set_threads(args.threads)
    if _is_main():
        checkpoints.eprint(f"configuration: {describe(config)}")
        checkpoints.eprint(f"run folder: {os.path.abspath(args.out)}")
        for warning in unit_warnings(config):
            checkpoints.eprint(f"warning: {warning}")
    resume_command = cli.command_line("experiments.train", argv, "--resume")
    if args.resume and _is_main() and not os.path.exists(os.path.join(args.out, "config.json")):
        checkpoints.eprint(f"note: {os.path.abspath(args.out)} holds no run to resume (a typo in --out?); starting one")
    if args.dry_run:
        cli.or_exit(lambda: cli.dry_run([(config, args.out)], lambda c, f: check_run(c, f, args.resume)))
        return
    with cli.friendly(resume_command):
        result = train(config, args.out, resume=args.resume)
    if _is_main():
        print(json.dumps(result["accuracy"]), flush=True)


if __name__ == "__main__":
    main()
