"""Data sets of the experiments: CIFAR-10 (torchvision, local folder) and scikit-learn's bundled digits.

Images are floats in [0, 1] without normalisation, so attack radii (eps in 1/255 units) are in
pixel space, as in the paper.
"""

from __future__ import annotations

import os
import pickle
from typing import ClassVar

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

DATASETS = ("digits", "cifar10")


class DataError(Exception):
    """A data set that cannot be loaded, with the folder and what to do."""


def torchvision_advice(error: Exception) -> str:
    """What to install where torchvision failed to import with ``error``.

    Missing, the ``cifar`` extra installs it. Installed but built for another torch (its
    operators do not load: "operator torchvision::nms does not exist"), that extra changes nothing
    (pip finds it satisfied): the torchvision built for this torch is needed, from torch's index.

    Only torchvision itself missing is "missing": an import error from inside an installed
    torchvision (``cannot import name 'register_fake' from 'torch.library'``), like any other error
    there, is a build for another torch.

    Example:
        >>> torchvision_advice(ModuleNotFoundError("No module named 'torchvision'", name="torchvision"))
        "install it: pip install -e '.[cifar]'"
    """
    if isinstance(error, ModuleNotFoundError) and error.name == "torchvision":
        return "install it: pip install -e '.[cifar]'"
    import torch

    return (
        f"the torchvision installed was built for another torch than this one ({torch.__version__}): install "
        "both from one index, e.g. pip install --force-reinstall torch torchvision --index-url "
        "https://download.pytorch.org/whl/cpu for CPU builds, or pip install torchvision==<the release paired "
        "with this torch> from the registry"
    )


def _unchecked_cifar10():
    """torchvision's CIFAR-10 reader without the md5 checks (torchvision only checks existence when
    an md5 is None). Unpickling an unchecked file can run code: only for files you wrote yourself,
    such as the tests' tiny CIFAR-format sets, behind ``--skip-data-checksums``.

    Built on demand: torchvision (the ``cifar`` extra) is imported only where CIFAR-10 is used, so
    the digits studies run on an install without it."""
    import torchvision

    class UncheckedCIFAR10(torchvision.datasets.CIFAR10):
        train_list: ClassVar = [[name, None] for name, _ in torchvision.datasets.CIFAR10.train_list]
        test_list: ClassVar = [[name, None] for name, _ in torchvision.datasets.CIFAR10.test_list]
        meta: ClassVar = {**torchvision.datasets.CIFAR10.meta, "md5": None}

    return UncheckedCIFAR10


def _mismatched(folder: str) -> list[str]:
    """CIFAR-10 files present in ``folder`` whose md5 differs from torchvision's published one."""
    import torchvision
    from torchvision.datasets.utils import check_integrity

    reference = torchvision.datasets.CIFAR10
    files = [*reference.train_list, *reference.test_list, [reference.meta["filename"], reference.meta["md5"]]]
    present = [(n, md5) for n, md5 in files if os.path.exists(os.path.join(folder, n))]
    return [n for n, md5 in present if not check_integrity(os.path.join(folder, n), md5)]


def _missing(folder: str) -> list[str]:
    """CIFAR-10 files absent from ``folder``."""
    import torchvision

    reference = torchvision.datasets.CIFAR10
    names = [n for n, _ in (*reference.train_list, *reference.test_list)] + [reference.meta["filename"]]
    return [n for n in names if not os.path.exists(os.path.join(folder, n))]


def torchvision_import_error() -> Exception | None:
    """Why torchvision (with its datasets and transforms) does not import, or None where it does.

    Any exception: a build for another torch fails with an ImportError, a RuntimeError ("operator
    torchvision::nms does not exist") or an AttributeError ("'torch.library' has no attribute
    'register_fake'"); missing, with a ModuleNotFoundError (see :func:`torchvision_advice`).
    """
    try:
        import torchvision  # first: missing, its error names torchvision itself, not a submodule
        import torchvision.datasets
        import torchvision.transforms  # noqa: F401
    except Exception as error:
        return error
    return None


def import_torchvision():
    """torchvision, with its transforms and datasets.

    Raises:
        DataError: it does not import, with :func:`torchvision_advice`.
    """
    error = torchvision_import_error()
    if error is not None:
        raise DataError(
            f"CIFAR-10 is read through torchvision, which does not import ({error}); {torchvision_advice(error)}"
        ) from error
    import torchvision

    return torchvision


def cifar10(root: str, train: bool, augment: bool = True, download: bool = False, verify: bool = True) -> Dataset:
    """CIFAR-10 from ``root`` (holding ``cifar-10-batches-py``); the paper's augmentation for training.

    With ``verify`` (the default) every file, ``batches.meta`` included, is checked against
    torchvision's published md5 before it is unpickled.

    Raises:
        DataError: the folder does not hold CIFAR-10 (or a file fails its checksum) and ``download``
            is off (or failed); or torchvision does not import.
    """
    torchvision = import_torchvision()
    transforms = torchvision.transforms
    steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if train and augment else []
    transform = transforms.Compose([*steps, transforms.ToTensor()])
    folder = os.path.join(root, "cifar-10-batches-py")
    missing = _missing(folder) if os.path.isdir(folder) and not download else []
    if missing:  # torchvision says "not found or corrupted" of the whole folder
        raise DataError(
            f"CIFAR-10 in {os.path.abspath(folder)!r} lacks {missing}: put the python version of CIFAR-10 there "
            "(data_batch_1 to data_batch_5, test_batch and batches.meta) or pass --download"
        )
    if verify and os.path.isdir(folder):
        bad = _mismatched(folder)
        if bad and not download:
            raise DataError(
                f"CIFAR-10 files in {os.path.abspath(folder)!r} fail their published md5 checksums: {bad}; "
                "they were not opened. Replace them (or pass --download); --skip-data-checksums reads them "
                "anyway, which runs any code planted in them"
            )
    reader = torchvision.datasets.CIFAR10 if verify else _unchecked_cifar10()
    try:
        if download:
            torchvision.datasets.CIFAR10(root, train=train, download=True)  # md5-checked download
        return reader(root, train=train, transform=transform)
    except (RuntimeError, OSError) as error:
        if download:
            raise DataError(
                f"downloading CIFAR-10 into {os.path.abspath(root)!r} failed ({error}); put the python version of "
                f"CIFAR-10 there yourself (expected {folder})"
            ) from None
        raise DataError(
            f"CIFAR-10 not found in {os.path.abspath(root)!r} (expected {folder}); "
            f"put the python version of CIFAR-10 there or pass --download ({error})"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        # Only unchecked files get here (checked ones are torchvision's own): one cut short or
        # not CIFAR-10's pickle at all.
        raise DataError(
            f"CIFAR-10 files in {os.path.abspath(folder)!r} could not be read ({type(error).__name__}: {error}); "
            "replace them with the python version of CIFAR-10"
        ) from None


def digits(train: bool, test_fraction: float = 0.25) -> TensorDataset:
    """scikit-learn's bundled 8x8 digits (1,797 images) as (1, 8, 8) floats in [0, 1].

    The train/test split is fixed: stratified, seed 0.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, random_state=0, stratify=y)
    x, y = (x_train, y_train) if train else (x_test, y_test)
    return TensorDataset(torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16, torch.tensor(y))


def dataset(
    name: str, train: bool, root: str = "data", augment: bool = True, download: bool = False, verify: bool = True
) -> Dataset:
    """A data set by name (``digits`` or ``cifar10``); ``verify=False`` skips CIFAR-10's checksums."""
    if name == "digits":
        return digits(train)
    if name == "cifar10":
        return cifar10(root, train, augment, download, verify)
    raise DataError(f"unknown dataset {name!r}; choose from {list(DATASETS)}")


def shape_of(name: str) -> tuple[int, int, int]:
    """(channels, height, width) of a data set's images."""
    return {"digits": (1, 8, 8), "cifar10": (3, 32, 32)}[name]


def loader(data: Dataset, batch_size: int, train: bool, seed: int = 0, distributed: bool = False) -> DataLoader:
    """A seeded loader; with ``distributed`` each process reads its own shard."""
    sampler = DistributedSampler(data, shuffle=train, seed=seed) if distributed else None
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(data, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler, generator=generator)
