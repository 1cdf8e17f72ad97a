"""Checkpoints: checksum after the data, weights-only loading, last two kept, damage set aside, locks."""

from __future__ import annotations

import hashlib
import os
import pickle

import pytest
import torch

from experiments import checkpoints
from experiments.checkpoints import DamagedCheckpoint
from experiments.config import UserError
from tests.experiments.planted import Planted


def state(epoch: int) -> dict:
    return {"model": {"w": torch.full((3, 4), float(epoch))}, "epoch": epoch, "history": [{"epoch": epoch, "loss": 0.5}]}


def test_save_load_round_trip_keeps_the_last_two(tmp_path):
    for epoch in range(1, 5):
        checkpoints.save(str(tmp_path), epoch, state(epoch))
    assert checkpoints.epochs(str(tmp_path)) == [3, 4]
    loaded = checkpoints.load_latest(str(tmp_path))
    assert loaded["epoch"] == 4 and torch.equal(loaded["model"]["w"], state(4)["model"]["w"])
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


@pytest.mark.parametrize("damage", ["flip", "truncate", "trailer"])
def test_damage_is_named_set_aside_and_the_previous_checkpoint_used(damage, tmp_path):
    for epoch in (1, 2):
        checkpoints.save(str(tmp_path), epoch, state(epoch))
    path = checkpoints.checkpoint_path(str(tmp_path), 2)
    raw = bytearray(open(path, "rb").read())
    if damage == "flip":
        middle = len(raw) // 2
        raw[middle : middle + 64] = bytes(b ^ 0xFF for b in raw[middle : middle + 64])
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[-3] = ord("0") if raw[-3] != ord("0") else ord("1")
    open(path, "wb").write(bytes(raw))
    with pytest.raises(DamagedCheckpoint, match=r"checkpoint-2\.pt"):
        checkpoints.load(path)
    reports = []
    assert checkpoints.load_latest(str(tmp_path), report=reports.append)["epoch"] == 1
    assert len(reports) == 1 and "checkpoint-2.pt" in reports[0]
    assert os.path.exists(path + ".damaged") and not os.path.exists(path)


def test_a_planted_pickle_with_a_valid_checksum_never_runs(tmp_path):
    marker = tmp_path / "ran"
    data = pickle.dumps({"epoch": 1, "x": Planted(str(marker))})
    buffer = tmp_path / "payload.pt"
    torch.save({"epoch": 1}, buffer)  # a real torch zip, then a planted object inside one
    import io
    import zipfile

    zipped = io.BytesIO()
    with zipfile.ZipFile(buffer) as source, zipfile.ZipFile(zipped, "w") as target:
        for item in source.infolist():
            content = source.read(item.filename)
            target.writestr(item, data if item.filename.endswith("data.pkl") else content)
    raw = zipped.getvalue()
    path = checkpoints.checkpoint_path(str(tmp_path), 1)
    open(path, "wb").write(raw + b"\nsha256:" + hashlib.sha256(raw).hexdigest().encode() + b"\n")
    with pytest.raises(DamagedCheckpoint, match="unreadable"):
        checkpoints.load(path)
    assert not marker.exists()


def test_a_second_writer_is_refused(tmp_path):
    with checkpoints.locked(str(tmp_path)):
        with pytest.raises(UserError, match="another process"):
            with checkpoints.locked(str(tmp_path)):
                pass
    with checkpoints.locked(str(tmp_path)):  # released
        pass


def test_output_folder_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match="is a file"):
        checkpoints.check_writable(str(tmp_path / "f"))


@pytest.mark.parametrize("contents", ['{"config": ', "[]", "\xff\xfe"], ids=["cut-short", "a-list", "not-utf8"])
def test_a_damaged_json_file_is_named(tmp_path, contents):
    path = tmp_path / "config.json"
    path.write_bytes(contents.encode("latin-1"))
    with pytest.raises(checkpoints.DamagedFile, match=r"config\.json is damaged"):
        checkpoints.read_json(str(path))


def test_a_write_cut_short_leaves_no_temporary_and_one_killed_is_removed_under_the_lock(tmp_path, monkeypatch):
    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save(str(tmp_path), 1, state(1))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []
    (tmp_path / "checkpoint-2.pt.tmp4242").write_bytes(b"half")  # a writer killed (SIGKILL) mid-write
    (tmp_path / "notes.tmp").write_text("kept")
    assert checkpoints.remove_temporaries(str(tmp_path)) == ["checkpoint-2.pt.tmp4242"]
    assert sorted(os.listdir(tmp_path)) == ["notes.tmp"]


def test_a_second_damaged_file_is_set_aside_beside_the_first_never_over_it(tmp_path):
    """Both the checkpoint and result.json paths renamed to <path>.damaged with os.replace: a second
    damaged file of the same name wrote over the first, without a word."""
    path = str(tmp_path / "checkpoint-2.pt")
    kept = []
    for content in (b"first", b"second", b"third"):
        open(path, "wb").write(content)
        kept.append(checkpoints.set_aside(path))
    assert kept == [path + ".damaged", path + ".damaged.1", path + ".damaged.2"]
    assert [open(k, "rb").read() for k in kept] == [b"first", b"second", b"third"] and not os.path.exists(path)


def test_a_checkpoint_that_accept_refuses_is_set_aside_and_the_previous_one_used(tmp_path):
    for epoch in (1, 2):
        checkpoints.save(str(tmp_path), epoch, state(epoch))

    def accept(loaded):
        if loaded["epoch"] == 2:
            raise checkpoints.ForeignCheckpoint("missing key 'fc.bias'")

    reports = []
    assert checkpoints.load_latest(str(tmp_path), report=reports.append, accept=accept)["epoch"] == 1
    path = checkpoints.checkpoint_path(str(tmp_path), 2)
    expected = f"warning: damaged checkpoint {path}: not this run's (missing key 'fc.bias'); kept as {path}.damaged"
    assert reports == [f"{expected}, trying the previous one"]


def test_a_checkpoint_set_aside_by_another_process_since_it_was_listed_is_passed_over(tmp_path, monkeypatch):
    """Two torchrun ranks resuming one run: one set a checkpoint aside after the other listed it, and
    the other died opening it (FileNotFoundError; review)."""
    checkpoints.save(str(tmp_path), 1, state(1))
    monkeypatch.setattr(checkpoints, "epochs", lambda folder: [1, 2])  # 2: listed, then moved away
    assert checkpoints.load_latest(str(tmp_path), report=pytest.fail)["epoch"] == 1
    # A link to a vanished disk, beside a copy set aside at an earlier resume: an error, not a
    # fresh start (reviews).
    (tmp_path / "checkpoint-2.pt.damaged").write_bytes(b"set aside at an earlier resume")
    os.symlink(tmp_path / "vanished" / "checkpoint-2.pt", tmp_path / "checkpoint-2.pt")
    with pytest.raises(FileNotFoundError):
        checkpoints.load_latest(str(tmp_path), report=pytest.fail)
