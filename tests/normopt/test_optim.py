"""NormDecayOptimizer as a drop-in torch.optim optimizer: formulas, training, ecosystem, state, errors."""

from __future__ import annotations

import contextlib
import copy
import io
import math
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, batches, deterministic_algorithms, digits, graph_recorder, rings_everywhere, small_cnn
from torch import nn

import normopt
from normopt import NormDecayOptimizer, norm_subgradient

DATA = digits()


def run(model, optimizer, steps, *, seed=0, size=32, closure=False):
    losses = []
    for inputs, labels in batches(*DATA, steps, size, seed):

        def compute(inputs=inputs, labels=labels):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(inputs), labels)
            loss.backward()
            return loss

        if closure:
            losses.append(optimizer.step(compute).item())
        else:
            losses.append(compute().item())
            optimizer.step()
    return losses


def summed_norms(model, ord):
    specs = normopt.layer_specs(model, DATA[0][:1])
    return {name: float(norm) for name, norm in normopt.layer_norms(model.state_dict(), specs, ord).items()}


@pytest.mark.parametrize("rule", ["paper", "reference"])
@pytest.mark.parametrize("ord", [1, math.inf])
def test_first_sgd_step_follows_the_formula(rule, ord):
    """Every regularized weight, batch-norm gamma included, gets exactly the decay term in its step."""
    model = small_cnn(batchnorm=True)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2.0)  # distinct gammas: a unique arg-max channel
    reference = copy.deepcopy(model)
    beta, gamma, lr = 0.3, 0.5, 0.1
    layers = ("conv", "linear", "batchnorm")
    optimizer = NormDecayOptimizer(
        torch.optim.SGD(model.parameters(), lr=lr),
        model,
        ord=ord,
        beta=beta,
        gamma=gamma,
        rule=rule,
        layers=layers,
        example_input=DATA[0][:1],
    )
    inputs, labels = next(batches(*DATA, 1, 16))
    F.cross_entropy(model(inputs), labels).backward()
    F.cross_entropy(reference(inputs), labels).backward()
    specs = normopt.layer_specs(reference, DATA[0][:1])
    optimizer.step()
    n = len(specs)
    assert set(specs) == {"0", "1", "3", "6"}
    for name, spec in specs.items():
        weight = dict(reference.named_parameters())[spec.weight]
        sub = norm_subgradient(reference.state_dict(), spec, ord)
        p = sub.dense(weight)
        h = (1 - gamma) * p if rule == "paper" else torch.where(sub.support(weight), p, 0.0)
        scale = beta / n if rule == "paper" else beta
        expected = weight - lr * (weight.grad + scale * h)
        assert_close(dict(model.named_parameters())[spec.weight], expected, rtol=1e-6, atol=1e-7, msg=name)
        assert_close(optimizer.last_norms[name], sub.norm)
        assert not torch.equal(dict(model.named_parameters())[spec.weight], weight - lr * weight.grad)  # decay applied
    biases = [n for n, _ in model.named_parameters() if n.endswith("bias")]
    for name in biases:  # not regularized: plain SGD
        ref = dict(reference.named_parameters())[name]
        assert_close(dict(model.named_parameters())[name], ref - lr * ref.grad, rtol=1e-6)


@pytest.mark.parametrize("ord", [1, math.inf])
def test_norms_fall_with_norm_decay_and_not_without(ord):
    before = summed_norms(small_cnn(), ord)
    plain, regularized = small_cnn(), small_cnn()
    run(plain, torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9), 150)
    run(regularized, NormDecayOptimizer(torch.optim.SGD(regularized.parameters(), lr=0.05), regularized, ord=ord, beta=0.1), 150)
    after_plain, after_regularized = summed_norms(plain, ord), summed_norms(regularized, ord)
    assert sum(after_plain.values()) > sum(before.values())
    for name in before:
        assert after_regularized[name] < before[name], name
    assert sum(after_regularized.values()) < 0.75 * sum(before.values())


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.05),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
        lambda p: torch.optim.Adam(p, lr=1e-2),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
    ],
    ids=["sgd", "sgd-nesterov", "adam", "adamw"],
)
def test_inner_optimizers_train_wrapped(make):
    model = small_cnn(batchnorm=True)
    optimizer = NormDecayOptimizer(make(model.parameters()), model, beta=1e-2, layers=("conv", "linear", "batchnorm"))
    losses = run(model, optimizer, 40)
    assert sum(losses[-5:]) < sum(losses[:5])
    assert set(optimizer.last_norms) == {"0", "1", "3", "6"}
    assert all(h.abs().sum() > 0 for h in optimizer.norm_decay.decay_buffers().values())
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "make",
    [
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
    ],
    ids=["step", "onecycle", "cosine"],
)
def test_schedulers_drive_the_inner_learning_rate(make):
    model = small_cnn()
    inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    optimizer = NormDecayOptimizer(inner, model)
    shadow = torch.optim.SGD(small_cnn().parameters(), lr=0.05, momentum=0.9)
    scheduler, shadow_scheduler = make(optimizer), make(shadow)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for inputs, labels in batches(*DATA, 8, 16):
            optimizer.zero_grad()
            F.cross_entropy(model(inputs), labels).backward()
            optimizer.step()
            scheduler.step()
            shadow.step()
            shadow_scheduler.step()
            assert inner.param_groups[0]["lr"] == shadow.param_groups[0]["lr"]
            assert optimizer.param_groups[0]["lr"] == shadow.param_groups[0]["lr"]
    assert inner.param_groups[0]["lr"] != 0.05


def test_grad_scaler_with_bfloat16_autocast_matches_an_unscaled_run():
    def train(use_scaler):
        model = small_cnn()
        optimizer = NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, beta=0.05)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=use_scaler)
        for inputs, labels in batches(*DATA, 5, 16):
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(inputs), labels)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # optional; decay must land on unscaled gradients either way
            scaler.step(optimizer)
            scaler.update()
        return model.state_dict(), scaler

    scaled, scaler = train(True)
    unscaled, _ = train(False)
    assert scaler.get_scale() == 2.0**10  # no overflow, so every step ran
    for key in scaled:
        assert_close(scaled[key], unscaled[key], rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("make", [lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), lambda p: torch.optim.Adam(p, lr=1e-2)])
@pytest.mark.parametrize("rule", ["paper", "reference"])
def test_resume_from_checkpoint_is_bit_for_bit(make, rule):
    def fresh():
        model = small_cnn(batchnorm=True)
        return model, NormDecayOptimizer(make(model.parameters()), model, beta=0.05, rule=rule, bn_max_norm=5.0)

    model, optimizer = fresh()
    run(model, optimizer, 4, seed=1)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    run(model, optimizer, 4, seed=2)

    resumed, resumed_optimizer = fresh()
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    assert set(checkpoint["optimizer"]) == {"state", "param_groups", "norm_decay_ords"}  # the checkpoint is not consumed
    run(resumed, resumed_optimizer, 4, seed=2)
    for key, value in model.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    for name, h in optimizer.norm_decay.decay_buffers().items():
        assert torch.equal(h, resumed_optimizer.norm_decay.decay_buffers()[name])


@pytest.mark.parametrize("bn", ["exact", "released"])
@pytest.mark.parametrize("through", ["wrapper", "hooks"])
@pytest.mark.parametrize(("ord", "gamma"), [("l1", 0.5), ("linf", 0.5), ("linf", 0.7)])
def test_torch_distributed_checkpoints_state_dict_functions_resume_bit_for_bit(through, ord, gamma, bn):
    """torch.distributed.checkpoint keys the state by parameter name and keeps only ``state`` and
    ``param_groups``; the decay state of stepped weights lives in ``state``, so it comes along.
    Its set_optimizer_state_dict first steps a fresh optimizer (zero gradients, lr 0), where the
    released batch-norm cap acts: the model's state is loaded after it. A run at gamma 0.7 keeps
    rings of 47 steps, which the resumed optimizer, built with the default gamma, takes on."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def fresh(gamma=0.5):
        model = small_cnn(batchnorm=True)
        inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        options = {"ord": ord, "beta": 0.05, "gamma": gamma, "bn_max_norm": 0.5, "bn_projection": bn}
        if through == "hooks":
            normopt.attach_norm_decay(inner, model, **options)
            return model, inner
        return model, NormDecayOptimizer(inner, model, **options)

    with rings_everywhere():  # so that the l_inf runs carry their rings too
        model, optimizer = fresh(gamma)
        run(model, optimizer, 3 if gamma == 0.5 else 40, seed=1)
        checkpoint = copy.deepcopy({"model": model.state_dict(), "optimizer": get_optimizer_state_dict(model, optimizer)})
        run(model, optimizer, 3, seed=2)
        resumed, resumed_optimizer = fresh()
        set_optimizer_state_dict(resumed, resumed_optimizer, checkpoint["optimizer"])
        resumed.load_state_dict(checkpoint["model"])
        saved = checkpoint["optimizer"]["state"]["0.weight"]
        assert "norm_decay_buffer" in saved and ("norm_decay_recent" in saved) == (ord == "linf")
        run(resumed, resumed_optimizer, 3, seed=2)
    for key, value in model.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


@pytest.mark.parametrize("through", ["wrapper", "hooks"])
def test_a_checkpoint_taken_right_after_a_load_into_a_stepped_optimizer_holds_h_in_its_state(through):
    """A trainer may checkpoint at its resume step, and torch.distributed.checkpoint (whose load
    steps first) and ZeRO read ``state`` only."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def fresh():
        model = small_cnn()
        inner = torch.optim.Adam(model.parameters(), lr=1e-2)
        if through == "hooks":
            return model, inner, normopt.attach_norm_decay(inner, model, beta=0.05)
        optimizer = NormDecayOptimizer(inner, model, beta=0.05)
        return model, optimizer, optimizer.norm_decay

    model, optimizer, decay = fresh()
    run(model, optimizer, 3)
    saved, h = copy.deepcopy(optimizer.state_dict()), decay.decay_buffers()
    run(model, optimizer, 1)
    optimizer.load_state_dict(copy.deepcopy(saved))  # a rollback
    assert all("norm_decay_buffer" in optimizer.state[p] for p in (model[0].weight, model[3].weight, model[6].weight))
    checkpoint = copy.deepcopy(get_optimizer_state_dict(model, optimizer))
    for _ in range(2):  # resume, checkpoint at once, resume from that
        model, optimizer, decay = fresh()
        set_optimizer_state_dict(model, optimizer, checkpoint)
        checkpoint = copy.deepcopy(get_optimizer_state_dict(model, optimizer))
    for name, value in h.items():
        assert torch.equal(decay.decay_buffers()[name], value), name


@pytest.mark.parametrize("bn_projection", ["exact", "released"])
@pytest.mark.parametrize("rule", ["paper", "reference"])
@pytest.mark.parametrize("ord", ["l1", "linf"])
def test_a_run_under_deterministic_algorithms_gives_the_weights_of_one_without(ord, rule, bn_projection):
    def train(deterministic):
        model = small_cnn(batchnorm=True)
        inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        options = {"bn_max_norm": 0.5, "bn_projection": bn_projection, "layers": ("conv", "linear", "batchnorm")}
        optimizer = NormDecayOptimizer(inner, model, ord=ord, rule=rule, beta=0.05, **options)
        with deterministic_algorithms() if deterministic else contextlib.nullcontext():
            with rings_everywhere():
                run(model, optimizer, 3)
        return model.state_dict()

    expected = train(False)
    for key, value in train(True).items():
        assert torch.equal(value, expected[key]), key


def test_a_plain_inner_state_dict_loads():
    model = small_cnn()
    plain = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    run(model, plain, 2)
    optimizer = NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model)
    optimizer.load_state_dict(plain.state_dict())
    assert optimizer.optimizer.state_dict()["state"].keys() == plain.state_dict()["state"].keys()
    assert all(not h.any() for h in optimizer.norm_decay.decay_buffers().values())
    assert optimizer.state is optimizer.optimizer.state and optimizer.param_groups is optimizer.optimizer.param_groups


@pytest.mark.parametrize("through", ["wrapper", "hooks"])
def test_a_plain_checkpoint_keeps_each_groups_beta_and_gamma(through):
    """torch replaces the param groups with the checkpoint's, which a plain optimizer wrote without
    these keys: each group keeps what it had (torch fills in its own missing options alike)."""
    torch.manual_seed(0)
    model = small_cnn()
    groups = lambda m: [{"params": m[0].parameters()}, {"params": [p for n, p in m.named_parameters() if not n.startswith("0.")]}]
    plain = torch.optim.SGD(groups(model), lr=0.05, momentum=0.9)
    run(model, plain, 2)
    checkpoint = copy.deepcopy(plain.state_dict())
    inner = torch.optim.SGD(groups(model), lr=0.05, momentum=0.9)
    inner.param_groups[0]["norm_decay_beta"] = 0.0  # no decay for the stem
    if through == "hooks":
        normopt.attach_norm_decay(inner, model, beta=0.1, gamma=0.7)
        optimizer = inner
    else:
        optimizer = NormDecayOptimizer(inner, model, beta=0.1, gamma=0.7)
    optimizer.load_state_dict(checkpoint)
    assert [(g["norm_decay_beta"], g["norm_decay_gamma"]) for g in optimizer.param_groups] == [(0.0, 0.7), (0.1, 0.7)]
    for group in optimizer.param_groups:  # a hand-written schedule
        group["norm_decay_beta"] *= 0.5
    stem = model[0].weight.detach().clone()
    twin = copy.deepcopy(model)
    twin_plain = torch.optim.SGD(groups(twin), lr=0.05, momentum=0.9)
    twin_plain.load_state_dict(copy.deepcopy(checkpoint))  # torch loads the tensors themselves, not copies
    run(model, optimizer, 1, seed=3)
    run(twin, twin_plain, 1, seed=3)
    assert torch.equal(model[0].weight, twin[0].weight) and not torch.equal(model[0].weight, stem)  # beta 0 there
    assert not torch.equal(model[3].weight, twin[3].weight)


@pytest.mark.parametrize("inner", ["SGD", "LBFGS"])
def test_global_step_hooks_run_once_per_step_and_the_wrappers_own_around_it(inner):
    """torch hooks every optimizer class's step with the instance's and the global step hooks: the
    global ones run once, around the inner step; the wrapper's own around the whole step."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    calls = []

    def halve(optimizer, args, kwargs):  # a pre-hook that changes the gradients: it must act once
        calls.append(("pre", type(optimizer).__name__))
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(0.5)

    make = {
        "SGD": lambda m: torch.optim.SGD(m.parameters(), lr=0.5),
        "LBFGS": lambda m: torch.optim.LBFGS(m.parameters(), max_iter=1),
    }
    model, twin = small_cnn(), small_cnn()
    optimizer, plain = NormDecayOptimizer(make[inner](model), model, beta=0.0), make[inner](twin)
    own = []
    optimizer.optimizer.register_step_pre_hook(lambda *_: own.append("inner pre"))
    optimizer.register_step_pre_hook(lambda o, args, kwargs: own.append(("wrapper pre", o is optimizer, len(args))))
    optimizer.register_step_post_hook(lambda o, args, kwargs: own.append("wrapper post"))
    handles = [
        register_optimizer_step_pre_hook(halve),
        register_optimizer_step_post_hook(lambda o, *_: calls.append(("post", type(o).__name__))),
    ]
    try:
        # (SGD given a closure would run the global hooks after it, where torch runs them before.)
        run(model, optimizer, 2, closure=inner == "LBFGS")
        wrapped_calls, calls[:] = list(calls), []
        run(twin, plain, 2, closure=inner == "LBFGS")
    finally:
        for handle in handles:
            handle.remove()
    assert wrapped_calls == calls == [(kind, inner) for kind in ("pre", "post")] * 2
    with_closure = 2 if inner == "LBFGS" else 1  # (self, closure) or (self,)
    assert own == [("wrapper pre", True, with_closure), "inner pre", "wrapper post"] * 2
    for key, value in model.state_dict().items():
        assert torch.equal(value, twin.state_dict()[key]), key


def test_state_dict_hooks_registered_on_the_wrapper_run_as_on_a_torch_optimizer():
    model = small_cnn()
    optimizer = NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model)
    run(model, optimizer, 2)
    calls = []
    optimizer.register_state_dict_pre_hook(lambda opt: calls.append(("save pre", opt)))
    optimizer.register_state_dict_post_hook(lambda opt, sd: {**sd, "epoch": 7})
    optimizer.register_load_state_dict_pre_hook(
        lambda opt, sd: calls.append(("load pre", opt, sd.get("epoch"))) or {k: v for k, v in sd.items() if k != "epoch"}
    )
    optimizer.register_load_state_dict_post_hook(lambda opt: calls.append(("load post", opt)))
    saved = optimizer.state_dict()
    assert saved["epoch"] == 7 and "norm_decay_buffer" in saved["state"][0]
    optimizer.load_state_dict(saved)  # the inner optimizer never sees "epoch"
    assert calls == [("save pre", optimizer), ("load pre", optimizer, 7), ("load post", optimizer)]


def test_a_bad_checkpoint_is_refused_before_anything_changes():
    model = small_cnn()
    optimizer = NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model)
    run(model, optimizer, 2)
    state = copy.deepcopy(optimizer.state_dict())
    before = optimizer.norm_decay.decay_buffers()
    state["state"][0]["norm_decay_buffer"] = torch.zeros(3)  # parameter 0 is layer '0's weight
    state["param_groups"][0]["lr"] = 123.0
    with pytest.raises(ValueError, match=r"decay buffer of layer '0' has shape \(3,\)"):
        optimizer.load_state_dict(state)
    assert optimizer.param_groups[0]["lr"] == 0.05
    assert torch.equal(optimizer.norm_decay.decay_buffers()["0"], before["0"])


def test_a_checkpoint_the_inner_optimizer_refuses_half_way_changes_nothing():
    """Adam given an SGD checkpoint (no "step") raises in its __setstate__, after torch put the
    checkpoint's groups in place: the wrapper's groups lost their betas and norm_decay_beta, and
    the next step raised KeyError: 'betas'."""
    sgd_model = small_cnn()
    sgd = NormDecayOptimizer(torch.optim.SGD(sgd_model.parameters(), lr=0.05, momentum=0.9), sgd_model)
    run(sgd_model, sgd, 1)
    model = small_cnn()
    optimizer = NormDecayOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), model, beta=0.1)
    run(model, optimizer, 2)
    twin, twin_optimizer = copy.deepcopy((model, optimizer))
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(KeyError, match="step"):
        optimizer.load_state_dict(copy.deepcopy(sgd.state_dict()))
    after = optimizer.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for index, entry in before["state"].items():
        for key, value in entry.items():
            assert torch.equal(after["state"][index][key], value), (index, key)
    run(model, optimizer, 2, seed=5)
    run(twin, twin_optimizer, 2, seed=5)
    for mine, theirs in zip(model.parameters(), twin.parameters()):
        assert torch.equal(mine, theirs)


def test_closure_is_evaluated_once_and_matches_the_plain_loop():
    calls = []
    model, twin = small_cnn(), small_cnn()
    optimizer = NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, beta=0.1)
    original = optimizer.optimizer.step

    def counting_step(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    optimizer.optimizer.step = counting_step
    run(model, optimizer, 3, closure=True)
    run(twin, NormDecayOptimizer(torch.optim.SGD(twin.parameters(), lr=0.05), twin, beta=0.1), 3)
    assert calls == [(), (), ()]  # the inner optimizer never sees the closure
    for key, value in model.state_dict().items():
        assert torch.equal(value, twin.state_dict()[key])


def test_lbfgs_gets_the_decay_after_every_closure_evaluation():
    model = small_cnn()
    optimizer = NormDecayOptimizer(torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4), model, beta=0.01)
    seen = []
    original = optimizer.norm_decay.before_step
    optimizer.norm_decay.before_step = lambda: seen.append(1) or original()
    losses = run(model, optimizer, 3, closure=True)
    assert len(seen) >= 3 * 2  # LBFGS evaluated the closure several times per step, each decayed
    assert losses[-1] < losses[0] and "6" in optimizer.last_norms
    with pytest.raises(ValueError, match="LBFGS needs a closure"):
        optimizer.step()


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    model = small_cnn()
    optimizer = NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model)
    run(model, optimizer, 1)
    optimizer.zero_grad(set_to_none=set_to_none)
    for p in model.parameters():
        assert (p.grad is None) if set_to_none else torch.equal(p.grad, torch.zeros_like(p))


def test_is_an_optimizer_sharing_groups_state_and_defaults():
    model = small_cnn()
    inner = torch.optim.Adam(model.parameters(), lr=1e-3)
    optimizer = NormDecayOptimizer(inner, model)
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert optimizer.param_groups is inner.param_groups
    assert optimizer.state is inner.state
    assert optimizer.defaults is inner.defaults
    assert not hasattr(optimizer, "_step_supports_amp_scaling")
    assert "NormDecayOptimizer(Adam" in repr(optimizer)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")
def test_loading_the_inner_optimizer_directly_keeps_the_wrapper_in_step():
    model, twin = small_cnn(), small_cnn()
    optimizer = NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, beta=0.1)
    run(model, optimizer, 2)
    twin.load_state_dict(model.state_dict())
    twin_optimizer = NormDecayOptimizer(torch.optim.SGD(twin.parameters(), lr=0.5, momentum=0.9), twin, beta=0.3)
    scheduler = torch.optim.lr_scheduler.StepLR(twin_optimizer, step_size=1, gamma=0.5)
    twin_optimizer.optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # torch replaces the inner groups and state
    assert twin_optimizer.param_groups is twin_optimizer.optimizer.param_groups
    assert twin_optimizer.state is twin_optimizer.optimizer.state
    assert twin_optimizer.param_groups[0]["norm_decay_beta"] == 0.1
    scheduler.step()  # reaches the loaded groups
    assert twin_optimizer.optimizer.param_groups[0]["lr"] == 0.05
    for group in (optimizer.param_groups[0], twin_optimizer.param_groups[0]):
        group["lr"], group["norm_decay_beta"] = 0.05, 0.2
    run(model, optimizer, 1, seed=5)
    run(twin, twin_optimizer, 1, seed=5)
    for key, value in model.state_dict().items():
        assert torch.equal(value, twin.state_dict()[key]), key


def test_a_deep_copy_trains_like_the_original_and_previews_its_schedule():
    model = small_cnn()
    optimizer = NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, ord="linf", beta=0.1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1.0, total_steps=10)
    run(model, optimizer, 1)
    scheduler.step()
    preview = copy.deepcopy(scheduler)  # a schedule previewed on a copy leaves the original alone
    lr = optimizer.param_groups[0]["lr"]
    for _ in range(3):
        preview.step()
    assert optimizer.param_groups[0]["lr"] == lr != preview.optimizer.param_groups[0]["lr"]
    twin, twin_optimizer, twin_scheduler = copy.deepcopy((model, optimizer, scheduler))
    assert twin_optimizer.norm_decay.model is twin and twin_optimizer.param_groups is twin_optimizer.optimizer.param_groups
    for seed in range(1, 4):
        for m, o, sch in ((model, optimizer, scheduler), (twin, twin_optimizer, twin_scheduler)):
            run(m, o, 1, seed=seed)
            sch.step()
    for key, value in model.state_dict().items():
        assert torch.equal(value, twin.state_dict()[key]), key


@pytest.mark.parametrize("ord", ["l1", "linf"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_made_after_steps_trains_like_the_original_and_apart_from_it(how, ord):
    with rings_everywhere():  # so that the l_inf run and its copy carry rings
        model = small_cnn(batchnorm=True)
        inner = torch.optim.Adam(model.parameters(), lr=1e-2)
        optimizer = NormDecayOptimizer(inner, model, ord=ord, beta=0.1, layers=("conv", "linear", "batchnorm"))
        run(model, optimizer, 3)
        twin, twin_optimizer = (
            copy.deepcopy((model, optimizer)) if how == "deepcopy" else pickle.loads(pickle.dumps((model, optimizer)))
        )
        for m, o in ((model, optimizer), (twin, twin_optimizer)):
            run(m, o, 3, seed=1)
    assert bool(twin_optimizer.norm_decay._state.recent) == bool(optimizer.norm_decay._state.recent) == (ord == "linf")
    for key, value in model.state_dict().items():
        assert torch.equal(value, twin.state_dict()[key]), key
    for name, h in optimizer.norm_decay.decay_buffers().items():
        assert torch.equal(twin_optimizer.norm_decay.decay_buffers()[name], h), name
    twin[6] = nn.Linear(128, 10)  # the copy chooses its layers anew; the original steps as before
    twin_optimizer.add_param_group({"params": twin[6].parameters()})
    run(twin, twin_optimizer, 1, seed=2)
    run(model, optimizer, 1, seed=2)
    assert sorted(optimizer.last_norms) == ["0", "1", "3", "6"]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_made_before_the_first_step_records_sizes_and_loads_checkpoints_as_the_original(how):
    torch.manual_seed(0)
    # A 9x9 kernel on 8x8 inputs: its norm depends on the input size the first forward records.
    model = nn.Sequential(nn.Conv2d(1, 4, 9, padding=4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
    optimizer = NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, ord="linf", beta=0.1)
    twin, twin_optimizer = (
        copy.deepcopy((model, optimizer)) if how == "deepcopy" else pickle.loads(pickle.dumps((model, optimizer)))
    )
    for m, o in ((model, optimizer), (twin, twin_optimizer)):
        run(m, o, 2)
    assert twin_optimizer.norm_decay.specs["0"].input_size == (8, 8)
    for name, norm in optimizer.last_norms.items():
        assert torch.equal(twin_optimizer.last_norms[name], norm), name
    checkpoint = copy.deepcopy(optimizer.state_dict())
    run(twin, twin_optimizer, 1, seed=3)
    twin_optimizer.load_state_dict(copy.deepcopy(checkpoint))  # through the copy's own hooks
    for name, h in optimizer.norm_decay.decay_buffers().items():
        assert torch.equal(twin_optimizer.norm_decay.decay_buffers()[name], h), name
    checkpoint["state"][0]["norm_decay_buffer"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"decay buffer of layer '0' has shape \(3,\)"):
        twin_optimizer.load_state_dict(checkpoint)


def test_add_param_group_reaches_the_inner_optimizer_and_is_regularized():
    model = small_cnn()
    head = [p for n, p in model.named_parameters() if n.startswith("6.")]
    body = [p for n, p in model.named_parameters() if not n.startswith("6.")]
    optimizer = NormDecayOptimizer(torch.optim.SGD(body, lr=0.05), model, beta=0.1)
    assert "6" not in optimizer.norm_decay.decayed
    optimizer.add_param_group({"params": head, "lr": 0.01})
    assert len(optimizer.optimizer.param_groups) == 2 and optimizer.param_groups[1]["lr"] == 0.01
    run(model, optimizer, 1)
    assert "6" in optimizer.last_norms


def test_frozen_layers_and_parameters_without_gradient_are_left_alone():
    model = small_cnn()
    model[0].weight.requires_grad_(False)
    optimizer = NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, beta=0.1)
    frozen = model[0].weight.clone()
    run(model, optimizer, 2)
    assert torch.equal(model[0].weight, frozen) and model[0].weight.grad is None
    assert "0" not in optimizer.last_norms and "3" in optimizer.last_norms


def test_lazy_discovery_records_sizes_from_the_training_forward_without_an_extra_pass():
    model = small_cnn(batchnorm=True)
    # beta=0: the weights follow plain SGD exactly, so equal statistics mean equal numbers of forwards.
    optimizer = NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, beta=0.0)
    twin = small_cnn(batchnorm=True)
    run(model, optimizer, 2)
    run(twin, torch.optim.SGD(twin.parameters(), lr=0.05), 2)
    assert torch.equal(model[1].running_mean, twin[1].running_mean)  # same number of forwards
    probed = normopt.layer_specs(model, DATA[0][:1])
    for name, spec in optimizer.norm_decay.decayed.items():
        assert spec == probed[name]
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_compiled_model_trains_wrapped():
    model = small_cnn()
    compiled = torch.compile(model, backend="aot_eager")
    optimizer = NormDecayOptimizer(torch.optim.SGD(compiled.parameters(), lr=0.05), compiled, beta=0.1)
    losses = run(compiled, optimizer, 4)
    assert all(math.isfinite(loss) for loss in losses)
    assert optimizer.norm_decay.decayed["0"].input_size == (8, 8)


@pytest.mark.parametrize(("ord", "rings"), [(1, False), (math.inf, False), (math.inf, True)], ids=["l1", "linf", "linf-rings"])
def test_compiled_step_equals_eager_and_breaks_only_where_torch_optim_does(ord, rings):
    import torch._dynamo

    def train(compile_step):
        with rings_everywhere() if rings else contextlib.nullcontext():
            return _train(compile_step)

    def _train(compile_step):
        model = small_cnn(batchnorm=True)
        optimizer = NormDecayOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
            model,
            ord=ord,
            beta=0.1,
            layers=("conv", "linear", "batchnorm"),
        )
        run(model, optimizer, 1)  # the first, eager step records the input sizes
        if compile_step:
            optimizer.step = torch.compile(optimizer.step, backend="aot_eager")
        run(model, optimizer, 3, seed=1)
        return model, optimizer

    torch._dynamo.reset()
    eager, _ = train(False)
    getattr(torch._dynamo.utils, "warn_once_cache", set()).clear()  # dynamo warns once per message and process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled, optimizer = train(True)
    assert not caught, [str(w.message) for w in caught]  # e.g. dynamo on a functools cache in the step
    assert bool(optimizer.norm_decay._state.recent) == rings
    for key, value in eager.state_dict().items():
        assert_close(compiled.state_dict()[key], value, rtol=1e-6, atol=1e-7, msg=key)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(NormDecayOptimizer.step)(optimizer)
    assert explained.graph_break_count <= 1, [b.reason for b in explained.break_reasons]
    for reason in explained.break_reasons:  # the one torch.optim inserts around every optimizer's step
        assert reason.user_stack[-1].filename.endswith("torch/optim/optimizer.py"), reason


@pytest.mark.parametrize("shared", [True, False], ids=["one-tensor", "a-tensor-per-group"])
@pytest.mark.parametrize(("ord", "rings"), [(1, False), (math.inf, True)], ids=["l1", "linf-rings"])
def test_a_tensor_beta_changed_between_compiled_steps_does_not_recompile(ord, rings, shared):
    # A float beta is a constant of the graph: each new value recompiled the step (and past
    # dynamo's recompile limit the step ran eagerly). A 0-d tensor is an input, as torch.optim's
    # tensor lr.
    import torch._dynamo

    graphs, counting = graph_recorder()

    def train(compile_step):
        with rings_everywhere() if rings else contextlib.nullcontext():
            model = small_cnn()
            head = [p for n, p in model.named_parameters() if n.startswith("6.")]
            body = [p for n, p in model.named_parameters() if not n.startswith("6.")]
            groups = [{"params": body}, {"params": head}]
            if not shared:
                groups[1]["norm_decay_beta"] = torch.tensor(0.05)
            inner = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
            optimizer = NormDecayOptimizer(inner, model, ord=ord, beta=torch.tensor(0.1))
            run(model, optimizer, 1)
        if compile_step:
            optimizer.step = torch.compile(optimizer.step, backend=counting)
        for step in range(4):
            if step == 1:
                compiled_before = len(graphs)
            betas = {id(g["norm_decay_beta"]): g["norm_decay_beta"] for g in optimizer.param_groups}
            for beta in betas.values():  # in place, as torch's schedulers change a tensor lr
                beta.mul_(2.0)
            run(model, optimizer, 1, seed=step + 1)
        assert len(graphs) == (compiled_before if compile_step else 0)
        return model, optimizer

    torch._dynamo.reset()
    eager, _ = train(False)
    compiled, optimizer = train(True)
    assert graphs and bool(optimizer.norm_decay._state.recent) == rings
    assert [float(g["norm_decay_beta"]) for g in optimizer.param_groups] == pytest.approx([1.6, 1.6 if shared else 0.8])
    for key, value in eager.state_dict().items():
        assert_close(compiled.state_dict()[key], value, rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("then", [None, "aot_eager"], ids=["dynamo", "aot_eager"])
def test_a_tensor_beta_and_a_shared_gamma_changed_between_compiled_steps_recompile_once_without_a_graph_break(then):
    # After a float's value changes dynamo traces it as a symbol: math.isfinite on it broke the
    # graph inside the step, and a set() of gammas fixed each new value (a recompile per value,
    # then eager past dynamo's recompile limit). Now the first change of gamma recompiles and later
    # ones reuse that graph, and a tensor beta changed in place never recompiles. (A float beta
    # recompiles at every new value under AOTAutograd, which fixes it as torch.optim's float lr.)
    import logging

    import torch._dynamo

    breaks = []
    graphs, counting = graph_recorder(then)

    class Collect(logging.Handler):
        def emit(self, record):
            breaks.append(record.getMessage())

    def train(compile_step):
        model = small_cnn()
        groups = [{"params": model[0].parameters()}, {"params": [p for n, p in model.named_parameters() if n[0] != "0"]}]
        optimizer = NormDecayOptimizer(torch.optim.SGD(groups, lr=0.05), model, ord="linf", beta=torch.tensor(0.1))
        for group in optimizer.param_groups:  # one tensor per group
            group["norm_decay_beta"] = torch.tensor(0.1)
        run(model, optimizer, 1)
        if compile_step:
            optimizer.step = torch.compile(optimizer.step, backend=counting)
        counts = []
        for step in range(5):
            for i, group in enumerate(optimizer.param_groups):
                group["norm_decay_beta"].fill_(0.1 * (step + 2 + i))
                group["norm_decay_gamma"] = 0.5 - 0.05 * step
            run(model, optimizer, 1, seed=step + 1)
            counts.append(len(graphs))
        return model, counts

    torch._dynamo.reset()
    eager, _ = train(False)
    logger, handler = logging.getLogger("torch._dynamo.symbolic_convert.__graph_breaks"), Collect()
    logger.addHandler(handler)
    torch._logging.set_logs(graph_breaks=True)
    try:
        compiled, counts = train(True)
    finally:
        torch._logging.set_logs()
        logger.removeHandler(handler)
    assert breaks  # torch.optim's own break is seen, so a break of normopt's would be too
    where = [b.splitlines()[0] for b in breaks]  # "Graph break ... in user code at <file>:<line>"
    assert all(w.split(" at ")[-1].split(":")[0].endswith("torch/optim/optimizer.py") for w in where), where
    assert counts[2:] == counts[1:2] * 3, counts  # no graph after the first change's recompile
    for key, value in eager.state_dict().items():
        assert_close(compiled.state_dict()[key], value, rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("example", [False, True], ids=["discovered", "example-input"])
def test_a_compiled_step_sets_the_decay_up_outside_the_graph_first_and_after_add_param_group(example):
    import torch._dynamo

    def train(compile_step, beta=0.1):
        model = small_cnn()
        head = [p for n, p in model.named_parameters() if n.startswith("6.")]
        body = [p for n, p in model.named_parameters() if not n.startswith("6.")]
        example_input = torch.zeros(1, 1, 8, 8) if example else None
        inner = torch.optim.SGD(body, lr=0.05, momentum=0.9)
        optimizer = NormDecayOptimizer(inner, model, beta=beta, example_input=example_input)
        if compile_step:  # from the very first step
            optimizer.step = torch.compile(optimizer.step, backend="aot_eager")
        run(model, optimizer, 2)
        optimizer.add_param_group({"params": head})
        run(model, optimizer, 2, seed=1)
        return model, optimizer

    torch._dynamo.reset()
    eager, _ = train(False)
    compiled, optimizer = train(True)
    undecayed, _ = train(False, beta=0.0)
    assert sorted(optimizer.last_norms) == ["0", "3", "6"]
    for key, value in eager.state_dict().items():
        assert_close(compiled.state_dict()[key], value, rtol=1e-6, atol=1e-7, msg=key)
    assert not torch.allclose(eager[6].weight, undecayed[6].weight, rtol=1e-4)


@pytest.mark.parametrize("ord", [1, math.inf], ids=["l1", "linf"])
def test_a_compiled_step_takes_each_decay_buffer_once_per_graph(ord):
    # A view handed in beside the buffer it aliases made AOTAutograd copy every buffer and back.
    import torch._dynamo

    torch._dynamo.reset()
    model = small_cnn(batchnorm=True)
    optimizer = NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, ord=ord, beta=0.1)
    run(model, optimizer, 1)
    graphs = []

    def backend(graph, example_inputs):
        graphs.append([t.untyped_storage().data_ptr() for t in example_inputs if isinstance(t, torch.Tensor)])
        return graph.forward

    optimizer.step = torch.compile(optimizer.step, backend=backend)
    run(model, optimizer, 2, seed=1)
    state = optimizer.norm_decay._state
    flats = [flat.untyped_storage().data_ptr() for flat in (*state.buffers, *state.scales)]
    assert any(set(flats) <= set(inputs) for inputs in graphs)  # the decay is in a graph
    for inputs in graphs:
        assert all(inputs.count(flat) <= 1 for flat in flats)


def test_attach_norm_decay_under_a_compiled_step_compiles_once_and_matches_eager():
    # The step post-hook read each weight's .grad; compiled, zero_grad freeing it recompiled the
    # hook's frame at every step (then ran it eagerly past dynamo's recompile limit).
    import torch._dynamo

    graphs, counting = graph_recorder()

    def train(compile_step):
        model = small_cnn()
        inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        normopt.attach_norm_decay(inner, model, ord="linf", beta=0.1)
        run(model, inner, 1)
        step = torch.compile(inner.step, backend=counting) if compile_step else inner.step
        counts = []
        for seed in range(1, 5):
            for inputs, labels in batches(*DATA, 1, 32, seed):
                inner.zero_grad()  # set_to_none: every step's gradients are new tensors
                F.cross_entropy(model(inputs), labels).backward()
                step()
            counts.append(len(graphs))
        return model, counts

    torch._dynamo.reset()
    eager, _ = train(False)
    compiled, counts = train(True)
    assert counts[0] > 0 and counts[1:] == counts[:1] * 3, counts
    for key, value in eager.state_dict().items():
        assert_close(compiled.state_dict()[key], value, rtol=1e-6, atol=1e-7, msg=key)


def _unfreeze_first(model):
    model[0].weight.requires_grad_(True)
    return contextlib.nullcontext()


def _parametrize_head(model):
    nn.utils.parametrizations.weight_norm(model[6])
    return pytest.warns(UserWarning, match="layer '6' is no longer regularized: .*parametrized")


@pytest.mark.parametrize(
    ("change", "layers"), [(_unfreeze_first, {"0", "3", "6"}), (_parametrize_head, {"3"})], ids=["unfrozen", "parametrized"]
)
def test_a_compiled_step_takes_a_layer_changed_after_add_params_as_eager_does(change, layers):
    """Dynamo guards neither requires_grad there nor a parametrization: add_params() tells the step."""
    import torch._dynamo

    def train(compile_step):
        model = small_cnn()
        model[0].weight.requires_grad_(False)
        optimizer = NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, beta=0.1)
        run(model, optimizer, 1)
        step = torch.compile(optimizer.step, backend="aot_eager") if compile_step else optimizer.step
        for seed in range(1, 5):
            if seed == 2:
                with change(model):
                    optimizer.norm_decay.add_params()
            for inputs, labels in batches(*DATA, 1, 32, seed):
                optimizer.zero_grad()
                F.cross_entropy(model(inputs), labels).backward()
                step()
        assert set(optimizer.last_norms) == layers
        return model

    torch._dynamo.reset()
    eager, compiled = train(False), train(True)
    for key, value in eager.state_dict().items():
        assert_close(compiled.state_dict()[key], value, rtol=1e-6, atol=1e-7, msg=key)


def test_attach_norm_decay_matches_the_wrapper():
    model, twin = small_cnn(), small_cnn()
    inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    decay = normopt.attach_norm_decay(inner, model, beta=0.1, max_norm=3.0)
    run(model, inner, 3)
    run(twin, NormDecayOptimizer(torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9), twin, beta=0.1, max_norm=3.0), 3)
    for key, value in model.state_dict().items():
        assert torch.equal(value, twin.state_dict()[key]), key
    with pytest.raises(RuntimeError, match="closure"):
        inner.step(lambda: torch.tensor(0.0))
    decay.detach()
    inner.step(lambda: torch.tensor(0.0))


def test_caps_hold_after_every_step():
    model = small_cnn(batchnorm=True)
    optimizer = NormDecayOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.5), model, ord=1, beta=0.0, max_norm=1.5, bn_max_norm=2.0
    )
    run(model, optimizer, 3)
    specs = normopt.layer_specs(model, DATA[0][:1])
    norms = normopt.layer_norms(model.state_dict(), specs, 1)
    for name, spec in specs.items():
        bound = 2.0 if isinstance(spec, normopt.BatchNormSpec) else 1.5
        assert norms[name] <= bound * (1 + 1e-5), name


def test_non_finite_weights_skip_the_layer_with_one_warning():
    """A layer whose weights hold a NaN gets no decay (so none is written), with one warning."""
    model = small_cnn()
    optimizer = NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, beta=0.1)
    with pytest.warns(UserWarning, match=r"no new subgradient of layers \['3'\]") as record:
        for inputs, labels in batches(*DATA, 3, 16):
            optimizer.zero_grad()
            F.cross_entropy(model(inputs), labels).backward()
            with torch.no_grad():
                model[3].weight[0, 0, 0, 0] = float("nan")  # after backward: the gradients stay finite
            optimizer.step()
            assert torch.isnan(model[3].weight).sum() == 1  # the decay wrote no further NaN
            with torch.no_grad():
                model[3].weight[0, 0, 0, 0] = 0.0
    assert sum("no new subgradient of layers" in str(w.message) for w in record) == 1
    buffers = optimizer.norm_decay.decay_buffers()
    assert torch.equal(buffers["3"], torch.zeros_like(model[3].weight))
    assert buffers["0"].abs().sum() > 0  # the other layers were decayed


@pytest.mark.parametrize("rule", ["paper", "reference"])
def test_a_layer_gone_non_finite_keeps_decaying_its_h_as_the_docs_say(rule):
    """No new subgradient for that layer, but its finite h still decays by gamma and is added."""
    model, beta, gamma = small_cnn(), 0.1, 0.5
    optimizer = NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, beta=beta, gamma=gamma, rule=rule)
    run(model, optimizer, 1)
    before = optimizer.norm_decay.decay_buffers()["3"].clone()
    assert before.abs().sum() > 0
    with torch.no_grad():
        model[3].weight[0, 0, 0, 0] = float("nan")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.warns(UserWarning, match=r"no new subgradient of layers \['3'\]"):
        optimizer.step()
    after = optimizer.norm_decay.decay_buffers()["3"]
    assert_close(after, gamma * before)
    strength = beta / len(optimizer.norm_decay.decayed) if rule == "paper" else beta
    assert_close(model[3].weight.grad, strength * after)
    assert torch.isfinite(after).all() and torch.isfinite(model[3].weight.grad).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"beta": -1.0}, ValueError, "beta must be"),
        ({"beta": float("nan")}, ValueError, "beta must be"),
        ({"gamma": 1.5}, ValueError, "gamma must be"),
        ({"ord": "fro"}, ValueError, "unknown norm order"),
        ({"ord": 2}, ValueError, "supports ord 1"),
        ({"rule": "adam"}, ValueError, "unknown rule"),
        ({"layers": ("conv", "attention")}, ValueError, "unknown layer kinds"),
        ({"exclude": ("nope",)}, ValueError, r"exclude names \['nope'\]"),
        ({"max_norm": 0.0}, ValueError, "max_norm must be a positive finite number"),
    ],
)
def test_bad_options_are_refused(kwargs, error, match):
    model = small_cnn()
    with pytest.raises(error, match=match):
        NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, **kwargs)


def test_a_refused_construction_leaves_no_hook_on_the_model():
    model = nn.Sequential(nn.Conv1d(1, 1, 3), nn.LayerNorm(2))
    with pytest.raises(ValueError, match="no layer to regularize"):
        NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, layers=("linear",))
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_max_norm_on_folded_padding_is_refused_before_any_step():
    model = nn.Sequential(nn.Conv1d(1, 1, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match=r"layer '0'.*reflect"):
        NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, max_norm=1.0, example_input=torch.zeros(1, 1, 4))


def test_an_optimizer_without_the_models_parameters_is_refused():
    model = small_cnn()
    with pytest.raises(ValueError, match="holds none of the model's parameters"):
        NormDecayOptimizer(torch.optim.SGD(small_cnn().parameters(), lr=0.1), model)


def test_a_model_without_regularizable_layers_is_refused():
    model = nn.Sequential(nn.LayerNorm(4), nn.Embedding(3, 4))
    with pytest.raises(ValueError, match="no layer to regularize"):
        NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)


def test_not_an_optimizer_is_refused():
    model = small_cnn()
    with pytest.raises(TypeError, match=r"must be a torch\.optim\.Optimizer"):
        NormDecayOptimizer(model.parameters(), model)


def test_fsdp_sharded_parameters_are_refused(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = small_cnn()
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        with pytest.raises(NotImplementedError, match="FSDP"):
            NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_one_process_on_the_global_batch(tmp_path):
    import ddp_worker

    torch.multiprocessing.spawn(ddp_worker.train_ddp, args=(2, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    single = ddp_worker.train_single()
    for key in single:
        assert torch.equal(rank0[key], rank1[key]), key
        assert_close(rank0[key], single[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize(("bn_projection", "through"), [("exact", "wrapper"), ("released", "hooks")])
def test_ddp_replicas_agree_on_input_sizes_and_batch_norm_variances(tmp_path, bn_projection, through):
    """Each replica records its own input sizes and updates its own running variances; given the
    DDP model, norm decay takes every rank's sizes and the first rank's variances."""
    import ddp_worker

    torch.multiprocessing.spawn(ddp_worker.replicas_agree, args=(2, str(tmp_path), bn_projection, through), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0["sizes"] == rank1["sizes"]
    for key, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][key]), key


@pytest.mark.parametrize("through", ["wrapper", "hooks", "svc"])
def test_a_replica_whose_first_forward_runs_no_convolution_gathers_the_sizes_with_the_others(tmp_path, through):
    import ddp_worker

    torch.multiprocessing.spawn(ddp_worker.no_conv_on_one_rank, args=(2, str(tmp_path), through), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), key


def test_periodic_svc_on_ddp_replicas_of_different_input_sizes_decides_alike(tmp_path):
    import ddp_worker

    torch.multiprocessing.spawn(ddp_worker.periodic_svc_agrees, args=(2, str(tmp_path)), nprocs=2, join=True, daemon=True)
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert outcomes[0] == outcomes[1] and "several sizes" in outcomes[0]  # the same refusal, not a hang


@pytest.mark.parametrize("bad_rank", [0, 1])
def test_a_clip_gone_non_finite_on_one_replica_is_decided_by_rank_zero_on_every_rank(tmp_path, bad_rank):
    import ddp_worker

    torch.multiprocessing.spawn(
        ddp_worker.periodic_svc_rank_zero_decides, args=(2, str(tmp_path), bad_rank), nprocs=2, join=True, daemon=True
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert torch.equal(ranks[0]["weight"], ranks[1]["weight"]) and torch.isfinite(ranks[0]["weight"]).all()
    if bad_rank == 0:  # refused on both ranks, nothing written
        assert all(r["outcome"].startswith("layers ['0']: the clip gave kernels with non-finite values") for r in ranks)
    else:  # rank 0's kernel, written on both
        assert all(r["outcome"] == "stepped" for r in ranks)


@pytest.mark.parametrize("through", ["norm decay", "svc", "discovery"])
def test_a_collective_step_under_join_warns_once_on_every_rank(tmp_path, through):
    """Inside torch's Join (uneven inputs) a rank out of batches takes no step: the others waited
    for it in the step's broadcast until the process group's timeout (review). Whether a Join block
    runs cannot be told (torch leaves the model's join setting on after it: a refusal refused every
    later step, second review), so the step warns, once."""
    import ddp_worker

    torch.multiprocessing.spawn(ddp_worker.join_warned, args=(2, str(tmp_path), through), nprocs=2, join=True)
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    expected = {  # the gather, once, does not hide the broadcast of every step (review)
        "svc": ["Singular value clipping under DDP is one collective per step"],
        "norm decay": ["Decaying or capping batch norms under DDP is one collective per step"],
        "discovery": [
            "Gathering the recorded input sizes under DDP is one collective at the first step",
            "Decaying or capping batch norms under DDP is one collective per step",
        ],
    }[through]
    warned = outcomes[0].split("\n")
    assert outcomes[0] == outcomes[1] and len(warned) == len(expected)  # each once, the same on both ranks
    assert all(line.startswith(start) and "torch's Join" in line for line, start in zip(warned, expected))


@pytest.mark.parametrize("through", ["wrapper", "hooks"])
def test_zero_checkpoints_carry_the_decay_state_and_resume_bit_for_bit(tmp_path, through):
    import ddp_worker

    torch.multiprocessing.spawn(ddp_worker.resume_zero, args=(2, str(tmp_path), through), nprocs=2, join=True)
    saved = torch.load(tmp_path / "optimizer.pt")
    decayed = {0, 2, 4}  # the weights of small_cnn's three layers
    assert all({"norm_decay_buffer", "norm_decay_scale"} <= set(saved["state"][i]) for i in decayed)
    # the spare head had no gradient yet: its h is beside the state (index 6 of 8, stepped by rank 1)
    assert 6 not in saved["state"] and {"norm_decay_buffer", "norm_decay_scale"} <= set(saved["norm_decay_pending"][6])
    for rank in (0, 1):
        runs = torch.load(tmp_path / f"rank{rank}.pt")
        for key, value in runs["continued"].items():
            assert torch.equal(runs["resumed"][key], value), (rank, key)


class WithExtras(torch.optim.SGD):
    """An optimizer with methods of its own, as ZeroRedundancyOptimizer's consolidate_state_dict."""

    fused_like = False
    _step_supports_amp_scaling = True

    def consolidate(self) -> str:
        return "consolidated"


def test_the_inner_optimizers_own_public_methods_are_reached_through_the_wrapper():
    model = small_cnn()
    inner = WithExtras(model.parameters(), lr=0.1)
    wrapper = NormDecayOptimizer(inner, model)
    assert wrapper.consolidate() == "consolidated" and wrapper.fused_like is False
    # Private ones are not: GradScaler would take the wrapper for one that unscales in its step.
    assert not hasattr(wrapper, "_step_supports_amp_scaling")
    with pytest.raises(AttributeError, match="'NormDecayOptimizer' object has no attribute 'nothing'"):
        wrapper.nothing  # noqa: B018
    copy.deepcopy(wrapper).consolidate()
