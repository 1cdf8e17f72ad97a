"""Cost of NormDecayOptimizer over a plain optimizer step, measured side by side in one run.

For the CIFAR ResNet-18 and RegNetX-200MF of the paper, both norms:

* operators: aten operators dispatched by one wrapped step minus one plain SGD step (a
  TorchDispatchMode counting every call: on a GPU each is a kernel launch or more);
* step time: the optimizer step (norm decay + SGD with momentum) over the plain SGD step;
* training step: a whole step of torchvision's ResNet-18 (batch of 32x32 images) wrapped over plain.

With ``--released PATH`` (a checkout of the authors' code, github.com/youweiliang/norm_robustness,
read and run, never copied) it also times their step (``add_lip_grad`` then SGD) against ours with
both rules, counts its operators, checks that ``rule="reference"`` gives bit-identical weights, and
times two lower bounds beside them: the plain step plus the regularized layers' norms alone
(``normopt.layer_norms``, which every exact norm-decay step computes first), and the plain step
plus one plain read of their weights (``sum``: what a fused abs-and-sum would cost). With
``--compile`` it times ``torch.compile``d steps as well (inductor where a C compiler exists, else
aot_eager). ``--device cuda`` runs the models, steps and training steps there (a GPU's
kernel launches are what the operator counts stand for); the bit-identity check stays on the
CPU. Medians of interleaved repeats (synchronising the GPU around each call); thread counts are
set once (torch and BLAS).

    python -m benchmarks.optimizer [--threads 2] [--repeats 15] [--batch 128] [--released PATH] [--compile] [--device cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math
import os
import platform
import shutil
import sys

import torch
import torch.nn.functional as F

import normopt
from benchmarks.timing import count, count_operators, interleaved_medians, positive_int, require_torchvision, set_threads
from experiments.models import regnetx_200mf, resnet18

MODELS = {"ResNet-18": resnet18, "RegNetX-200MF": regnetx_200mf}
ORDS = {"l1": (1, "1-norm"), "linf": (math.inf, "inf-norm")}


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _with_grads(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same batches on every device
    x = torch.randn(8, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (8,), generator=generator)
    F.cross_entropy(model(x.to(_device(model))), y.to(_device(model))).backward()
    return model


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def _wrapped(model, ord, rule="paper"):
    example = torch.zeros(1, 3, 32, 32, device=_device(model))
    return normopt.NormDecayOptimizer(_sgd(model), model, ord=ord, beta=1e-3, rule=rule, example_input=example)


def _released_step(model, norm: str):
    from lip.add_lip import bind_lip  # the authors' code, from --released

    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per skipped layer
        bind_lip(model, norm=norm, beta=1e-3)
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, 32, 32, device=_device(model)))  # their forward hook builds the partitions
        model.train()
    optimizer = _sgd(model)

    def step():
        model.add_lip_grad(linear=True, conv=True, bn=False)
        optimizer.step()

    return step


def _floors(optimizer: normopt.NormDecayOptimizer, model: torch.nn.Module, ord) -> dict:
    """Lower bounds on the decay's time, as steps to time beside it: the norms of the regularized
    layers alone (what an exact norm decay computes before anything else), and one plain read of
    their weights (what a fused abs-and-sum would cost; eager torch has none)."""
    specs = normopt.LayerSpecs(optimizer.norm_decay.decayed)  # keeps its tables between calls
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    weights = [tensors[spec.weight] for spec in specs.values()]

    @torch.no_grad()
    def norms():
        return normopt.layer_norms(tensors, specs, ord)

    @torch.no_grad()
    def read():
        for weight in weights:
            weight.sum()

    return {"norms": norms, "read": read}


def optimizer_steps(repeats: int, released: bool, compile_backend: str | None, device: str = "cpu") -> list[dict]:
    rows = []
    for label, make in MODELS.items():
        torch.manual_seed(0)
        base = make().to(device)
        for ord_name, (ord, released_norm) in ORDS.items():
            plain_model, ours_model = _with_grads(copy.deepcopy(base)), _with_grads(copy.deepcopy(base))
            plain, ours = _sgd(plain_model), _wrapped(ours_model, ord)
            plain.step(), ours.step()  # first steps create the momentum buffers and the decay state
            row = {"model": label, "ord": ord_name, "layers": len(ours.norm_decay.decayed)}
            row["added operators"] = count_operators(ours.step) - count_operators(plain.step)
            steps = {"plain": plain.step, "ours": ours.step}
            if released:
                released_model = _with_grads(copy.deepcopy(base))
                steps["released"] = _released_step(released_model, released_norm)
                reference = _wrapped(_with_grads(copy.deepcopy(base)), ord, "reference")
                reference.step()
                steps["ours reference"] = reference.step
                row["released added operators"] = count_operators(steps["released"]) - count_operators(plain.step)
                floors = _floors(ours, plain_model, ord)
                steps["plain + norms"] = lambda step=plain.step, floor=floors["norms"]: (step(), floor())
                steps["plain + read"] = lambda step=plain.step, floor=floors["read"]: (step(), floor())
            if compile_backend:
                compiled_model = _with_grads(copy.deepcopy(base))
                compiled = _wrapped(compiled_model, ord)
                compiled.step()
                torch._dynamo.reset()  # every optimizer's step is torch.optim's one wrapper: its recompile limit is shared
                compiled.step = torch.compile(compiled.step, backend=compile_backend)
                steps["ours compiled"] = compiled.step
            medians = interleaved_medians(steps, repeats=repeats, warmup=2)
            row["ours / plain"] = medians["ours"] / medians["plain"]
            if released:
                row["ours / released"] = medians["ours"] / medians["released"]
                row["reference / released"] = medians["ours reference"] / medians["released"]
                row["(plain + norms) / released"] = medians["plain + norms"] / medians["released"]
                row["(plain + read) / released"] = medians["plain + read"] / medians["released"]
            if compile_backend:
                row[f"compiled ({compile_backend}) / plain"] = medians["ours compiled"] / medians["plain"]
                if released:
                    row[f"compiled ({compile_backend}) / released"] = medians["ours compiled"] / medians["released"]
            row["plain ms"] = medians["plain"] * 1e3
            rows.append(row)
    return rows


def bit_identity(steps: int = 100) -> dict[str, bool]:
    """Weights after ``steps`` SGD steps with rule="reference" and with the released code, from the same start."""
    result = {}
    for ord_name, (ord, released_norm) in ORDS.items():
        torch.manual_seed(0)
        ours_model, their_model = resnet18(), resnet18()
        their_model.load_state_dict(ours_model.state_dict())
        ours = _wrapped(ours_model, ord, "reference")
        theirs = _released_step(their_model, released_norm)
        for step in range(steps):
            for model, run in ((ours_model, ours.step), (their_model, theirs)):
                model.zero_grad()
                _with_grads(model, seed=step)
                run()
        result[ord_name] = all(
            torch.equal(a, b) for a, b in zip(ours_model.state_dict().values(), their_model.state_dict().values())
        )
    return result


def training_steps(repeats: int, batch: int, compile_backend: str | None = None, device: str = "cpu") -> dict[str, float]:
    """A whole step (forward, backward, optimizer) of torchvision's ResNet-18, wrapped over plain.

    A whole step's time varies by a few percent from run to run, more than the decay adds; the
    decay alone (its part of the wrapped step, measured in the same run) is printed beside it,
    and so are the same two lower bounds as in :func:`optimizer_steps` (norms alone, one read).
    With ``compile_backend`` the wrapped steps also run with ``torch.compile(optimizer.step)``
    (model eager), over the plain eager step.
    """
    import torchvision  # here only: the optimizer steps need no torchvision

    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=10).to(device)
    x, y = torch.randn(batch, 3, 32, 32).to(device), torch.randint(0, 10, (batch,)).to(device)
    steps, decays = {}, {}
    torch._dynamo.reset()
    runs = [("plain", None, False), ("l1", 1, False), ("linf", math.inf, False)]
    if compile_backend:
        runs += [("l1 compiled", 1, True), ("linf compiled", math.inf, True)]
    for name, ord, compiled in runs:
        model = copy.deepcopy(base)
        optimizer = _sgd(model) if ord is None else normopt.NormDecayOptimizer(_sgd(model), model, ord=ord, beta=1e-3)
        update = optimizer.step
        if compiled:
            F.cross_entropy(model(x), y).backward()
            optimizer.step()  # the first step, eager, discovers the layers and creates the state
            update = torch.compile(optimizer.step, backend=compile_backend)

        def step(model=model, optimizer=optimizer, update=update):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            update()

        steps[name] = step
        if ord is not None:
            decay = optimizer.norm_decay.before_step
            decays[f"{name} decay"] = torch.compile(decay, backend=compile_backend) if compiled else decay
            if not compiled:
                floors = _floors(optimizer, model, ord)
                decays[f"{name} norms"] = floors["norms"]
                decays["read"] = floors["read"]
    medians = interleaved_medians({**steps, **decays}, repeats=repeats, warmup=2)
    plain = medians["plain"]
    result = {"plain s": plain}
    for name, _, _ in runs[1:]:
        result[f"{name} / plain"] = medians[name] / plain
        result[f"1 + {name} decay / plain"] = 1 + medians[f"{name} decay"] / plain
    for name in ("l1 norms", "linf norms", "read"):
        result[f"1 + {name} / plain"] = 1 + medians[name] / plain
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.optimizer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=positive_int, default=2, help="torch and BLAS threads (set once)")
    parser.add_argument("--repeats", type=positive_int, default=15)
    parser.add_argument("--batch", type=positive_int, default=128, help="batch of the whole training step")
    parser.add_argument("--train-repeats", type=count, default=5, help="repeats of the whole training step (0: skip)")
    parser.add_argument("--released", help="checkout of youweiliang/norm_robustness, to run their step beside ours")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd steps")
    parser.add_argument("--device", default="cpu", help="where the models and steps run (e.g. cuda)")
    args = parser.parse_args(argv)
    if args.released and not os.path.isfile(os.path.join(args.released, "lip", "add_lip.py")):
        parser.error(f"--released {args.released!r}: no lip/add_lip.py there; pass a checkout of youweiliang/norm_robustness")
    if args.train_repeats:
        require_torchvision(parser, "--train-repeats 0")
    set_threads(args.threads)
    if args.released:
        sys.path.insert(0, args.released)
    backend = ("inductor" if shutil.which("cc") or shutil.which("gcc") else "aot_eager") if args.compile else None
    cpu = platform.processor() or platform.machine()
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"{where}; CPU ({cpu}), {args.threads} threads for torch and BLAS, torch {torch.__version__}")
    print(f"medians of {args.repeats} interleaved repeats")
    rows = optimizer_steps(args.repeats, bool(args.released), backend, args.device)
    columns = list(rows[0])
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()))
    results = {"steps": rows}
    if args.released:
        results["bit identical"] = bit_identity()
        print("rule='reference' vs released code, ResNet-18, 100 steps: weights bit-identical:", results["bit identical"])
    if args.train_repeats:
        results["training"] = training_steps(args.train_repeats, args.batch, backend, args.device)
        print(
            f"torchvision ResNet-18, batch {args.batch} of 32x32, whole training step:",
            {k: round(v, 4) for k, v in results["training"].items()},
        )
    return results


if __name__ == "__main__":
    main()
