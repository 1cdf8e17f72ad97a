"""Overhead of NormDecayOptimizer: a wrapped training step over a plain one, measured side by side.

CIFAR ResNet-18, batch 128 of 3x32x32 inputs, SGD with momentum; both models start from the same
weights and run interleaved, so the ratio of their median step times is stable on a noisy machine.

    python -m benchmarks.optimizer [--repeats 7] [--batch 128] [--ord linf]
"""

from __future__ import annotations

import argparse
import copy
import platform

import torch
import torch.nn.functional as F

import normopt
from benchmarks.timing import interleaved_medians
from experiments.models import resnet18


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--ord", default="l1")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    plain_model = resnet18().to(device)
    wrapped_model = copy.deepcopy(plain_model)
    plain = torch.optim.SGD(plain_model.parameters(), lr=0.01, momentum=0.9)
    wrapped = normopt.NormDecayOptimizer(
        torch.optim.SGD(wrapped_model.parameters(), lr=0.01, momentum=0.9), wrapped_model, ord=args.ord, beta=1e-3
    )
    inputs = torch.randn(args.batch, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)

    def step(model, optimizer):
        def run():
            optimizer.zero_grad()
            F.cross_entropy(model(inputs), labels).backward()
            optimizer.step()

        return run

    def decay_only():
        wrapped.norm_decay.add_to_gradients()

    medians = interleaved_medians(
        {"plain": step(plain_model, plain), "wrapped": step(wrapped_model, wrapped), "decay": decay_only},
        repeats=args.repeats,
        warmup=1,
    )
    cpu = platform.processor() or platform.machine()
    print(f"device: {device} ({cpu}, {torch.get_num_threads()} threads), torch {torch.__version__}")
    print(
        f"ResNet-18, batch {args.batch}, SGD momentum 0.9, norm decay ord={args.ord}; medians of {args.repeats} interleaved runs"
    )
    print(f"plain step          {medians['plain'] * 1e3:10.1f} ms")
    print(f"wrapped step        {medians['wrapped'] * 1e3:10.1f} ms")
    print(f"norm decay alone    {medians['decay'] * 1e3:10.1f} ms")
    print(f"ratio wrapped/plain {medians['wrapped'] / medians['plain']:10.3f}")
    return medians


if __name__ == "__main__":
    main()
