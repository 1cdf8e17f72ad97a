"""Data paths: CIFAR-10 in its real on-disk format through torchvision, and the bundled digits."""

from __future__ import annotations

import os
import pickle
import sys

import numpy as np
import pytest
import torch

from experiments.data import DataError, cifar10, dataset, digits, loader

LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(root, per_batch: int = 4, test: int = 6, seed: int = 0) -> str:
    """A tiny CIFAR-10 in the python version's format: protocol-2 pickles of dicts with string keys
    (the real files come from Python 2), uint8 rows of 3072 values (R, G, B planes) and labels."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        count = test if name == "test_batch" else per_batch
        batch = {
            "batch_label": name,
            "labels": rng.integers(0, 10, count).tolist(),
            "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            "filenames": ["x.png"] * count,
        }
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": LABELS, "num_cases_per_batch": per_batch, "num_vis": 3072}, f, protocol=2)
    return str(root)


def test_cifar10_format_loads_through_torchvision(tmp_path):
    root = write_cifar10(tmp_path)
    train, test = cifar10(root, train=True, verify=False), cifar10(root, train=False, verify=False)
    assert len(train) == 20 and len(test) == 6
    image, label = test[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert train.classes[0] == "airplane" and isinstance(label, int)
    with open(os.path.join(root, "cifar-10-batches-py", "test_batch"), "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    expected = torch.tensor(raw["data"][0]).reshape(3, 32, 32).float() / 255
    assert torch.allclose(image, expected)  # no augmentation on the test split


def test_cifar10_training_augmentation_crops_with_padding_and_flips(tmp_path):
    root = write_cifar10(tmp_path)
    plain, augmented = cifar10(root, train=True, augment=False, verify=False), cifar10(root, train=True, verify=False)
    torch.manual_seed(0)
    views = {tuple(augmented[0][0].flatten()[:50].tolist()) for _ in range(10)}
    assert len(views) > 1 and augmented[0][0].shape == plain[0][0].shape == (3, 32, 32)


def test_missing_cifar10_names_the_folder(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nowhere")):
        cifar10(str(tmp_path / "nowhere"), train=True)


def test_digits_split_is_fixed_and_disjoint():
    train, test = digits(True), digits(False)
    assert len(train) + len(test) == 1797 and len(test) == 450
    assert torch.equal(digits(False).tensors[0], test.tensors[0])
    assert train.tensors[0].shape[1:] == (1, 8, 8) and train.tensors[0].max() <= 1
    assert set(test.tensors[1].tolist()) == set(range(10))


def test_unknown_dataset_and_seeded_loader():
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        dataset("mnist", True)
    first = [y.tolist() for _, y in loader(digits(True), 64, True, seed=3)]
    again = [y.tolist() for _, y in loader(digits(True), 64, True, seed=3)]
    assert first == again


class Planted:
    """A pickle that would create a marker file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["batches.meta", "data_batch_1", "test_batch"])
def test_a_planted_cifar10_file_is_refused_before_unpickling(name, tmp_path):
    root = write_cifar10(tmp_path / "data")
    marker = tmp_path / "ran"
    with open(os.path.join(root, "cifar-10-batches-py", name), "wb") as f:
        pickle.dump(Planted(str(marker)), f)
    for train in (True, False):
        with pytest.raises(DataError, match="md5") as error:
            cifar10(root, train=train)
        assert name in str(error.value) and "--skip-data-checksums" in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize("dry_run", [True, False])
def test_cifar10_without_torchvision_is_a_user_error_that_says_what_to_install(dry_run, tmp_path, monkeypatch, capsys):
    import sys

    from experiments import regularize

    root = write_cifar10(tmp_path)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if it were not installed
    with pytest.raises(DataError, match=r"torchvision, which does not import .*pip install -e '\.\[cifar\]'"):
        cifar10(root, train=False, verify=False)
    argv = ["--dataset", "cifar10", "--data-dir", root, "--models", "small", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit:
        regularize.main([*argv, "--dry-run"] if dry_run else [*argv, "--methods", "plain", "--epochs", "1"])
    assert exit.value.code == 2 and "pip install -e '.[cifar]'" in capsys.readouterr().err


def test_a_missing_cifar10_file_is_named(tmp_path):
    """torchvision says "not found or corrupted" of the whole folder, and the message said the
    folder was not found, where it was: one file was missing (review)."""
    root = write_cifar10(tmp_path)
    os.remove(os.path.join(root, "cifar-10-batches-py", "data_batch_3"))
    for verify in (True, False):
        with pytest.raises(DataError, match=r"lacks \['data_batch_3'\]"):
            cifar10(root, train=True, verify=verify)


@pytest.mark.parametrize("content", [b"garbage\n", b""])
def test_an_unreadable_unchecked_cifar10_file_is_a_data_error_naming_the_folder(content, tmp_path):
    """Unchecked (--skip-data-checksums), a file that is not CIFAR-10's pickle ended in a traceback (review)."""
    root = write_cifar10(tmp_path)
    with open(os.path.join(root, "cifar-10-batches-py", "data_batch_3"), "wb") as f:
        f.write(content)
    with pytest.raises(DataError, match=r"could not be read \(.*replace them"):
        cifar10(root, train=True, verify=False)


def test_a_failed_download_does_not_ask_for_download(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    with pytest.raises(DataError, match=r"downloading CIFAR-10 into .* failed \(<urlopen error") as error:
        cifar10(str(tmp_path), train=True, download=True)
    assert "--download" not in str(error.value)


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("operator torchvision::nms does not exist"),
        ImportError("cannot import name 'register_fake' from 'torch.library'"),  # from inside torchvision
        AttributeError("module 'torch.library' has no attribute 'register_fake'"),
        ModuleNotFoundError("No module named 'torch._custom_ops'", name="torch._custom_ops"),
    ],
)
def test_a_torchvision_built_for_another_torch_gets_other_advice_than_a_missing_one(error):
    """Installed but built for another torch, "pip install -e '.[cifar]'" changed nothing (review);
    an import error from inside torchvision got that advice too (second review)."""
    from experiments.data import torchvision_advice

    advice = torchvision_advice(error)
    assert "built for another torch" in advice and torch.__version__ in advice and "[cifar]" not in advice
    missing = torchvision_advice(ModuleNotFoundError("No module named 'torchvision'", name="torchvision"))
    assert missing == "install it: pip install -e '.[cifar]'"


def test_a_torchvision_that_fails_to_import_in_any_way_is_a_data_error(tmp_path, monkeypatch):
    """A torchvision newer than torch fails with an AttributeError ('torch.library' has no
    'register_fake'), which ended in a traceback (second review)."""
    stub = tmp_path / "stub" / "torchvision"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise AttributeError(\"module 'torch.library' has no attribute 'register_fake'\")\n")
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path / "stub"))
    with pytest.raises(DataError, match="register_fake") as error:
        cifar10(str(tmp_path), train=True)
    assert "built for another torch" in str(error.value)


def test_a_dry_run_with_download_says_what_the_run_would_fetch_and_downloads_nothing(tmp_path, monkeypatch, capsys):
    """With --download and CIFAR-10 absent, the dry run failed with "... or pass --download" (review)."""
    import torchvision

    from experiments import regularize

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", lambda *a, **k: pytest.fail("downloaded"))
    data, out = tmp_path / "data", tmp_path / "out"
    argv = ["--dataset", "cifar10", "--data-dir", str(data), "--models", "small", "--methods", "plain", "--out", str(out)]
    regularize.main([*argv, "--download", "--dry-run"])
    err = capsys.readouterr().err
    assert f"would download CIFAR-10 into {data}" in err and "or pass --download" not in err
    assert not data.exists() and not out.exists()
    (tmp_path / "file").write_text("")  # a --data-dir that cannot be a folder is still refused
    with pytest.raises(SystemExit) as exit:
        regularize.main([*argv[:2], "--data-dir", str(tmp_path / "file" / "data"), *argv[4:], "--download", "--dry-run"])
    assert exit.value.code == 2 and "choose another --data-dir" in capsys.readouterr().err
