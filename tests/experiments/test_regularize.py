"""The regularization study on a tiny configuration: outputs, resume, bad arguments."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

import experiments.train as training
from experiments import regularize

TINY = ["--epochs", "1", "--eval-images", "16", "--eval-iterations", "2", "--eval-targets", "1"]


def test_tiny_study_writes_tables_norms_and_figures(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "study")
    regularize.main([*TINY, "--methods", "plain,nd-l1,svc", "--out", out])
    printed = capsys.readouterr()
    assert os.path.abspath(out) in printed.err and "| model | method |" in printed.out
    table = pd.read_csv(os.path.join(out, "results.csv"))
    assert len(table) == 1 + 2 + 2 and {"clean acc", "robust acc", "sum l1", "sum linf"} <= set(table.columns)
    assert table["robust acc"].le(table["clean subset acc"]).all()
    for name in (
        "results.md",
        "results.tex",
        "norms.csv",
        "conv_linear_norms.png",
        "batchnorm_norms.png",
        "layer_norms_small.png",
    ):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    norms = pd.read_csv(os.path.join(out, "norms.csv"))
    assert set(norms.kind) == {"conv", "batchnorm", "linear"} and set(norms.epoch) == {0, 1}

    monkeypatch.setattr(training, "build_model", lambda *a: pytest.fail("a finished run was trained again"))
    regularize.main([*TINY, "--methods", "plain,nd-l1,svc", "--out", out])  # resumes: nothing retrained


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--models", "lenet"], "unknown model"),
        (["--methods", "dropout"], "unknown method"),
        (["--dataset", "mnist"], "invalid choice"),
        (["--models", ","], "--models needs at least one name"),
        (["--methods", ""], "--methods needs at least one name"),  # an empty variable: not the whole default grid
    ],
)
@pytest.mark.parametrize("study", ["regularize", "adversarial"])
def test_bad_arguments_exit_with_code_two(arguments, message, study, tmp_path, capsys):
    from experiments import adversarial

    with pytest.raises(SystemExit) as exit:
        {"regularize": regularize, "adversarial": adversarial}[study].main([*arguments, "--out", str(tmp_path)])
    assert exit.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("study", ["regularize", "adversarial"])
def test_a_study_under_torchrun_is_refused_before_any_work(study, tmp_path, monkeypatch, capsys):
    """Every rank trained every run as a DDP run and wrote the same tables at once (review)."""
    from experiments import adversarial

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(SystemExit) as exit:
        {"regularize": regularize, "adversarial": adversarial}[study].main([*TINY, "--out", str(tmp_path / "study")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "a study runs in one process" in err and "--shard" in err
    assert "WORLD_SIZE=2 is set" in err
    assert not os.path.exists(tmp_path / "study")


def test_missing_cifar10_exits_with_code_two(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        regularize.main(
            ["--dataset", "cifar10", "--data-dir", str(tmp_path / "none"), "--methods", "plain", "--out", str(tmp_path)]
        )
    assert exit.value.code == 2 and "CIFAR-10 not found" in capsys.readouterr().err
    # Found before the study claims --out: its study.json refused every other study there.
    assert os.listdir(tmp_path) == []
    regularize.main([*TINY, "--methods", "plain", "--out", str(tmp_path)])


def test_a_study_that_fails_before_any_run_holds_a_checkpoint_takes_back_its_claim(tmp_path, monkeypatch):
    """A study whose first run crashed in its first epoch left its study.json, which refused
    every other study in that --out though it held no run."""
    from experiments import study

    out = str(tmp_path / "study")

    def crash(config, folder, resume=True):
        raise RuntimeError("out of memory in the first epoch")

    monkeypatch.setattr(study, "train", crash)
    with pytest.raises(RuntimeError, match="first epoch"):
        regularize.main([*TINY, "--methods", "plain", "--out", out])
    assert not os.path.exists(os.path.join(out, "study.json"))

    def crash_after_a_result(config, folder, resume=True):
        os.makedirs(folder, exist_ok=True)
        training.checkpoints.write_json(os.path.join(folder, "result.json"), {})
        raise RuntimeError("crashed after its first run")

    monkeypatch.setattr(study, "train", crash_after_a_result)
    with pytest.raises(RuntimeError, match="after its first run"):
        regularize.main([*TINY, "--methods", "plain", "--seeds", "1", "--out", out])
    assert json.load(open(os.path.join(out, "study.json")))["options"]["seeds"] == [1]  # a run holds a result: kept


def test_a_collect_that_finds_no_finished_run_leaves_the_folder_free(tmp_path, capsys):
    """--collect into a folder with no finished run failed ("no finished runs") but left its
    study.json, which then refused every other study there (a helper's hunt)."""
    out = str(tmp_path / "study")
    with pytest.raises(SystemExit) as exit:
        regularize.main([*TINY, "--methods", "plain", "--out", out, "--collect"])
    assert exit.value.code == 2 and "no finished runs" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "study.json"))
    regularize.main([*TINY, "--methods", "plain", "--epochs", "2", "--out", out, "--dry-run"])
    assert "dry run: 1 run(s)" in capsys.readouterr().err


def test_another_seed_is_another_study_and_never_overwrites(tmp_path, capsys):
    out = str(tmp_path / "study")
    regularize.main([*TINY, "--methods", "plain", "--out", out])
    before = open(os.path.join(out, "results.csv")).read()
    with pytest.raises(SystemExit) as exit:
        regularize.main([*TINY, "--methods", "plain", "--seeds", "1", "--out", out])
    assert exit.value.code == 2 and "seeds: [0] -> [1]" in capsys.readouterr().err
    assert open(os.path.join(out, "results.csv")).read() == before


def test_two_shards_at_once_then_collect_equal_one_unsharded_run(tmp_path):
    arguments = [sys.executable, "-m", "experiments.regularize", *TINY, "--methods", "plain,nd-l1", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    sharded, whole = str(tmp_path / "sharded"), str(tmp_path / "whole")
    shards = [
        subprocess.Popen([*arguments, "--out", sharded, "--shard", f"{k}/2"], env=env, stderr=subprocess.PIPE, text=True)
        for k in (1, 2)
    ]
    errors = [shard.communicate(timeout=600)[1] for shard in shards]
    assert [shard.returncode for shard in shards] == [0, 0], errors
    assert not os.path.exists(os.path.join(sharded, "results.csv"))  # a shard writes no tables
    collected = subprocess.run([*arguments, "--out", sharded, "--collect"], env=env, capture_output=True, text=True, timeout=300)
    assert collected.returncode == 0, collected.stderr
    done = subprocess.run([*arguments, "--out", whole], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    for name in ("results.csv", "norms.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(os.path.join(sharded, name)), pd.read_csv(os.path.join(whole, name)))


def test_a_dry_run_meets_the_refusals_of_the_real_run_without_writing(tmp_path, capsys):
    out = str(tmp_path / "study")
    regularize.main([*TINY, "--methods", "plain", "--out", out])
    before = sorted(os.listdir(out))
    for changed, named in (
        (["--methods", "plain,wd"], "added: ["),  # another study: the runs named
        (["--methods", "plain", "--epochs", "2"], "epochs"),
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit:
            regularize.main([*TINY, *changed, "--out", out, "--dry-run"])
        assert exit.value.code == 2 and named in capsys.readouterr().err
    assert sorted(os.listdir(out)) == before


def test_collect_sets_aside_a_result_of_another_run_instead_of_tabling_it(tmp_path, capsys):
    """A result.json of seed 1 copied into seed 0's folder went into the collected tables: two seed-1
    rows, no seed 0, no word (a helper's hunt); a study without --collect set it aside."""
    import shutil

    out = str(tmp_path / "study")
    arguments = [*TINY, "--methods", "plain", "--seeds", "0,1", "--out", out]
    for k in (1, 2):
        regularize.main([*arguments, "--shard", f"{k}/2"])
    folders = {
        json.load(open(os.path.join(f, "config.json")))["config"]["seed"]: f for f in glob.glob(os.path.join(out, "*", "plain-*"))
    }
    shutil.copy(os.path.join(folders[1], "result.json"), os.path.join(folders[0], "result.json"))
    capsys.readouterr()
    regularize.main([*arguments, "--collect"])
    err = capsys.readouterr().err
    assert "is not the result of this run" in err and "1 run(s) not finished yet" in err
    assert "  small plain seed 0\n" in err  # which of the runs (the list named no seed)
    assert pd.read_csv(os.path.join(out, "results.csv"))["seed"].tolist() == [1]
    assert os.path.exists(os.path.join(folders[0], "result.json.damaged"))


def test_a_model_named_twice_runs_once(tmp_path, capsys):
    """--models small,small trained and tabled each run twice (a helper's hunt)."""
    regularize.main([*TINY, "--models", "small,small", "--methods", "plain", "--out", str(tmp_path / "s"), "--dry-run"])
    assert "dry run: 1 run(s)" in capsys.readouterr().err


def test_shards_are_the_same_whatever_the_order_of_the_seeds_and_methods(tmp_path, capsys):
    """Shards were dealt in command-line order while the study check sorts: shard 1 of --seeds 0,1
    and shard 2 of --seeds 1,0 trained the same half, and the other half never (a helper's hunt)."""
    out = str(tmp_path / "s")

    def runs(seeds, methods, k):
        capsys.readouterr()
        regularize.main([*TINY, "--methods", methods, "--seeds", seeds, "--shard", f"{k}/2", "--out", out, "--dry-run"])
        return sorted(line for line in capsys.readouterr().err.splitlines() if line.startswith("  ") and "[" in line)

    first = runs("0,1", "plain,nd-l1", 1)
    assert first == runs("1,0", "nd-l1,plain", 1)
    second = runs("1,0", "plain,nd-l1", 2)
    assert second == runs("0,1", "nd-l1,plain", 2) and not set(first) & set(second) and len(first) + len(second) == 6


def test_a_run_whose_result_is_damaged_is_not_called_done(tmp_path, capsys):
    """The study printed "done" of a run right before "evaluating the run again" (a helper's hunt)."""
    out = str(tmp_path / "study")
    regularize.main([*TINY, "--methods", "plain", "--out", out])
    (result,) = glob.glob(os.path.join(out, "*", "plain-*", "result.json"))
    open(result, "w").write('{"accuracy": ')
    capsys.readouterr()
    regularize.main([*TINY, "--methods", "plain", "--out", out])
    err = capsys.readouterr().err
    assert "small plain seed 0: training (" in err and ": done (" not in err and "evaluating the run again" in err
    capsys.readouterr()
    regularize.main([*TINY, "--methods", "plain", "--out", out])
    assert "small plain seed 0: done (" in capsys.readouterr().err
