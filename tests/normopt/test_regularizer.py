"""NormDecay, the shell: state inside the optimizer, beta and gamma in the param groups, bad input refused early."""

from __future__ import annotations

import copy
import math
import pickle
import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_close,
    attached,
    batches,
    digits,
    explicit_matrix,
    host_reads,
    one_step,
    same_weights,
    small_cnn,
    wrapped,
)
from torch import nn

import normopt
from normopt import NormDecayOptimizer, attach_norm_decay

DATA = digits()


@pytest.mark.parametrize("rule", ["paper", "reference"])
@pytest.mark.parametrize("ord", [1, math.inf], ids=["l1", "linf"])
@pytest.mark.parametrize("kind", [float, torch.tensor], ids=["float", "tensor"])
def test_zero_beta_makes_the_next_step_a_plain_step_and_doubling_doubles_the_decay(rings, kind, ord, rule):
    model, twin = small_cnn(), small_cnn()
    optimizer = NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, beta=kind(0.2), ord=ord, rule=rule)
    one_step(model, optimizer)
    for group in optimizer.param_groups:
        group["norm_decay_beta"] = kind(0.0)
    before = copy.deepcopy(model.state_dict())
    twin.load_state_dict(before)
    one_step(model, optimizer, 1)
    one_step(twin, torch.optim.SGD(twin.parameters(), lr=0.05), 1)
    for key, value in model.state_dict().items():
        assert torch.equal(value, twin.state_dict()[key]), key

    added = {}
    for beta in (0.1, 0.2):
        model.load_state_dict(before)
        fresh = NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model, beta=kind(beta), ord=ord, rule=rule)
        inputs, labels = next(batches(*DATA, 1, 16, 2))
        fresh.zero_grad()
        F.cross_entropy(model(inputs), labels).backward()
        plain = {name: p.grad.clone() for name, p in model.named_parameters()}
        fresh.norm_decay.before_step()
        added[beta] = {name: p.grad - plain[name] for name, p in model.named_parameters()}
    for name, value in added[0.2].items():
        assert_close(value, 2 * added[0.1][name], rtol=1e-6, atol=1e-9, msg=name)
    assert any(value.abs().sum() > 0 for value in added[0.1].values())


@pytest.mark.parametrize("rule", ["paper", "reference"])
@pytest.mark.parametrize("ord", [1, math.inf], ids=["l1", "linf"])
@pytest.mark.parametrize("kind", ["float", "tensor", "tensor in place"])
def test_doubling_beta_between_steps_doubles_the_next_added_gradient(rings, kind, ord, rule):
    model, twin = small_cnn(), small_cnn()
    beta = (lambda v: v) if kind == "float" else torch.tensor
    optimizers = [wrapped(m, beta=beta(0.1), ord=ord, rule=rule) for m in (model, twin)]
    for seed in range(3):  # the same history: rings and buffers hold earlier slices
        for m, optimizer in zip((model, twin), optimizers):
            one_step(m, optimizer, seed)
    doubled = optimizers[1].param_groups[0]
    if kind == "tensor in place":
        doubled["norm_decay_beta"].fill_(0.2)
    else:
        doubled["norm_decay_beta"] = beta(0.2)
    added = []
    for m, optimizer in zip((model, twin), optimizers):
        inputs, labels = next(batches(*DATA, 1, 16, 7))
        optimizer.zero_grad()
        F.cross_entropy(m(inputs), labels).backward()
        plain = {name: p.grad.clone() for name, p in m.named_parameters()}
        optimizer.norm_decay.before_step()
        added.append({name: p.grad - plain[name] for name, p in m.named_parameters()})
    for name, value in added[1].items():
        assert_close(value, 2 * added[0][name], rtol=1e-6, atol=1e-9, msg=name)
    assert all(added[0][f"{i}.weight"].abs().sum() > 0 for i in (0, 3, 6))


def _set_in_groups(optimizer, key, value) -> None:
    for group in optimizer.param_groups:
        group[key] = value


# What changes the groups between steps: each change must be seen at the next step, whether the
# groups hold Python floats (the same objects until changed) or NumPy ones.
_GROUP_CHANGES = {
    "beta": lambda optimizer, number: _set_in_groups(optimizer, "norm_decay_beta", number(0.3)),
    "gamma": lambda optimizer, number: _set_in_groups(optimizer, "norm_decay_gamma", number(0.25)),
    "maximize": lambda optimizer, number: _set_in_groups(optimizer, "maximize", True),
    "group-replaced": lambda optimizer, number: optimizer.param_groups.__setitem__(
        0, {**optimizer.param_groups[0], "norm_decay_beta": number(0.3)}
    ),
    "default": lambda optimizer, number: (
        [group.pop("norm_decay_beta") for group in optimizer.param_groups],
        optimizer.defaults.__setitem__("norm_decay_beta", number(0.3)),
    ),
}


@pytest.mark.parametrize("change", list(_GROUP_CHANGES))
@pytest.mark.parametrize("how", ["wrapper", "hooks"])
def test_param_groups_changed_between_steps_are_read_anew(change, how):
    import numpy as np

    runs = []
    for number in (float, np.float64):
        model = small_cnn()
        optimizer = wrapped(model, beta=0.1) if how == "wrapper" else attached(model, beta=0.1)
        _set_in_groups(optimizer, "norm_decay_beta", number(0.1))
        for step in range(4):
            if step == 2:
                _GROUP_CHANGES[change](optimizer, number)
            one_step(model, optimizer, step)
        runs.append(model)
    same_weights(*runs)
    assert not all(torch.equal(p, q) for p, q in zip(runs[0].parameters(), small_cnn().parameters()))


@pytest.mark.parametrize("rule", ["paper", "reference"])
@pytest.mark.parametrize("ord", [1, math.inf], ids=["l1", "linf"])
def test_a_step_inside_torch_autocast_gives_the_weights_of_one_outside(ord, rule):
    """Training loops put forward, backward and step under one autocast region; torch.optim's
    steps are elementwise, which autocast leaves alone, and so must the decay be."""

    def make():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, stride=2, padding=1),  # several tap patterns
            nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"),  # folds taps on 4x4 maps
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64, 10),
        )

    model, twin = make(), make()
    with torch.no_grad():  # two columns of the first layer a hair apart: bfloat16 cannot tell them apart
        for m in (model, twin):
            m[0].weight.mul_(0.1)
            m[0].weight[:, 0, 0, 0] = torch.tensor([0.501, 0.0, 0.0, 0.0])
            m[0].weight[:, 0, 2, 2] = torch.tensor([0.5, 0.0, 0.0, 0.0])
    optimizers = [wrapped(m, beta=0.5, ord=ord, rule=rule, example_input=DATA[0][:1]) for m in (model, twin)]
    for seed in range(4):
        for m, optimizer, autocast in zip((model, twin), optimizers, (True, False)):
            inputs, labels = next(batches(*DATA, 1, 16, seed))
            optimizer.zero_grad()
            F.cross_entropy(m(inputs), labels).backward()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                optimizer.step()
        norms = [optimizer.last_norms for optimizer in optimizers]
        assert norms[0].keys() == {"0", "1", "4"} and all(torch.equal(norms[0][n], norms[1][n]) for n in norms[0])
    same_weights(model, twin)


@pytest.mark.parametrize("where", ["constructor", "param groups"])
def test_numpy_scalars_as_beta_and_gamma_step_as_the_same_floats(where):
    np = pytest.importorskip("numpy")
    model, twin = small_cnn(), small_cnn()
    if where == "constructor":
        numpy_optimizer = wrapped(model, beta=np.float32(0.25), gamma=np.float32(0.75))
    else:  # a schedule computed with NumPy (np.linspace(...)[step])
        numpy_optimizer = wrapped(model)
        for group in numpy_optimizer.param_groups:
            group["norm_decay_beta"], group["norm_decay_gamma"] = np.float32(0.25), np.float32(0.75)
    optimizer = wrapped(twin, beta=0.25, gamma=0.75)
    for seed in range(3):
        one_step(model, numpy_optimizer, seed)
        one_step(twin, optimizer, seed)
    same_weights(model, twin)


def test_each_param_group_uses_its_own_beta():
    model = small_cnn()
    head = [p for n, p in model.named_parameters() if n.startswith("6.")]
    body = [p for n, p in model.named_parameters() if not n.startswith("6.")]
    inner = torch.optim.SGD([{"params": body}, {"params": head, "norm_decay_beta": 0.0}], lr=0.05)
    optimizer = NormDecayOptimizer(inner, model, beta=0.3, rule="reference")
    assert [g["norm_decay_beta"] for g in optimizer.param_groups] == [0.3, 0.0]
    inputs, labels = next(batches(*DATA, 1, 16))
    F.cross_entropy(model(inputs), labels).backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.norm_decay.before_step()
    assert torch.equal(model[6].weight.grad, plain["6.weight"])  # beta 0 in its group
    assert not torch.equal(model[0].weight.grad, plain["0.weight"])


def test_projections_leave_frozen_and_foreign_weights_alone():
    model = small_cnn(batchnorm=True)
    model[0].weight.requires_grad_(False)  # frozen
    held = [p for n, p in model.named_parameters() if not n.startswith("6.")]  # the head is not in the optimizer
    with torch.no_grad():
        model[0].weight.mul_(50)
        model[6].weight.mul_(50)
        model[1].weight.fill_(100.0)
    frozen, foreign = model[0].weight.clone(), model[6].weight.clone()
    optimizer = NormDecayOptimizer(torch.optim.SGD(held, lr=0.0), model, beta=0.0, max_norm=0.5, bn_max_norm=1.0)
    one_step(model, optimizer)
    assert torch.equal(model[0].weight, frozen) and torch.equal(model[6].weight, foreign)
    assert normopt.layer_norm(model.state_dict(), normopt.module_spec(model[3], "3", (8, 8)), 1) <= 0.5 * (1 + 1e-5)
    assert "0" in optimizer.norm_decay.skipped and "6" in optimizer.norm_decay.skipped


@pytest.mark.parametrize("caps", ["none", "exact", "released"])
def test_a_weight_frozen_after_construction_gets_no_decay_and_no_projection(caps):
    model = small_cnn(batchnorm=True)
    options = {} if caps == "none" else {"max_norm": 0.5, "bn_max_norm": 1.0, "bn_projection": caps}
    optimizer = NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, beta=0.5, **options)
    one_step(model, optimizer)
    for layer in (model[0], model[1]):
        layer.weight.requires_grad_(False)
    with torch.no_grad():
        model[0].weight.mul_(50)
        model[1].weight.fill_(100.0)
    frozen = [model[0].weight.clone(), model[1].weight.clone()]
    inputs, labels = next(batches(*DATA, 1, 16, 1))
    optimizer.zero_grad(set_to_none=False)  # the frozen weights keep a zero gradient: SGD steps them
    F.cross_entropy(model(inputs), labels).backward()
    optimizer.step()
    assert torch.equal(model[0].weight, frozen[0]) and torch.equal(model[1].weight, frozen[1])
    if caps != "none":
        assert normopt.layer_norm(model.state_dict(), normopt.module_spec(model[3], "3", (8, 8)), 1) <= 0.5 * (1 + 1e-5)


@pytest.mark.parametrize("example", [True, False], ids=["example input", "lazy"])
def test_a_layer_frozen_when_layers_are_chosen_is_regularized_once_unfrozen(example):
    model = small_cnn()
    model[0].weight.requires_grad_(False)  # a frozen backbone, unfrozen later for fine-tuning
    options = {"example_input": DATA[0][:1]} if example else {}
    optimizer = wrapped(model, beta=0.1, **options)
    one_step(model, optimizer)
    assert "0" not in optimizer.norm_decay.last_norms and "frozen" in optimizer.norm_decay.skipped["0"]
    h = optimizer.norm_decay.decay_buffers()["3"]
    spec = optimizer.norm_decay.decayed["3"]
    # At the weights the next step's decay reads:
    subgradient = normopt.norm_subgradient(model.state_dict(), spec, 1).dense(model[3].weight)
    model[0].weight.requires_grad_(True)
    one_step(model, optimizer, 1)
    assert "0" in optimizer.norm_decay.last_norms and "0" not in optimizer.norm_decay.skipped
    assert optimizer.norm_decay.decay_buffers()["0"].abs().sum() > 0
    # Layer 3 kept its h through the re-selection: h <- gamma h + (1 - gamma) p, gamma 0.5.
    assert h.abs().sum() > 0
    assert_close(optimizer.norm_decay.decay_buffers()["3"], 0.5 * h + 0.5 * subgradient, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("make", [torch.optim.SGD, torch.optim.Adam], ids=["SGD", "Adam"])
def test_a_fused_optimizer_under_grad_scaler_gets_the_same_decay_through_the_hooks(make):
    """A fused optimizer unscales inside its own step: GradScaler hands it scaled gradients."""

    def run(decay: bool, **kernel):
        model = small_cnn()
        optimizer = make(model.parameters(), lr=0.01, **kernel)
        if decay:
            attach_norm_decay(optimizer, model, beta=0.5, ord=math.inf)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        for inputs, labels in batches(*DATA, 4, 16):
            optimizer.zero_grad()
            scaler.scale(F.cross_entropy(model(inputs), labels)).backward()
            scaler.step(optimizer)
            scaler.update()
        return model

    fused, unfused, plain = run(True, fused=True), run(True, foreach=False), run(False, foreach=False)
    for name, value in unfused.state_dict().items():
        assert_close(fused.state_dict()[name], value, rtol=1e-5, atol=1e-7, msg=name)
    assert max((a - b).abs().max() for a, b in zip(unfused.parameters(), plain.parameters())) > 1e-3


@pytest.mark.parametrize("rule", ["paper", "reference"])
def test_a_run_that_unfreezes_a_layer_resumes_bit_for_bit_into_a_model_built_frozen(rule):
    """A script freezes its backbone when it builds the model and unfreezes it in its loop: a
    checkpoint taken after the unfreezing resumes exactly in a wrapper built with the layer frozen."""

    def build():
        model = small_cnn()
        model[0].weight.requires_grad_(False)
        return model, wrapped(model, beta=0.1, rule=rule, example_input=DATA[0][:1])

    model, optimizer = build()
    for seed in range(4):
        if seed == 2:
            model[0].weight.requires_grad_(True)
        one_step(model, optimizer, seed)
    checkpoint = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    twin, twin_optimizer = build()
    twin.load_state_dict(checkpoint[0])
    bad = copy.deepcopy(checkpoint[1])
    bad["state"][0]["norm_decay_buffer"] = torch.zeros(7)  # checked though the layer is frozen
    with pytest.raises(ValueError, match=r"decay buffer of layer '0' has shape \(7,\)"):
        twin_optimizer.load_state_dict(bad)
    twin_optimizer.load_state_dict(checkpoint[1])
    resaved = twin_optimizer.state_dict()  # saved again while frozen, the layer's h goes with it
    assert "norm_decay_buffer" not in resaved["state"][0]  # no decay key beside SGD's own while frozen
    assert torch.equal(resaved["norm_decay_pending"][0]["norm_decay_buffer"], checkpoint[1]["state"][0]["norm_decay_buffer"])
    twin[0].weight.requires_grad_(True)
    for seed in (4, 5):
        one_step(model, optimizer, seed)
        one_step(twin, twin_optimizer, seed)
    same_weights(model, twin)


def test_a_second_decay_of_the_same_layers_on_one_optimizer_is_refused_until_the_first_is_detached():
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = attach_norm_decay(optimizer, model, beta=0.1, exclude=("0",))
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups])
    hooks = len(optimizer._optimizer_load_state_dict_pre_hooks)
    with pytest.raises(
        ValueError, match=r"layers \['3', '6'\] have a norm decay on this optimizer already .*exclude=\('3', '6'\)"
    ):
        attach_norm_decay(optimizer, model, ord=math.inf, beta=0.2)
    with pytest.raises(ValueError, match=r"layers \['3', '6'\] have a norm decay on this optimizer already"):
        NormDecayOptimizer(optimizer, model)  # a wrapper around a hooked optimizer
    assert len(optimizer._optimizer_load_state_dict_pre_hooks) == hooks  # nothing was added
    assert [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] == groups
    first.detach()
    attach_norm_decay(optimizer, model, ord=math.inf, beta=0.2)  # its layers are free now


def test_a_second_decay_given_another_beta_or_gamma_than_its_groups_hold_is_refused_and_groups_of_its_own_take_it():
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    attach_norm_decay(optimizer, model, beta=0.5, exclude=("6",))
    hooks = len(optimizer._optimizer_step_pre_hooks)
    for given, key in (({"beta": 0.01}, "norm_decay_beta"), ({"gamma": 0.0}, "norm_decay_gamma")):
        with pytest.raises(ValueError, match=rf"param group 0 holds {key}=0.5 from the other norm decay"):
            attach_norm_decay(optimizer, model, exclude=("0", "3"), **{"beta": 0.5, **given})
    assert len(optimizer._optimizer_step_pre_hooks) == hooks  # nothing was added

    # A frozen layer of the second decay in the first's group takes its beta once unfrozen: refused too.
    linears = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    groups = [{"params": [*linears[0].parameters(), *linears[1].parameters()]}, {"params": linears[2].parameters()}]
    optimizer = torch.optim.SGD(groups, lr=0.1)
    attach_norm_decay(optimizer, linears, beta=0.5, exclude=("1", "2"))
    optimizer.param_groups[1]["norm_decay_beta"] = 0.01
    linears[1].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"param group 0 holds norm_decay_beta=0.5 from the other norm decay"):
        attach_norm_decay(optimizer, linears, beta=0.01, exclude=("0",))

    model = small_cnn()
    body = [p for name, p in model.named_parameters() if not name.startswith("6.")]
    groups = [{"params": body}, {"params": list(model[6].parameters()), "norm_decay_beta": 0.01}]
    optimizer = torch.optim.SGD(groups, lr=0.0)
    attach_norm_decay(optimizer, model, beta=0.5, exclude=("6",))
    attach_norm_decay(optimizer, model, beta=0.01, rule="reference", exclude=("0", "3"))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # the reference rule from h = 0 adds beta * sign on the arg-max line
    assert model[6].weight.grad.abs().max() == torch.tensor(0.01)


def test_a_decay_detached_takes_out_the_beta_and_gamma_decays_wrote_where_no_other_decay_uses_them():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    groups = [{"params": model[i].parameters()} for i in range(3)]
    groups[2]["norm_decay_beta"] = 0.0  # the user's: no decay of the head
    optimizer = torch.optim.SGD(groups, lr=0.1)
    first = attach_norm_decay(optimizer, model, beta=0.01, exclude=("1",))
    second = attach_norm_decay(optimizer, model, beta=0.01, exclude=("0", "2"))
    betas = lambda: [g.get("norm_decay_beta") for g in optimizer.param_groups]
    assert betas() == [0.01, 0.01, 0.0]
    first.detach()  # group 0 was its own: free for another beta; group 2 is the user's
    assert betas() == [None, 0.01, 0.0] and "norm_decay_gamma" not in optimizer.param_groups[0]
    attach_norm_decay(optimizer, model, beta=0.02, exclude=("1",))
    assert betas() == [0.02, 0.01, 0.0]
    second.detach()
    assert betas() == [0.02, None, 0.0] and optimizer.defaults["norm_decay_beta"] == 0.01  # still used


def test_the_last_decay_detached_takes_its_beta_and_gamma_out_of_the_groups_for_one_attached_later():
    model = small_cnn()
    wrapper = NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, beta=0.5, gamma=0.7)
    wrapper.norm_decay.detach()
    options = [wrapper.defaults, *wrapper.param_groups]
    assert not any(key.startswith("norm_decay") for group in options for key in group)
    wrapper.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})  # a detached decay chooses nothing
    assert all(not m._forward_pre_hooks for m in model.modules())
    decay = attach_norm_decay(wrapper, model, beta=0.01, rule="reference")
    assert [g["norm_decay_beta"] for g in wrapper.param_groups] == [0.01, 0.01]
    one_step(model, wrapper)
    assert decay.decay_buffers()["0"].abs().max() == 1.0  # a sign: h = p from zero with gamma 0.5, reference rule


def test_a_wrappers_decay_once_detached_leaves_a_plain_optimizer_whose_layers_another_decay_may_take():
    model, twin = small_cnn(), small_cnn()
    wrapper = NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, beta=0.1)
    for again in (lambda: NormDecayOptimizer(wrapper.optimizer, model), lambda: attach_norm_decay(wrapper, model)):
        with pytest.raises(ValueError, match=r"have a norm decay on this optimizer already .*\.norm_decay\.detach\(\)"):
            again()  # the same inner optimizer wrapped again; a decay attached to the wrapper
    wrapper.norm_decay.detach()
    plain = torch.optim.SGD(twin.parameters(), lr=0.1)
    one_step(model, wrapper)
    one_step(twin, plain)
    same_weights(model, twin)  # a plain step
    decay = attach_norm_decay(wrapper, model, beta=0.1)  # takes the layers
    one_step(model, wrapper)
    one_step(twin, plain)
    assert not torch.equal(model[0].weight, twin[0].weight)
    entry = wrapper.state[model[0].weight]
    assert torch.equal(entry["norm_decay_buffer"] * entry["norm_decay_scale"], decay.decay_buffers()["0"])


def test_a_layer_added_later_goes_to_the_first_decay_that_chooses_it_with_a_warning_from_the_other():
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = attach_norm_decay(optimizer, model, beta=0.1, exclude=("6",))
    second = attach_norm_decay(optimizer, model, beta=0.1, exclude=("0", "3"))
    model.add_module("7", nn.Linear(10, 10))
    optimizer.add_param_group({"params": model[7].parameters()})
    first.add_params()
    with pytest.warns(UserWarning, match="layer '7' is left to the other norm decay on this optimizer"):
        second.add_params()
    one_step(model, optimizer)
    assert sorted(first.decayed) == ["0", "3", "7"] and sorted(second.decayed) == ["6"]
    assert "another norm decay" in second.skipped["7"]


def test_zero_overlapping_ddp_is_refused():
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = small_cnn()
        zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD, lr=0.1, overlap_with_ddp=True)
        with pytest.raises(ValueError, match=r"overlap_with_ddp=True\) steps inside DDP's communication hook"):
            attach_norm_decay(zero, model)
    finally:
        dist.destroy_process_group()


def test_exclude_leaves_every_layer_inside_a_named_block_alone():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.Flatten(),
        nn.Linear(256, 10),
    )
    optimizer = NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, exclude=("0",), example_input=DATA[0][:1])
    assert list(optimizer.norm_decay.decayed) == ["1", "3"]
    alone = NormDecayOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, exclude=("0.2", "3"), example_input=DATA[0][:1]
    )
    assert list(alone.norm_decay.decayed) == ["0.0", "1"]


def test_exclude_takes_the_names_a_wrapped_or_shared_module_has():
    torch.manual_seed(0)
    shared = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), shared, shared, nn.Flatten(), nn.Linear(256, 10))
    example = DATA[0][:1]

    def decayed(module, exclude):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return list(NormDecayOptimizer(optimizer, module, exclude=exclude, example_input=example).norm_decay.decayed)

    assert decayed(model, ("2",)) == ["0", "4"]  # "2" is the module named "1"
    assert decayed(nn.DataParallel(model), ("module.0",)) == ["1", "4"]
    assert decayed(torch.compile(model, backend="eager"), ("_orig_mod.4",)) == ["0", "1"]
    for whole in ("", "module", "module.", "_orig_mod."):
        with pytest.raises(ValueError, match=r"exclude names the whole model"):
            decayed(nn.DataParallel(model), (whole,))
    with pytest.raises(ValueError, match=r"exclude names \['module.9'\]"):
        decayed(model, ("module.9",))


def test_max_norm_skips_a_layer_with_non_finite_weights():
    model = small_cnn()
    optimizer = NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, beta=0.0, max_norm=0.5)
    inputs, labels = next(batches(*DATA, 1, 16))
    F.cross_entropy(model(inputs), labels).backward()
    with torch.no_grad():
        model[3].weight[0, 0, 0, 0] = float("nan")  # after backward: the gradients stay finite
    before = model[3].weight.clone()
    with pytest.warns(UserWarning, match=r"no new subgradient of layers \['3'\]"):
        optimizer.step()
    assert torch.equal(torch.nan_to_num(model[3].weight), torch.nan_to_num(before))
    specs = normopt.layer_specs(model, DATA[0][:1])
    assert normopt.layer_norm(model.state_dict(), specs["0"], 1) <= 0.5 * (1 + 1e-5)


def test_the_released_batchnorm_projection_caps_the_argmax_channel_before_the_step():
    model = small_cnn(batchnorm=True)
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([9.0, -8.0, 1.0, 0.5]))
        model[1].running_var.fill_(1.0)
    optimizer = NormDecayOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), model, beta=0.0, bn_max_norm=5.0, bn_projection="released"
    )
    one_step(model, optimizer)
    gamma, var = model[1].weight.detach(), model[1].running_var  # the training forward moved var
    assert_close(gamma[0], 5 * (var[0] + model[1].eps) ** 0.5)
    assert gamma[1] == -8.0  # only the largest channel is capped


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning", "ignore:Complex modules:UserWarning")
@pytest.mark.parametrize(
    ("make_model", "kwargs", "error", "match"),
    [
        (lambda: nn.Sequential(nn.Linear(0, 3), nn.Linear(3, 2)), {}, ValueError, r"layer '0' has an empty weight"),
        (lambda: nn.Sequential(nn.Linear(3, 2).to(torch.complex64)), {}, TypeError, r"layer '0' has complex weights"),
        (small_cnn, {"exclude": "0"}, TypeError, r"exclude must be an iterable of module names, not the string '0'"),
        (small_cnn, {"exclude": 3}, TypeError, r"exclude must be an iterable of module names, got 3"),
        (small_cnn, {"exclude": None}, TypeError, r"exclude must be an iterable of module names, got None"),
        (small_cnn, {"layers": None}, TypeError, r"layers must be an iterable of layer kinds \(some of \['batchnorm'"),
        (small_cnn, {"layers": ()}, ValueError, r"none of the model's \(no kinds: layers=\(\)\) layers has a trainable"),
        (small_cnn, {"beta": 1e39}, ValueError, r"beta=1e\+39 is too large"),
        (small_cnn, {"beta": True}, ValueError, "beta must be"),
        (small_cnn, {"beta": torch.tensor(-1.0)}, ValueError, "beta must be a finite number >= 0"),
        (small_cnn, {"beta": torch.tensor([0.1])}, TypeError, r"beta as a tensor must be 0-d and of dtype float16/"),
        (small_cnn, {"beta": torch.tensor(1)}, TypeError, r"beta as a tensor must be 0-d and of dtype float16/"),
        (small_cnn, {"beta": torch.tensor(0.1j)}, TypeError, r"beta as a tensor must be 0-d and of dtype float16/"),
        (small_cnn, {"beta": torch.tensor(0.1, requires_grad=True)}, TypeError, r"beta as a tensor must not require grad"),
        (small_cnn, {"beta": torch.tensor(0.1, device="meta")}, ValueError, r"beta is a tensor on meta"),
        (small_cnn, {"gamma": torch.tensor(0.5)}, TypeError, "gamma must be a number in \\[0, 1\\], not a tensor"),
        (small_cnn, {"bn_projection": "argmax"}, ValueError, "unknown bn_projection"),
        (small_cnn, {"max_norm": float("inf")}, ValueError, "max_norm must be a positive finite number"),
        (small_cnn, {"max_norm": True}, ValueError, "max_norm must be a positive finite number, got True"),
        (small_cnn, {"bn_max_norm": True}, ValueError, "bn_max_norm must be a positive finite number, got True"),
    ],
)
def test_bad_input_is_refused_at_construction(make_model, kwargs, error, match):
    model = make_model()
    with pytest.raises(error, match=match):
        NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, **kwargs)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_a_state_dict_given_as_the_model_is_refused_naming_the_model():
    model = small_cnn()
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got OrderedDict: pass the model itself"):
        NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.state_dict())


@pytest.mark.parametrize(
    ("beta", "error"),
    [
        (float("inf"), ValueError),
        (1e39, ValueError),
        (torch.tensor(float("inf")), ValueError),
        (torch.tensor([0.1]), TypeError),
        (torch.tensor(0.1, device="meta"), ValueError),
    ],
    ids=["float", "too large", "tensor", "1-d tensor", "meta tensor"],
)
def test_a_bad_beta_set_between_steps_is_refused_before_anything_changes(beta, error):
    model = small_cnn()
    optimizer = wrapped(model, beta=0.1)
    one_step(model, optimizer)
    optimizer.param_groups[0]["norm_decay_beta"] = beta
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match="norm_decay_beta of param group 0"):
        one_step(model, optimizer, 1)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("key", ["norm_decay_beta", "norm_decay_gamma"])
@pytest.mark.parametrize("through", ["wrapper", "hooks"])
def test_a_param_group_added_with_a_bad_beta_or_gamma_is_refused_when_added(through, key):
    model = small_cnn()
    body = [p for name, p in model.named_parameters() if not name.startswith("6.")]
    inner = torch.optim.SGD(body, lr=0.1)
    optimizer = NormDecayOptimizer(inner, model) if through == "wrapper" else inner
    decay = optimizer.norm_decay if through == "wrapper" else attach_norm_decay(inner, model)
    group = {"params": list(model[6].parameters()), key: -1.0 if key == "norm_decay_beta" else 2.0}
    if through == "wrapper":  # before the inner optimizer takes it
        with pytest.raises(ValueError, match=f"{key} of the param group added"):
            optimizer.add_param_group(group)
        assert len(inner.param_groups) == 1
    else:  # torch's add_param_group checks nothing of ours: add_params, which the docs ask for after it
        inner.add_param_group(group)
        with pytest.raises(ValueError, match=f"{key} of param group 1"):
            decay.add_params()


@pytest.mark.parametrize("inner", [torch.optim.SGD, torch.optim.Adam], ids=["sgd", "adam"])
@pytest.mark.parametrize("make", [NormDecayOptimizer, attach_norm_decay], ids=["wrapper", "hooks"])
@pytest.mark.parametrize("ord", [1, math.inf], ids=["l1", "linf"])
@pytest.mark.parametrize("kind", [float, torch.tensor], ids=["float", "tensor"])
def test_a_maximizing_optimizer_gets_a_decay_that_still_shrinks_the_norms(inner, make, ord, kind):
    """Maximizing L with ``maximize=True`` must step exactly as minimizing -L does, decay included."""

    def run(maximize):
        model = small_cnn()
        options = {"lr": 0.05, "maximize": maximize} | ({"momentum": 0.9} if inner is torch.optim.SGD else {})
        optimizer = inner(model.parameters(), **options)
        wrapped = make(optimizer, model, beta=kind(0.5), ord=ord)
        optimizer = optimizer if make is attach_norm_decay else wrapped
        for seed in range(4):
            x, y = next(batches(*DATA, 1, 16, seed))
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            (loss if maximize else -loss).backward()
            optimizer.step()
        return model

    maximized, minimized = run(True), run(False)
    for key, value in minimized.state_dict().items():
        assert torch.equal(maximized.state_dict()[key], value), key


def typed_step(model, optimizer, seed):
    inputs, labels = next(batches(*DATA, 1, 16, seed))
    optimizer.zero_grad()
    F.cross_entropy(model(inputs.to(model[0].weight.dtype)).float(), labels).backward()
    optimizer.step()


@pytest.mark.parametrize("make", [wrapped, attached], ids=["wrapper", "hooks"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_model_cast_after_the_first_steps_goes_on_as_one_resumed_in_that_dtype(make, dtype):
    def plain_sgd(model, **options):  # SGD with momentum would keep float32 buffers for cast weights
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        return NormDecayOptimizer(optimizer, model, **options) if make is wrapped else attach(optimizer, model, **options)

    def attach(optimizer, model, **options):
        attach_norm_decay(optimizer, model, **options)
        return optimizer

    model = small_cnn()
    optimizer = plain_sgd(model, beta=0.3)
    for seed in range(3):
        typed_step(model, optimizer, seed)
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    model.to(dtype)
    twin = small_cnn().to(dtype)
    twin.load_state_dict(saved[0])
    twin_optimizer = plain_sgd(twin, beta=0.3)
    twin_optimizer.load_state_dict(saved[1])
    for seed in range(3, 6):
        for pair in ((model, optimizer), (twin, twin_optimizer)):
            typed_step(*pair, seed)
    assert all(h.dtype == dtype for h in optimizer.norm_decay.decay_buffers().values()) if make is wrapped else True
    same_weights(model, twin)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda layer: nn.utils.parametrizations.spectral_norm(layer), "weight is parametrized"),
        (lambda layer: setattr(layer, "weight", nn.Parameter(layer.weight.detach().clone())), "not a parameter of the optimizer"),
    ],
    ids=["parametrized", "new-parameter"],
)
def test_a_weight_replaced_after_the_first_step_is_no_longer_regularized_and_says_so(change, reason):
    model = small_cnn()
    optimizer = wrapped(model, beta=0.3, max_norm=0.5)
    for seed in range(2):
        one_step(model, optimizer, seed)
    old = model[6].weight
    assert "norm_decay_buffer" in optimizer.state[old]
    change(model[6])
    before = old.detach().clone()
    with pytest.warns(UserWarning, match=rf"layer '6' is no longer regularized: .*{reason}"):
        one_step(model, optimizer, 2)
    assert set(optimizer.last_norms) == {"0", "3"}
    assert not any(key.startswith("norm_decay") for key in optimizer.state[old])
    if old.grad is not None:  # still stepped by the optimizer (parametrized): plain SGD with momentum, no cap
        momentum = optimizer.state[old]["momentum_buffer"]
        assert torch.equal(old.detach(), before.add(momentum, alpha=-0.05))


class Tied(nn.Module):
    """Two layers of one weight: convolutions at two dilations (TridentNet), or of one geometry on
    inputs of two sizes, or two equal linear heads."""

    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        if kind == "linear":
            self.p, self.q = nn.Linear(4, 4), nn.Linear(4, 4)
        else:
            dilation = 2 if kind == "dilations" else 1
            self.p, self.q = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=dilation, dilation=dilation)
        self.q.weight = self.p.weight

    def forward(self, x):
        if self.kind == "linear":
            return self.q(torch.tanh(self.p(x)))
        small = x[..., : x.shape[-1] // 2] if self.kind == "sizes" else x
        return self.p(x).mean((2, 3)) + self.q(small).mean((2, 3))


def tied_step(model, optimizer, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 4, generator=generator) if model.kind == "linear" else torch.randn(2, 2, 6, 6, generator=generator)
    optimizer.zero_grad()
    model(x).square().sum().backward()
    optimizer.step()


def test_layers_of_one_weight_that_are_different_maps_are_refused_naming_them():
    with pytest.raises(ValueError, match=r"layers \['p', 'q'\] share one weight but are different maps .*exclude=\('q',\)"):
        wrapped(Tied("dilations"), example_input=torch.zeros(1, 2, 6, 6))
    model = Tied("dilations")
    optimizer = wrapped(model, exclude=("q",), example_input=torch.zeros(1, 2, 6, 6))
    tied_step(model, optimizer, 0)
    assert set(optimizer.last_norms) == {"p"}


def test_layers_of_one_weight_found_different_by_the_first_forward_are_refused_at_every_step():
    model = Tied("sizes")
    optimizer = wrapped(model)  # input sizes unknown yet: two equal maps
    before = copy.deepcopy(model.state_dict())
    for seed in range(2):
        with pytest.raises(ValueError, match=r"layers \['p', 'q'\] share one weight but are different maps"):
            tied_step(model, optimizer, seed)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("ord", [1, math.inf], ids=["l1", "linf"])
def test_layers_of_one_weight_that_are_one_map_share_their_h_and_resume_bit_for_bit(ord):
    model = Tied("linear")
    optimizer = wrapped(model, beta=0.3, ord=ord)
    for seed in range(3):
        tied_step(model, optimizer, seed)
    h = optimizer.norm_decay.decay_buffers()
    assert torch.equal(h["p"], h["q"]) and h["p"].abs().sum() > 0
    twin = Tied("linear")
    twin.load_state_dict(model.state_dict())
    twin_optimizer = wrapped(twin, beta=0.3, ord=ord)
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for seed in range(3, 6):
        for pair in ((model, optimizer), (twin, twin_optimizer)):
            tied_step(*pair, seed)
    for key, value in model.state_dict().items():
        assert torch.equal(twin.state_dict()[key], value), key


def _conv_pair():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, padding=1), nn.Flatten(), nn.LazyLinear(4))


def _pair_step(model, optimizer, seed):
    generator = torch.Generator().manual_seed(seed)
    optimizer.zero_grad()
    model(torch.randn(2, 2, 6, 6, generator=generator)).square().sum().backward()
    optimizer.step()


def _built_to_replace(through, ord=1):
    model = _conv_pair()
    model(torch.zeros(1, 2, 6, 6))  # initialise the lazy head
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if through == "wrapper":
        optimizer = NormDecayOptimizer(optimizer, model, beta=0.1, ord=ord)
        return model, optimizer, optimizer.norm_decay
    return model, optimizer, attach_norm_decay(optimizer, model, beta=0.1, ord=ord)


def _replace(model, optimizer, decay, tell=True):
    """Another map of the first conv's weight shape, which halves the maps after it, and a head of
    another shape, added to the optimizer; returns the weights they replaced."""
    replaced = (model[0].weight, model[4].weight)
    torch.manual_seed(1)
    model[0] = nn.Conv2d(2, 3, 3, stride=2, bias=False)
    model[4] = nn.Linear(8, 5)
    optimizer.add_param_group({"params": [*model[0].parameters(), *model[4].parameters()]})
    if tell and not isinstance(optimizer, NormDecayOptimizer):  # the wrapper's add_param_group does it
        decay.add_params()
    return replaced


@pytest.mark.parametrize("ord", [1, math.inf], ids=["l1", "linf"])
def test_a_layer_replaced_and_added_to_the_optimizer_is_described_anew(ord):
    runs = {}
    for through in ("wrapper", "hooks"):
        model, optimizer, decay = _built_to_replace(through, ord)
        _pair_step(model, optimizer, 0)
        replaced = _replace(model, optimizer, decay)
        for seed in range(1, 4):
            _pair_step(model, optimizer, seed)
        fresh = normopt.layer_specs(model, torch.zeros(1, 2, 6, 6))
        assert dict(decay.specs) == dict(fresh)
        assert set(decay.decayed) == {"0", "2", "4"}
        for weight in replaced:  # still held by the optimizer, no longer regularized: no decay state left
            assert not any(key.startswith("norm_decay") for key in optimizer.state[weight])
        runs[through] = model.state_dict()
    for key, value in runs["wrapper"].items():  # the same steps, the first after the change included
        assert torch.equal(runs["hooks"][key], value), key
    for name, norm in normopt.layer_norms(model.state_dict(), fresh, ord=1).items():
        size = (2, 6, 6) if name == "0" else (3, 2, 2) if name == "2" else (8,)
        assert_close(norm, explicit_matrix(model.get_submodule(name), size).abs().sum(0).max(), msg=name)


@pytest.mark.parametrize("through", ["wrapper", "hooks"])
def test_a_run_with_a_replaced_layer_resumes_bit_for_bit(through):
    model, optimizer, decay = _built_to_replace(through, math.inf)
    _pair_step(model, optimizer, 0)
    _replace(model, optimizer, decay)
    for seed in range(1, 4):
        _pair_step(model, optimizer, seed)
    checkpoint = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    twin, twin_optimizer, twin_decay = _built_to_replace(through, math.inf)
    _replace(twin, twin_optimizer, twin_decay)  # the script's own steps, before it loads the checkpoint
    twin.load_state_dict(checkpoint[0])
    twin_optimizer.load_state_dict(checkpoint[1])
    for seed in range(4, 7):
        for pair in ((model, optimizer), (twin, twin_optimizer)):
            _pair_step(*pair, seed)
    same_weights(model, twin)


def test_a_hooked_optimizer_that_sees_a_replaced_conv_only_at_its_step_says_what_to_do():
    model, optimizer, decay = _built_to_replace("hooks")
    _pair_step(model, optimizer, 0)
    _replace(model, optimizer, decay, tell=False)
    with pytest.warns(UserWarning, match=r"modules \['0', '4'\] changed .* call add_params\(\) after add_param_group"):
        _pair_step(model, optimizer, 1)
    _pair_step(model, optimizer, 2)  # the forward before it recorded the sizes
    assert dict(decay.specs) == dict(normopt.layer_specs(model, torch.zeros(1, 2, 6, 6)))


@pytest.mark.parametrize(
    "options",
    [
        {"ord": 1},
        {"ord": math.inf},
        {"ord": math.inf, "rule": "reference"},
        {"ord": 1, "beta": torch.tensor(0.2)},
        {"ord": 1, "max_norm": 0.5, "layers": ("conv", "linear", "batchnorm"), "bn_max_norm": 1.0},
        {"ord": math.inf, "max_norm": 0.5, "bn_max_norm": 1.0, "bn_projection": "released"},
    ],
    ids=["l1", "linf-rings", "reference", "tensor-beta", "caps", "released-caps"],
)
@pytest.mark.parametrize("grad_scale", [False, True], ids=["plain", "fused-under-grad-scaler"])
def test_a_steady_state_step_reads_nothing_back_to_the_host(rings, options, grad_scale):
    """The decay's per-step work (before and after the inner step) never waits for a tensor's value."""
    model = small_cnn(batchnorm=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    beta = options.pop("beta", 0.1)
    decay = normopt.regularizer.NormDecay(optimizer, model, beta=beta, **options)
    for seed in range(3):
        inputs, labels = next(batches(*DATA, 1, 16, seed))
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), labels).backward()
        if grad_scale and seed == 2:
            optimizer.grad_scale = torch.tensor(8.0)  # as GradScaler sets it for a fused optimizer
        if seed < 2:
            decay.before_step(), optimizer.step(), decay.after_step()
    # On the CPU the non-finite reporter reads its flags at once (there is no device to wait for);
    # on an accelerator it reads them steps later, through an event (tested with it).
    reporter = mock.patch.object(decay._reporter, "push")
    with host_reads() as reads, reporter as push:
        decay.before_step()
        decay.after_step()
    # A tensor beta on the CPU is checked there (no device waits for it): its value is the one read.
    assert [func for func, tensor in reads.found if tensor is not beta] == []
    assert push.call_count == 1


def test_a_pooling_layer_replaced_with_a_new_head_gives_the_kept_convs_their_new_input_size():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1), nn.Identity(), nn.Conv2d(2, 2, 3, padding=1), nn.Flatten(), nn.Linear(72, 4)
    )
    optimizer = wrapped(model, beta=0.1, example_input=torch.zeros(1, 2, 6, 6))
    _pair_step(model, optimizer, 0)
    model[1] = nn.MaxPool2d(3)  # no weights of its own, but the conv after it now sees 2x2 maps
    model[4] = nn.Linear(8, 4)
    optimizer.add_param_group({"params": list(model[4].parameters())})
    for seed in (1, 2):
        _pair_step(model, optimizer, seed)
    assert optimizer.norm_decay.specs["2"].input_size == (2, 2)
    assert dict(optimizer.norm_decay.specs) == dict(normopt.layer_specs(model, torch.zeros(1, 2, 6, 6)))


@pytest.mark.parametrize("make", [wrapped, attached], ids=["wrapper", "hooks"])
def test_detach_takes_the_decay_state_out_of_the_optimizer(make):
    model = small_cnn()
    optimizer = make(model, beta=0.1)
    for seed in range(2):
        one_step(model, optimizer, seed)
    inner = getattr(optimizer, "optimizer", optimizer)
    decay = optimizer.norm_decay if make is wrapped else next(iter(normopt.regularizer._DECAYS[inner]))
    compact = len(pickle.dumps(inner.state_dict()))
    decay.detach()
    keys = {key for entry in inner.state.values() for key in entry}
    assert keys == {"momentum_buffer"}
    assert len(pickle.dumps(inner.state_dict())) < compact  # no view of a flat buffer left to pickle whole
    assert decay.decay_buffers() == {}
    again = attach_norm_decay(inner, model, beta=0.1)  # starts afresh: nothing left to resume from
    assert again.decay_buffers() == {}


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_a_wrapper_whose_decay_was_detached_stays_a_plain_optimizer(how):
    model = small_cnn()
    wrapper = wrapped(model, beta=0.1)
    one_step(model, wrapper)
    wrapper.norm_decay.detach()
    copied = (
        copy.deepcopy({"model": model, "wrapper": wrapper})
        if how == "deepcopy"
        else pickle.loads(pickle.dumps({"model": model, "wrapper": wrapper}))
    )
    twin, inner = copied["model"], copied["wrapper"].optimizer
    assert not inner._optimizer_load_state_dict_pre_hooks and not inner._optimizer_state_dict_post_hooks
    attach_norm_decay(inner, twin, beta=0.1)  # refused while the copy re-hooked its detached decay


@pytest.mark.parametrize("make", [wrapped, attached], ids=["wrapper", "hooks"])
def test_a_group_with_beta_zero_or_a_frozen_layer_still_counts_in_the_paper_rules_n(make):
    """N is the number of layers the decay regularizes, whatever their groups' beta and whether
    they are frozen now: a group switched off, or a backbone frozen and unfrozen for fine-tuning,
    leaves the others' decay as it is (a layer excluded, or not in the optimizer, is not counted)."""
    torch.manual_seed(0)
    model = small_cnn()
    decays = {}
    for fc in ("beta 0", "beta 0.1", "frozen", "excluded", "not held"):
        twin = copy.deepcopy(model)
        head = [p for name, p in twin.named_parameters() if name.startswith("6.")]
        rest = [p for name, p in twin.named_parameters() if not name.startswith("6.")]
        groups = [{"params": rest}]
        if fc != "not held":
            groups.append({"params": head, "norm_decay_beta": 0.0} if fc == "beta 0" else {"params": head})
        if fc == "frozen":
            twin[6].weight.requires_grad_(False)
        inner = torch.optim.SGD(groups, lr=0.0)
        options = {"beta": 0.1, "exclude": ("6",) if fc == "excluded" else ()}
        optimizer = NormDecayOptimizer(inner, twin, **options) if make is wrapped else inner
        if make is attached:
            attach_norm_decay(inner, twin, **options)
        inputs, labels = next(batches(*DATA, 1, 16, 0))
        F.cross_entropy(twin(inputs), labels).backward()
        plain = twin[0].weight.grad.clone()
        optimizer.step()
        decays[fc] = twin[0].weight.grad - plain
    for three_layers in ("beta 0", "frozen"):  # beta / 3
        assert_close(decays[three_layers], decays["beta 0.1"], rtol=0, msg=three_layers)
    for two_layers in ("excluded", "not held"):  # beta / 2
        assert_close(decays[two_layers], 1.5 * decays["beta 0.1"], rtol=1e-6, msg=two_layers)


def test_detach_leaves_the_state_of_a_batch_norm_another_decay_regularizes():
    """A decay that only caps a batch norm (bn_max_norm) took the other decay's state of it out of
    the optimizer when detached."""
    model = small_cnn(batchnorm=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    capping = attach_norm_decay(optimizer, model, beta=0.1, bn_max_norm=5.0)
    decaying = attach_norm_decay(optimizer, model, beta=0.1, layers=("batchnorm",))
    one_step(model, optimizer)
    batchnorm = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).weight
    before = optimizer.state[batchnorm]["norm_decay_buffer"]
    capping.detach()
    assert optimizer.state[batchnorm]["norm_decay_buffer"] is before
    assert decaying.decay_buffers()


@pytest.mark.parametrize("wrap", ["wrapper", "hooks"])
def test_a_step_that_no_forward_preceded_warns_once_that_the_large_input_limit_is_kept(wrap):
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if wrap == "wrapper":
        optimizer = normopt.NormDecayOptimizer(optimizer, model)
        decay = optimizer.norm_decay
    else:
        decay = normopt.attach_norm_decay(optimizer, model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with warnings.catch_warnings():  # the lr-0 step by which set_optimizer_state_dict sets up state
        warnings.simplefilter("error")
        optimizer.param_groups[0]["lr"] = 0.0
        optimizer.step()
        optimizer.param_groups[0]["lr"] = 0.1
    with pytest.warns(UserWarning, match="stepped before any forward of the model ran its convolutions"):
        optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()  # once
        model(torch.zeros(1, 1, 6, 6))
        optimizer.step()  # a forward recorded the sizes: described anew, no warning
    assert decay.specs["0"].input_size == (6, 6)


def test_a_compiled_model_that_ran_before_the_decay_was_made_is_named_in_the_warning():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3))
    compiled = torch.compile(model, backend="eager")
    compiled(torch.randn(2, 1, 6, 6))  # a warm-up before the hooks exist
    optimizer = normopt.NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), compiled)
    compiled(torch.randn(2, 1, 6, 6)).sum().backward()  # dynamo does not call hooks added since
    with pytest.warns(UserWarning, match="large-input limit until one does; if the model is torch.compile'd and ran before"):
        optimizer.step()
    torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore:modules .* changed:UserWarning")
@pytest.mark.parametrize("example", [True, False], ids=["example_input", "recorded"])
def test_a_module_replaced_mid_training_does_not_warn_that_no_forward_ran(example):
    """Replacing a module makes a fresh recorder during the step, which the first check of this
    warning took for one that no forward had reached."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(72, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    attach_norm_decay(optimizer, model, example_input=torch.zeros(1, 1, 6, 6) if example else None)
    x = torch.randn(2, 1, 6, 6)
    model(x).sum().backward()
    optimizer.step()
    model[3] = nn.Linear(72, 2)
    optimizer.add_param_group({"params": model[3].parameters()})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(x).sum().backward()
        optimizer.step()
    assert not [w for w in caught if "stepped before any forward" in str(w.message)]


class _Standardised(nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, self.weight - self.weight.mean((1, 2, 3), keepdim=True), self.bias)


@pytest.mark.parametrize("excluded", [False, True])
def test_norm_decay_names_the_overriding_layers_it_decays_once_and_none_it_excludes(excluded):
    model = nn.Sequential(_Standardised(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, exclude=("0",) if excluded else ())
        for _ in range(2):
            model(torch.randn(2, 1, 6, 6)).sum().backward()
            optimizer.step()
    named = [str(w.message) for w in caught if issubclass(w.category, normopt.OverriddenForwardWarning)]
    if excluded:
        assert named == []
    else:
        assert len(named) == 1 and named[0].startswith("norm decay regularizes them as described: layers ['0']")
        assert "exclude=('0',)" in named[0]


class _Doubled(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, 2 * weight, bias)


class _ScaledBatchNorm(nn.BatchNorm2d):
    def forward(self, x):
        return 3 * super().forward(x)


def _overriding_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, normopt.OverriddenForwardWarning)]


def test_norm_decay_names_a_capped_batch_norm_and_a_layer_replaced_by_another_overriding_class():
    model = nn.Sequential(_Standardised(1, 2, 3, padding=1), _ScaledBatchNorm(2), nn.ReLU(), nn.Conv2d(2, 2, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decay = attach_norm_decay(torch.optim.SGD(model.parameters(), lr=0.1), model, bn_max_norm=1.0)
        optimizer = decay.optimizer
        model(torch.randn(2, 1, 6, 6)).sum().backward()
        optimizer.step()
    named = _overriding_warnings(caught)
    assert len(named) == 2 and {"_Standardised", "_ScaledBatchNorm"} == {
        cls for cls in ("_Standardised", "_ScaledBatchNorm") for message in named if cls in message
    }
    assert str(__file__) in {w.filename for w in caught if issubclass(w.category, normopt.OverriddenForwardWarning)}
    model[0] = _Doubled(1, 2, 3, padding=1)  # the same name, another overriding class
    optimizer.add_param_group({"params": model[0].parameters()})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decay.add_params()
        model(torch.randn(2, 1, 6, 6)).sum().backward()
        optimizer.step()
    assert [m for m in _overriding_warnings(caught) if "_Doubled" in m]


@pytest.mark.filterwarnings("ignore:.*changed since the layers were chosen:UserWarning")
def test_the_no_forward_warning_judges_only_a_recorder_that_was_there_before_the_step():
    # Replaced before the first step, a forward ran: the recorder made during the step missed it.
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(72, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    attach_norm_decay(optimizer, model)
    model[0] = nn.Conv2d(1, 2, 3, padding=1)
    optimizer.add_param_group({"params": model[0].parameters()})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(torch.randn(2, 1, 6, 6)).sum().backward()
        optimizer.step()
    assert not [w for w in caught if "stepped before any forward" in str(w.message)]
    # Sizes from example_input, a conv replaced, then steps with no forward at all: warned.
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(72, 2))
    optimizer = NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, example_input=torch.zeros(1, 1, 6, 6))
    model[0] = nn.Conv2d(1, 2, 3, padding=1)
    optimizer.add_param_group({"params": model[0].parameters()})
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.warns(UserWarning, match="stepped before any forward") as caught:
        for _ in range(2):
            optimizer.step()
    assert str(__file__) in {w.filename for w in caught if "stepped before any forward" in str(w.message)}
