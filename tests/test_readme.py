"""Every code block of the README runs, or is checked against the project, from a temporary directory.

* python blocks: run in order in one fresh interpreter (the README says they build on each other),
  in a temporary directory, with only this checkout's ``normopt`` importable (not ``experiments``).
* bash blocks: ``pip install`` lines must name real extras and the PyTorch CPU index, ``tox`` lines
  real environments (nothing is installed); study commands (``python -m experiments...``) run with
  ``--dry-run`` appended, in a temporary directory holding tiny CIFAR-10 files in the real format.
* the text block of the layout: every folder it names exists.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)


def readme_blocks(language: str) -> list[str]:
    with open(README, encoding="utf-8") as f:
        return [body for lang, body in FENCE.findall(f.read()) if lang == language]


def bash_commands() -> list[str]:
    """Every command of every bash block, ``a && b`` split into ``a`` and ``b``."""
    commands = []
    for block in readme_blocks("bash"):
        for line in block.splitlines():
            commands += [part.strip() for part in line.split("&&") if part.strip() and not part.strip().startswith("#")]
    return commands


def setup_extras() -> set[str]:
    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"))
    return set(config["options.extras_require"])


def tox_envs() -> set[str]:
    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "tox.ini"))
    listed = {name.strip() for name in re.split(r"[,\s]+", config["tox"]["env_list"]) if name.strip()}
    return listed | {section.split(":", 1)[1] for section in config.sections() if section.startswith("testenv:")}


def kind(command: str) -> str:
    words = shlex.split(command)
    if words[:2] == ["pip", "install"]:
        return "pip"
    if words[0] == "tox":
        return "tox"
    if words[:3] == ["python", "-m", words[2]] and words[2].split(".")[0] == "experiments":
        return "study"
    return "unknown"


def commands_of(what: str) -> list[str]:
    return [command for command in bash_commands() if kind(command) == what]


def test_every_bash_command_is_checked():
    assert bash_commands(), "the README has no bash block"
    unchecked = [command for command in bash_commands() if kind(command) == "unknown"]
    assert not unchecked, f"no check in tests/test_readme.py for these README commands: {unchecked}"


def test_python_blocks_say_they_build_on_each_other():
    with open(README, encoding="utf-8") as f:
        assert "build on each other" in f.read()


def test_python_blocks_run_in_sequence_from_a_temporary_directory(tmp_path):
    blocks = readme_blocks("python")
    assert len(blocks) >= 5
    # Only this checkout's normopt on the path: a snippet importing experiments/ (which pip does not
    # install) or relying on the checkout as working directory fails here.
    (tmp_path / "path").mkdir()
    os.symlink(os.path.join(ROOT, "normopt"), tmp_path / "path" / "normopt")
    (tmp_path / "work").mkdir()
    script = "\n".join(f"exec(compile({block!r}, 'README python block {i + 1}', 'exec'))" for i, block in enumerate(blocks))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "path"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path / "work", env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "work" / "ckpt.pt").is_file()  # the training snippet saved where it was run


@pytest.mark.parametrize("command", commands_of("pip"))
def test_pip_commands_name_real_extras_and_the_cpu_index(command):
    words = shlex.split(command)[2:]
    if "--index-url" in words:
        assert words[words.index("--index-url") + 1] == CPU_INDEX
        assert set(words[: words.index("--index-url")]) <= {"torch", "torchvision"}
        return
    if "-e" in words:
        target = words[words.index("-e") + 1]
        match = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", target)
        assert match, f"pip install -e of {target!r}: expected '.' or '.[extras]'"
        extras = set(match.group(1).split(",")) if match.group(1) else set()
        assert extras <= setup_extras(), f"{command}: unknown extras {extras - setup_extras()}"
        return
    assert words == ["tox>=4"], f"unexpected pip command in the README: {command}"


@pytest.mark.parametrize("command", commands_of("tox"))
def test_tox_commands_name_real_environments(command):
    words = shlex.split(command)[1:]
    if "-e" in words:
        asked = set(words[words.index("-e") + 1].split(","))
        assert asked <= tox_envs(), f"{command}: unknown tox environments {asked - tox_envs()}"
    else:
        assert words == [], f"unexpected tox arguments: {command}"


def write_fake_cifar10(root) -> None:
    """A tiny CIFAR-10 in its real on-disk format (the helper of the data tests)."""
    try:
        from tests.experiments.helpers import write_cifar10
    except ImportError:
        from tests.experiments.test_data import write_cifar10
    write_cifar10(str(root))


def run_module(module: str, arguments: list[str], cwd, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", module, *arguments], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("command", commands_of("study"))
def test_study_commands_resolve_with_dry_run(command, tmp_path):
    words = shlex.split(command)
    module, arguments = words[2], words[3:]
    helped = run_module(module, ["--help"], tmp_path)
    assert helped.returncode == 0, helped.stderr[-2000:]
    if "--dry-run" not in helped.stdout:
        pytest.skip(f"`python -m {module}` has no --dry-run option yet (branch `runs` adds it)")
    if "--data-dir" in arguments:
        data_dir = tmp_path / arguments[arguments.index("--data-dir") + 1]
        data_dir.mkdir(parents=True, exist_ok=True)
        write_fake_cifar10(data_dir)
        arguments = [*arguments, "--skip-data-checksums"]  # our own tiny files, not the published ones
    done = run_module(module, [*arguments, "--dry-run"], tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_layout_names_real_folders():
    (layout,) = [block for block in readme_blocks("") if re.search(r"^normopt/", block, re.M)]
    named = re.findall(r"^([\w.-]+)/", layout, re.M)
    assert named
    missing = [name for name in named if not os.path.isdir(os.path.join(ROOT, name))]
    assert not missing, f"the README's layout names missing folders: {missing}"


@pytest.mark.parametrize("folder", ["normopt", "experiments", "benchmarks"])
def test_layout_names_every_module(folder):
    """The layout had fallen behind: eight modules and experiments/models/ were missing from it (review)."""
    (layout,) = [block for block in readme_blocks("") if re.search(r"^normopt/", block, re.M)]
    # The folder's own lines only: benchmarks/svc.py passed because normopt's lines name svc (review).
    sections = dict(re.findall(r"^([\w.-]+)/(.*?)(?=^[\w.-]+/|\Z)", layout, re.M | re.S))
    words = set(re.findall(r"[\w]+", sections[folder]))
    modules = [
        name.removesuffix(".py")
        for name in os.listdir(os.path.join(ROOT, folder))
        if (name.endswith(".py") and name not in ("__init__.py", "__main__.py")) or name == "models"
    ]
    missing = [name for name in modules if name not in words]
    assert not missing, f"the README's layout does not name {folder}/{missing}"
