"""The main job's report: the radius sweep and the claims table, computed from two tiny studies."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from experiments import __main__ as main_job
from experiments import adversarial, regularize

TINY = ["--epochs", "2", "--eval-images", "32", "--eval-iterations", "2", "--eval-targets", "1", "--threads", "1"]
TINY += ["--seeds", "0,1", "--sweep", "4,16"]


def test_main_job_prints_the_sweep_and_the_claims(tmp_path, capsys):
    folders = {
        "regularize": regularize.main([*TINY, "--methods", "plain,wd,nd-l1,nd-linf", "--out", str(tmp_path / "r")]),
        "adversarial": adversarial.main([*TINY, "--methods", "plain,pgd-at", "--out", str(tmp_path / "a")]),
    }
    capsys.readouterr()
    main_job.report(folders, str(tmp_path))
    printed = capsys.readouterr().out
    assert "robust accuracy at each radius (regularize" in printed and "| eps 16/255 |" in printed
    claims = pd.read_csv(tmp_path / "claims.csv")
    assert set(claims.claim) == {
        "norm decay lowers the norms",
        "norm decay, weight decay and SVC do not raise robust accuracy",
        "batch-norm norms resist norm decay",
        "adversarially trained models have norms no smaller than plain ones",
    }
    assert set(claims.holds) <= {"holds", "does not hold"} and all(claims.measured.str.len() > 10)
    sweep = pd.read_csv(os.path.join(folders["regularize"], "sweep.csv"))
    assert list(sweep.columns) == ["model", "run", "seeds", "clean", "eps 1/255", "eps 4/255", "eps 16/255"]
    assert set(sweep.seeds) == {2}


def test_ctrl_c_in_the_main_job_names_the_command_that_resumes_all_of_it(tmp_path, capsys, monkeypatch):
    from experiments import train as training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "build", interrupted)
    with pytest.raises(SystemExit) as exit:
        main_job.main(["--out", str(tmp_path), "--threads", "1"])
    err = capsys.readouterr().err
    assert exit.value.code == 130
    resume = err.split("resume with:")[1].strip()
    assert " -m experiments --out " in resume and "experiments.regularize" not in resume


@pytest.mark.parametrize(
    ("threads", "message"),
    # torch.set_num_threads overflowed, threadpoolctl ran out of memory: tracebacks
    [("0", "--threads must be at least 1"), ("100000", "--threads must be at most 1024"), (str(2**70), "at most 1024")],
)
def test_the_main_jobs_thread_count_is_checked(threads, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main_job.main(["--threads", threads, "--dry-run"])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_without_threads_the_main_job_chooses_one_count_for_every_study(tmp_path, monkeypatch, capsys):
    """Each study chose its thread count from the load at its own start: one job could train the
    regularization study at 2 threads and the adversarial one at 1 (a helper's hunt)."""
    from experiments import cli, speed

    loads = iter([(2, "default: 2 core(s)"), (1, "default: 2 core(s), 1 busy"), (1, "default: 2 core(s), 1 busy")])
    monkeypatch.setattr(cli, "default_threads", lambda: next(loads))
    given = []
    for module in (regularize, adversarial, speed):
        monkeypatch.setattr(module, "main", lambda argv, given=given: given.append(argv[argv.index("--threads") + 1]))
    main_job.main(["--out", str(tmp_path), "--dry-run"])
    printed = capsys.readouterr()
    assert given == ["2", "2", "2"] and "threads: 2 for every study (default: 2 core(s))" in printed.err
    assert "dry run: every study checked, nothing trained" in printed.out and "all studies done" not in printed.out
