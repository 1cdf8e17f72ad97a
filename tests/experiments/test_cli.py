"""The command lines as a user meets them, through real subprocesses: planted pickles, changed
options on resume, damaged checkpoints, Ctrl-C, bad numbers, --help, locks and --dry-run."""

from __future__ import annotations

import importlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest

from experiments import checkpoints
from experiments.methods import METHODS
from experiments.models import MODELS
from tests.experiments.planted import Planted

TINY = ["--eval-images", "16", "--eval-iterations", "2", "--eval-targets", "1", "--threads", "1"]
ENV = {**os.environ, "PYTHONPATH": os.getcwd(), "PYTHONUNBUFFERED": "1"}


def run(module: str, *arguments: str, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", module, *arguments]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_a_planted_checkpoint_never_runs_and_a_changed_option_is_refused(tmp_path):
    out, marker = tmp_path / "run", tmp_path / "ran"
    done = run("experiments.train", "--epochs", "1", *TINY, "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "configuration: dataset=digits" in done.stderr and "fingerprint" in done.stderr
    os.remove(out / "result.json")
    for epoch in (1, 2):  # replace the checkpoint and plant a newer one: neither may run
        with open(checkpoints.checkpoint_path(str(out), epoch), "wb") as f:
            pickle.dump(Planted(str(marker)), f)
    done = run("experiments.train", "--epochs", "1", *TINY, "--out", str(out), "--resume")
    assert not marker.exists()
    assert "damaged checkpoint" in done.stderr and "checkpoint-2.pt" in done.stderr and done.returncode == 0

    done = run("experiments.train", "--epochs", "1", "--lr", "0.1", *TINY, "--out", str(out), "--resume")
    assert done.returncode == 2 and "lr: 0.05 -> 0.1" in done.stderr and "Traceback" not in done.stderr
    done = run("experiments.train", "--epochs", "1", *TINY, "--out", str(out))
    assert done.returncode == 2 and "--resume" in done.stderr


def test_a_damaged_checkpoint_is_reported_and_survived(tmp_path):
    out = tmp_path / "run"
    assert run("experiments.train", "--epochs", "2", *TINY, "--out", str(out)).returncode == 0
    first = json.load(open(out / "result.json"))
    os.remove(out / "result.json")
    path = checkpoints.checkpoint_path(str(out), 2)
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)
    open(path, "wb").write(bytes(raw))
    done = run("experiments.train", "--epochs", "2", *TINY, "--out", str(out), "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"damaged checkpoint {path}" in done.stderr and os.path.exists(path + ".damaged")
    again = json.load(open(out / "result.json"))
    assert again["history"] == first["history"] and again["accuracy"] == first["accuracy"]


def test_another_runs_checkpoint_copied_in_is_set_aside_and_the_run_resumes_from_its_own(tmp_path):
    """A checkpoint with a valid checksum but another model's state ended --resume in a traceback
    (RuntimeError: Missing key(s) in state_dict), after loading some of it into the run."""
    out, other = tmp_path / "run", tmp_path / "other"
    assert run("experiments.train", "--epochs", "2", *TINY, "--out", str(out)).returncode == 0
    first = json.load(open(out / "result.json"))
    assert run("experiments.train", "--epochs", "1", "--method", "pgd-at-he", *TINY, "--out", str(other)).returncode == 0
    os.remove(out / "result.json")
    path = checkpoints.checkpoint_path(str(out), 2)
    shutil.copyfile(checkpoints.checkpoint_path(str(other), 1), path)
    done = run("experiments.train", "--epochs", "2", *TINY, "--out", str(out), "--resume")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"damaged checkpoint {path}: not this run's (another configuration: " in done.stderr
    assert "method: 'pgd-at-he' -> 'plain'" in done.stderr and os.path.exists(path + ".damaged")
    again = json.load(open(out / "result.json"))  # resumed from epoch 1, its own: the same run
    assert again["history"] == first["history"] and again["accuracy"] == first["accuracy"]


def test_ctrl_c_exits_130_naming_the_resume_command(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "experiments.train", "--epochs", "200", *TINY, "--out", str(out)]
    process = subprocess.Popen(command, env=ENV, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 120
    for line in process.stderr:
        lines.append(line)
        if "epoch 1/200" in line or time.monotonic() > deadline:
            break
    process.send_signal(signal.SIGINT)
    rest = process.communicate(timeout=120)[1]
    assert process.returncode == 130, "".join(lines) + rest
    assert "Traceback" not in rest and "resume with" in rest
    resume = rest.strip().splitlines()[-1].strip()
    assert resume.endswith("--resume") and f"--out {out}" in resume and "--epochs 200" in resume
    assert checkpoints.epochs(str(out))  # finished epochs were saved


BAD = [
    ("experiments.train", ["--epochs", "0"], "--epochs"),
    ("experiments.train", ["--epochs", "-1"], "--epochs"),
    ("experiments.train", ["--method", "nd-linf", "--strength", "-0.1"], "--strength"),
    ("experiments.train", ["--eval-eps", "-1"], "--eval-eps"),
    ("experiments.train", ["--eval-images", "0"], "--eval-images"),
    ("experiments.train", ["--bn-radius", "-2"], "--bn-radius"),
    ("experiments.train", ["--threads", "0"], "--threads"),
    ("experiments.train", ["--model", "lenet"], "lenet"),
    ("experiments.regularize", ["--epochs", "0"], "--epochs"),
    ("experiments.regularize", ["--eval-eps", "-1"], "--eval-eps"),
    ("experiments.regularize", ["--eval-targets", "0"], "--eval-targets"),
    ("experiments.regularize", ["--shard", "3/2"], "--shard"),
    ("experiments.adversarial", ["--eval-images", "-5"], "--eval-images"),
    ("experiments.speed", ["--iterations", "0"], "--iterations"),
    ("experiments.speed", ["--repeats", "-1"], "--repeats"),
    ("experiments.train", ["--eval-eps", "inf"], "--eval-eps"),
    ("experiments.adversarial", ["--eval-eps", "inf"], "--eval-eps"),
    ("experiments.regularize", ["--sweep", "4,inf"], "--sweep"),
    # Past the whole pixel range; and an empty list ("--sweep $RADII", RADII unset) taken as none.
    ("experiments.train", ["--eval-eps", "300"], "--eval-eps must be at most 255"),
    ("experiments.adversarial", ["--sweep", "4,1e300"], "--sweep radius must be at most 255"),
    ("experiments.regularize", ["--sweep", ","], "--sweep takes comma-separated radii, got ','"),
    # Options no chosen attack reads: ignored, yet another run of the same measurement.
    ("experiments.train", ["--attacks", "pgd", "--eval-iterations", "7"], "--eval-iterations is not used by --attacks pgd"),
    (
        "experiments.regularize",
        ["--attacks", "apgd-ce", "--eval-targets", "2"],
        "--eval-targets is not used by --attacks apgd-ce",
    ),
    ("experiments.train", ["--method", "pgd-at", "--strength", "0.5"], "--strength is not used by --method pgd-at"),
    ("experiments.train", ["--method", "nd-linf"], "--method nd-linf needs --strength > 0"),
    ("experiments.train", ["--bn-radius", "2"], "--bn-radius is not used by --method plain"),
    ("experiments.train", ["--method", "wd", "--strength", "0.1", "--released-skips"], "--released-skips is not used"),
    ("experiments.adversarial", ["--released-skips"], "--released-skips is used only by norm decay"),
    ("experiments.train", ["--seed", "100000000000000000"], "--seed"),
    # A study's seeds were reported as "--seed must be ...", an option the studies do not have.
    ("experiments.regularize", ["--seeds", "0,4294967296"], "--seeds must be integers in [0, 4294967295], got 4294967296"),
    ("experiments.adversarial", ["--seeds", "0,-1"], "--seeds must be integers in [0, 4294967295], got -1"),
]


@pytest.mark.parametrize(("module", "arguments", "named"), BAD, ids=[f"{m[12:]} {' '.join(a)}" for m, a, _ in BAD])
def test_each_bad_number_exits_2_in_one_line(module, arguments, named, tmp_path, capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit:
        main([*arguments, "--out", str(tmp_path / "out"), "--dry-run"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and named in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize(
    "module",
    ["experiments.__main__", "experiments.train", "experiments.regularize", "experiments.adversarial", "experiments.speed"],
)
def test_an_empty_out_is_refused_before_anything_is_written(module, tmp_path, monkeypatch, capsys):
    """--out "$OUT" with OUT unset: the studies wrote to their default folder, and the main job
    into the current one, failing at its last step after all its training (a helper's hunt)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:
        importlib.import_module(module).main(["--out", "", "--dry-run"])
    assert exit.value.code == 2 and "argument --out: an empty folder" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(("module", "arguments", "named"), [BAD[0], BAD[2], BAD[8], BAD[13]])
def test_bad_numbers_through_the_real_command_line(module, arguments, named, tmp_path):
    done = run(module, *arguments, "--out", str(tmp_path / "out"), timeout=120)
    assert done.returncode == 2 and named in done.stderr and "Traceback" not in done.stderr
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("module", ["experiments.train", "experiments.regularize", "experiments.adversarial"])
def test_help_lists_every_choice(module, capsys):
    with pytest.raises(SystemExit) as exit:
        importlib.import_module(module).main(["--help"])
    text = capsys.readouterr().out
    assert exit.value.code == 0 and all(m in text for m in MODELS)
    if module != "experiments.adversarial":  # its methods are fixed: plain and the three adversarial trainings
        assert all(m in text for m in (METHODS if module == "experiments.train" else ["nd-l1", "nd-linf", "wd", "svc"]))


def test_a_second_writer_and_a_file_as_output_folder_are_refused(tmp_path):
    with checkpoints.locked(str(tmp_path / "run")):
        done = run("experiments.train", "--epochs", "1", *TINY, "--out", str(tmp_path / "run"))
    assert done.returncode == 2 and "another process" in done.stderr and "Traceback" not in done.stderr
    (tmp_path / "file").write_text("")
    done = run("experiments.train", "--epochs", "1", *TINY, "--out", str(tmp_path / "file"))
    assert done.returncode == 2 and "is a file" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("module", "arguments", "named"),
    [
        ("experiments.train", ["--eval-eps", "0.031"], "--eval-eps 0.031 is below 1"),
        ("experiments.adversarial", ["--eval-eps", "0.031", "--methods", "plain"], "--eval-eps 0.031 is below 1"),
        ("experiments.regularize", ["--sweep", "4,0.5", "--methods", "plain"], "--sweep radius 0.5 is below 1"),
    ],
)
def test_an_attack_radius_below_one_warns_that_the_unit_is_1_over_255(module, arguments, named, tmp_path, capsys):
    """--eval-eps 0.031 (meant as 8/255) attacked at 0.031/255 without a word."""
    importlib.import_module(module).main([*arguments, "--threads", "1", "--out", str(tmp_path / "out"), "--dry-run"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and named in warnings[0] and "1/255 units" in warnings[0]
    assert "pass 7.9" in warnings[0] or "pass 128" in warnings[0]


def test_released_skips_in_a_study_reach_only_its_norm_decay_runs(tmp_path, capsys):
    from experiments import regularize

    out = str(tmp_path / "s")
    regularize.main(["--methods", "plain,wd,nd-l1", "--released-skips", "--threads", "1", "--out", out, "--dry-run"])
    resolved = [
        json.loads(line.split(" ", 1)[1]) for line in capsys.readouterr().out.splitlines() if line.startswith("resolved ")
    ]
    skips = {r["method"]: r["skip_layers"] for r in resolved}
    assert skips == {"plain": "none", "wd": "none", "nd-l1": "released"}


def _skips_study(skips: bool):
    from experiments.config import RunConfig

    nd = {"method": "nd-l1", "strength": 0.1, "skip_layers": "released" if skips else "none"}
    return [RunConfig(), RunConfig(**nd)]


@pytest.mark.parametrize(
    ("saved", "skips", "refused"),
    [
        ("old", True, None),  # a folder the old code made with --released-skips: the same command resumes it
        ("old", False, "skip_layers: 'released' -> 'none'"),
        (True, True, None),
        (True, False, "skip_layers: 'released' -> 'none'"),  # was accepted as the same study
        (False, True, "skip_layers: 'none' -> 'released'"),  # was accepted as the same study
        (False, False, None),
    ],
)
def test_released_skips_are_part_of_the_study(tmp_path, saved, skips, refused):
    """identity() read the options off the first run (plain, without skips): a folder made with
    --released-skips by the old code could not be resumed by the same command, and the same --out
    took the study with and without the switch as one study."""
    from experiments.config import UserError
    from experiments.study import claim_study, identity

    out = str(tmp_path / "s")
    if saved == "old":  # what the old code wrote: every run, plain included, carried the switch
        study = identity("regularize", _skips_study(False))
        study["options"]["skip_layers"] = "released"
        os.makedirs(out)
        checkpoints.write_json(os.path.join(out, "study.json"), study)
    else:
        claim_study(out, identity("regularize", _skips_study(saved)))
    if refused is None:
        claim_study(out, identity("regularize", _skips_study(skips)))
    else:
        with pytest.raises(UserError, match=refused):
            claim_study(out, identity("regularize", _skips_study(skips)))


@pytest.mark.parametrize("skips", [True, False])
def test_a_study_echoes_its_released_skips(tmp_path, capsys, skips):
    from experiments import regularize

    switch = ["--released-skips"] if skips else []
    regularize.main(["--methods", "plain,nd-l1", *switch, "--threads", "1", "--out", str(tmp_path / "s"), "--dry-run"])
    echoed = [line for line in capsys.readouterr().err.splitlines() if "shared configuration" in line]
    assert len(echoed) == 1 and f"skip_layers={'released' if skips else 'none'} " in echoed[0]


def test_dry_run_prints_the_runs_and_trains_nothing(tmp_path):
    done = run("experiments.regularize", "--methods", "plain,nd-l1", "--dry-run", "--out", str(tmp_path / "s"))
    assert done.returncode == 0 and "dry run: 3 run(s)" in done.stderr and "seed=0" in done.stderr
    resolved = [json.loads(line.split(" ", 1)[1]) for line in done.stdout.splitlines() if line.startswith("resolved ")]
    assert [(r["method"], r["strength"]) for r in resolved] == [("plain", 0.0), ("nd-l1", 0.01), ("nd-l1", 0.1)]
    assert not os.path.exists(tmp_path / "s")


def test_threads_are_set_once_for_torch_and_blas():
    code = (
        "import torch, threadpoolctl; from experiments import cli; cli.set_threads(1);"
        "print(torch.get_num_threads(), {p['num_threads'] for p in threadpoolctl.threadpool_info()})"
    )
    done = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.stdout.split(None, 1) == ["1", "{1}\n"], done.stderr


@pytest.mark.parametrize(("cores", "busy", "expected"), [(2, 0, 2), (2, 1, 1), (2, 2, 1), (2, 5, 1), (16, 3, 13)])
def test_default_threads_leave_the_busy_cores_alone(monkeypatch, cores, busy, expected):
    from experiments import cli

    monkeypatch.setattr(cli, "available_cores", lambda: cores)
    monkeypatch.setattr(cli, "busy_cores", lambda: busy)
    assert cli.default_threads()[0] == expected


def test_busy_cores_sees_a_spinning_process():
    from experiments import cli

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it start spinning
        assert cli.busy_cores() >= 1
    finally:
        spinner.kill()
        spinner.wait()
