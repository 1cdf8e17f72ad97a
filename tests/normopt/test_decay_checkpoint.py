"""The decay state through the optimizer's own state_dict and load_state_dict: saved whole, resumed bit for bit, a bad
checkpoint refused before anything changes, checkpoints of earlier versions still loaded."""

from __future__ import annotations

import contextlib
import copy
import io
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, attached, batches, digits, one_step, rings_everywhere, same_weights, small_cnn, wrapped
from torch import nn

from normopt import NormDecayOptimizer, attach_norm_decay
from normopt.recent_slices import DENSE, horizon

DATA = digits()


@pytest.mark.parametrize("make", [wrapped, attached], ids=["wrapper", "hooks"])
def test_state_round_trips_through_the_inner_optimizers_state_dict(make):
    model = small_cnn(batchnorm=True)
    optimizer = make(model, beta=0.1, gamma=0.7, layers=("conv", "linear", "batchnorm"))
    for seed in range(3):
        one_step(model, optimizer, seed)
    inner = getattr(optimizer, "optimizer", optimizer)
    saved = inner.state_dict()
    keys = {key for entry in saved["state"].values() for key in entry}
    assert {"norm_decay_buffer", "norm_decay_scale", "momentum_buffer"} <= keys
    assert all(group["norm_decay_beta"] == 0.1 and group["norm_decay_gamma"] == 0.7 for group in saved["param_groups"])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": saved}, buffer)
    one_step(model, optimizer, 7)

    twin = small_cnn(batchnorm=True)
    # Built with other defaults: beta and gamma come back from the checkpoint's param groups.
    twin_optimizer = make(twin, beta=0.3, gamma=0.2, layers=("conv", "linear", "batchnorm"))
    buffer.seek(0)
    checkpoint = torch.load(buffer)  # weights_only: plain tensors and numbers
    twin.load_state_dict(checkpoint["model"])
    getattr(twin_optimizer, "optimizer", twin_optimizer).load_state_dict(checkpoint["optimizer"])
    assert all(g["norm_decay_beta"] == 0.1 and g["norm_decay_gamma"] == 0.7 for g in twin_optimizer.param_groups)
    one_step(twin, twin_optimizer, 7)
    for key, value in model.state_dict().items():
        assert torch.equal(value, twin.state_dict()[key]), key


def saved_and_reloaded(model, optimizer, make, edit=lambda saved: None, **options):
    """A twin of ``model`` and its optimizer, loaded from a checkpoint of both (after ``edit``)."""
    saved = copy.deepcopy(optimizer.state_dict())
    edit(saved)
    twin = small_cnn()
    twin.load_state_dict(model.state_dict())
    twin_optimizer = make(twin, **options)
    twin_optimizer.load_state_dict(saved)
    return twin, twin_optimizer


@pytest.mark.parametrize("make", [wrapped, attached], ids=["wrapper", "hooks"])
def test_rings_of_recent_slices_round_trip_and_resume_bit_for_bit(rings, make):
    model = small_cnn()
    optimizer = make(model, beta=0.1, ord=math.inf)
    for seed in range(30):  # past the ring's length (24 at gamma 0.5 in float32)
        one_step(model, optimizer, seed)
    entries = optimizer.state_dict()["state"].values()
    recent = [entry["norm_decay_recent"] for entry in entries if "norm_decay_recent" in entry]
    assert len(recent) == 3 and all(r.shape == (24,) and r.min() >= 0 for r in recent)
    twin, twin_optimizer = saved_and_reloaded(model, optimizer, make, beta=0.1, ord=math.inf)
    for seed in range(30, 33):
        one_step(model, optimizer, seed)
        one_step(twin, twin_optimizer, seed)
    same_weights(model, twin)


def drop_rings(saved):
    for entry in saved["state"].values():
        entry.pop("norm_decay_recent", None)


def shorten_rings(saved):  # as kept for bfloat16 (8 places) or a smaller gamma
    for entry in saved["state"].values():
        if "norm_decay_recent" in entry:
            entry["norm_decay_recent"] = entry["norm_decay_recent"][-8:].clone()


def lengthen_rings(saved):  # as kept for float64 or a larger gamma
    for entry in saved["state"].values():
        if "norm_decay_recent" in entry:
            entry["norm_decay_recent"] = torch.cat([torch.full((6,), -1), entry["norm_decay_recent"]])


@pytest.mark.parametrize("edit", [drop_rings, shorten_rings], ids=["none", "shorter"])
def test_a_checkpoint_without_a_ring_of_this_length_rebuilds_it_from_the_buffers(rings, edit):
    model = small_cnn()
    optimizer = wrapped(model, beta=0.1, ord=math.inf)
    for seed in range(30):
        one_step(model, optimizer, seed)
    twin, twin_optimizer = saved_and_reloaded(model, optimizer, wrapped, edit, beta=0.1, ord=math.inf)
    rebuilt, rebuilt_optimizer = saved_and_reloaded(model, optimizer, wrapped, drop_rings, beta=0.1, ord=math.inf)
    for seed in range(30, 60):
        for pair in ((model, optimizer), (twin, twin_optimizer), (rebuilt, rebuilt_optimizer)):
            one_step(*pair, seed)
    same_weights(model, twin, rtol=1e-6)
    same_weights(rebuilt, twin)  # a ring shorter than this dtype's is not trusted: h alone decides


def test_a_checkpoint_with_longer_rings_keeps_them_as_a_run_sized_for_a_larger_gamma_would(rings):
    model = small_cnn()
    optimizer = wrapped(model, beta=0.1, ord=math.inf)
    for seed in range(30):
        one_step(model, optimizer, seed)
    twin, twin_optimizer = saved_and_reloaded(model, optimizer, wrapped, lengthen_rings, beta=0.1, ord=math.inf)
    for seed in range(30, 60):
        for pair in ((model, optimizer), (twin, twin_optimizer)):
            one_step(*pair, seed)
    recent = [
        entry["norm_decay_recent"] for entry in twin_optimizer.state_dict()["state"].values() if "norm_decay_recent" in entry
    ]
    assert len(recent) == 3 and all(r.shape == (30,) and r.min() >= 0 for r in recent)  # kept, and still sparse
    same_weights(model, twin, rtol=1e-6)  # the longer rings add slices older than 24 steps too


@pytest.mark.parametrize("make", [wrapped, attached], ids=["wrapper", "hooks"])
@pytest.mark.parametrize("before", ["a gamma spike", "a step at another gamma"])
def test_a_checkpoint_loaded_into_an_optimizer_that_has_stepped_resumes_as_one_loaded_before_its_first_step(rings, make, before):
    """A rollback in place after a gamma spike turned the rings dense, or a load after a step of an
    optimizer built with another gamma (torch.distributed.checkpoint's load steps first)."""
    model = small_cnn()
    optimizer = make(model, beta=0.1, ord=math.inf, gamma=0.7)  # rings of 47 steps
    for seed in range(50):
        one_step(model, optimizer, seed)
    saved, weights = copy.deepcopy(optimizer.state_dict()), copy.deepcopy(model.state_dict())
    fresh = small_cnn()
    fresh.load_state_dict(weights)
    fresh_optimizer = make(fresh, beta=0.1, ord=math.inf)  # built with the default gamma 0.5: rings of 24
    fresh_optimizer.load_state_dict(copy.deepcopy(saved))  # its momentum buffers would be shared
    if before == "a gamma spike":
        stepped, stepped_optimizer = model, optimizer
        for group in optimizer.param_groups:
            group["norm_decay_gamma"] = 0.99  # above every ring: dense for good
        one_step(model, optimizer, 99)
        assert all(bool((ring == DENSE).all()) for ring in _rings(optimizer))
    else:
        stepped = small_cnn(seed=1)
        stepped_optimizer = make(stepped, beta=0.1, ord=math.inf)
        one_step(stepped, stepped_optimizer, 99)
    stepped.load_state_dict(weights)
    stepped_optimizer.load_state_dict(copy.deepcopy(saved))
    for seed in range(50, 80):
        one_step(fresh, fresh_optimizer, seed)
        one_step(stepped, stepped_optimizer, seed)
    for optimizer in (fresh_optimizer, stepped_optimizer):  # the checkpoint's rings, sparse
        assert [tuple(ring.shape) for ring in _rings(optimizer)] == [(horizon(0.7, torch.float32),)] * 3
        assert all(bool((ring >= 0).all()) for ring in _rings(optimizer))
    same_weights(fresh, stepped)


def _rings(optimizer) -> list[torch.Tensor]:
    return [entry["norm_decay_recent"] for entry in optimizer.state_dict()["state"].values() if "norm_decay_recent" in entry]


def half_net(dtype, width):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 3)).to(dtype)


def half_step(model, optimizer, seed):
    generator = torch.Generator().manual_seed(seed)
    inputs, labels = torch.randn(8, 4, generator=generator), torch.randint(0, 3, (8,), generator=generator)
    optimizer.zero_grad()
    F.cross_entropy(model(inputs.to(model[0].weight.dtype)).float(), labels).backward()
    optimizer.step()


# Wide enough that some channels are not integers of the dtype (above 256 in bfloat16, 2048 in float16).
@pytest.mark.parametrize(("dtype", "width"), [(torch.bfloat16, 600), (torch.float16, 3000)], ids=["bfloat16", "float16"])
def test_rings_of_half_precision_weights_survive_torchs_cast_of_the_loaded_state(rings, dtype, width):
    model = half_net(dtype, width)
    optimizer = wrapped(model, beta=0.1, ord=math.inf)
    for seed in range(12):
        half_step(model, optimizer, seed)
    saved = copy.deepcopy(optimizer.state_dict())
    ring = saved["state"][0]["norm_decay_recent"]  # the first layer's output channels
    assert ring.shape == (horizon(0.5, dtype),) and ring.dtype == torch.int64
    assert bool((ring.to(dtype).long() != ring).any()), "no channel that the dtype rounds: pick another seed"
    twin = half_net(dtype, width)
    twin.load_state_dict(model.state_dict())
    twin_optimizer = wrapped(twin, beta=0.1, ord=math.inf)
    twin_optimizer.load_state_dict(saved)  # torch casts the state of a half-precision weight to its dtype
    for seed in range(12, 16):
        half_step(model, optimizer, seed)
        half_step(twin, twin_optimizer, seed)
        rings = [o.state_dict()["state"][0]["norm_decay_recent"] for o in (optimizer, twin_optimizer)]
        assert torch.equal(*rings), seed
    for key, value in model.state_dict().items():
        assert torch.equal(twin.state_dict()[key], value), key


@pytest.mark.parametrize("make", [wrapped, attached], ids=["wrapper", "hooks"])
def test_a_checkpoint_loaded_before_the_first_step_is_saved_again_whole(rings, make):
    model = small_cnn()
    optimizer = make(model, beta=0.1, ord=math.inf)
    for seed in range(30):
        one_step(model, optimizer, seed)
    twin, twin_optimizer = saved_and_reloaded(model, optimizer, make, beta=0.1, ord=math.inf)
    resaved = copy.deepcopy(twin_optimizer.state_dict())  # before the twin's first step
    for key in ("norm_decay_buffer", "norm_decay_scale", "norm_decay_recent"):
        # every layer has a ring here; not in "state" while the layers are not stepped (see the next test)
        assert sum(key in entry for entry in resaved["norm_decay_pending"].values()) == 3, key
    third = small_cnn()
    third.load_state_dict(model.state_dict())
    third_optimizer = make(third, beta=0.1, ord=math.inf)
    third_optimizer.load_state_dict(resaved)
    for seed in range(30, 33):
        for pair in ((model, optimizer), (twin, twin_optimizer), (third, third_optimizer)):
            one_step(*pair, seed)
    same_weights(model, twin)
    same_weights(model, third)


@pytest.mark.parametrize(  # hooks are not copied with an optimizer (documented): no copy of the attached decay
    ("make", "resume"), [(wrapped, "checkpoint"), (wrapped, "copy"), (attached, "checkpoint")], ids=["wrapper", "copy", "hooks"]
)
def test_a_batch_dense_from_its_start_stays_dense_when_resumed_at_a_smaller_gamma(rings, make, resume):
    """A gamma warm-up from 0.97 (too slow a decay for any ring) lays the batch out dense for good;
    its checkpoint carried no ring, and a run resumed after gamma fell to 0.5 went sparse, away from
    the uninterrupted run."""
    model = small_cnn()
    optimizer = make(model, beta=0.1, gamma=0.97, ord=math.inf)
    for seed in range(6):
        if seed == 2:
            for group in optimizer.param_groups:
                group["norm_decay_gamma"] = 0.5
        one_step(model, optimizer, seed)
    if resume == "copy":
        twin, twin_optimizer = copy.deepcopy((model, optimizer))
    else:
        twin, twin_optimizer = saved_and_reloaded(model, optimizer, make, beta=0.1, gamma=0.97, ord=math.inf)
    for seed in range(6, 9):
        one_step(model, optimizer, seed)
        one_step(twin, twin_optimizer, seed)
    for o in (optimizer, twin_optimizer):  # both dense, and their checkpoints say so
        rings = [entry["norm_decay_recent"] for entry in o.state_dict()["state"].values() if "norm_decay_recent" in entry]
        assert rings and all(bool((ring == DENSE).all()) for ring in rings)
    same_weights(model, twin)


@pytest.mark.parametrize("resume", ["checkpoint", "copy"])
@pytest.mark.parametrize("gamma", [0.9, 0.5])
@pytest.mark.parametrize("event", ["unfreeze", "add_param_group"])
def test_a_resumed_run_that_chooses_its_layers_anew_at_once_goes_on_bit_for_bit(rings, resume, gamma, event):
    """Layers chosen anew (a head unfrozen or added) kept h as buffer * scale when live, which rounds
    unless gamma is a power of two, and rebuilt its ring; a resumed run kept the checkpoint's split."""
    model = small_cnn()
    head = list(model[6].parameters())
    params = model.parameters() if event == "unfreeze" else [p for p in model.parameters() if all(p is not q for q in head)]
    if event == "unfreeze":
        for p in head:
            p.requires_grad_(False)
    make = lambda m, **options: NormDecayOptimizer(
        torch.optim.SGD(
            m.parameters() if event == "unfreeze" else [p for p in m.parameters() if all(p is not q for q in m[6].parameters())],
            lr=0.05,
            momentum=0.9,
        ),
        m,
        **options,
    )
    optimizer = NormDecayOptimizer(torch.optim.SGD(params, lr=0.05, momentum=0.9), model, beta=0.1, gamma=gamma, ord=math.inf)
    for seed in range(5):
        one_step(model, optimizer, seed)
    if resume == "copy":
        twin, twin_optimizer = copy.deepcopy((model, optimizer))
    else:
        if event == "unfreeze":  # the twin is built as the model was: its head frozen
            saved = copy.deepcopy(optimizer.state_dict())
            twin = small_cnn()
            twin.load_state_dict(model.state_dict())
            for p in twin[6].parameters():
                p.requires_grad_(False)
            twin_optimizer = make(twin, beta=0.1, gamma=gamma, ord=math.inf)
            twin_optimizer.load_state_dict(saved)
        else:
            twin, twin_optimizer = saved_and_reloaded(model, optimizer, make, beta=0.1, gamma=gamma, ord=math.inf)
    for m, o in ((model, optimizer), (twin, twin_optimizer)):
        if event == "unfreeze":
            for p in m[6].parameters():
                p.requires_grad_(True)
        else:
            o.add_param_group({"params": list(m[6].parameters())})
    for seed in range(5, 9):
        one_step(model, optimizer, seed)
        one_step(twin, twin_optimizer, seed)
    same_weights(model, twin)


def test_a_ring_of_an_earlier_selection_leaves_the_optimizer_state(rings):
    model = small_cnn()
    head = list(model[6].parameters())
    body = [p for p in model.parameters() if all(p is not q for q in head)]
    optimizer = NormDecayOptimizer(torch.optim.SGD(body, lr=0.05, momentum=0.9), model, beta=0.1, ord=math.inf)
    for seed in range(3):
        one_step(model, optimizer, seed)
    assert any("norm_decay_recent" in entry for entry in optimizer.state_dict()["state"].values())
    optimizer.add_param_group({"params": head, "norm_decay_gamma": 0.95})  # too slow a decay for any ring
    one_step(model, optimizer, 3)
    entries = optimizer.state_dict()["state"].values()
    assert sum("norm_decay_buffer" in entry for entry in entries) == 3
    # The new layout is dense from its start: its rings say so (so that a resume stays dense); none
    # holds the earlier ring's channels.
    rings = [entry["norm_decay_recent"] for entry in entries if "norm_decay_recent" in entry]
    assert rings and all(bool((ring == DENSE).all()) for ring in rings)


@pytest.mark.parametrize(
    "bad",
    [lambda r: r.float(), lambda r: torch.full_like(r, 8), lambda r: torch.full_like(r, -3), lambda r: r.view(4, 6)],
    ids=["float", "past-the-channels", "below-the-marker", "2-d"],
)
def test_a_bad_ring_of_recent_slices_is_refused_naming_the_layer(rings, bad):
    model = small_cnn()
    optimizer = wrapped(model, beta=0.1, ord=math.inf)
    for seed in range(3):
        one_step(model, optimizer, seed)
    saved = copy.deepcopy(optimizer.state_dict())
    entry = saved["state"][2]  # layer '3''s weight: l_inf norms read its 8 output channels
    entry["norm_decay_recent"] = bad(entry["norm_decay_recent"])
    entry["norm_decay_buffer"].fill_(5.0)
    before, inner = optimizer.norm_decay.decay_buffers(), copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match=r"recent slices of layer '3' must be a 1-D integer tensor of channels in \[-2, 8\)"):
        optimizer.load_state_dict(saved)
    for name, h in optimizer.norm_decay.decay_buffers().items():
        assert torch.equal(h, before[name]), name
    for i, entry in optimizer.state_dict()["state"].items():
        assert all(torch.equal(value, inner["state"][i][key]) for key, value in entry.items()), i


def test_a_gamma_above_the_rings_is_kept_dense_through_a_checkpoint(rings):
    model = small_cnn()
    optimizer = wrapped(model, beta=0.1, ord=math.inf)
    for seed in range(5):
        one_step(model, optimizer, seed)
    for group in optimizer.param_groups:
        group["norm_decay_gamma"] = 0.9  # above the 0.5 the rings were sized for: dense from now on
    one_step(model, optimizer, 5)
    recent = [entry["norm_decay_recent"] for entry in optimizer.state_dict()["state"].values() if "norm_decay_recent" in entry]
    assert recent and all(bool((r == -2).all()) for r in recent)
    twin, twin_optimizer = saved_and_reloaded(model, optimizer, wrapped, beta=0.1, ord=math.inf)
    for seed in range(6, 40):
        if seed == 20:
            for group in optimizer.param_groups + twin_optimizer.param_groups:
                group["norm_decay_gamma"] = 0.5
        one_step(model, optimizer, seed)
        one_step(twin, twin_optimizer, seed)
    same_weights(model, twin)


@pytest.mark.parametrize("make", [wrapped, attached], ids=["wrapper", "hooks"])
@pytest.mark.parametrize(
    ("first", "then"), [(0.5, 0.8), (0.8, 0.5), (0.8, 0.9)], ids=["raised", "lowered", "raised-past-its-ring"]
)
def test_a_checkpoint_saved_after_gamma_changed_and_before_the_next_step_resumes_bit_for_bit(rings, make, first, then):
    # An epoch-end scheduler that moves gamma, then a checkpoint: the twin's first step sees the new
    # gamma, and must size its rings as the run that wrote the checkpoint did, not for that gamma.
    model = small_cnn()
    optimizer = make(model, beta=0.1, gamma=first, ord=math.inf)
    for seed in range(5):
        one_step(model, optimizer, seed)
    for group in optimizer.param_groups:
        group["norm_decay_gamma"] = then
    twin, twin_optimizer = saved_and_reloaded(model, optimizer, make, beta=0.1, gamma=first, ord=math.inf)
    for seed in range(5, 40):
        one_step(model, optimizer, seed)
        one_step(twin, twin_optimizer, seed)
    same_weights(model, twin)


@pytest.mark.parametrize("when", ["before the first step", "after a step"])
@pytest.mark.parametrize("ord", [1, math.inf], ids=["l1", "linf"])
def test_buffers_of_a_hooks_checkpoint_from_before_the_state_moved_resume_through_load_buffers(rings, ord, when):
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    decay = attach_norm_decay(optimizer, model, beta=0.1, ord=ord)
    for seed in range(3):
        one_step(model, optimizer, seed)
    old_checkpoint = {"model": copy.deepcopy(model.state_dict()), "buffers": decay.decay_buffers()}  # {layer: h}
    old_optimizer = copy.deepcopy(optimizer.state_dict())
    for entry in old_optimizer["state"].values():
        for key in [k for k in entry if k.startswith("norm_decay")]:
            del entry[key]
    twin = small_cnn(seed=1)
    twin.load_state_dict(old_checkpoint["model"])
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    twin_decay = attach_norm_decay(twin_optimizer, twin, beta=0.1, ord=ord)
    if when == "after a step":
        one_step(twin, twin_optimizer, 9)
        twin.load_state_dict(old_checkpoint["model"])
    twin_optimizer.load_state_dict(old_optimizer)
    with pytest.raises(ValueError, match=r"decay buffer of layer '0' has shape \(4,\)"):
        twin_decay.load_buffers({**old_checkpoint["buffers"], "0": torch.zeros(4)})
    with pytest.raises(TypeError, match=r"decay buffer of layer '3' must be a real floating-point tensor, got list"):
        twin_decay.load_buffers({"3": [0.0]})
    with pytest.raises(ValueError, match=r"decay buffer of layer '3' is not finite"):
        twin_decay.load_buffers({"3": torch.full_like(old_checkpoint["buffers"]["3"], math.nan)})
    twin_decay.load_buffers(old_checkpoint["buffers"])
    for name, h in twin_decay.decay_buffers().items():
        assert torch.equal(h, old_checkpoint["buffers"][name]), name
    for seed in (3, 4):
        one_step(model, optimizer, seed)
        one_step(twin, twin_optimizer, seed)
    same_weights(model, twin, rtol=1e-6)


def _corrupt(state_dict: dict, refused_by: str) -> tuple[type, str]:
    """Spoil a checkpoint (after its first entry's buffers were changed) as ``refused_by`` says; the
    error expected."""
    h = state_dict["state"][2]["norm_decay_buffer"]
    if refused_by == "torch":
        state_dict["param_groups"].append(dict(state_dict["param_groups"][0]))  # one group too many
        return ValueError, "parameter groups"
    spoilt = {
        "a buffer of another shape": ("norm_decay_buffer", torch.zeros(3), ValueError, r"layer '3' has shape \(3,\)"),
        "a NaN buffer": ("norm_decay_buffer", torch.full_like(h, math.nan), ValueError, r"layer '3' is not finite"),
        "an integer buffer": ("norm_decay_buffer", h.long(), TypeError, r"layer '3' must be a real floating-point tensor"),
        "a complex buffer": ("norm_decay_buffer", h.cfloat(), TypeError, r"layer '3' must be a real .* got torch.complex64"),
        "a list buffer": ("norm_decay_buffer", h.tolist(), TypeError, r"layer '3' must be a real .* got list"),
        "a float scale": ("norm_decay_scale", 1.0, TypeError, r"decay scale of layer '3' must be a real .* got float"),
    }
    if refused_by in spoilt:
        key, value, error, match = spoilt[refused_by]
        state_dict["state"][2][key] = value
        return error, match
    key, value = {"a negative beta": ("norm_decay_beta", -1.0), "a gamma above 1": ("norm_decay_gamma", 2.0)}[refused_by]
    state_dict["param_groups"][0][key] = value
    return ValueError, f"{key} of param group 0 of the checkpoint"


@pytest.mark.parametrize(
    "refused_by",
    [
        "torch",
        "a buffer of another shape",
        "a NaN buffer",
        "an integer buffer",
        "a complex buffer",
        "a list buffer",
        "a float scale",
        "a negative beta",
        "a gamma above 1",
    ],
)
@pytest.mark.parametrize("through", ["wrapper", "hooks"])
def test_a_refused_load_changes_neither_the_optimizer_nor_the_decay_state(through, refused_by):
    model = small_cnn()
    if through == "wrapper":
        optimizer = wrapped(model, beta=0.1)
        decay = optimizer.norm_decay
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        decay = attach_norm_decay(optimizer, model, beta=0.1)
    one_step(model, optimizer)
    before, inner = decay.decay_buffers(), copy.deepcopy(optimizer.state_dict())
    bad = copy.deepcopy(optimizer.state_dict())
    bad["state"][0]["norm_decay_buffer"] = torch.full_like(bad["state"][0]["norm_decay_buffer"], 5.0)
    bad["state"][0]["momentum_buffer"] = torch.full_like(bad["state"][0]["momentum_buffer"], 5.0)
    error, match = _corrupt(bad, refused_by)
    with pytest.raises(error, match=match):
        optimizer.load_state_dict(bad)
    assert optimizer.param_groups[0]["norm_decay_beta"] == 0.1 and optimizer.param_groups[0]["norm_decay_gamma"] == 0.5
    for name, h in decay.decay_buffers().items():
        assert torch.equal(h, before[name]), name
    for i, entry in optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, inner["state"][i][key]), (i, key)


def _two_groups(model: nn.Module) -> list[dict]:
    """The convolutions (4 parameters) and the head (2) of :func:`small_cnn`, in two groups."""
    return [{"params": [*model[0].parameters(), *model[3].parameters()]}, {"params": list(model[6].parameters())}]


@pytest.mark.parametrize("make", [NormDecayOptimizer, attach_norm_decay], ids=["wrapper", "hooks"])
@pytest.mark.parametrize(
    ("regroup", "message"),
    [
        (lambda groups: groups[::-1], "contains a parameter group that doesn't match the size of optimizer's group"),
        (lambda groups: [{"params": [p for g in groups for p in g["params"]]}], "has a different number of parameter groups"),
    ],
    ids=["sizes", "count"],
)
def test_a_checkpoint_of_other_param_groups_is_refused_in_torchs_words(make, regroup, message):
    # The decay pairs saved parameters with the optimizer's by position before torch checks the
    # groups: it named a layer's buffer of another shape instead.
    model = small_cnn()
    optimizer = torch.optim.SGD(_two_groups(model), lr=0.05, momentum=0.9)
    decay = make(optimizer, model, beta=0.1)
    stepping = decay if make is NormDecayOptimizer else optimizer
    one_step(model, stepping)
    saved = copy.deepcopy(stepping.state_dict())
    other = small_cnn()
    plain = torch.optim.SGD(regroup(_two_groups(other)), lr=0.05, momentum=0.9)
    with pytest.raises(ValueError, match=message):
        plain.load_state_dict(copy.deepcopy(saved))  # torch's own refusal
    inner = torch.optim.SGD(regroup(_two_groups(other)), lr=0.05, momentum=0.9)
    target = make(inner, other, beta=0.1)
    loading = target if make is NormDecayOptimizer else inner
    one_step(other, loading)
    before = copy.deepcopy(loading.state_dict())
    with pytest.raises(ValueError, match=message):
        loading.load_state_dict(saved)
    for i, entry in loading.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, before["state"][i][key]), (i, key)


def test_checkpoints_of_the_previous_version_still_load():
    model = small_cnn()
    optimizer = wrapped(model, beta=0.1)
    one_step(model, optimizer)
    legacy = copy.deepcopy(optimizer.state_dict())  # state_dict() returns the live tensors
    legacy["state"] = {
        i: {k: v for k, v in entry.items() if not k.startswith("norm_decay")} for i, entry in legacy["state"].items()
    }
    for group in legacy["param_groups"]:
        group.pop("norm_decay_beta"), group.pop("norm_decay_gamma")
    old_buffers = optimizer.norm_decay.decay_buffers()
    legacy["norm_decay"] = {"buffers": old_buffers, "rule": "paper"}
    twin = small_cnn()
    twin.load_state_dict(model.state_dict())
    twin_optimizer = wrapped(twin, beta=0.1)
    twin_optimizer.load_state_dict(legacy)
    for name, h in twin_optimizer.norm_decay.decay_buffers().items():
        assert_close(h, old_buffers[name], msg=name)
    one_step(model, optimizer, 3)
    one_step(twin, twin_optimizer, 3)
    for key, value in model.state_dict().items():
        assert_close(twin.state_dict()[key], value, rtol=1e-6, msg=key)


def test_adam_state_is_initialised_before_the_decay_keys_join_it():
    model = small_cnn()
    optimizer = NormDecayOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), model, beta=0.1)
    for seed in range(2):
        one_step(model, optimizer, seed)
    state = optimizer.state[model[0].weight]
    assert {"step", "exp_avg", "exp_avg_sq", "norm_decay_buffer", "norm_decay_scale"} <= set(state)


@pytest.mark.parametrize("through", ["wrapper", "hooks"])
def test_a_checkpoint_taken_while_a_chosen_layer_is_frozen_resumes_bit_for_bit(through):
    """A layer frozen after the layers were chosen keeps its h unchanged until it is unfrozen,
    in the run and in a resume from a checkpoint taken meanwhile."""

    def build(frozen: bool):
        model = small_cnn()
        model[0].weight.requires_grad_(not frozen)
        return model, (wrapped if through == "wrapper" else attached)(model, beta=0.1, example_input=DATA[0][:1])

    model, optimizer = build(False)
    for seed in range(4):
        if seed == 2:
            model[0].weight.requires_grad_(False)
        one_step(model, optimizer, seed)
    checkpoint = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    twin, twin_optimizer = build(True)
    twin.load_state_dict(checkpoint[0])
    twin_optimizer.load_state_dict(checkpoint[1])
    for seed in range(4, 8):
        if seed == 6:
            model[0].weight.requires_grad_(True)
            twin[0].weight.requires_grad_(True)
        one_step(model, optimizer, seed)
        one_step(twin, twin_optimizer, seed)
    same_weights(model, twin)
    assert "norm_decay_buffer" in optimizer.state[model[0].weight]


def test_a_checkpoint_with_decay_state_of_weights_not_stepped_yet_loads_into_adam():
    """Decay state loaded before the first step is saved again though Adam has no state there
    yet; loading such a checkpoint leaves Adam to initialise its own (it took the entry for its own)."""

    def build():
        model = small_cnn()
        return model, NormDecayOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), model, beta=0.1)

    model, optimizer = build()
    h = {name: torch.full_like(model.get_submodule(name).weight, 0.5) for name in ("0", "3", "6")}
    optimizer.norm_decay.load_buffers(h)
    saved = optimizer.state_dict()
    assert saved["state"] == {}  # no Adam state yet, and no entry Adam would take for its own
    assert set(saved["norm_decay_pending"][0]) == {"norm_decay_buffer", "norm_decay_scale"}
    plain = small_cnn()
    plain_adam = torch.optim.Adam(plain.parameters(), lr=1e-3)
    plain_adam.load_state_dict(copy.deepcopy(saved))  # a run resumed without norm decay
    one_step(plain, plain_adam)
    twin, twin_optimizer = build()
    twin_optimizer.load_state_dict(saved)
    assert twin_optimizer.norm_decay.decay_buffers().keys() == h.keys()
    for name, value in twin_optimizer.norm_decay.decay_buffers().items():
        assert torch.equal(value, h[name]), name
    for m, o in ((model, optimizer), (twin, twin_optimizer)):
        one_step(m, o)
    same_weights(model, twin)
    assert {"step", "exp_avg", "norm_decay_buffer"} <= set(twin_optimizer.state[twin[0].weight])


def test_a_checkpoint_saved_right_after_a_load_carries_every_layers_h():
    """Plain SGD keeps no state of its own: after a load mid-run, h lives only in the decay state
    until the next step, and a checkpoint taken meanwhile still carries it."""
    model = small_cnn()
    optimizer = NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, beta=0.1)
    for seed in range(3):
        one_step(model, optimizer, seed)
    h = optimizer.norm_decay.decay_buffers()
    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    saved = copy.deepcopy(optimizer.state_dict())
    twin = small_cnn()
    twin_optimizer = NormDecayOptimizer(torch.optim.SGD(twin.parameters(), lr=0.05), twin, beta=0.1)
    twin_optimizer.load_state_dict(saved)
    for name, value in twin_optimizer.norm_decay.decay_buffers().items():
        assert torch.equal(value, h[name]), name


@pytest.mark.parametrize("make", [wrapped, attached], ids=["wrapper", "hooks"])
def test_a_checkpoint_holds_compact_copies_of_the_decay_state(make):
    """optimizer.state holds views of one flat buffer per batch: a plain pickle of a checkpoint that
    held them would write that buffer once per view (265 MiB for 8 MiB of h over 32 layers)."""
    model = small_cnn()
    optimizer = make(model, ord=math.inf)
    with rings_everywhere():
        one_step(model, optimizer)
    saved = optimizer.state_dict()
    decayed = {index: entry for index, entry in saved["state"].items() if "norm_decay_buffer" in entry}
    assert len(decayed) == 3 and all("norm_decay_recent" in entry for entry in decayed.values())
    for index, entry in decayed.items():
        for key in ("norm_decay_buffer", "norm_decay_scale", "norm_decay_recent"):
            t = entry[key]
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), (index, key)
    weight = model[0].weight
    assert optimizer.state[weight]["norm_decay_buffer"]._base is not None  # the live state: views still
    assert len(pickle.dumps(saved)) < 2 * sum(t.numel() * t.element_size() for e in saved["state"].values() for t in e.values())


def test_two_decays_on_one_optimizer_each_resume_their_own_layers():
    def build():
        model = small_cnn()
        first = [p for name, p in model.named_parameters() if name.startswith("0.")]
        rest = [p for name, p in model.named_parameters() if not name.startswith("0.")]
        optimizer = torch.optim.Adam([{"params": first}, {"params": rest, "norm_decay_beta": 0.2}], lr=1e-3)
        attach_norm_decay(optimizer, model, beta=0.1, exclude=("3", "6"))
        attach_norm_decay(optimizer, model, beta=0.2, ord=math.inf, exclude=("0",))
        return model, optimizer

    model, optimizer = build()
    for seed in range(3):
        one_step(model, optimizer, seed)
    checkpoint = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    twin, twin_optimizer = build()
    twin.load_state_dict(checkpoint[0])
    twin_optimizer.load_state_dict(checkpoint[1])
    for seed in (3, 4):
        one_step(model, optimizer, seed)
        one_step(twin, twin_optimizer, seed)
    same_weights(model, twin)


class TwoBranches(nn.Module):
    """A trunk, and two heads of which each step uses one (the other's weights get no gradient)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk, self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x, head="a"):
        return getattr(self, head)(torch.relu(self.trunk(x)))


def branch_step(model, optimizer, seed, head):
    generator = torch.Generator().manual_seed(seed)
    inputs, labels = torch.randn(8, 4, generator=generator), torch.randint(0, 3, (8,), generator=generator)
    optimizer.zero_grad()
    F.cross_entropy(model(inputs, head), labels).backward()
    optimizer.step()


@pytest.mark.parametrize("inner", [torch.optim.SGD, torch.optim.Adam], ids=["sgd", "adam"])
@pytest.mark.parametrize("make", [NormDecayOptimizer, attach_norm_decay], ids=["wrapper", "hooks"])
@pytest.mark.parametrize("regroup", [False, True], ids=["one-group", "group-added-mid-run"])
def test_a_checkpoint_carries_the_h_of_a_layer_that_has_had_no_gradient_yet(inner, make, regroup):
    """h moves at every step, gradient or not: a head unused so far must still resume bit for bit."""

    def build():
        model = TwoBranches()
        first = [*model.trunk.parameters(), *model.a.parameters()]
        optimizer = inner(first if regroup else model.parameters(), lr=0.05)
        wrapped = make(optimizer, model, beta=0.3, ord=math.inf)
        return model, optimizer if make is attach_norm_decay else wrapped

    model, optimizer = build()
    for seed in range(3):
        branch_step(model, optimizer, seed, "a")
    if regroup:  # the layers are chosen anew, and b's h starts then
        optimizer.add_param_group({"params": list(model.b.parameters())})
        branch_step(model, optimizer, 3, "a")
    assert model.b.weight.grad is None and optimizer.state.get(model.b.weight, {}) == {}
    twin, twin_optimizer = build()
    if regroup:
        twin_optimizer.add_param_group({"params": list(twin.b.parameters())})
    twin.load_state_dict(model.state_dict())
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for seed in range(4, 8):
        for pair in ((model, optimizer), (twin, twin_optimizer)):
            branch_step(*pair, seed, "b")
    for key, value in model.state_dict().items():
        assert torch.equal(twin.state_dict()[key], value), key


def test_an_earlier_versions_entry_of_decay_keys_only_loads_where_its_layer_is_not_regularized():
    """Before "norm_decay_pending", a head without gradient yet had an entry of decay keys only."""

    def build(**options):
        model = TwoBranches()
        return model, NormDecayOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), model, beta=0.3, **options)

    model, optimizer = build()
    for seed in range(2):
        branch_step(model, optimizer, seed, "a")
    saved = copy.deepcopy(optimizer.state_dict())
    earlier = {**saved, "state": {**saved["state"], **saved.pop("norm_decay_pending")}}
    earlier.pop("norm_decay_pending")
    assert set(earlier["state"][4]) == {"norm_decay_buffer", "norm_decay_scale"}  # b's weight, as written then
    twin, twin_optimizer = build(exclude=("b",))
    twin.load_state_dict(model.state_dict())
    twin_optimizer.load_state_dict(earlier)  # Adam raised KeyError: 'step' half-way through
    assert 4 not in twin_optimizer.state_dict()["state"]
    branch_step(twin, twin_optimizer, 2, "b")
    assert {"step", "exp_avg"} <= set(twin_optimizer.state[twin.b.weight])


@pytest.mark.parametrize("make", [wrapped, attached], ids=["wrapper", "hooks"])
@pytest.mark.parametrize("ord", [1, math.inf], ids=["l1", "linf"])
@pytest.mark.parametrize("rings", [False, True], ids=["dense", "rings"])
def test_a_decay_made_after_its_optimizer_loaded_a_checkpoint_resumes_from_it(make, ord, rings):
    """Loading first and wrapping (or attaching) then is a resume like the other order: the first
    step used to start h at zero and write over the checkpoint's."""
    torch.manual_seed(0)
    model = small_cnn()
    twin = copy.deepcopy(model)
    with rings_everywhere() if rings else contextlib.nullcontext():
        optimizer = make(model, beta=0.1, ord=ord)
        for seed in range(3):
            one_step(model, optimizer, seed)
    inner = getattr(optimizer, "optimizer", optimizer)
    checkpoint = copy.deepcopy({"model": model.state_dict(), "optimizer": inner.state_dict()})
    assert rings == any("norm_decay_recent" in entry for entry in checkpoint["optimizer"]["state"].values()) or ord == 1
    for seed in (3, 4):
        one_step(model, optimizer, seed)

    twin.load_state_dict(checkpoint["model"])
    plain = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    plain.load_state_dict(checkpoint["optimizer"])
    # Built with other values: the groups keep the checkpoint's beta and gamma.
    if make is wrapped:
        resumed = NormDecayOptimizer(plain, twin, beta=0.3, gamma=0.2, ord=ord)
    else:
        attach_norm_decay(plain, twin, beta=0.3, gamma=0.2, ord=ord)
        resumed = plain
    # A checkpoint taken now, before the first step (as a trainer saves at its resume step), in
    # full and as torch.distributed.checkpoint keeps it ("state" and "param_groups" only), loads
    # into a fresh optimizer and resumes alike: the state adopted no longer sits stale in "state".
    again = copy.deepcopy(plain.state_dict())
    triplets = []
    for kept in (again, {key: again[key] for key in ("state", "param_groups")}):
        triplet = copy.deepcopy(twin)
        optimizer = make(triplet, beta=0.3, gamma=0.2, ord=ord)
        getattr(optimizer, "optimizer", optimizer).load_state_dict(copy.deepcopy(kept))
        triplets.append((triplet, optimizer))
    for seed in (3, 4):
        one_step(twin, resumed, seed)
        for triplet, optimizer in triplets:
            one_step(triplet, optimizer, seed)
    for resumed_model in (twin, *(triplet for triplet, _ in triplets)):
        same_weights(model, resumed_model)


def test_decay_state_already_in_the_optimizer_that_does_not_fit_is_refused_at_construction():
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.state[model[0].weight]["norm_decay_buffer"] = torch.zeros(3)
    groups = copy.deepcopy(optimizer.param_groups)
    for make in (lambda: NormDecayOptimizer(optimizer, model), lambda: attach_norm_decay(optimizer, model)):
        with pytest.raises(ValueError, match="decay buffer of layer '0' has shape"):
            make()
    assert str(optimizer.param_groups) == str(groups)  # no beta or gamma written
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_load_state_dict_pre_hooks


def test_a_ring_that_a_bfloat16_load_rounded_is_rebuilt_from_h_when_the_decay_is_made_after():
    """torch's own load casts a ring of 300 channels to bfloat16, which holds integers exactly up
    to 256 only: the decay made after it takes the ring from h instead."""
    torch.manual_seed(0)
    with rings_everywhere():
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 10)).to(torch.bfloat16)
        with torch.no_grad():
            model[1].weight[299] *= 4  # the arg-max row: 299 is 300 in bfloat16
        twin = copy.deepcopy(model)
        optimizer = wrapped(model, beta=0.1, ord=math.inf)
        inputs, labels = next(batches(*DATA, 1, 16, 0))
        inputs = inputs.to(torch.bfloat16)

        def step(model, optimizer):
            optimizer.zero_grad()
            F.cross_entropy(model(inputs).float(), labels).backward()
            optimizer.step()

        for _ in range(3):
            step(model, optimizer)
        checkpoint = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.optimizer.state_dict()})
        assert checkpoint["optimizer"]["state"][0]["norm_decay_recent"].max() == 299
        twin.load_state_dict(checkpoint["model"])
        plain = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
        plain.load_state_dict(checkpoint["optimizer"])
        assert plain.state[twin[1].weight]["norm_decay_recent"].dtype == torch.bfloat16  # what torch's load did
        resumed = NormDecayOptimizer(plain, twin, beta=0.1, ord=math.inf)
        again = copy.deepcopy(plain.state_dict())  # before the first step: the ring left out, not as bfloat16
        assert "norm_decay_recent" not in again["state"][0]
        triplet = copy.deepcopy(twin)
        fresh = wrapped(triplet, beta=0.1, ord=math.inf)
        fresh.load_state_dict(again)
        for _ in range(2):
            step(model, optimizer)
            step(twin, resumed)
            step(triplet, fresh)
    same_weights(model, twin)
    same_weights(model, triplet)


@pytest.mark.parametrize("through", ["wrapper", "hooks"])
@pytest.mark.parametrize(("saved_ord", "ord"), [(1, math.inf), (math.inf, 1)], ids=["l1 into l_inf", "l_inf into l1"])
def test_decay_state_of_another_norm_is_refused_naming_the_layer_and_changing_nothing(through, saved_ord, ord):
    """An l1 checkpoint loaded silently into an l_inf decay: its h, a running sum of l1
    subgradients, went on being added (a helper's hunt)."""
    make = wrapped if through == "wrapper" else attached
    model = small_cnn()
    writer = make(model, beta=0.1, ord=saved_ord)
    one_step(model, writer)
    checkpoint = copy.deepcopy(writer.state_dict())
    twin = small_cnn()
    optimizer = make(twin, beta=0.1, ord=ord)
    one_step(twin, optimizer)
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match=r"layer '0' was saved by an l(1|_inf) norm decay, and this one is l(1|_inf)"):
        optimizer.load_state_dict(checkpoint)
    after = optimizer.state_dict()
    for i, entry in before["state"].items():
        for key, value in entry.items():
            assert torch.equal(after["state"][i][key], value), (i, key)
    # Of the same norm, and without the records (an earlier version's checkpoint), it loads.
    same = make(small_cnn(), beta=0.1, ord=saved_ord)
    same.load_state_dict(checkpoint)
    older = {key: value for key, value in checkpoint.items() if key != "norm_decay_ords"}
    older["state"] = {i: {k: v for k, v in entry.items() if k != "norm_decay_ord"} for i, entry in checkpoint["state"].items()}
    optimizer.load_state_dict(older)


@pytest.mark.parametrize("through", ["wrapper", "hooks"])
def test_decay_state_of_another_norm_that_the_optimizer_loaded_before_the_decay_was_made_is_refused(through):
    """Loaded by the inner optimizer before wrapping (the README's other resume path), an l1 h was
    adopted by an l_inf decay: torch's load keeps the state entries but drops the top-level record
    of their norm, so each entry records it too."""
    model = small_cnn()
    writer = wrapped(model, beta=0.1, ord=1)
    one_step(model, writer)
    checkpoint = copy.deepcopy(writer.state_dict())
    assert all(float(entry["norm_decay_ord"]) == 1.0 for entry in checkpoint["state"].values() if "norm_decay_buffer" in entry)
    twin = small_cnn()
    twin.load_state_dict(model.state_dict())
    inner = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    inner.load_state_dict(checkpoint)
    make = NormDecayOptimizer if through == "wrapper" else attach_norm_decay
    with pytest.raises(ValueError, match=r"layer '0' was saved by an l1 norm decay, and this one is l_inf"):
        make(inner, twin, beta=0.1, ord=math.inf)
    resumed = make(inner, twin, beta=0.1, ord=1)  # refused, it changed nothing: the same norm resumes
    one_step(model, writer, 1)
    one_step(twin, resumed if through == "wrapper" else inner, 1)
    same_weights(model, twin)


def test_a_load_the_optimizer_refuses_half_way_leaves_an_attached_decay_its_state():
    """With hooks alone a load is as atomic as the optimizer's own (torch's is not: Adam refuses an
    entry without "step" after loading the groups); the decay keeps its state from before the load,
    and a good checkpoint loaded then resumes."""
    model = small_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    decay = attach_norm_decay(optimizer, model, beta=0.1)
    for seed in range(2):
        one_step(model, optimizer, seed)
    before = {name: h.clone() for name, h in decay.decay_buffers().items()}
    good = copy.deepcopy(optimizer.state_dict())
    bad = copy.deepcopy(good)
    del bad["state"][max(bad["state"])]["step"]
    with pytest.raises(KeyError, match="step"):
        optimizer.load_state_dict(bad)
    for name, h in decay.decay_buffers().items():
        assert torch.equal(h, before[name]), name
    optimizer.load_state_dict(good)
    for name, h in decay.decay_buffers().items():
        assert torch.equal(h, before[name]), name
    one_step(model, optimizer, 2)
    weights = {name: module.weight for name, module in model.named_modules() if name in decay.decayed}
    assert all("norm_decay_buffer" in optimizer.state[w] for w in weights.values())
