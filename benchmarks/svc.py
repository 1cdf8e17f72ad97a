"""Time of singular values and singular value clipping (SciPy complex SVD) of conv layers.

The paper's six layer shapes on a 32x32 input, and every conv layer of a CIFAR ResNet-18 at its
real input size (the circular convolution on the padded input, as SVC uses it). Medians. The
largest shapes take tens of seconds per call on a 2-core CPU: the full run takes several minutes.

    python -m benchmarks.svc [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform

import scipy
import torch

import normopt
from benchmarks.norms import PAPER_SHAPES
from benchmarks.timing import interleaved_medians
from experiments.models import resnet18
from normopt.svc import clip_layer, conv_singular_values, padded_input_size


def main(argv=None) -> list[tuple[str, float, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for k, c_in, c_out in PAPER_SHAPES:
        weight = torch.randn(c_out, c_in, k, k)
        medians = interleaved_medians(
            {
                "sv": lambda w=weight: conv_singular_values(w, 32),
                "clip": lambda w=weight: normopt.svc.clip_singular_values(w, 32, 1.0),
            },
            repeats=args.repeats,
            warmup=0,  # each call is seconds long; nothing to warm
        )
        rows.append((f"conv {k}x{k} ({c_in},{c_out}) on 32x32", medians["sv"], medians["clip"]))
    model = resnet18()
    specs = normopt.layer_specs(model, torch.zeros(1, 3, 32, 32))
    convs = {n: s for n, s in specs.items() if isinstance(s, normopt.ConvSpec)}
    weights = {n: model.get_submodule(n).weight for n in convs}

    def all_sv():
        for n, s in convs.items():
            conv_singular_values(weights[n], padded_input_size(s), groups=s.groups, dilation=s.dilation)

    def all_clip():
        for n, s in convs.items():
            clip_layer(weights[n], s, 1.0)

    medians = interleaved_medians({"sv": all_sv, "clip": all_clip}, repeats=args.repeats, warmup=0)
    rows.append((f"ResNet-18, all {len(convs)} convs", medians["sv"], medians["clip"]))
    cpu = platform.processor() or platform.machine()
    print(f"CPU ({cpu}, {torch.get_num_threads()} threads), SciPy {scipy.__version__}; medians of {args.repeats} repeats")
    print(f"{'layer':36} {'singular values s':>18} {'clip s':>10}")
    for label, sv, clip in rows:
        print(f"{label:36} {sv:18.3f} {clip:10.3f}")
    return rows


if __name__ == "__main__":
    main()
