"""The timing study on its smallest shape."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from experiments import speed


def test_speed_table_has_every_method_column(tmp_path, monkeypatch):
    timed = {"svd": [], "power": []}
    svd, power = speed.conv_singular_values, speed.power_iteration_norm
    monkeypatch.setattr(speed, "conv_singular_values", lambda *a, **k: timed["svd"].append(k) or svd(*a, **k))
    monkeypatch.setattr(speed, "power_iteration_norm", lambda *a, **k: timed["power"].append(k) or power(*a, **k))
    specs = []
    module_spec = speed.normopt.module_spec
    monkeypatch.setattr(speed.normopt, "module_spec", lambda *a, **k: specs.append(module_spec(*a, **k)) or specs[-1])
    out = speed.main(
        ["--quick", "--repeats", "1", "--iterations", "40", "--threads", "1", "--max-channels", "32", "--out", str(tmp_path)]
    )
    table = pd.read_csv(os.path.join(out, "speed.csv"))
    assert len(table) == 1 and table.device[0] == "cpu" and table.threads[0] == 1
    # --quick times 20 iterations: the column says its figure is scaled from them (review).
    columns = ["power iteration (40 it., scaled from 20) s", "SVD of FFT (SciPy, one call) s", "exact l1 ms", "exact l_inf ms"]
    assert table[columns].gt(0).all(axis=None)
    # What the columns name: SciPy's SVD (the default Gram eigenvalues were timed), and exactly
    # the iterations asked (tol=0 stopped at two equal estimates).
    assert [k.get("method") for k in timed["svd"]] == ["svd"]
    assert timed["power"] == [{"iterations": 20, "tol": None}]
    # The released speed_test.py's layer: nn.Conv2d's default padding 0 (it was padded by k // 2).
    assert [(s.kernel_size, s.padding, s.stride) for s in specs] == [((3, 3), ((0, 0), (0, 0)), (1, 1))]
    assert os.path.exists(os.path.join(out, "speed.md")) and os.path.exists(os.path.join(out, "speed.tex"))


def test_bad_iterations_exit_with_code_two(tmp_path):
    with pytest.raises(SystemExit) as exit:
        speed.main(["--iterations", "0", "--out", str(tmp_path)])
    assert exit.value.code == 2


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_max_channels_that_leave_no_shape_exit_2_and_keep_an_earlier_table(dry_run, tmp_path, capsys):
    """--max-channels 8 wrote an empty table over the earlier speed.* in --out and exited 0."""
    (tmp_path / "speed.csv").write_text("earlier table\n")
    with pytest.raises(SystemExit) as exit:
        speed.main(["--max-channels", "8", "--threads", "1", "--out", str(tmp_path), *dry_run])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "--max-channels 8 leaves no shape" in err and "32 channels" in err
    assert (tmp_path / "speed.csv").read_text() == "earlier table\n"


@pytest.mark.parametrize(("repeats", "calls"), [(1, 1), (3, 4)])
def test_timing_makes_one_untimed_call_first_where_it_repeats(repeats, calls):
    made = []
    assert speed._time(lambda: made.append(1), repeats, speed.torch.device("cpu")) >= 0
    assert len(made) == calls


def test_ctrl_c_says_nothing_was_saved(tmp_path, monkeypatch, capsys):
    """Ctrl-C said "finished epochs are saved; resume with", where the timing saves nothing and
    starts over (a helper's hunt)."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(speed, "measure_shape", interrupted)
    with pytest.raises(SystemExit) as exit:
        speed.main(["--quick", "--threads", "1", "--max-channels", "32", "--out", str(tmp_path / "speed")])
    err = capsys.readouterr().err
    assert exit.value.code == 130 and "nothing is written until every shape is timed" in err and "epochs" not in err
