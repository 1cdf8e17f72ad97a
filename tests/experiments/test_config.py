"""A run's configuration: checks of every number, a fingerprint of what changes results, named differences."""

from __future__ import annotations

import dataclasses
import re

import pytest

from experiments import checkpoints
from experiments.config import RunConfig, UserError, differences, fingerprint


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("epochs", 0),
        ("epochs", -1),
        ("lr", 0.0),
        ("batch_size", 0),
        ("eval_images", 0),
        ("eval_iterations", 0),
        ("eval_targets", 0),
        ("eval_targets", 10),
        ("strength", -0.1),
        ("bn_radius", -1.0),
        ("eval_eps", -1.0),
        ("adv_eps", -0.1),
        ("strength", float("nan")),
        ("eval_eps", float("inf")),
        ("lr", float("inf")),
        ("strength", float("inf")),
        ("sweep", (4.0, float("inf"))),
        ("eval_eps", 255.5),  # past the whole pixel range: at 1e300 ART's NaN images were scored
        ("sweep", (4.0, 256.0)),
        ("seed", -1),
        ("seed", 2**32),
        ("seed", 100_000_000_000_000_000),
        ("model", "lenet"),
        ("method", "dropout"),
    ],
)
def test_impossible_options_are_refused_naming_the_option(option, value):
    with pytest.raises(UserError, match=option.replace("_", "-") if option not in ("model", "method") else repr(value)):
        RunConfig(**{option: value})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": "pgd-at", "strength": 0.5}, "--strength is not used by --method pgd-at"),
        ({"method": "plain", "strength": 0.1}, "--strength is not used by --method plain"),
        ({"method": "nd-linf"}, "--method nd-linf needs --strength > 0"),
        ({"method": "wd", "strength": 0.0}, "--method wd needs --strength > 0"),
        ({"method": "at+nd", "strength": 0.0}, "--method at\\+nd needs --strength > 0"),
        ({"method": "nd-l1", "strength": 0.1, "bn_radius": 2.0}, "--bn-radius is not used by --method nd-l1"),
        ({"method": "trades", "bn_radius": 2.0}, "--bn-radius is not used by --method trades"),
        ({"method": "svc", "strength": 1.0, "skip_layers": "released"}, "--released-skips is not used by --method svc"),
    ],
)
def test_an_option_the_method_ignores_or_a_missing_strength_is_refused(changes, message):
    """They were ignored yet changed the fingerprint: pgd-at at strength 0.5 trained as at 0, and
    nd-linf without --strength ran norm decay with beta 0."""
    with pytest.raises(UserError, match=message):
        RunConfig(**changes)


def test_options_a_method_uses_are_accepted():
    RunConfig(method="nd-l1+bn", strength=0.1, bn_radius=2.0, skip_layers="released")
    RunConfig(method="at+nd", strength=0.01, skip_layers="released")
    RunConfig(method="pgd-at", bn_radius=5.0)  # the protocol's own value: nothing set


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("lr", -1.0, "--lr must be > 0, got -1.0"),
        ("epochs", 0, "--epochs must be at least 1, got 0"),
        # a batch of 2**64 passed the dry run and crashed in the DataLoader
        ("batch_size", 2**64, f"--batch-size must be at most 2147483647, got {2**64}"),
        ("eval_iterations", 2**31, f"--eval-iterations must be at most 2147483647, got {2**31}"),
    ],
)
def test_a_count_must_be_at_least_1_and_a_rate_above_0(option, value, message):
    """--lr -1 answered "must be at least 1 (or > 0)"."""
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        RunConfig(**{option: value})


def test_fingerprint_follows_results_not_paths():
    config = RunConfig()
    assert config.fingerprint() == RunConfig(data_dir="elsewhere", download=True).fingerprint()
    for change in ({"seed": 1}, {"epochs": 3, "milestones": (1,)}, {"eval_iterations": 7}, {"method": "wd", "strength": 0.5}):
        assert RunConfig(**change).fingerprint() != config.fingerprint(), change
    assert fingerprint({**config.as_dict(), "definition": config.definition()}) == config.fingerprint()


def test_radii_and_attacks_in_another_order_or_named_twice_are_the_same_run():
    """--sweep 2,4 and 4,2 (or 2,2 and 2) were other runs, with other folders, of one measurement
    (a helper's hunt); a config.json of an earlier version that kept the command line's order
    still finds its run."""
    config = RunConfig(sweep=(2.0, 4.0))
    assert RunConfig(sweep=(4, 2, 2.0)).sweep == (2.0, 4.0) and RunConfig(sweep=(-0.0,)).sweep == (0.0,)
    assert RunConfig(sweep=(4.0, 2.0, 4.0)).fingerprint() == config.fingerprint()
    assert RunConfig(attacks=("apgd-t", "apgd-t")).attacks == ("apgd-t",)
    earlier = {**config.as_dict(), "sweep": [4.0, 2.0, 2.0], "attacks": ["apgd-ce", "apgd-t", "apgd-ce"]}
    assert differences(earlier, config.as_dict()) == []
    assert fingerprint({**earlier, "definition": config.definition()}) == config.fingerprint()
    # The order of the attacks stays: they draw from one random stream, in order.
    assert RunConfig(attacks=("apgd-t", "apgd-ce")).fingerprint() != RunConfig().fingerprint()


def test_unverified_cifar10_files_are_known_by_their_folder(tmp_path):
    """With --skip-data-checksums the files are whatever their folder holds: a run trained on one
    folder was taken as finished for another (its data_dir stayed out of its identity)."""
    from experiments.train import claim_folder

    unverified = dict(dataset="cifar10", verify_data=False)
    one, other = RunConfig(data_dir=str(tmp_path / "a"), **unverified), RunConfig(data_dir=str(tmp_path / "b"), **unverified)
    assert one.fingerprint() != other.fingerprint()
    assert one.fingerprint() == RunConfig(data_dir=str(tmp_path / "a" / "." / ""), **unverified).fingerprint()
    checked = dict(dataset="cifar10", verify_data=True)
    assert RunConfig(data_dir="a", **checked).fingerprint() == RunConfig(data_dir="b", **checked).fingerprint()
    assert RunConfig(data_dir="a", verify_data=False).fingerprint() == RunConfig(data_dir="b").fingerprint()  # digits
    (tmp_path / "run").mkdir()
    assert not claim_folder(one, str(tmp_path / "run"), resume=True, write=False)  # a dry run writes nothing
    assert claim_folder(one, str(tmp_path / "run"), resume=True)  # written afresh: a failed run takes it back
    with pytest.raises(UserError, match=r"unverified data_dir: '.*a' -> '.*b'"):
        claim_folder(other, str(tmp_path / "run"), resume=True)
    assert not claim_folder(one, str(tmp_path / "run"), resume=True)  # the same folder resumes; its file was there


def test_a_changed_method_definition_is_another_run(monkeypatch, tmp_path):
    import experiments.config
    from experiments.methods import REGISTRY
    from experiments.train import claim_folder

    config = RunConfig(method="at+nd", strength=0.01)
    before = config.fingerprint()
    claim_folder(config, str(tmp_path), resume=True)
    changed = {**REGISTRY, "at+nd": dataclasses.replace(REGISTRY["at+nd"], loss="pgd-at")}
    monkeypatch.setattr(experiments.config, "REGISTRY", changed)
    assert config.fingerprint() != before and config.definition()["loss"] == "pgd-at"
    with pytest.raises(UserError, match="definition of 'at\\+nd'"):
        claim_folder(config, str(tmp_path), resume=True)


# Fingerprints before HE runs logged the applied last-layer weight (commit f0baa51 left them as they were).
FINGERPRINTS_BEFORE_APPLIED_HE_NORMS = {
    "plain": ({}, "747579c2c520"),
    "pgd-at": ({"method": "pgd-at"}, "f4b4cba536fc"),
    "nd-l1": ({"method": "nd-l1", "strength": 0.1}, "6f0b13293029"),
    "pgd-at-he": ({"method": "pgd-at-he"}, "9bd4719cf48f"),
    "trades-he": ({"method": "trades-he"}, "ddbd50de4677"),
    "alp-he": ({"method": "alp-he"}, "292992c86b85"),
}


@pytest.mark.parametrize("name", FINGERPRINTS_BEFORE_APPLIED_HE_NORMS)
def test_he_runs_that_logged_the_raw_last_layer_weight_are_other_runs(name, tmp_path):
    """A study resumed after HE runs started logging scale * normalize(W) read back their finished
    runs, whose fc norms were the raw W's; only HE runs may change identity, the others keep theirs."""
    from experiments.methods import REGISTRY
    from experiments.study import run_folder
    from experiments.train import claim_folder

    changes, before = FINGERPRINTS_BEFORE_APPLIED_HE_NORMS[name]
    config = RunConfig(**changes)
    if not REGISTRY[config.method].he:
        assert config.fingerprint() == before and "last_layer_norms" not in config.definition()
        return
    assert config.fingerprint() != before and not run_folder(config, "out").endswith(before)
    old = {key: value for key, value in config.definition().items() if key != "last_layer_norms"}
    checkpoints.write_json(str(tmp_path / "config.json"), {"config": config.as_dict(), "definition": old})
    with pytest.raises(UserError, match="last_layer_norms"):
        claim_folder(config, str(tmp_path), resume=True)


def test_differences_name_each_changed_option_and_the_config_is_frozen():
    a, b = RunConfig().as_dict(), RunConfig(lr=0.1, seed=2, data_dir="x").as_dict()
    assert differences(a, b) == ["lr: 0.05 -> 0.1", "seed: 0 -> 2"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().lr = 1.0


def test_autoattack_without_torchattacks_is_refused_at_construction(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchattacks" else real(name, *a))
    with pytest.raises(UserError, match="torchattacks"):
        RunConfig(attacks=("apgd-ce", "autoattack"))
    with pytest.raises(UserError, match="--attacks must be"):
        RunConfig(attacks=("cw",))


@pytest.mark.parametrize("method", ["pgd-at", "trades", "alp", "pgd-at-he"])
def test_a_single_adversarial_run_gets_the_adversarial_studys_defaults(method):
    """Launched alone, a CIFAR-10 PGD-AT run trained at the regularization study's lr 0.01 and was
    evaluated at 1/255, so it differed from (and was another run than) the study's one."""
    from experiments.train import parse_args

    alone, _ = parse_args(["--dataset", "cifar10", "--method", method])
    in_the_study = RunConfig.resolve("released", "cifar10", method=method, lr=0.1, eval_eps=8.0)
    assert (alone.lr, alone.eval_eps) == (0.1, 8.0)
    assert alone.fingerprint() == in_the_study.fingerprint()
    digits, _ = parse_args(["--method", method])
    assert digits.eval_eps == 8.0 and digits.lr == RunConfig.resolve("released", "digits").lr
    chosen, _ = parse_args(["--dataset", "cifar10", "--method", method, "--lr", "0.05", "--eval-eps", "2"])
    assert (chosen.lr, chosen.eval_eps) == (0.05, 2.0)  # the command line wins


def test_a_study_sets_its_own_defaults_whatever_the_method():
    """The regularization study keeps its protocol for an adversarial method picked with
    --methods (a first version gave those runs lr 0.1 there: neither study's run)."""
    regularization = RunConfig.resolve("released", "cifar10", method="pgd-at", eval_eps=1.0)
    assert (regularization.lr, regularization.eval_eps) == (0.01, 1.0)


@pytest.mark.parametrize("method", ["plain", "nd-l1", "wd"])
def test_other_methods_keep_the_regularization_defaults(method):
    from experiments.train import parse_args

    config, _ = parse_args(["--dataset", "cifar10", "--method", method] + (["--strength", "0.001"] if method != "plain" else []))
    assert (config.lr, config.eval_eps) == (0.01, 1.0)
