"""Time of the exact l1 / l_inf norms against one read of the same weights (``w.abs().sum()``).

Layers: the six shapes of the paper's timing study (32x32 input, stride 1), every linear piece of
a CIFAR ResNet-18, and every linear piece of four torchvision models of many small layers at
224x224 (EfficientNet-B0, RegNetY-400MF, MobileNetV3-Large, DenseNet-121; random weights), where a
fixed cost per layer would show. Prints medians of interleaved repeats and their ratios; thread
counts are set once (``--threads``, default 1).

    python -m benchmarks.norms [--repeats 30] [--threads 1] [--device cpu] [--no-torchvision]
"""

from __future__ import annotations

import argparse
import platform

import torch
from torch import nn

import normopt
from benchmarks.timing import interleaved_medians, positive_int, require_torchvision, set_threads
from experiments.models import resnet18

# (kernel, in_channels, out_channels) of the paper's timing table.
PAPER_SHAPES = [(3, 32, 32), (3, 32, 128), (3, 128, 256), (3, 256, 512), (5, 256, 128), (5, 512, 256)]
# Many small layers: a fixed cost per layer would dominate their norms.
TORCHVISION_MODELS = ("efficientnet_b0", "regnet_y_400mf", "mobilenet_v3_large", "densenet121")


def read_once(tensors: list[torch.Tensor]):
    return [t.abs().sum() for t in tensors]


def bench(label: str, model: nn.Module, example: torch.Tensor, repeats: int) -> tuple[str, float, float, float]:
    specs = normopt.layer_specs(model, example)
    tensors = model.state_dict()
    read = [tensors[key] for spec in specs.values() for key in _keys(spec)]
    with torch.no_grad():
        medians = interleaved_medians(
            {
                "read": lambda: read_once(read),
                "l1": lambda: normopt.layer_norms(tensors, specs, 1),
                "linf": lambda: normopt.layer_norms(tensors, specs, "linf"),
            },
            repeats=repeats,
        )
    return label, medians["read"], medians["l1"], medians["linf"]


def _keys(spec) -> list[str]:
    if isinstance(spec, normopt.BatchNormSpec):
        return [k for k in (spec.weight, spec.running_var) if k is not None]
    return [spec.weight]


def main(argv=None) -> list[tuple[str, float, float, float]]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.norms", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=positive_int, default=30)
    parser.add_argument("--threads", type=positive_int, default=1, help="torch and BLAS threads (set once)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-torchvision", action="store_true", help="skip the four torchvision models")
    args = parser.parse_args(argv)
    if not args.no_torchvision:
        require_torchvision(parser, "--no-torchvision")
    set_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows = []
    for k, c_in, c_out in PAPER_SHAPES:
        layer = nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False)).to(device)
        rows.append(bench(f"conv {k}x{k} ({c_in},{c_out})", layer, torch.zeros(1, c_in, 32, 32, device=device), args.repeats))
    rows.append(bench("ResNet-18, all 41 layers", resnet18().to(device), torch.zeros(1, 3, 32, 32, device=device), args.repeats))
    if not args.no_torchvision:
        import torchvision

        for name in TORCHVISION_MODELS:
            model = torchvision.models.get_model(name, weights=None).to(device).eval()
            specs = normopt.layer_specs(model)
            rows.append(
                bench(f"{name}, {len(specs)} layers, 224x224", model, torch.zeros(1, 3, 224, 224, device=device), args.repeats)
            )
    cpu = platform.processor() or platform.machine()
    print(f"device: {device} ({cpu}), {args.threads} threads for torch and BLAS, torch {torch.__version__}")
    print(f"medians of {args.repeats} interleaved repeats; ratio = norm time / read time")
    print(f"{'layer':34} {'read ms':>9} {'l1 ms':>9} {'linf ms':>9} {'l1 ratio':>9} {'linf ratio':>10}")
    for label, read, l1, linf in rows:
        print(f"{label:34} {read * 1e3:9.3f} {l1 * 1e3:9.3f} {linf * 1e3:9.3f} {l1 / read:9.2f} {linf / read:10.2f}")
    return rows


if __name__ == "__main__":
    main()
