"""Many layers at once: the batched norms and arg-max lines equal the per-layer ones."""

from __future__ import annotations

import dataclasses
import math

import torch
from helpers import conv_layers
from hypothesis import given, settings
from hypothesis import strategies as st

import normopt
from normopt.batched import all_line_sums, argmax_slices, batch_norms, batch_plan, batch_tables, padded_line_sums

MODES = ("zeros", "circular", "reflect", "replicate")


@settings(max_examples=60, deadline=None)
@given(st.lists(conv_layers(modes=MODES), min_size=1, max_size=4), st.sampled_from([1, math.inf]))
def test_batched_norms_and_argmax_lines_equal_the_per_layer_ones(cases, ord):
    specs, tensors = [], {}
    for i, (layer, spec, _) in enumerate(cases):
        weight = layer.weight.detach().double()
        spec = dataclasses.replace(spec, name=f"l{i}", weight=f"l{i}.weight")
        specs.append(spec)
        tensors[spec.weight] = weight
    order, plan = batch_plan(tuple(specs), ord)
    tables = batch_tables(plan, torch.device("cpu"), torch.float64)
    weights = [tensors[specs[i].weight] for i in order]
    lines = all_line_sums(weights, None, plan, tables)
    norms = batch_norms(lines, tables)
    found = argmax_slices(padded_line_sums(lines, plan, tables), tables)
    starts = [0]
    for p in plan.plans:
        starts.append(starts[-1] + p.slice_size)
    for position, i in enumerate(order):
        spec = specs[i]
        assert torch.equal(norms[position], normopt.layer_norm(tensors, spec, ord))
        assert torch.equal(found.norms[position], norms[position])
        sub = normopt.norm_subgradient(tensors, spec, ord)
        entries = found.entries[starts[position] : starts[position + 1]]
        assert torch.equal(entries, sub.index)
