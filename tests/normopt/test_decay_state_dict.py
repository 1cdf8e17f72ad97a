"""The decay state in a state dict: pure functions that never change what they are given."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import assert_close

from normopt.decay_state_dict import (
    BUFFER,
    ORDS,
    PENDING,
    RECENT,
    SCALE,
    check_buffers,
    check_ords,
    checked_entry,
    compacted,
    saved_entries,
    with_ords,
    with_pending,
    without_decay_state,
)
from normopt.discovery import module_spec

LINEAR = module_spec(torch.nn.Linear(3, 2), "fc")


def _same(a, b) -> bool:
    """Nested dicts, lists and tensors equal, key for key and value for value."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def _state_dict():
    return {
        "state": {
            0: {"momentum_buffer": torch.ones(2, 3), BUFFER: torch.full((2, 3), 2.0), SCALE: torch.ones(2, 1)},
            1: {BUFFER: torch.zeros(4)},  # an earlier version's entry of decay keys only
            2: {"momentum_buffer": torch.ones(4)},
        },
        "param_groups": [{"params": [0, 1, 2], "lr": 0.1}],
        PENDING: {0: {BUFFER: torch.full((2, 3), 3.0)}, 2: {BUFFER: torch.ones(4)}},
    }


def test_saved_entries_find_each_layer_by_the_optimizers_numbering_with_pending_over_state():
    w, other = torch.zeros(2, 3), torch.zeros(4)
    entries = saved_entries(_state_dict(), [w, torch.zeros(4), other], {"fc": w, "missing": torch.zeros(1)})
    index, saved = entries["fc"]
    # The pending decay state is the newer one, all of it: the saved entry's scale (or a ring
    # that torch's load cast to a float dtype) does not join it.
    assert index == 0 and set(saved) == {"momentum_buffer", BUFFER}
    assert_close(saved[BUFFER], torch.full((2, 3), 3.0))
    assert entries["missing"] == (None, {})


@pytest.mark.parametrize("own", [set(), {0}, {0, 2}])
def test_without_decay_state_strips_the_own_keys_and_moves_decay_only_entries_aside(own):
    state_dict = _state_dict()
    before = copy.deepcopy(state_dict)
    stripped = without_decay_state(state_dict, own)
    assert _same(state_dict, before)  # the caller's checkpoint untouched
    assert stripped["param_groups"] == state_dict["param_groups"]
    for index, entry in stripped["state"].items():
        assert not (index in own and set(entry) & {BUFFER, SCALE, RECENT})
        assert not set(entry) <= {BUFFER, SCALE, RECENT}  # the optimizer never sees an entry of decay keys only
    assert 1 not in stripped["state"] and 1 in stripped[PENDING]
    assert set(stripped[PENDING]) == {1} | ({0, 2} - own)


def test_without_decay_state_drops_the_pending_key_when_nothing_is_left_there():
    stripped = without_decay_state({"state": {0: {BUFFER: torch.ones(1)}}, "param_groups": [], PENDING: {0: {}}}, {0})
    assert stripped == {"state": {}, "param_groups": []}


def test_compacted_copies_views_into_new_entries_and_leaves_the_rest_as_it_is():
    flat = torch.arange(12.0)
    entry = {BUFFER: flat[:6].view(2, 3), SCALE: flat[6:8].view(2, 1), "step": 3}
    state_dict = {"state": {0: entry, 1: {"step": 1}}}
    compact = compacted(state_dict, [0, 1, 5])
    assert compact["state"][0] is not entry and state_dict["state"][0] is entry
    assert compact["state"][1] is state_dict["state"][1]
    for key in (BUFFER, SCALE):
        assert compact["state"][0][key].untyped_storage().nbytes() == entry[key].numel() * 4
        assert torch.equal(compact["state"][0][key], entry[key])
    assert compacted(state_dict, [1]) is state_dict  # nothing to copy


def test_with_pending_adds_copies_beside_what_is_there_and_nothing_when_empty():
    state_dict = {"state": {}, PENDING: {4: {BUFFER: torch.ones(1)}}}
    assert with_pending(state_dict, {}) is state_dict
    buffer, recent = torch.zeros(2, 2), torch.tensor([1, -1])
    added = with_pending(state_dict, {3: (buffer, None, recent)})
    assert set(added[PENDING]) == {3, 4} and set(state_dict[PENDING]) == {4}
    assert added[PENDING][3][BUFFER] is not buffer and torch.equal(added[PENDING][3][RECENT], recent)
    assert float(added[PENDING][3][SCALE]) == 1.0


@pytest.mark.parametrize(
    ("saved", "match"),
    [
        ({BUFFER: torch.zeros(3, 2)}, r"decay buffer of layer 'fc' has shape \(3, 2\), the weight \(2, 3\)"),
        ({SCALE: torch.ones(3, 1)}, r"decay scale of layer 'fc' has shape \(3, 1\)"),
        ({RECENT: torch.tensor([0.5])}, r"recent slices of layer 'fc' must be a 1-D integer tensor"),
        ({RECENT: torch.tensor([[0]])}, r"recent slices of layer 'fc' must be a 1-D integer tensor"),
        ({RECENT: torch.tensor([2])}, r"channels in \[-2, 2\)"),
        ({RECENT: torch.tensor([-3])}, r"channels in \[-2, 2\)"),
    ],
)
def test_checked_entry_refuses_what_does_not_fit_the_weight_by_layer(saved, match):
    with pytest.raises(ValueError, match=match):
        checked_entry("fc", saved, torch.zeros(2, 3), LINEAR, float("inf"))


def test_checked_entry_hands_back_what_fits_with_a_copy_of_the_ring():
    recent = torch.tensor([0, -1, -2])
    spec = module_spec(torch.nn.Conv2d(2, 4, 3), "c", input_size=(5, 5))
    kernel = torch.zeros(4, 2, 3, 3)
    buffer, scale, copied = checked_entry("c", {BUFFER: kernel, RECENT: recent}, kernel, spec, 1)
    assert buffer is kernel and scale is None and torch.equal(copied, recent) and copied is not recent
    assert checked_entry("c", {}, torch.zeros(4, 2, 3, 3), spec, 1) == (None, None, None)


@pytest.mark.parametrize(
    ("buffers", "error", "match"),
    [
        ({"conv": torch.zeros(2, 3)}, ValueError, r"layer 'conv', which is not regularized here"),
        ({"fc": torch.zeros(2, 3, dtype=torch.int64)}, TypeError, r"layer 'fc' must be a real floating-point tensor"),
        ({"fc": [0.0]}, TypeError, r"layer 'fc' must be a real floating-point tensor, got list"),
        ({"fc": torch.full((2, 3), math.inf)}, ValueError, r"layer 'fc' is not finite"),
        ({"fc": torch.zeros(3, 2)}, ValueError, r"layer 'fc' has shape \(3, 2\), the weight \(2, 3\)"),
    ],
)
def test_check_buffers_names_the_layer_that_does_not_fit(buffers, error, match):
    with pytest.raises(error, match=match):
        check_buffers(buffers, {"fc": torch.zeros(2, 3)})
    check_buffers({"fc": torch.zeros(2, 3, dtype=torch.float64)}, {"fc": torch.zeros(2, 3)})


def test_with_ords_keeps_another_decays_record_and_changes_nothing_given():
    first = with_ords({"state": {}}, [0, 1], 1)
    given = copy.deepcopy(first)
    both = with_ords(first, [2], math.inf)
    assert both[ORDS] == {0: 1.0, 1: 1.0, 2: math.inf} and _same(first, given)


@pytest.mark.parametrize(
    ("saved", "refused"),
    [
        ({ORDS: {0: 1.0}}, True),
        ({ORDS: {0: math.inf}}, False),  # the same norm
        ({ORDS: {1: 1.0}}, False),  # another layer's record
        ({}, False),  # an earlier version's checkpoint: no record
    ],
)
@pytest.mark.parametrize("has_buffer", [True, False])
def test_check_ords_refuses_only_a_buffer_of_the_other_norm(saved, refused, has_buffer):
    entries = {"fc": (0, {BUFFER: torch.zeros(2, 3)} if has_buffer else {"momentum_buffer": torch.zeros(2, 3)})}
    if refused and has_buffer:
        with pytest.raises(ValueError, match="layer 'fc' was saved by an l1 norm decay, and this one is l_inf"):
            check_ords(saved, entries, math.inf)
    else:
        assert check_ords(saved, entries, math.inf) is None  # no buffer of the other norm: nothing to refuse
