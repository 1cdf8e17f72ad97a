"""PeriodicSVC: clips every conv layer every N steps, with any optimizer, from recorded input sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import batches, digits, small_cnn

import normopt
from normopt import NormDecayOptimizer, PeriodicSVC
from normopt.svc import clip_layer, layer_spectral_bound

DATA = digits()


@pytest.mark.parametrize("wrap", [False, True], ids=["sgd", "norm-decay"])
def test_clips_exactly_every_n_steps(wrap):
    model, twin = small_cnn(), small_cnn()

    def make(m):
        inner = torch.optim.SGD(m.parameters(), lr=0.05)
        return NormDecayOptimizer(inner, m, beta=0.01) if wrap else inner

    optimizer, twin_optimizer = make(model), make(twin)
    svc = PeriodicSVC(optimizer, model, bound=0.3, every=3)  # sizes recorded from the training forward
    specs = normopt.layer_specs(twin, DATA[0][:1])

    def compare(step):
        if step % 3 == 0:  # the twin gets the same clip by hand
            with torch.no_grad():
                for name in ("0", "3"):
                    twin.get_submodule(name).weight.copy_(clip_layer(twin.get_submodule(name).weight, specs[name], 0.3))
        for key, value in model.state_dict().items():
            assert torch.equal(value, twin.state_dict()[key]), (step, key)

    for inputs, labels in batches(*DATA, 7, 16):
        for m, o in ((model, optimizer), (twin, twin_optimizer)):
            o.zero_grad()
            F.cross_entropy(m(inputs), labels).backward()
            o.step()
        compare(svc.steps)
    assert svc.clips == 2 and svc.state_dict() == {"steps": 7, "clips": 2}
    for name in ("0", "3"):  # just clipped at step 6, one plain step since
        assert layer_spectral_bound(model.get_submodule(name).weight, specs[name]) < 2.0


def test_report_records_the_norm_left_after_the_crop():
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    svc = PeriodicSVC(optimizer, model, bound=0.3, every=1, iterations=5, example_input=DATA[0][:1], report=True)
    inputs, labels = next(batches(*DATA, 1, 16))
    F.cross_entropy(model(inputs), labels).backward()
    optimizer.step()
    specs = normopt.layer_specs(model, DATA[0][:1])
    assert set(svc.last_norms) == {"0", "3"}
    for name, norm in svc.last_norms.items():
        assert norm == layer_spectral_bound(model.get_submodule(name).weight, specs[name])
        assert norm < 0.3 * 1.5


def test_needs_input_sizes_before_the_first_clip():
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    svc = PeriodicSVC(optimizer, model, bound=1.0, every=1)
    with pytest.raises(RuntimeError, match="input sizes"):
        svc.clip()
    svc.remove()


@pytest.mark.parametrize(("kwargs", "match"), [({"bound": 0.0}, "bound"), ({"bound": 1.0, "every": 0}, "every")])
def test_bad_options_are_refused(kwargs, match):
    model = small_cnn()
    with pytest.raises(ValueError, match=match):
        PeriodicSVC(torch.optim.SGD(model.parameters(), lr=0.1), model, **kwargs)
