"""PeriodicSVC: clips every conv layer every N steps, with any optimizer, from recorded input sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import batches, digits, small_cnn
from torch import nn

import normopt
from normopt import NormDecayOptimizer, PeriodicSVC
from normopt.periodic_svc import ClipReport
from normopt.svc import clip_layer, clip_layer_counted, layer_spectral_bound

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


@pytest.mark.parametrize(
    "state", [{"steps": 3}, {"steps": -1, "clips": 0}, {"steps": 2.5, "clips": 1}, {"steps": True, "clips": 0}, None]
)
def test_a_bad_checkpoint_of_the_counts_is_refused_and_changes_nothing(state):
    """A missing key raised a bare KeyError; a negative or fractional count was taken."""
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    svc = PeriodicSVC(optimizer, model, bound=1.0, every=3, example_input=DATA[0][:1])
    svc.load_state_dict({"steps": 5, "clips": 1})
    with pytest.raises(ValueError, match="steps and clips must be whole numbers >= 0"):
        svc.load_state_dict(state)
    assert svc.state_dict() == {"steps": 5, "clips": 1}


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


@pytest.mark.parametrize(
    ("exclude", "error", "match"),
    [
        ("0", TypeError, r"not the string '0'; did you mean exclude=\('0',\)"),
        (("nope",), ValueError, r"exclude names \['nope'\]"),
        (("",), ValueError, r"exclude names the whole model"),
    ],
)
def test_bad_exclude_is_refused_by_name(exclude, error, match):
    model = small_cnn()
    with pytest.raises(error, match=match):
        PeriodicSVC(torch.optim.SGD(model.parameters(), lr=0.1), model, bound=1.0, exclude=exclude)


def test_exclude_leaves_every_conv_inside_a_named_block_alone():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)), nn.Conv2d(4, 4, 3, padding=1)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    svc = PeriodicSVC(optimizer, model, bound=0.1, every=1, exclude=("0",), example_input=DATA[0][:1])
    before = [conv.weight.clone() for conv in (model[0][0], model[0][1], model[1])]
    model(DATA[0][:2]).sum().backward()
    optimizer.step()
    assert svc.clips == 1 and svc.last_report.layers == 1
    assert torch.equal(model[0][0].weight, before[0]) and torch.equal(model[0][1].weight, before[1])
    assert not torch.equal(model[1].weight, before[2])


@pytest.mark.parametrize("copied", ["wrapped optimizer", "plain optimizer and svc", "pickled"])
def test_a_copy_clips_its_own_model_and_the_original_stays(copied):
    import copy
    import pickle

    model = small_cnn()
    inner = torch.optim.SGD(model.parameters(), lr=0.0)
    optimizer = NormDecayOptimizer(inner, model, beta=0.0) if copied == "wrapped optimizer" else inner
    svc = PeriodicSVC(optimizer, model, bound=0.1, every=1, example_input=DATA[0][:1])
    original = [p.detach().clone() for p in model.parameters()]
    if copied == "wrapped optimizer":  # it keeps its hooks; as a checkpointing trainer copies both
        twin_model, twin_optimizer = copy.deepcopy((model, optimizer))
    elif copied == "pickled":  # torch copies a plain optimizer without its hooks
        twin_model, twin_optimizer, _ = pickle.loads(pickle.dumps((model, optimizer, svc)))
    else:
        twin_model, twin_optimizer, _ = copy.deepcopy((model, optimizer, svc))
    inputs, labels = next(batches(*DATA, 1, 16, 0))
    twin_optimizer.zero_grad()
    F.cross_entropy(twin_model(inputs), labels).backward()
    twin_optimizer.step()
    assert svc.steps == 0 and all(torch.equal(p, q) for p, q in zip(model.parameters(), original))
    assert not torch.equal(twin_model[0].weight, original[0])  # the copy's own model was clipped


def test_report_holds_the_layers_of_the_last_clip_only_and_remove_takes_every_hook_off():
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    svc = PeriodicSVC(optimizer, model, bound=torch.tensor(0.1), every=1, report=True)  # sizes from the forward
    model(DATA[0][:2])
    svc.clip()
    assert sorted(svc.last_norms) == ["0", "3"]
    model[0].weight.requires_grad_(False)
    svc.clip()
    assert sorted(svc.last_norms) == ["3"] and svc.last_report.layers == 1
    fresh = PeriodicSVC(optimizer, model, bound=0.1)
    assert any(m._forward_hooks for m in model.modules())
    fresh.remove()
    svc.remove()
    assert not any(m._forward_hooks for m in model.modules())


def test_a_compiled_step_runs_the_clip_eagerly_in_one_graph_of_its_own():
    import torch._dynamo

    torch._dynamo.reset()
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    PeriodicSVC(optimizer, model, bound=0.1, every=1, example_input=DATA[0][:1])
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    step = torch.compile(optimizer.step, backend=backend)
    for seed in range(3):
        inputs, labels = next(batches(*DATA, 1, 16, seed))
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), labels).backward()
        step()
    assert len(graphs) == 1  # the SGD step; the clip (SciPy, LAPACK, loops over frequencies) was traced


def test_raw_input_sizes_smaller_than_the_kernel_are_skipped_as_the_released_code_skips_them():
    """VGG on 32x32 has 3x3 convs on 2x2 maps: the released protocol (raw sizes) leaves them alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(4), nn.Conv2d(4, 4, 3, padding=1), nn.Flatten())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    svc = PeriodicSVC(optimizer, model, bound=0.1, every=1, input_size="raw", example_input=DATA[0][:1])
    before = model[2].weight.detach().clone()
    svc.clip()
    assert svc.last_report.layers == 1 and torch.equal(model[2].weight, before)
    assert svc.skipped == {"2": "kernel reach (3, 3) is larger than its raw input (2, 2)"}
    padded = PeriodicSVC(optimizer, model, bound=0.1, every=1, example_input=DATA[0][:1])  # 4x4 padded: clipped
    padded.clip()
    assert padded.last_report.layers == 2 and padded.skipped == {}


def test_a_transposed_layer_is_skipped_at_raw_sizes_by_its_adjoints_input_its_output():
    """The skip compared the kernel with the transposed layer's input, where the raw clip runs at
    its output size: a DCGAN head (4x4 kernel, 1x1 latent, 4x4 output) was never clipped, and a
    layer with a smaller output went on to the clip, which refused it after the layer before it
    had been clipped (review)."""
    torch.manual_seed(0)
    x = torch.randn(1, 8, 1, 1)
    model = nn.Sequential(nn.ConvTranspose2d(8, 4, 4, 1, 0), nn.ReLU(), nn.ConvTranspose2d(4, 2, 5, 1, 3))  # 1 -> 4 -> 2
    specs = normopt.layer_specs(model, x)
    expected = clip_layer(model[0].weight, specs["0"], 0.1, input_size="raw")
    svc = PeriodicSVC(torch.optim.SGD(model.parameters(), lr=0.0), model, bound=0.1, example_input=x, input_size="raw")
    svc.clip()
    assert svc.skipped == {"2": "kernel reach (5, 5) is larger than the raw input of its adjoint (its output) (2, 2)"}
    assert svc.last_report.layers == 1 and torch.equal(model[0].weight, expected)


class WithAuxiliaryHead(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.aux = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        h = self.body(x)
        return h + self.aux(h).sum() if self.training else h  # the head only trains


@pytest.mark.filterwarnings("ignore:layer 'aux' was not called by the recorded forward")
def test_a_layer_whose_input_size_no_forward_recorded_is_refused_before_any_clip():
    model = WithAuxiliaryHead()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(ValueError, match=r"input sizes of conv layers \['aux'\] are not known.*exclude=\('aux',\)"):
        PeriodicSVC(optimizer, model, bound=0.1, example_input=DATA[0][:1])  # its probe runs in eval mode
    PeriodicSVC(optimizer, model, bound=0.1, example_input=DATA[0][:1], exclude=("aux",))
    svc = PeriodicSVC(optimizer, model, bound=0.1)  # recorded from the training forward
    model(DATA[0][:2])
    svc.clip()
    assert svc.last_report.layers == 2


class SharedAtTwoScales(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head = nn.Conv2d(1, 2, 3, padding=1, padding_mode=mode), nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return self.head(self.conv(x)).mean() + self.conv(x[..., :4, :4]).mean()


@pytest.mark.filterwarnings("ignore:layer 'conv' is skipped")
@pytest.mark.parametrize("example", [True, False], ids=["example_input", "recorded"])
def test_a_trained_conv_that_layer_specs_skips_is_refused_by_name_not_left_unclipped(example):
    """A reflect-padded conv called at two sizes has no spec (layer_specs skips it): left out
    silently, the clip would never touch a layer it trains."""
    model = SharedAtTwoScales("reflect")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(ValueError, match=r"conv layers \['conv'\] cannot be clipped.*reflect padding.*exclude=\('conv',\)"):
        svc = PeriodicSVC(optimizer, model, bound=0.1, example_input=DATA[0][:1] if example else None)
        model(DATA[0][:2])
        svc.clip()
    svc = PeriodicSVC(optimizer, model, bound=0.1, example_input=DATA[0][:1], exclude=("conv",))
    svc.clip()
    assert svc.last_report.layers == 1


def test_an_evaluation_at_another_size_before_the_first_clip_leaves_the_training_sizes():
    """Without example_input the sizes come from the forwards before the first clip: an evaluation
    under no_grad at full resolution among them made the clip refuse the layer inside
    optimizer.step(), advising to leave example_input out (it was)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    svc = PeriodicSVC(optimizer, model, bound=0.1, every=2)

    def train_step():
        optimizer.zero_grad()
        F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.randint(0, 2, (4,))).backward()
        optimizer.step()

    train_step()
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 16, 16))
    model.train()
    train_step()  # the clip
    assert svc.clips == 1 and svc.specs["0"].input_size == (8, 8)
    assert svc.last_report.layers == svc.last_report.layers_clipped == 1


@pytest.mark.filterwarnings("ignore:layer '0' was called with input sizes")
def test_a_layer_trained_at_several_sizes_is_refused_naming_them_and_example_input():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    svc = PeriodicSVC(optimizer, model, bound=0.1, every=1)
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    model(torch.randn(2, 1, 12, 12)).sum().backward()  # multi-scale training
    before = model[0].weight.clone()
    with pytest.raises(ValueError, match=r"'0' called with input sizes \[\(8, 8\), \(12, 12\)\].*pass example_input at"):
        optimizer.step()
    assert torch.equal(model[0].weight, before) and svc.clips == 0


@pytest.mark.filterwarnings("ignore:layer 'aux' was not called by the recorded forward")
def test_conv_layers_added_or_replaced_later_are_clipped_once_a_forward_has_recorded_their_sizes():
    model = WithAuxiliaryHead().eval()
    optimizer = torch.optim.SGD(model.body.parameters(), lr=0.0)
    svc = PeriodicSVC(optimizer, model, bound=0.1, example_input=DATA[0][:1])
    model.train()
    model.aux = nn.Conv2d(4, 2, 1)  # a new head of another kernel size
    optimizer.add_param_group({"params": model.aux.parameters()})
    with pytest.warns(UserWarning, match=r"conv layers \['aux'\] were added or replaced"):
        svc.clip()  # left alone: its spec was of the old head
    assert svc.last_report.layers == 1
    model(DATA[0][:2])
    svc.clip()
    assert svc.last_report.layers == 2 and svc.specs["aux"].kernel_size == (1, 1)
    assert normopt.svc.conv_spectral_norm(model.aux.weight, (8, 8)) <= 0.1 * (1 + 1e-5)


@pytest.mark.parametrize("iterations", [0, -2, 1.5, True])
def test_bad_iterations_are_refused_at_construction(iterations):
    model = small_cnn()
    with pytest.raises(ValueError, match="iterations"):
        PeriodicSVC(torch.optim.SGD(model.parameters(), lr=0.1), model, bound=1.0, iterations=iterations)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input_size": "reference"}, "input_size"),
        ({"threads": 0}, "threads"),
        ({"method": "qr"}, "method"),
        ({"every": True}, "every must be a positive int, got True"),
        ({"bound": True}, "bound must be a positive finite number, got True"),
        ({"bound": float("inf")}, "bound must be a positive finite number, got inf"),
        ({"bound": float("nan")}, "bound must be a positive finite number, got nan"),
    ],
)
def test_bad_clip_options_are_refused_at_construction(kwargs, match):
    model = small_cnn()
    with pytest.raises(ValueError, match=match):
        PeriodicSVC(torch.optim.SGD(model.parameters(), lr=0.1), model, **{"bound": 1.0, **kwargs})


@pytest.mark.parametrize("method", ["gram", "svd"])
def test_each_clip_reports_the_layers_and_frequencies_that_needed_work(method):
    model = small_cnn()
    specs = normopt.layer_specs(model, DATA[0][:1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    top = max(layer_spectral_bound(model.get_submodule(n).weight, specs[n]) for n in ("0", "3"))
    low = min(layer_spectral_bound(model.get_submodule(n).weight, specs[n]) for n in ("0", "3"))
    svc = PeriodicSVC(optimizer, model, bound=top * 1.01, every=1, example_input=DATA[0][:1], method=method)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    svc.clip()  # every layer is already under the bound: nothing to do, nothing written
    counts = [clip_layer_counted(model.get_submodule(n).weight, specs[n], 1.0, method=method)[1] for n in ("0", "3")]
    assert svc.last_report == ClipReport(layers=2, layers_clipped=0, frequencies=sum(counts), frequencies_clipped=0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    svc.bound = (low + top) / 2  # only the layer with the larger norm exceeds it
    svc.clip()
    report = svc.last_report
    assert report.layers == 2 and report.layers_clipped == 1 and 0 < report.frequencies_clipped < report.frequencies


def test_raw_input_size_clips_as_the_released_code_does():
    model, twin = small_cnn(), small_cnn()
    twin.load_state_dict(model.state_dict())
    specs = normopt.layer_specs(model, DATA[0][:1])
    svc = PeriodicSVC(torch.optim.SGD(model.parameters(), lr=0.1), model, bound=0.3, example_input=DATA[0][:1], input_size="raw")
    svc.clip()
    for name in ("0", "3"):
        expected = clip_layer(twin.get_submodule(name).weight, specs[name], 0.3, input_size="raw")
        assert torch.equal(model.get_submodule(name).weight, expected)


def _reflecting():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.ReLU(), nn.Conv2d(2, 2, 3))


def test_layers_padded_with_copies_of_their_input_are_refused_before_any_clip():
    model = _reflecting()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"layers \['0'\] pad with copies of their input .*exclude=\('0',\)"):
        PeriodicSVC(optimizer, model, bound=0.1, example_input=torch.zeros(1, 1, 6, 6))
    lazy = PeriodicSVC(optimizer, model, bound=0.1, every=1)  # sizes from the training forward
    before = {key: value.clone() for key, value in model.state_dict().items()}
    model(torch.randn(2, 1, 6, 6)).sum().backward()
    with pytest.raises(ValueError, match=r"layers \['0'\] pad with copies"):
        lazy.clip()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    lazy.remove()
    PeriodicSVC(optimizer, model, bound=0.1, exclude=("0",), example_input=torch.zeros(1, 1, 6, 6)).clip()
    assert not torch.equal(model[2].weight, before["2.weight"])


def test_report_at_the_raw_input_size_records_the_norm_at_that_size():
    model = nn.Sequential(nn.Conv1d(1, 1, 3, padding=1, bias=False))  # the kernel covers the raw input: an exact clip
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[[1.0, 0.2, 0.0]]]))  # singular values 1.2 and 0.92 (twice) at size 3
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    svc = PeriodicSVC(optimizer, model, bound=1.0, input_size="raw", report=True, example_input=torch.zeros(1, 1, 3))
    svc.clip()
    assert svc.last_norms["0"] == pytest.approx(1.0, rel=1e-5)  # at the padded size 5 it is 1.032
    assert normopt.svc.conv_spectral_norm(model[0].weight, (5,)) > 1.03


def test_a_conv_the_optimizer_does_not_train_is_not_clipped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1))
    model[0].requires_grad_(False)  # a frozen stem, still held by the optimizer
    optimizer = torch.optim.SGD([model[0].weight, model[1].weight, model[1].bias], lr=0.0)  # model[2]: another optimizer's
    svc = PeriodicSVC(optimizer, model, bound=0.1, every=1, example_input=DATA[0][:1])
    before = [conv.weight.clone() for conv in model]
    svc.clip()
    assert svc.last_report.layers == 1
    assert torch.equal(model[0].weight, before[0]) and torch.equal(model[2].weight, before[2])
    assert not torch.equal(model[1].weight, before[1])
    model[0].requires_grad_(True)  # unfrozen between clips: clipped from then on
    svc.clip()
    assert svc.last_report.layers == 2 and not torch.equal(model[0].weight, before[0])


def test_an_optimizer_that_holds_none_of_the_convs_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(256, 2))
    with pytest.raises(ValueError, match="the optimizer holds none of the model's 1 conv layers"):
        PeriodicSVC(torch.optim.SGD(model[2].parameters(), lr=0.1), model, bound=0.1)
    with pytest.raises(ValueError, match=r"no conv layers outside exclude=\['0'\]: PeriodicSVC has nothing to clip"):
        PeriodicSVC(torch.optim.SGD(model.parameters(), lr=0.1), model, bound=0.1, exclude=("0",))


def test_a_model_without_conv_layers_is_refused_as_having_nothing_to_clip():
    """It was told to pass model.parameters() to the optimizer, which it had."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with pytest.raises(ValueError, match=r"^the model has no conv layers: PeriodicSVC has nothing to clip$"):
        PeriodicSVC(torch.optim.SGD(model.parameters(), lr=0.1), model, bound=0.1)


def test_a_frozen_conv_padded_with_copies_is_not_refused():
    model = _reflecting()
    model[0].requires_grad_(False)
    svc = PeriodicSVC(torch.optim.SGD(model.parameters(), lr=0.1), model, bound=0.1, example_input=torch.zeros(1, 1, 6, 6))
    before = model[0].weight.clone()
    svc.clip()
    assert svc.last_report.layers == 1 and torch.equal(model[0].weight, before)


@pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")
@pytest.mark.parametrize(
    "hide",
    [
        nn.utils.parametrizations.weight_norm,
        nn.utils.parametrizations.spectral_norm,
        nn.utils.weight_norm,
        lambda conv: torch.nn.utils.prune.l1_unstructured(conv, "weight", amount=0.3),
    ],
    ids=["parametrized", "spectral", "hook", "pruned"],
)
@pytest.mark.parametrize("alone", [False, True], ids=["beside-a-plain-conv", "the-only-conv"])
def test_a_trained_conv_whose_weight_is_computed_is_refused_by_name_not_left_unclipped(hide, alone):
    """Trained through the parameters its weight is computed from, such a layer has no spec; the
    clip used to leave it above the bound without a word (and a model of only such layers was
    told that the optimizer held none of its convolutions)."""
    import torch.nn.utils.prune  # a submodule torch does not import

    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    hide(model[0] if alone else model[2])
    if alone:
        model[2].requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    name = "0" if alone else "2"
    refusal = rf"conv layers \['{name}'\] cannot be clipped \('{name}': .*weight.*exclude=\('{name}',\)"
    with pytest.raises(ValueError, match=refusal):
        PeriodicSVC(optimizer, model, bound=0.5, example_input=torch.zeros(1, 1, 4, 4))
    if not alone:
        svc = PeriodicSVC(optimizer, model, bound=0.5, example_input=torch.zeros(1, 1, 4, 4), exclude=(name,))
        svc.clip()
        assert svc.last_report.layers == 1


def test_a_non_finite_kernel_is_refused_before_any_layer_is_clipped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1))
    with torch.no_grad():
        model[0].weight.mul_(10)  # above the bound: the first layer has work to do
        model[1].weight[0, 0, 0, 0] = float("nan")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    svc = PeriodicSVC(optimizer, model, bound=1.0, every=1, example_input=torch.zeros(1, 1, 4, 4))
    before = [conv.weight.clone() for conv in model]
    with pytest.raises(ValueError, match=r"layers \['1'\]: kernels have non-finite values .*no layer was clipped"):
        svc.clip()
    assert torch.equal(model[0].weight, before[0]) and svc.clips == 0
    assert torch.equal(model[1].weight.nan_to_num(), before[1].nan_to_num())


@pytest.mark.parametrize("failure", ["raises", "not finite"])
def test_a_clip_that_fails_on_one_layer_leaves_every_layer_as_it_was(monkeypatch, failure):
    """Layers are clipped before any weight is written: a LAPACK error, or a clipped kernel that is
    not finite, on the second layer left the first one clipped (and the NaN kernel written)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1))
    with torch.no_grad():
        model[0].weight.mul_(10)  # above the bound: the first layer has work to do
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    svc = PeriodicSVC(optimizer, model, bound=1.0, every=1, example_input=torch.zeros(1, 1, 4, 4))
    before = [conv.weight.clone() for conv in model]

    def clip_second_fails(weight, spec, *args, **kwargs):
        clipped, count, exceeded = clip_layer_counted(weight, spec, *args, **kwargs)
        if spec.name == "1":
            if failure == "raises":
                raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
            clipped = torch.full_like(weight, float("nan"))
        return clipped, count, exceeded

    monkeypatch.setattr(normopt.periodic_svc, "clip_layer_counted", clip_second_fails)
    error = torch.linalg.LinAlgError if failure == "raises" else ValueError
    with pytest.raises(error, match=None if failure == "raises" else r"layers \['1'\]: the clip gave .*no layer was clipped"):
        optimizer.step()
    assert all(torch.equal(conv.weight, old) for conv, old in zip(model, before)) and svc.clips == 0


def test_a_weight_shared_by_two_layers_is_clipped_for_each_in_turn():
    """Clipping every layer before writing any clipped both from the original weight, and the last
    one written dropped the first one's clip (a review)."""
    first, second = nn.Conv1d(1, 1, 3, padding=1, bias=False), nn.Conv1d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[[3.0, -3.0, 3.0]]]))
    second.weight = first.weight
    model = nn.Sequential(first, nn.Upsample(scale_factor=0.5), second)
    specs = normopt.layer_specs(model, torch.zeros(1, 1, 16))
    expected = clip_layer(clip_layer(first.weight.detach(), specs["0"], 1.0), specs["2"], 1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    svc = PeriodicSVC(optimizer, model, bound=1.0, every=1, example_input=torch.zeros(1, 1, 16))
    svc.clip()
    assert svc.last_report.layers_clipped == 2 and torch.equal(first.weight, expected)


def test_a_compiled_model_that_ran_before_the_clipper_was_made_is_named_as_the_likely_cause():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3))
    compiled = torch.compile(model, backend="eager")
    compiled(torch.randn(2, 1, 6, 6))  # a warm-up before the hooks exist
    svc = PeriodicSVC(torch.optim.SGD(model.parameters(), lr=0.1), compiled, bound=0.5)
    compiled(torch.randn(2, 1, 6, 6))  # dynamo does not call hooks added since it compiled
    with pytest.raises(RuntimeError, match=r"run a forward first .*torch.compile'd and ran before"):
        svc.clip()
    torch._dynamo.reset()


def test_a_conv_pruned_after_the_first_clip_is_refused_by_name_at_the_next():
    import torch.nn.utils.prune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    svc = PeriodicSVC(optimizer, model, bound=0.5, example_input=torch.zeros(1, 1, 4, 4))
    svc.clip()
    assert svc.last_report.layers == 2
    torch.nn.utils.prune.l1_unstructured(model[2], "weight", amount=0.3)  # the optimizer trains weight_orig
    with pytest.raises(ValueError, match=r"conv layers \['2'\] cannot be clipped \('2': .*forward hook.*exclude=\('2',\)"):
        svc.clip()


class _StandardisedConv(nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, self.weight - self.weight.mean((1, 2, 3), keepdim=True), self.bias)


@pytest.mark.parametrize("excluded", [False, True])
@pytest.mark.parametrize("example", [True, False], ids=["example_input", "recorded"])
def test_periodic_svc_names_the_overriding_convs_it_clips_once_and_none_it_excludes(excluded, example):
    import warnings

    model = nn.Sequential(_StandardisedConv(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeriodicSVC(
            optimizer,
            model,
            bound=0.5,
            every=1,
            exclude=("0",) if excluded else (),
            example_input=torch.zeros(1, 1, 4, 4) if example else None,
        )
        for _ in range(2):
            model(torch.randn(2, 1, 4, 4)).sum().backward()
            optimizer.step()
    named = [w for w in caught if issubclass(w.category, normopt.OverriddenForwardWarning)]
    assert len(named) == (0 if excluded else 1)
    if not excluded:
        assert str(named[0].message).startswith("PeriodicSVC clips them as described: layers ['0']")
        assert named[0].filename == __file__
