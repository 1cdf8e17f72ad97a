"""The training loop: every method, resume after an interruption, torchrun data parallel, CLI errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import experiments.train as training
from experiments import checkpoints
from experiments.config import UserError
from experiments.methods import METHODS, REGISTRY
from experiments.train import RunConfig, train

TINY = {"epochs": 2, "milestones": (1,), "eval_images": 16, "eval_iterations": 2, "eval_targets": 1}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_reports(method, tmp_path):
    strength = {"wd": 1e-3, "svc": 1.0}.get(method, 0.05 if REGISTRY[method].strength else 0.0)
    config = RunConfig(method=method, strength=strength, svc_every=10, adv_steps=2, **{**TINY, "epochs": 1})
    result = train(config, str(tmp_path), progress=False)
    assert set(result["accuracy"]) == {"clean", "clean subset", "apgd-ce", "apgd-t", "robust"}
    assert result["history"][0]["steps"] == 22 and {row["epoch"] for row in result["norms"]} == {0, 1}
    assert json.load(open(tmp_path / "result.json"))["accuracy"] == result["accuracy"]


def test_resume_after_an_interruption_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    config = RunConfig(method="nd-linf", strength=0.1, **{**TINY, "epochs": 3})
    uninterrupted = train(config, str(tmp_path / "a"), progress=False)

    real = training.evaluate
    calls = []

    def interrupt_in_epoch_two(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(training, "evaluate", interrupt_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train(config, str(tmp_path / "b"), progress=False)
    assert checkpoints.load(str(tmp_path / "b" / "checkpoint-1.pt"))["epoch"] == 1
    monkeypatch.setattr(training, "evaluate", real)
    resumed = train(config, str(tmp_path / "b"), progress=False)
    assert resumed["history"] == uninterrupted["history"]
    assert resumed["norms"] == uninterrupted["norms"]
    assert resumed["accuracy"] == uninterrupted["accuracy"]  # evaluation subset and attacks seeded
    a, b = (checkpoints.load(str(tmp_path / x / "checkpoint-3.pt"))["model"] for x in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_run_is_read_back_not_retrained(tmp_path, monkeypatch):
    config = RunConfig(**TINY)
    first = train(config, str(tmp_path), progress=False)
    monkeypatch.setattr(training, "build_model", lambda *a: pytest.fail("retrained a finished run"))
    assert train(config, str(tmp_path), progress=False) == first


def test_largest_norm_decay_halves_the_summed_norm_on_digits(tmp_path):
    """The digits study's claim, on the study's own schedule: beta=1 against plain training."""
    evaluation = {"eval_images": 16, "eval_iterations": 2, "eval_targets": 1}
    finals = {}
    for method, strength in (("plain", 0.0), ("nd-l1", 1.0), ("nd-linf", 1.0)):
        result = train(RunConfig(method=method, strength=strength, **evaluation), str(tmp_path / method), progress=False)
        last = [r for r in result["norms"] if r["epoch"] == 15 and r["kind"] in ("conv", "linear")]
        finals[method] = {o: sum(r["norm"] for r in last if r["ord"] == o) for o in ("l1", "linf")}
    assert finals["plain"]["l1"] >= 2 * finals["nd-l1"]["l1"]
    assert finals["plain"]["linf"] >= 2 * finals["nd-linf"]["linf"]


def test_torchrun_with_two_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "experiments.train"]
    command += ["--method", "nd-l1", "--strength", "0.05", "--epochs", "1", "--eval-images", "16", "--out", str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=os.getcwd())
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.load(open(tmp_path / "result.json"))
    assert result["history"][0]["world_size"] == 2
    assert result["history"][0]["steps"] == 11  # each process reads half of the 1,347 images
    # A damaged result, resumed: the first process alone sets it aside (each used to rename it,
    # and the second to find it gone) and both evaluate the run again.
    (tmp_path / "result.json").write_text('{"accuracy": ')
    done = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=300, cwd=os.getcwd())
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.load(open(tmp_path / "result.json"))["accuracy"] == result["accuracy"]
    assert (tmp_path / "result.json.damaged").exists()


# Run by torchrun in each process: train with rank 0's evaluation slowed down, and write what this
# rank's train() returned, when it returned, and when an evaluation ended.
_RANKS = """
import json, os, sys, time
import torch.distributed as dist
import experiments.train as training

dist.init_process_group("gloo")
out = sys.argv[1]
evaluate = training.robust_evaluation

def slow_evaluation(*args):
    time.sleep(8)
    result = evaluate(*args)
    open(os.path.join(out, f"evaluated-{dist.get_rank()}"), "w").write(repr(time.time()))
    return result

training.robust_evaluation = slow_evaluation
evaluation = dict(eval_images=16, eval_iterations=2, eval_targets=1)
config = training.RunConfig(method="nd-l1", strength=0.05, epochs=1, milestones=(1,), **evaluation)
result = training.train(config, out, progress=False)
open(os.path.join(out, f"returned-{dist.get_rank()}"), "w").write(repr(time.time()))
json.dump(result["history"], open(os.path.join(out, f"history-{dist.get_rank()}.json"), "w"))
"""


def test_torchrun_ranks_share_the_epochs_figures_and_do_not_wait_for_the_evaluation(tmp_path):
    """Each rank's loss and accuracy were its own share's (rank 0's went into the history); the
    others waited for rank 0's evaluation in a barrier, past the process group's timeout, and
    torchrun then stopped rank 0 mid-evaluation, on every --resume too (review)."""
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    done = subprocess.run([*command, str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    histories = [json.load(open(tmp_path / "run" / f"history-{rank}.json")) for rank in (0, 1)]
    # Test accuracy is each rank's evaluation of its own model (its batch norms' running statistics
    # are its last batch's: DDP broadcasts rank 0's at the next forward); rank 0's is recorded.
    shared = lambda history: [{k: v for k, v in row.items() if k != "test_accuracy"} for row in history]
    assert shared(histories[0]) == shared(histories[1]) and histories[0][0]["world_size"] == 2
    result = json.load(open(tmp_path / "run" / "result.json"))
    assert result["history"] == histories[0] and "robust" in result["accuracy"]
    # Ordering, not a short timeout (flaky under load): rank 1 is back before rank 0's 8-second
    # evaluation ends, and evaluates nothing itself.
    when = lambda name: float((tmp_path / "run" / name).read_text())
    assert when("returned-1") < when("evaluated-0") and not (tmp_path / "run" / "evaluated-1").exists()


def test_a_run_resumed_with_another_number_of_processes_is_refused(tmp_path, capsys):
    """--batch-size is per process: a two-process run resumed by one went on with half the batch,
    under the same fingerprint, without a word (review)."""
    config = RunConfig(**TINY)
    first = train(config, str(tmp_path), progress=False)
    os.remove(tmp_path / "result.json")
    state = checkpoints.load(checkpoints.checkpoint_path(str(tmp_path), 2))
    state["history"] = [{**row, "world_size": 2} for row in state["history"]]  # as a torchrun run wrote it
    checkpoints.save(str(tmp_path), 2, state)
    with pytest.raises(UserError, match=r"trained with 2 processes and this is 1: --batch-size is per process") as error:
        train(config, str(tmp_path), progress=False)
    assert "torchrun --nproc_per_node 2 -m experiments.train" in str(error.value)
    assert checkpoints.load(checkpoints.checkpoint_path(str(tmp_path), 2))["history"][-1]["world_size"] == 2  # kept
    os.remove(checkpoints.checkpoint_path(str(tmp_path), 2))  # the epoch before, written by one process, resumes
    assert train(config, str(tmp_path), progress=False)["history"] == first["history"]


def test_each_epoch_records_its_thread_count_and_a_resume_with_another_says_so(tmp_path, capsys, monkeypatch):
    """A run's figures move with the thread count (0.9867 against 0.9711 clean accuracy at 2 and 1
    threads), which was recorded nowhere: a resume under another load mixed counts unseen (review)."""
    config = RunConfig(**TINY)
    first = train(config, str(tmp_path), progress=False)
    assert [row["threads"] for row in first["history"]] == [torch.get_num_threads()] * 2
    os.remove(tmp_path / "result.json")
    state = checkpoints.load(checkpoints.checkpoint_path(str(tmp_path), 2))
    state["history"][-1]["threads"] = torch.get_num_threads() + 3  # as another machine's load chose
    checkpoints.save(str(tmp_path), 2, state)
    train(config, str(tmp_path))
    err = capsys.readouterr().err
    ran = torch.get_num_threads() + 3
    assert f"note: epoch 2 ran with {ran} threads and this resume with {torch.get_num_threads()}" in err
    assert f"(--threads {ran} resumes as it ran)" in err


def test_before_the_process_group_starts_only_torchruns_rank_zero_is_the_main_process(monkeypatch):
    """Every rank printed the configuration, the run folder and the notes of main() (review)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert not training._is_main()
    monkeypatch.setenv("RANK", "0")
    assert training._is_main()
    monkeypatch.delenv("RANK")
    assert training._is_main()


@pytest.mark.parametrize("world_size", [None, "1"])
def test_a_single_process_with_a_stray_rank_is_the_main_process(monkeypatch, world_size):
    """RANK=1 left in the environment of a single process made it write nothing (review)."""
    monkeypatch.setenv("RANK", "1")
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    assert training._is_main()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [(["--model", "lenet"], "invalid choice: 'lenet'"), (["--method", "dropout"], "invalid choice: 'dropout'")],
)
def test_bad_arguments_exit_with_code_two(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit:
        training.main(arguments)
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_missing_cifar10_folder_exits_with_code_two(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        training.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "out")])
    assert exit.value.code == 2 and str(tmp_path / "none") in capsys.readouterr().err
    # The config.json it claimed the folder with is taken back: it refused every other run there.
    assert not os.path.exists(tmp_path / "out" / "config.json")


def test_a_run_that_fails_before_its_first_checkpoint_leaves_the_folder_free(tmp_path, monkeypatch):
    def broken(config, where):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(training, "build", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        train(RunConfig(**TINY), str(tmp_path), progress=False)
    assert not os.path.exists(tmp_path / "config.json")
    monkeypatch.undo()
    other = RunConfig(**{**TINY, "lr": RunConfig(**TINY).lr / 2})
    assert train(other, str(tmp_path), progress=False)["config"]["lr"] == other.lr  # another configuration takes it


def test_every_layer_norm_is_recorded_every_step(tmp_path):
    config = RunConfig(method="nd-linf", strength=0.1, **{**TINY, "epochs": 2})
    result = train(config, str(tmp_path), progress=False)
    steps = result["step_norms"]
    assert steps["step"] == list(range(44)) and steps["layer"] == ["conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "fc"]
    assert len(steps["l1"]) == len(steps["linf"]) == 44 and {len(row) for row in steps["l1"]} == {7}
    epoch_one = {r["layer"]: r["norm"] for r in result["norms"] if r["epoch"] == 0 and r["ord"] == "linf"}
    assert steps["linf"][0] == pytest.approx([epoch_one[name] for name in steps["layer"]], rel=1e-5)
    sparse = train(RunConfig(norms_every=5, **{**TINY, "epochs": 2}), str(tmp_path / "sparse"), progress=False)
    assert sparse["step_norms"]["step"] == list(range(0, 44, 5))


def test_the_evaluation_subset_is_random_and_drawn_with_the_seed():
    """Released: the first batch of a shuffled loader, i.e. a random subset, not the first images."""
    from torch.utils.data import TensorDataset

    from experiments.train import _subset

    data = TensorDataset(torch.arange(1000).float().reshape(-1, 1), torch.arange(1000))
    _, first = _subset(data, 100, seed=0)
    _, again = _subset(data, 100, seed=0)
    _, other = _subset(data, 100, seed=1)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert len(set(first.tolist())) == 100 and first.max() > 200  # not the first 100 images


@pytest.mark.filterwarnings("ignore:norm decay took no new subgradient:UserWarning")  # the divergence itself
def test_a_diverged_run_is_marked_not_evaluated_and_never_sums_to_zero(tmp_path, capsys):
    """lr 1e30 turns every weight NaN in the first epoch: pandas' sum skipped the NaN norms and
    wrote ``sum l1 = 0.0``, and the NaN model's chance accuracies were recorded as measured."""
    import math

    from experiments.study import summary_table

    config = RunConfig(method="nd-l1", strength=0.1, lr=1e30, sweep=(4.0,), **{**TINY, "epochs": 1})
    result = train(config, str(tmp_path / "nan"), progress=True)
    assert result["diverged"] and "epoch 1" in result["diverged"]
    assert "run diverged" in capsys.readouterr().err
    assert json.load(open(tmp_path / "nan" / "result.json"))["diverged"] == result["diverged"]
    assert set(result["accuracy"]) == {"clean", "clean subset", "apgd-ce", "apgd-t", "robust", "sweep"}
    assert all(math.isnan(v) for k, v in result["accuracy"].items() if k != "sweep")
    fine = train(RunConfig(**{**TINY, "epochs": 1}), str(tmp_path / "fine"), progress=False)
    assert fine["diverged"] is None
    result["label"], fine["label"] = "ND l1 0.1", "plain"
    table = summary_table([result, fine])
    assert table.diverged.tolist() == [True, False]
    nan_row, fine_row = table.iloc[0], table.iloc[1]
    assert math.isnan(nan_row["sum l1"]) and math.isnan(nan_row["sum linf"]) and math.isnan(nan_row["robust acc"])
    assert fine_row["sum l1"] > 0 and fine_row["robust acc"] >= 0
    # A result.json written before runs were marked: found diverged from its NaN norms all the same.
    old = {k: v for k, v in result.items() if k != "diverged"}
    assert summary_table([old]).diverged.tolist() == [True]
    # Diverged through a buffer (a non-finite running variance), its weights' norms finite: its
    # sums were tabled (7.4e16 in a helper's hunt), where the docs promise NaN.
    through_a_buffer = {**fine, "diverged": "epoch 1: 1.running_var is not finite"}
    row = summary_table([through_a_buffer]).iloc[0]
    assert row["diverged"] and all(math.isnan(row[k]) for k in ("sum l1", "sum linf", "max bn", "clean acc"))


def test_an_he_run_describes_its_cosine_layer_without_the_warning_about_overriding_classes():
    """layer_specs warns of a subclass that overrides how its layer applies the weight; the HE
    layer does, and its norms are logged of the weight it applies, so the run does not warn."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = training.build(RunConfig(method="pgd-at-he", **TINY), torch.device("cpu"))
    assert "fc" in run.specs


@pytest.mark.filterwarnings("ignore:layers .* are experiments.methods.CosineLinear:UserWarning")
def test_he_layer_norms_are_those_of_the_matrix_it_applies():
    """A CosineLinear applies scale * normalize(W) to unit features: scaling W by 7 changed no output
    but multiplied the logged fc norms by 7, as they were the raw W's."""
    import math

    import normopt
    from experiments.methods import hypersphere
    from experiments.models import build_model
    from experiments.train import layer_norm_rows, step_norms

    torch.manual_seed(0)
    model = hypersphere(build_model("small", 10, 1), 15.0).eval()
    specs = normopt.layer_specs(model, torch.zeros(1, 1, 8, 8))
    with torch.no_grad():
        # On the unit vectors e_i the layer's input normalization is the identity: column i of the
        # applied matrix is fc(e_i).
        matrix = model.fc(torch.eye(model.fc.in_features)).T
    explicit = {"l1": float(matrix.abs().sum(0).max()), "linf": float(matrix.abs().sum(1).max())}

    def fc_norms():
        return {r["ord"]: r["norm"] for r in layer_norm_rows(model, specs, 0) if r["layer"] == "fc"}

    assert fc_norms() == pytest.approx(explicit, rel=1e-5)
    column = list(specs).index("fc")
    assert step_norms(model, specs)[:, column].tolist() == pytest.approx([explicit["l1"], explicit["linf"]], rel=1e-5)
    x = torch.rand(4, 1, 8, 8)
    before = model(x)
    with torch.no_grad():
        model.fc.weight.mul_(7.0)
    assert torch.allclose(model(x), before, atol=1e-5)
    assert fc_norms() == pytest.approx(explicit, rel=1e-5)
    assert explicit["linf"] <= 15.0 * math.sqrt(model.fc.in_features) + 1e-3  # unit rows: at most s * sqrt(n)


@pytest.mark.parametrize("tensor", ["conv2.weight", "fc.bias", "bn2.running_mean", "bn2.running_var"])
def test_a_nan_in_any_parameter_or_buffer_marks_the_run_diverged(tensor, tmp_path, monkeypatch):
    """Only the loss and the layer norms were checked: a NaN in fc.bias or in a batch-norm
    running_mean after the last epoch changed neither, and the run was attacked and tabulated."""
    import math

    from experiments.study import summary_table

    original = training.train_epoch

    def nan_after_the_last_epoch(config, run, epoch, where):
        row = original(config, run, epoch, where)
        if epoch == config.epochs:  # after the last step: the epoch's loss is finite
            tensors = {**dict(run.model.named_parameters()), **dict(run.model.named_buffers())}
            with torch.no_grad():
                tensors[tensor].view(-1)[0] = math.nan
        return row

    monkeypatch.setattr(training, "train_epoch", nan_after_the_last_epoch)
    result = train(RunConfig(**TINY), str(tmp_path / "run"), progress=False)
    assert result["diverged"] and "epoch 2" in result["diverged"]
    assert math.isnan(result["accuracy"]["clean"]) and summary_table([result]).diverged.tolist() == [True]
    assert [row["non-finite"] for row in result["history"]] == [[], [tensor]]


class _ScalarReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts reads of a tensor's value by the host (``float``, ``int``, ``item``, ``bool``)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in ("aten._local_scalar_dense", "aten.is_nonzero"):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["nd-linf", "pgd-at"])
def test_a_training_epoch_reads_nothing_back_per_step(method, monkeypatch):
    """The epoch summed its loss and correct count with float() and int() at every step, which
    waits for an accelerator each time; they are summed on the device and read once an epoch."""
    monkeypatch.setattr(training, "evaluate", lambda *args, **kwargs: 0.0)
    reads = {}
    for batch_size in (64, 16):  # about 20 and 80 steps
        strength = 0.1 if method == "nd-linf" else 0.0
        config = RunConfig(method=method, strength=strength, batch_size=batch_size, adv_steps=1, **TINY)
        run = training.build(config, torch.device("cpu"))
        with _ScalarReads() as counter:
            row = training.train_epoch(config, run, 1, torch.device("cpu"))
        reads[batch_size] = counter.count
        assert row["steps"] > 10 and 0 <= row["train_accuracy"] <= 1
    assert reads[64] == reads[16]


def test_a_damaged_or_foreign_result_is_set_aside_and_the_run_evaluated_again(tmp_path, capsys):
    config = RunConfig(**TINY)
    first = train(config, str(tmp_path), progress=False)
    for contents in ('{"accuracy": ', json.dumps({**first, "config": {**first["config"], "lr": 0.5}})):
        (tmp_path / "result.json").write_text(contents)
        again = train(config, str(tmp_path), progress=False)
        assert again["accuracy"] == first["accuracy"] and again["history"] == first["history"]
        assert "result.json.damaged" in capsys.readouterr().err and (tmp_path / "result.json.damaged").exists()


def test_checkpoints_without_the_config_that_names_their_run_are_refused(tmp_path):
    train(RunConfig(**TINY), str(tmp_path), progress=False)
    os.remove(tmp_path / "config.json")
    with pytest.raises(UserError, match=r"no config\.json"):
        train(RunConfig(method="nd-l1", strength=0.5, **TINY), str(tmp_path), progress=False)


def test_a_damaged_config_is_named(tmp_path):
    train(RunConfig(**TINY), str(tmp_path), progress=False)
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(UserError, match=r"config\.json is damaged"):
        train(RunConfig(**TINY), str(tmp_path), progress=False)


def test_mixed_precision_without_a_gpu_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--amp"):
        train(RunConfig(amp=True, **TINY), str(tmp_path), progress=False)
    assert not os.path.exists(tmp_path / "config.json")


def test_a_study_counts_a_run_with_a_damaged_result_as_missing(tmp_path, capsys):
    from experiments.study import finished, run_folder

    done, damaged = RunConfig(**TINY), RunConfig(method="nd-l1", strength=0.5, **TINY)
    # The finished run's result is its own (collect sets another run's aside).
    own = {"accuracy": {}, "config": done.as_dict(), "definition": done.definition()}
    for config, contents in ((done, json.dumps(own)), (damaged, '{"accuracy": ')):
        os.makedirs(run_folder(config, str(tmp_path)))
        with open(os.path.join(run_folder(config, str(tmp_path)), "result.json"), "w") as f:
            f.write(contents)
    results, missing = finished([done, damaged], str(tmp_path))
    assert [r["accuracy"] for r in results] == [{}] and missing == [damaged]
    assert "result.json is damaged" in capsys.readouterr().err


def test_a_dry_run_meets_the_refusal_of_the_real_run_without_writing(tmp_path, capsys):
    arguments = ["--epochs", "1", "--eval-images", "16", "--eval-iterations", "2", "--eval-targets", "1", "--out", str(tmp_path)]
    training.main(arguments)
    before = sorted(os.listdir(tmp_path))
    for changed, named in ((["--resume", "--epochs", "2"], "epochs: 1 -> 2"), ([], "already holds this run")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit:
            training.main([*arguments, *changed, "--dry-run"])
        assert exit.value.code == 2 and named in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == before


def test_resume_of_a_folder_without_a_run_says_so(tmp_path, capsys):
    arguments = ["--epochs", "1", "--eval-images", "16", "--eval-iterations", "2", "--eval-targets", "1", "--resume"]
    training.main([*arguments, "--out", str(tmp_path / "typo"), "--dry-run"])
    assert "holds no run to resume" in capsys.readouterr().err


def test_a_result_written_before_its_fingerprint_counted_more_is_still_the_runs(tmp_path, monkeypatch):
    """As claim_folder accepts its config.json: the options decide, not the fingerprint."""
    config = RunConfig(**TINY)
    first = train(config, str(tmp_path), progress=False)
    old = {key: value for key, value in first.items() if key != "definition"}
    (tmp_path / "result.json").write_text(json.dumps({**old, "fingerprint": "of an earlier version"}))
    monkeypatch.setattr(training, "build_model", lambda *a: pytest.fail("evaluated a finished run again"))
    assert train(config, str(tmp_path), progress=False)["accuracy"] == first["accuracy"]
    assert not (tmp_path / "result.json.damaged").exists()


def test_an_he_result_of_the_raw_weights_is_not_read_back():
    """HE runs logged the raw last-layer W until their definition named the applied weight: an
    old result of one, without a recorded definition, is another run's; a result of the same
    options whose recorded definition differs is too."""
    config = RunConfig(method="pgd-at-he", **TINY)
    old = {"config": config.as_dict(), "fingerprint": "of an earlier version", "accuracy": {}}
    assert not training._same_run(old, config)
    assert training._same_run({**old, "fingerprint": config.fingerprint()}, config)
    assert training._same_run({**old, "definition": config.definition()}, config)
    assert not training._same_run({**old, "definition": {**config.definition(), "loss": "ce"}}, config)


def test_torchrun_on_gpus_gives_each_process_its_own_before_the_first_collective(tmp_path, monkeypatch):
    """NCCL puts broadcast_object_list's tensors on the current device: cuda:0 in every process
    unless each sets its own (LOCAL_RANK)."""
    calls = []

    class Stop(Exception):
        pass

    def set_device(where):
        calls.append(("set_device", str(where)))
        raise Stop

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(training.dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(training.dist, "broadcast_object_list", lambda *a, **k: calls.append(("broadcast",)))
    with pytest.raises(Stop):
        train(RunConfig(**TINY), str(tmp_path), progress=False)
    assert calls == [("init", "nccl"), ("set_device", "cuda:1")]


def test_a_dry_run_meets_the_refusal_of_mixed_precision_without_a_gpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit:
        training.main(["--amp", "--dry-run", "--out", str(tmp_path)])
    assert exit.value.code == 2 and "--amp" in capsys.readouterr().err


def _two_epochs_then_no_result(config: RunConfig, out) -> dict:
    first = train(config, str(out), progress=False)
    os.remove(out / "result.json")
    return first


def test_an_error_loading_a_good_checkpoint_stops_the_resume_and_keeps_the_checkpoints(tmp_path, monkeypatch):
    """Every RuntimeError loading a checkpoint set it aside as another run's: an out-of-memory error
    set aside both good checkpoints and retrained from epoch 1, exit 0 (review)."""
    config = RunConfig(**TINY)
    _two_epochs_then_no_result(config, tmp_path)

    def out_of_memory(run, state):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(training, "_load_state", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        train(config, str(tmp_path), progress=False)
    assert checkpoints.epochs(str(tmp_path)) == [1, 2] and not list(tmp_path.glob("*.damaged*"))


def test_a_checkpoint_of_another_configuration_is_set_aside_even_where_its_state_fits(tmp_path, capsys):
    """A plain run's checkpoint copied into a weight-decay run's folder resumed it with weight decay 0
    (the optimizer's state brings its own param groups): checkpoints now record their configuration."""
    plain, decayed = RunConfig(**TINY), RunConfig(method="wd", strength=0.01, **TINY)
    first = _two_epochs_then_no_result(decayed, tmp_path / "wd")
    _two_epochs_then_no_result(plain, tmp_path / "plain")
    path = checkpoints.checkpoint_path(str(tmp_path / "wd"), 2)
    shutil.copyfile(checkpoints.checkpoint_path(str(tmp_path / "plain"), 2), path)
    again = train(decayed, str(tmp_path / "wd"), progress=False)
    err = capsys.readouterr().err
    assert f"damaged checkpoint {path}: not this run's (another configuration: method: 'plain' -> 'wd'" in err
    assert again["history"] == first["history"] and again["accuracy"] == first["accuracy"]


def test_a_checkpoint_another_process_set_aside_first_is_said_so(tmp_path):
    """Two torchrun ranks resuming one run both set a foreign checkpoint aside: the second found it
    gone and died with FileNotFoundError (review)."""
    path = str(tmp_path / "checkpoint-2.pt")
    assert checkpoints.set_aside(path) == f"{path}.damaged* (by another process)"


def test_an_older_checkpoint_of_another_run_is_set_aside_where_its_state_does_not_fit(tmp_path, capsys):
    """Checkpoints written before they recorded their configuration: judged by whether the state
    fits (a hypersphere-embedding model's in a plain run: no fc.bias)."""
    plain, other = RunConfig(**TINY), RunConfig(method="pgd-at-he", adv_steps=2, **{**TINY, "eval_eps": 8.0})
    first = _two_epochs_then_no_result(plain, tmp_path / "plain")
    _two_epochs_then_no_result(other, tmp_path / "he")
    state = checkpoints.load(checkpoints.checkpoint_path(str(tmp_path / "he"), 2))
    del state["config"], state["definition"]  # as an older version wrote it
    checkpoints.save(str(tmp_path / "plain"), 2, state)
    again = train(plain, str(tmp_path / "plain"), progress=False)
    path = checkpoints.checkpoint_path(str(tmp_path / "plain"), 2)
    assert f"damaged checkpoint {path}: not this run's (RuntimeError: Error(s) in loading state_dict" in capsys.readouterr().err
    assert again["history"] == first["history"] and again["accuracy"] == first["accuracy"]


def test_a_checkpoint_of_the_same_training_evaluated_otherwise_is_this_runs(tmp_path, capsys):
    """The evaluation options do not change training: a checkpoint recorded with other ones was set
    aside as another configuration's, and the training thrown away (review)."""
    first, other = RunConfig(**TINY), RunConfig(**{**TINY, "eval_images": 8, "sweep": (4.0,)})
    _two_epochs_then_no_result(first, tmp_path / "a")
    trained = _two_epochs_then_no_result(other, tmp_path / "b")
    shutil.copyfile(checkpoints.checkpoint_path(str(tmp_path / "a"), 2), checkpoints.checkpoint_path(str(tmp_path / "b"), 2))
    again = train(other, str(tmp_path / "b"), progress=False)
    assert "damaged" not in capsys.readouterr().err and again["history"] == trained["history"]


@pytest.mark.parametrize("how", ["train", "train --dry-run", "regularize", "regularize --dry-run"])
def test_a_model_that_cannot_take_the_images_is_refused_in_one_line_before_any_folder(how, tmp_path, capsys):
    """VGG-11's five max-pools on the digits' 8x8 images: the dry run passed, and the run ended in a
    traceback after it had claimed its folder (a helper's hunt)."""
    from experiments import regularize

    module, *flags = how.split()
    out = tmp_path / "out"
    tiny = ["--epochs", "1", "--threads", "1", "--out", str(out), *flags]
    with pytest.raises(SystemExit) as exit:
        if module == "train":
            training.main(["--model", "vgg11", *tiny])
        else:
            regularize.main(["--models", "vgg11", "--methods", "plain", "--seeds", "0", *tiny])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "--model vgg11 cannot take the digits images (8x8: " in err and "Traceback" not in err
    assert not out.exists()


def test_an_svc_run_that_would_never_clip_is_refused(tmp_path):
    """The released timing clips at batch index 1 modulo svc_every of each epoch: an epoch of one
    batch, or svc_every 1, never clipped, and the run trained as plain SGD labelled SVC (a helper's hunt)."""
    with pytest.raises(UserError, match="svc_every=1 never clips"):
        RunConfig(method="svc", strength=0.1, svc_every=1)
    assert RunConfig(method="svc", strength=0.1, svc_every=1, svc_timing="steps").svc_every == 1
    out = str(tmp_path / "svc")
    with pytest.raises(UserError, match=r"an epoch of \d+ images in batches of 2000 has 1: it would never clip"):
        train(RunConfig(method="svc", strength=0.1, batch_size=2000, **TINY), out, progress=False)
    assert not os.path.exists(os.path.join(out, "config.json"))  # the claim taken back: the folder stays free
