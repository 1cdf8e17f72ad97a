from __future__ import annotations

import argparse

import pytest

from benchmarks import norms, optimizer, svc
from benchmarks.timing import count, positive_int


@pytest.mark.parametrize(("parse", "text", "value"), [(positive_int, "1", 1), (positive_int, "15", 15), (count, "0", 0)])
def test_whole_numbers_in_range_are_taken(parse, text, value):
    assert parse(text) == value


@pytest.mark.parametrize(
    ("parse", "text"), [(positive_int, "0"), (positive_int, "-1"), (count, "-1"), (count, "1.5"), (count, "x")]
)
def test_other_numbers_are_refused(parse, text):
    with pytest.raises(argparse.ArgumentTypeError, match="expected a whole number"):
        parse(text)


@pytest.mark.parametrize(
    ("main", "argv", "named"),
    [
        (norms.main, ["--repeats", "0"], "--repeats"),
        (norms.main, ["--threads", "0"], "--threads"),
        (optimizer.main, ["--train-repeats", "-1"], "--train-repeats"),
        (optimizer.main, ["--batch", "0"], "--batch"),
        (optimizer.main, ["--repeats", "0"], "--repeats"),
        (optimizer.main, ["--released", "/nonexistent"], "--released"),
        (svc.main, ["--busy", "-2"], "--busy"),
        (svc.main, ["--repeats", "0"], "--repeats"),
    ],
)
def test_a_bad_option_is_refused_by_name_before_any_work(main, argv, named, capsys):
    """They crashed after minutes of timing (no median of no repeats) or timed an empty batch."""
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize(
    ("main", "without"), [(norms.main, "--no-torchvision"), (optimizer.main, "--train-repeats 0")], ids=["norms", "optimizer"]
)
def test_without_torchvision_the_benchmarks_say_what_to_install_before_any_work(main, without, monkeypatch, capsys):
    """benchmarks.optimizer failed to import, and benchmarks.norms crashed after timing the rest."""
    import sys

    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if it were not installed
    monkeypatch.setattr(sys.modules[main.__module__], "set_threads", lambda threads: pytest.fail("work began"))
    with pytest.raises(SystemExit) as exit:
        main([])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "torchvision does not import" in err and without in err and "pip install -e '.[cifar]'" in err


def test_a_torchvision_for_another_torch_is_a_usage_error_with_its_advice(tmp_path, monkeypatch, capsys):
    """A torchvision newer than torch fails with an AttributeError, which ended in a traceback (review)."""
    import sys

    from benchmarks.timing import require_torchvision

    stub = tmp_path / "torchvision"
    stub.mkdir()
    (stub / "__init__.py").write_text("raise AttributeError(\"module 'torch.library' has no attribute 'register_fake'\")\n")
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit) as exit:
        require_torchvision(argparse.ArgumentParser(prog="bench"), "--train-repeats 0")
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "register_fake" in err and "built for another torch" in err and "--train-repeats 0" in err
