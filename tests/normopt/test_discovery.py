"""Walking models into specs: names, keys, input sizes, wrappers, skipped modules, bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.distributed as dist
from helpers import assert_close, brute_norms, explicit_matrix
from torch import nn

import normopt
from normopt import BatchNormSpec, ConvSpec, LinearSpec, layer_specs


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.inner = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU())

    def forward(self, x):
        return self.inner(self.bn(self.conv(x)))


def test_nested_names_kinds_and_input_sizes():
    model = nn.Sequential(Block(), nn.Flatten(), nn.Linear(64, 10))
    specs = layer_specs(model, torch.zeros(2, 3, 8, 8))
    assert list(specs) == ["0.conv", "0.bn", "0.inner.0", "2"]
    assert isinstance(specs["0.conv"], ConvSpec) and specs["0.conv"].input_size == (8, 8)
    assert specs["0.inner.0"].input_size == (4, 4)
    assert isinstance(specs["0.bn"], BatchNormSpec) and specs["0.bn"].running_var == "0.bn.running_var"
    assert isinstance(specs["2"], LinearSpec) and specs["2"].weight == "2.weight"
    assert specs.skipped == {}


def test_without_example_input_convs_get_the_large_input_limit():
    specs = layer_specs(Block())
    assert all(s.input_size is None for s in specs.values() if isinstance(s, ConvSpec))


@pytest.mark.parametrize(
    ("padding", "dilation", "kernel", "expected"),
    [
        ("same", 1, 3, ((1, 1),)),
        ("same", 1, 4, ((1, 2),)),
        ("same", 2, 4, ((3, 3),)),
        ("valid", 3, 5, ((0, 0),)),
        (2, 1, 3, ((2, 2),)),
        ((1,), 1, 3, ((1, 1),)),
    ],
)
def test_padding_forms_resolve_to_left_right_pairs(padding, dilation, kernel, expected):
    spec = normopt.module_spec(nn.Conv1d(1, 1, kernel, padding=padding, dilation=dilation))
    assert spec.padding == expected


def test_specs_are_immutable_and_hashable():
    spec = normopt.module_spec(nn.Conv2d(2, 2, 3), "c", (5, 5))
    with pytest.raises(AttributeError):
        spec.groups = 2
    assert hash(spec) == hash(normopt.module_spec(nn.Conv2d(2, 2, 3), "c", (5, 5)))


def test_probe_forward_leaves_training_mode_and_batchnorm_statistics_untouched():
    model = Block().train()
    model.inner.eval()  # a mixed-mode model must come back exactly as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer_specs(model, torch.randn(4, 3, 8, 8))
    assert model.training and model.conv.training and not model.inner.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(not m._forward_pre_hooks for m in model.modules())


class FreezesInEval(nn.Module):
    """A model whose ``train()`` override freezes its backbone in eval mode, and that draws noise in
    eval mode too (a randomized defence)."""

    def __init__(self):
        super().__init__()
        self.backbone, self.head = nn.Conv2d(1, 2, 3), nn.Linear(18, 2)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.requires_grad_(mode)
        return self

    def forward(self, x):
        return self.head(self.backbone(x + 0.1 * torch.randn_like(x)).flatten(1))


def test_the_probe_forward_runs_no_train_override_and_leaves_the_random_stream():
    """layer_specs' probe switched to eval mode by model.eval(): an override that freezes the backbone
    left it frozen after the probe (its training flag restored, its requires_grad not); and it drew
    from the global random stream (noise in eval mode), so logging norms changed the run."""
    torch.manual_seed(0)
    model = FreezesInEval().train()
    torch.manual_seed(1)
    specs = layer_specs(model, torch.zeros(1, 1, 5, 5))
    drawn = torch.rand(4)
    torch.manual_seed(1)
    assert torch.equal(drawn, torch.rand(4))
    assert model.training and model.backbone.weight.requires_grad and set(specs) == {"backbone", "head"}
    model(torch.zeros(1, 1, 5, 5)).sum().backward()
    assert model.backbone.weight.grad is not None


def test_a_lazy_layer_initialised_by_the_probe_draws_from_the_stream_as_a_first_forward_would():
    """With the random state put back after the probe, the next layer made drew the lazy layer's
    initial weights again, bit for bit (a review)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(4))
    layer_specs(model, torch.zeros(1, 1, 5, 5))
    after_probe = nn.Linear(18, 4).weight
    torch.manual_seed(0)
    twin = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(4))
    twin(torch.zeros(1, 1, 5, 5))
    assert torch.equal(model[2].weight, twin[2].weight) and torch.equal(after_probe, nn.Linear(18, 4).weight)
    assert not torch.equal(after_probe, model[2].weight)


def test_shared_module_appears_once_and_tied_weights_get_their_first_key():
    conv = nn.Conv2d(2, 2, 3, padding=1)
    other = nn.Conv2d(2, 2, 3, padding=1)
    other.weight = conv.weight  # tied weight, separate module
    model = nn.Sequential(conv, nn.ReLU(), conv, other)
    specs = layer_specs(model, torch.zeros(1, 2, 5, 5))
    assert list(specs) == ["0", "3"]
    assert specs["3"].weight == "0.weight"
    norms = normopt.layer_norms(dict(model.named_parameters()), specs, 1)
    assert_close(norms["0"], norms["3"])
    assert normopt.layer_norms(model.state_dict(), specs, 1).keys() == {"0", "3"}


def test_input_sizes_may_name_a_shared_module_by_any_of_its_names():
    conv = nn.Conv2d(2, 2, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    for name in ("0", "2"):
        specs = layer_specs(model, input_sizes={name: (4, 4)})
        assert list(specs) == ["0"] and specs["0"].input_size == (4, 4)
        norms = normopt.layer_norms(dict(model.named_parameters()), specs, 1)
        assert_close(norms["0"], brute_norms(explicit_matrix(conv, (2, 4, 4)))[1])
    assert layer_specs(model, input_sizes={"0": (4, 4), "2": (4, 4)})["0"].input_size == (4, 4)
    with pytest.raises(ValueError, match=r"'0' and '2', two names of one shared module"):
        layer_specs(model, input_sizes={"0": (4, 4), "2": (5, 5)})


def test_skipped_modules_are_listed_with_a_reason():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.scale

    model = nn.Sequential(
        nn.Linear(3, 3),
        nn.LayerNorm(3),
        nn.GroupNorm(1, 3),
        nn.BatchNorm1d(3, track_running_stats=False),
        nn.MultiheadAttention(3, 1),
        Custom(),
        nn.utils.parametrizations.spectral_norm(nn.Linear(3, 3)),
        nn.ReLU(),
    )
    specs = layer_specs(model)
    assert list(specs) == ["0", "4.out_proj"]  # attention's output projection is a plain Linear
    assert set(specs.skipped) == {"1", "2", "3", "4", "5", "6"}
    assert "not a linear map" in specs.skipped["1"]
    assert "running statistics" in specs.skipped["3"]
    assert "attention" in specs.skipped["4"]
    assert "no operator-norm rule" in specs.skipped["5"]
    assert "parametrized" in specs.skipped["6"]


class _Positive(nn.Module):
    def forward(self, weight):
        return weight.abs()


@pytest.mark.parametrize(
    ("reparametrize", "reason"),
    [
        (lambda bn: nn.utils.parametrize.register_parametrization(bn, "weight", _Positive()), "parametrized"),
        (lambda bn: nn.utils.weight_norm(bn, dim=0), "computed by a forward hook"),
    ],
    ids=["parametrize", "weight_norm"],
)
@pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")
def test_a_batch_norm_with_a_computed_weight_is_skipped_and_the_rest_still_has_norms(reparametrize, reason):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.BatchNorm2d(2, affine=False))
    reparametrize(model[1])
    specs = layer_specs(model, torch.zeros(1, 1, 5, 5))
    assert list(specs) == ["0", "2"] and reason in specs.skipped["1"]  # "2": no affine weight, still a diagonal map
    assert set(normopt.layer_norms(model.state_dict(), specs, ord=1)) == {"0", "2"}


class _ConvOfImages(nn.Conv2d):
    def forward(self, images):  # a subclass may name its input otherwise
        return super().forward(images)


class _MaskedConv(nn.Conv2d):
    def forward(self, images, mask=None):  # and takes another tensor beside its input
        return super().forward(images if mask is None else images * mask.mean())


@pytest.mark.parametrize(
    ("make", "call"),
    [
        (lambda: nn.Conv2d(1, 2, 3, padding=1), lambda conv, x: conv(input=x)),
        (lambda: _ConvOfImages(1, 2, 3, padding=1), lambda conv, x: conv(images=x)),
        (lambda: _MaskedConv(1, 2, 3, padding=1), lambda conv, x: conv(mask=torch.ones(3, 3), images=x)),
    ],
    ids=["input", "images", "mask-first"],
)
@pytest.mark.filterwarnings("ignore::normopt.OverriddenForwardWarning")  # the subclasses change their input only
def test_a_conv_called_with_its_input_as_a_keyword_gets_its_input_size(make, call):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = make()

        def forward(self, x):
            return call(self.conv, x)

    model = Net()
    assert layer_specs(model, torch.zeros(1, 1, 5, 7))["conv"].input_size == (5, 7)
    optimizer = normopt.NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)  # sizes from training
    model(torch.randn(2, 1, 6, 4)).sum().backward()
    optimizer.step()
    assert optimizer.norm_decay.specs["conv"].input_size == (6, 4)


def test_module_spec_refuses_unsupported_modules_by_name():
    with pytest.raises(TypeError, match="layer 'norm' is not supported: LayerNorm"):
        normopt.module_spec(nn.LayerNorm(3), "norm")
    for module in (nn.Identity(), nn.ReLU(), nn.Sequential(nn.Linear(2, 2))):  # no weights of their own
        with pytest.raises(TypeError, match=rf"layer 'm' is not supported: {type(module).__name__}: holds no weights"):
            normopt.module_spec(module, "m")


@pytest.mark.parametrize(
    "make", [lambda: nn.LazyConv2d(3, 3), lambda: nn.LazyBatchNorm2d(), lambda: nn.LazyBatchNorm2d(affine=False)]
)
def test_uninitialised_lazy_module_is_refused(make):
    with pytest.raises(ValueError, match="layer 'c': lazy module"):
        normopt.module_spec(make(), "c")


@pytest.mark.parametrize(
    "parametrize",
    [
        nn.utils.parametrizations.spectral_norm,
        nn.utils.parametrizations.weight_norm,
        lambda m: nn.utils.parametrize.register_parametrization(m, "weight", _Positive()),
        nn.utils.weight_norm,
    ],
    ids=["spectral_norm", "weight_norm", "parametrize", "legacy-weight_norm"],
)
@pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")
def test_a_layer_with_a_computed_weight_is_skipped_and_module_spec_describes_it_for_the_weight_it_computes(parametrize):
    """The skip reason's advice works: module_spec gives the spec, and layer_norm of the computed
    weight is the norm of the map the layer applies (its explicit matrix)."""
    torch.manual_seed(0)
    conv = parametrize(nn.Conv2d(2, 3, 3, padding=1, stride=2))
    model = nn.Sequential(conv)
    with torch.no_grad():
        model(torch.zeros(1, 2, 5, 5))  # the legacy hook computes the weight in a forward
    model.eval()  # spectral_norm's power iteration steps at every access of the weight in training
    assert "0" in layer_specs(model, torch.zeros(1, 2, 5, 5)).skipped
    spec = normopt.module_spec(conv, "0", (5, 5))
    oracle = brute_norms(explicit_matrix(conv, (2, 5, 5)))
    for ord in (1, math.inf):
        with torch.no_grad():
            assert_close(normopt.layer_norm({"0.weight": conv.weight}, spec, ord), oracle[ord], rtol=1e-5)


@pytest.mark.parametrize("affine", [True, False])
def test_an_instance_norm_that_tracks_running_statistics_is_a_batch_norm_in_eval_mode(affine):
    torch.manual_seed(0)
    norm = nn.InstanceNorm2d(3, affine=affine, track_running_stats=True)
    with torch.no_grad():
        norm.running_var.uniform_(0.1, 2.0)
        if affine:
            norm.weight.uniform_(-3.0, 3.0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), norm, nn.InstanceNorm2d(3))
    specs = layer_specs(model, torch.zeros(1, 1, 5, 5))
    assert isinstance(specs["1"], BatchNormSpec) and (specs["1"].weight is None) != affine
    assert "its own statistics" in specs.skipped["2"]  # without running statistics: per sample, not linear
    oracle = brute_norms(explicit_matrix(norm, (3, 2, 2)))
    for ord in (1, math.inf):
        assert_close(normopt.layer_norms(model.state_dict(), specs, ord)["1"], oracle[ord], rtol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
def test_a_torchscript_model_is_refused_with_what_to_pass_instead():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(18, 2))
    for scripted in (torch.jit.script(model), torch.jit.trace(model, torch.zeros(1, 1, 5, 5))):
        with pytest.raises(TypeError, match=r"TorchScript module.*pass the model before scripting"):
            layer_specs(scripted)
        with pytest.raises(TypeError, match="TorchScript module"):
            normopt.NormDecayOptimizer(torch.optim.SGD(scripted.parameters(), lr=0.1), scripted)


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
def test_a_torchscript_part_of_a_model_is_skipped_once_by_name_and_the_rest_described():
    block = torch.jit.script(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))
    model = nn.Sequential(block, nn.Flatten(), nn.Linear(18, 2))
    specs = layer_specs(model, torch.zeros(1, 1, 5, 5))
    assert list(specs) == ["2"] and list(specs.skipped) == ["0"] and "TorchScript" in specs.skipped["0"]
    optimizer = normopt.NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    assert list(optimizer.norm_decay.decayed) == ["2"]


@pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max:UserWarning")
@pytest.mark.filterwarnings("ignore:layers .* overrides nn:UserWarning")
def test_the_probe_forward_leaves_every_buffer_as_it_found_it():
    """Eval mode keeps batch-norm statistics, not a quantization observer's, which calibrates in
    eval mode too (and writes without bumping the version counter)."""
    quantization = pytest.importorskip("torch.ao.quantization")
    torch.manual_seed(0)
    model = nn.Sequential(
        quantization.QuantStub(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
    )
    model.qconfig = quantization.get_default_qat_qconfig("fbgemm")
    model.train()
    quantization.prepare_qat(model, inplace=True)
    for _ in range(3):
        model(torch.randn(8, 3, 8, 8) * 3)  # calibration
    before = {k: v.clone() for k, v in model.state_dict().items()}
    specs = layer_specs(model, torch.zeros(1, 3, 8, 8))
    assert specs["1"].input_size == (8, 8)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert [k for k in before if not torch.equal(after[k], before[k])] == []
    assert model.training


def test_the_probe_forward_writes_no_buffer_it_did_not_change():
    """An eval-mode batch norm saves running_var for backward: a loss computed before the probe
    still backpropagates (a copy written back would bump its version). Buffers that are inference
    tensors, and a lazy module the probe materialises, are fine too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).eval()
    loss = model(torch.randn(2, 1, 5, 5)).square().sum()
    version = model[1].running_var._version
    layer_specs(model, torch.zeros(1, 1, 5, 5))
    assert model[1].running_var._version == version
    loss.backward()
    with torch.inference_mode():
        frozen = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    assert frozen[1].running_var.is_inference()
    assert list(layer_specs(frozen, torch.zeros(1, 1, 5, 5))) == ["0", "1"]
    lazy = nn.Sequential(nn.Conv2d(1, 2, 3), nn.LazyBatchNorm2d())
    assert list(layer_specs(lazy, torch.zeros(1, 1, 5, 5))) == ["0", "1"]


@pytest.mark.filterwarnings("ignore:.*use_reentrant.*:UserWarning")
def test_a_layer_inside_an_activation_checkpoint_wrapper_finds_its_state_dict_key():
    """named_parameters() keep the wrapper's name in the key, its state_dict hook takes it out."""
    wrapper = pytest.importorskip("torch.distributed.algorithms._checkpoint.checkpoint_wrapper")
    torch.manual_seed(0)
    model = nn.Sequential(wrapper.checkpoint_wrapper(nn.Sequential(nn.Conv2d(1, 2, 3))), nn.Flatten(), nn.Linear(18, 2))
    specs = layer_specs(model, torch.zeros(1, 1, 5, 5))
    conv = "0._checkpoint_wrapped_module.0"
    by_parameters = normopt.layer_norms({**dict(model.named_parameters()), **dict(model.named_buffers())}, specs, 1)
    by_state_dict = normopt.layer_norms(model.state_dict(), specs, 1)
    assert "0.0.weight" in model.state_dict()
    assert_close(by_state_dict[conv], by_parameters[conv])
    assert_close(by_state_dict[conv], brute_norms(explicit_matrix(model[0], (1, 5, 5)))[1], rtol=1e-5)


@pytest.mark.parametrize(
    ("layer", "size", "match"),
    [
        (nn.Conv2d(1, 1, 5), (3, 8), "too small"),
        (nn.Conv1d(1, 1, 3, dilation=3), (6,), "too small"),
        (nn.Conv1d(1, 1, 3, padding=4, padding_mode="reflect"), (4,), "reflect padding 4"),
        (nn.Conv1d(1, 1, 3, padding=5, padding_mode="circular"), (4,), "circular padding 5"),
    ],
)
def test_input_too_small_for_the_kernel_names_the_layer(layer, size, match):
    with pytest.raises(ValueError, match=f"layer 'bad'.*{match}"):
        normopt.module_spec(layer, "bad", size)


def test_layer_called_with_two_sizes_warns_and_uses_the_limit():
    conv = nn.Conv1d(1, 1, 3)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return self.conv(x), self.conv(x[..., :5])

    with pytest.warns(UserWarning, match="input sizes"):
        specs = layer_specs(Twice(), torch.zeros(1, 1, 9))
    assert specs["conv"].input_size is None


@pytest.mark.parametrize(
    ("mode", "seed", "kernel", "stride", "small"),
    [("reflect", 0, 3, 1, 3), ("replicate", 1, 5, 3, 1), ("circular", 1, 5, 2, 3)],  # small calls found past the limit
)
@pytest.mark.filterwarnings("ignore:layer 'conv' is skipped:UserWarning")  # checked once, below; then repeated
def test_a_layer_that_copies_samples_called_at_several_sizes_is_skipped_naming_them(mode, seed, kernel, stride, small):
    """The large-input limit bounds every size with zero padding only: here a small call folds
    taps together past it (the oracle shows it), so no one spec is right and the layer is skipped."""
    torch.manual_seed(seed)
    conv = nn.Conv1d(2, 2, kernel, padding=kernel // 2, stride=stride, padding_mode=mode, bias=False)

    class Pyramid(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return self.conv(x), self.conv(x[..., :small])

    with pytest.warns(UserWarning, match=rf"'conv' is skipped.*\[\({small},\), \(16,\)\] and {mode} padding"):
        specs = layer_specs(Pyramid(), torch.zeros(1, 2, 16))
    assert "conv" not in specs and "module_spec" in specs.skipped["conv"]
    limit = normopt.layer_norm({"weight": conv.weight.detach()}, normopt.module_spec(conv, "", None), 1)
    assert brute_norms(explicit_matrix(conv, (2, small)))[1] > limit * (1 + 1e-6)  # why: the limit bounds no small call
    recorder = normopt.InputSizeRecorder(Pyramid())
    Pyramid()(torch.zeros(1, 2, 16))
    assert recorder.sizes == {"conv": [(small,), (16,)]}
    with pytest.warns(UserWarning, match="skipped"):
        assert "conv" in recorder.specs().skipped
    with pytest.warns(UserWarning, match="'conv' is no longer regularized"):  # norm decay leaves it, saying so
        decay = normopt.NormDecayOptimizer(torch.optim.SGD(conv.parameters(), lr=0.0), Pyramid())
        torch.cat(Pyramid()(torch.zeros(1, 2, 16)), -1).sum().backward()
        decay.step()
    assert "conv" not in decay.norm_decay.decayed


def test_input_sizes_given_as_lists_are_one_size_each():
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"))
    assert layer_specs(model, input_sizes={"0": [5, 6]})["0"].input_size == (5, 6)
    assert layer_specs(model, input_sizes={"0": [(5, 6)]})["0"].input_size == (5, 6)
    with pytest.raises(TypeError, match=r"layer 'c': input_size \[\(4, 4\), \(8, 8\)\] is several sizes"):
        normopt.module_spec(model[0], "c", [(4, 4), (8, 8)])


@pytest.mark.parametrize("given", [[], ()], ids=["list", "tuple"])
def test_an_empty_input_size_is_refused_naming_the_layer(given):
    """An empty size (the shape[2:] of a 2-d tensor) passed the axis check, which read it as unknown, and
    gave an l1 norm of a reflect-padded Conv2d neither exact nor its large-input limit (3.30, 5.05)."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match=r"layer '0': input_size has 0 axes, kernel has 2"):
        layer_specs(model, input_sizes={"0": given})
    with pytest.raises(ValueError, match=r"layer 'c': input_size has 0 axes, kernel has 2"):
        ConvSpec("c", "c.weight", 2, 3, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), input_size=tuple(given))


def test_a_layer_that_pads_nothing_called_at_several_sizes_gets_the_limit_whatever_its_mode():
    """With no padding nothing is copied, and the large-input limit bounds every size."""
    conv = nn.Conv1d(1, 1, 3, padding=0, padding_mode="reflect")
    with pytest.warns(UserWarning, match="using the large-input limit"):
        specs = layer_specs(nn.Sequential(conv), input_sizes={"0": [(4,), (16,)]})
    assert specs["0"].input_size is None


def test_layer_not_reached_by_the_example_forward_warns():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Conv1d(1, 1, 3), nn.Conv1d(1, 1, 3)

        def forward(self, x):
            return self.used(x)

    with pytest.warns(UserWarning, match="'unused' was not called"):
        specs = layer_specs(Unused(), torch.zeros(1, 1, 9))
    assert specs["used"].input_size == (9,) and specs["unused"].input_size is None


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_a_layer_with_copy_padding_not_reached_warns_that_the_limit_may_be_below_its_norm(mode):
    """A reflect-padded Conv2d(2, 3, 3, padding=2) that runs on 3x3 inputs in training only: its large-input
    limit (l1 8.10 in the hunt) is below its norm there (14.68); with zero padding the limit bounds it."""

    class TrainingBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.main, self.aux = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 3, 3, padding=2, padding_mode=mode)

        def forward(self, x):
            return self.aux(x) if self.training else self.main(x)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        specs = layer_specs(TrainingBranch(), torch.zeros(1, 2, 3, 3))
    (message,) = [str(w.message) for w in caught]
    assert message.startswith("layer 'aux' was not called by the recorded forward; using the large-input limit")
    assert ("may be below its norm at the size it runs at" in message) == (mode == "reflect")
    assert specs["aux"].input_size is None


def test_a_compiled_submodule_that_ran_in_eval_mode_is_recorded_by_the_probe():
    """Its code, compiled under eval mode and no_grad before the probe's hooks existed, does not call
    them: the probe warned "not called" and gave a reflect-padded layer its large-input limit, below
    its norm at the size it runs at. The probe runs compiled submodules eagerly."""
    torch._dynamo.reset()
    model = nn.Sequential()
    model.add_module(
        "backbone", torch.compile(nn.Sequential(nn.Conv2d(2, 3, 3, padding=2, padding_mode="reflect")), backend="aot_eager")
    )
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    model.double().eval()
    with torch.no_grad():
        model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        specs = layer_specs(model, x)
    name = "backbone._orig_mod.0"
    assert specs[name].input_size == (3, 3)
    matrix = explicit_matrix(model.backbone._orig_mod[0], (2, 3, 3))
    for ord in (1, math.inf):
        assert_close(normopt.layer_norms(dict(model.named_parameters()), specs, ord)[name], brute_norms(matrix)[ord])
    torch._dynamo.reset()


def test_a_model_that_refuses_the_example_input_raises_its_error_naming_example_input():
    model = nn.Sequential(nn.Conv2d(1, 2, 3))
    with pytest.raises(RuntimeError, match="expected input") as raised:
        layer_specs(model, torch.zeros(1, 3, 5, 5))
    if hasattr(raised.value, "add_note"):  # Python 3.11+
        assert "raised by the model's forward of example_input" in raised.value.__notes__[0]


def test_a_batch_norm_with_a_parametrized_running_var_is_skipped():
    """Its spec named '0.running_var', a key neither state_dict() nor named_buffers() holds then."""
    model = nn.Sequential(nn.BatchNorm1d(2))
    nn.utils.parametrize.register_parametrization(model[0], "running_var", _Positive())
    specs = layer_specs(model)
    assert not specs and "running_var is parametrized" in specs.skipped["0"]


def test_distributed_data_parallel_prefix(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = Block()
        ddp = nn.parallel.DistributedDataParallel(model)
        specs = layer_specs(ddp, torch.zeros(1, 3, 8, 8))
        assert list(specs) == list(layer_specs(model))
        assert all(key.startswith("module.") for key in ddp.state_dict())
        norms = normopt.layer_norms(ddp.state_dict(), specs, 1)
        direct = normopt.layer_norms(model.state_dict(), specs, 1)
        for name in specs:
            assert_close(norms[name], direct[name])
    finally:
        dist.destroy_process_group()


def test_compiled_module_prefix_is_looked_through():
    model = Block()
    compiled = torch.compile(model)
    assert list(layer_specs(compiled)) == list(layer_specs(model))
    norms = normopt.layer_norms(compiled.state_dict(), layer_specs(compiled), 1)
    assert norms.keys() == set(layer_specs(model))


def test_transposed_conv_spec_output_size_matches_torch():
    layer = nn.ConvTranspose2d(2, 3, (3, 2), stride=(2, 3), padding=(1, 0), output_padding=(1, 2), dilation=(1, 2))
    spec = normopt.module_spec(layer, "t", (4, 5))
    assert spec.output_size == tuple(layer(torch.zeros(1, 2, 4, 5)).shape[2:])
    assert spec.weight_shape == tuple(layer.weight.shape)


@pytest.mark.parametrize("ord", [1, math.inf])
def test_transposed_conv_called_with_an_output_size_gets_the_matrix_of_that_call(ord):
    """ConvTranspose1d(1, 1, 3, stride=2, padding=1) on one sample with output_size=[2]: [[2], [4]]."""
    layer = nn.ConvTranspose1d(1, 1, 3, stride=2, padding=1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[[1.0, 2.0, 4.0]]]))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = layer

        def forward(self, x):
            return self.up(x, output_size=[2])

    model = Model()
    specs = layer_specs(model, torch.zeros(1, 1, 1))
    assert specs["up"].output_padding == (1,) and specs["up"].output_size == (2,)
    expected = {1: 6.0, math.inf: 4.0}[ord]
    assert normopt.layer_norms(model.state_dict(), specs, ord)["up"] == expected
    recorder = normopt.InputSizeRecorder(model)
    model(torch.zeros(1, 1, 1))
    assert recorder.specs()["up"] == specs["up"]  # the lazy path records the same


def test_calls_without_gradients_count_only_for_layers_no_call_with_gradients_reached():
    """An evaluation under no_grad at another size between training forwards does not add its sizes
    (nor a transposed layer's output padding) to theirs; a layer only evaluated is still recorded."""
    model = nn.ModuleDict({"conv": nn.Conv2d(1, 1, 3), "up": nn.ConvTranspose1d(1, 1, 3, stride=2), "judged": nn.Conv1d(1, 1, 3)})
    recorder = normopt.InputSizeRecorder(model)
    model["conv"](torch.zeros(1, 1, 8, 8))
    model["up"](torch.zeros(1, 1, 4), output_size=[9])
    with torch.no_grad():
        model["conv"](torch.zeros(1, 1, 16, 16))
        model["up"](torch.zeros(1, 1, 4), output_size=[10])
        model["judged"](torch.zeros(1, 1, 5))
    with torch.inference_mode():
        model["conv"](torch.zeros(1, 1, 32, 32))
    assert recorder.called
    assert recorder.sizes == {"conv": (8, 8), "up": (4,), "judged": (5,)}
    assert recorder.output_paddings == {"up": (0,)}
    specs = recorder.specs()
    assert specs["conv"].input_size == (8, 8) and specs["up"].output_padding == (0,) and specs["judged"].input_size == (5,)


@pytest.mark.parametrize("ord", [1, math.inf])
def test_transposed_conv_called_with_two_output_sizes_warns_and_bounds_both(ord):
    """ConvTranspose1d(1, 1, 3, stride=2, padding=1), weights [1, 2, 4], one input sample: output
    size 1 gives the matrix [[2]], output size 2 [[2], [4]]; the spec takes the larger."""
    layer = nn.ConvTranspose1d(1, 1, 3, stride=2, padding=1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[[1.0, 2.0, 4.0]]]))
    model = nn.Sequential(layer)
    recorder = normopt.InputSizeRecorder(model)
    x = torch.zeros(1, 1, 1)
    layer(x, output_size=[1])
    layer(x, output_size=[2])
    with pytest.warns(UserWarning, match="output paddings") as caught:
        assert recorder.output_paddings == {"0": (1,)}
        specs = recorder.specs()
    assert {w.filename for w in caught if "output paddings" in str(w.message)} == {__file__}  # the caller's line
    calls = []
    for size in (1, 2):  # each call's matrix, from its Jacobian (the bias is no part of it)
        matrix = torch.autograd.functional.jacobian(lambda v, size=size: layer(v, output_size=[size]), x).reshape(size, 1)
        calls.append(matrix.abs().sum(0 if ord == 1 else 1).max())
    assert calls[0] < calls[1] == {1: 6.0, math.inf: 4.0}[ord]
    assert normopt.layer_norms(model.state_dict(), specs, ord)["0"] == calls[1]  # a bound on both calls


class _OwnFrozenBatchNorm(nn.Module):
    """A frozen batch norm written by hand, as detection codebases do: four buffers and an eps."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((channels,), value))

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return x * scale[:, None, None] + (self.bias - self.running_mean * scale)[:, None, None]


def _torchvision_frozen_batchnorm(channels: int, eps: float) -> nn.Module:
    from torchvision.ops import FrozenBatchNorm2d

    return FrozenBatchNorm2d(channels, eps=eps)


@pytest.mark.parametrize("eps", [1e-3, 0], ids=["float-eps", "int-eps"])
@pytest.mark.parametrize("make", [_torchvision_frozen_batchnorm, _OwnFrozenBatchNorm], ids=["torchvision", "by hand"])
@pytest.mark.parametrize("ord", [1, math.inf])
def test_a_frozen_batchnorm_is_a_diagonal_map(ord, make, eps):
    layer = make(3, eps=eps)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, -2.0, 1.0]))
        layer.running_var.copy_(torch.tensor([1.0, 0.5, 4.0]))
        layer.running_mean.copy_(torch.tensor([0.1, 0.2, 0.3]))
    model = nn.Sequential(nn.Conv2d(2, 3, 1), layer)
    specs = layer_specs(model)
    assert isinstance(specs["1"], BatchNormSpec) and "1" not in specs.skipped
    oracle = explicit_matrix(layer, (3, 2, 2)).abs().sum(0 if ord == 1 else 1).max()
    assert_close(normopt.layer_norms(model.state_dict(), specs, ord)["1"], oracle, rtol=1e-6)
    layer.register_parameter("extra", nn.Parameter(torch.ones(3)))  # a learned parameter: not frozen
    assert "1" not in layer_specs(model)


class _StandardisedConv(nn.Conv2d):
    """Applies another weight than its parameter (weight standardisation, as timm's StdConv2d)."""

    def forward(self, x):
        weight = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        return self._conv_forward(x, weight, self.bias)


class _PaddedInForward(nn.Conv2d):
    """Pads inside ``forward`` (as timm's Conv2dSame): ``self.padding`` stays 0."""

    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(nn.functional.pad(x, (1, 1, 1, 1)), weight, bias)


@pytest.mark.parametrize(
    ("make", "method"),
    [
        (lambda: _StandardisedConv(2, 3, 3), "_StandardisedConv.forward"),
        (lambda: _PaddedInForward(2, 3, 3), "_PaddedInForward._conv_forward"),
        (lambda: _ConvOfImages(2, 3, 3), "_ConvOfImages.forward"),
    ],
    ids=["other-weight", "pads-itself", "keyword-only"],
)
def test_a_layer_whose_class_overrides_how_it_applies_its_weight_is_named_in_a_warning(make, method):
    model = nn.Sequential(nn.Conv2d(2, 2, 1), make(), nn.BatchNorm2d(3))
    cls = method.partition(".")[0]
    with pytest.warns(UserWarning, match=rf"layers \['1'\] are .*{cls}, whose {method} overrides nn.Conv2d's"):
        specs = layer_specs(model, torch.zeros(1, 2, 6, 6))
    assert list(specs) == ["0", "1", "2"]  # still described: a subclass that only changes its input is right
    assert normopt.discovery.overridden_forward(model[1]) == method


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Conv2d(1, 1, 3),
        lambda: nn.LazyConv2d(1, 3),
        lambda: nn.ConvTranspose3d(1, 1, 3),
        lambda: nn.Linear(2, 2),
        lambda: nn.modules.linear.NonDynamicallyQuantizableLinear(2, 2),
        lambda: nn.BatchNorm2d(2),
        lambda: nn.SyncBatchNorm(2),
        lambda: nn.InstanceNorm2d(2, track_running_stats=True),
    ],
)
def test_stock_layers_do_not_count_as_overriding_how_they_apply_their_weight(make):
    assert normopt.discovery.overridden_forward(make()) is None


def test_the_weight_standardised_layer_the_warning_names_really_has_another_norm():
    # Why the warning: the spec describes the parameter, and the layer applies another matrix.
    torch.manual_seed(0)
    conv = _StandardisedConv(2, 3, 3)
    with pytest.warns(UserWarning, match="overrides"):
        spec = layer_specs(nn.Sequential(conv), torch.zeros(1, 2, 5, 5))["0"]
    truth = float(brute_norms(explicit_matrix(conv, (2, 5, 5)))[1])
    weight = conv.weight.detach()
    described = normopt.layer_norm({"0.weight": weight}, spec, 1)
    assert not math.isclose(float(described), truth, rel_tol=1e-3)
    applied = weight - weight.mean((1, 2, 3), keepdim=True)
    assert math.isclose(float(normopt.layer_norm({"0.weight": applied}, spec, 1)), truth, rel_tol=1e-5)  # the documented route


@pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor, torch.quantize_per_channel:UserWarning")
def test_converted_quantized_layers_are_listed_as_skipped_with_the_reason():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    specs = layer_specs(quantized)
    assert dict(specs) == {}
    assert set(specs.skipped) == {"0", "2"} and "converted quantized layer" in specs.skipped["0"]
    assert normopt.discovery.hidden_linear_pieces(quantized, specs.skipped) == ["0", "2"]


@pytest.mark.parametrize("size", [(8.7, 8.2), 8, "88", [torch.tensor(8), torch.tensor(8)], (8, True)])
def test_an_input_size_that_is_not_whole_numbers_is_refused_by_layer(size):
    with pytest.raises(TypeError, match="layer 'c': input_size must be a tuple of whole numbers"):
        normopt.module_spec(nn.Conv2d(1, 2, 3), "c", size)


def test_input_sizes_of_numpy_or_torch_integers_are_taken():
    import numpy as np

    assert normopt.module_spec(nn.Conv2d(1, 2, 3), "c", np.array([8, 9])).input_size == (8, 9)
    assert normopt.module_spec(nn.Conv2d(1, 2, 3), "c", torch.Size([8, 9])).input_size == (8, 9)


def test_the_overriding_message_names_a_public_stock_class_or_the_kind_of_a_private_base():
    from torch.nn.modules.conv import _ConvNd

    from normopt.discovery import overriding_message

    class OnPrivateBase(_ConvNd):
        pass

    assert "overrides nn.Conv2d's" in overriding_message(_StandardisedConv, "_StandardisedConv.forward", ["c"])
    assert "overrides nn.Conv's: they are described as nn.Conv applies" in overriding_message(OnPrivateBase, "m", ["c"])


@pytest.mark.parametrize("option", ["input_sizes", "output_paddings"])
def test_a_name_given_that_is_no_convolution_of_the_model_is_refused(option):
    """A typo left the layer at the large-input limit, with a warning that named the real layer
    (not called by the recorded forward) and none about the typo (review)."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2))
    message = rf"{option} names \['2', 'typo'\], which are no convolutions of the model; its convolutions: \['0'\]"
    with pytest.raises(ValueError, match=message):
        layer_specs(model, **{option: {"typo": (4, 4), "2": (8,)}})


def test_a_recorder_describes_a_model_whose_recorded_convolution_was_replaced_since():
    """The recorder's sizes may name a module replaced after they were recorded: not a typo."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
    recorder = normopt.discovery.InputSizeRecorder(model)
    model(torch.zeros(1, 1, 6, 6))
    model[0] = nn.Linear(3, 3)
    assert list(recorder.specs()) == ["0"] and isinstance(recorder.specs()["0"], normopt.LinearSpec)
