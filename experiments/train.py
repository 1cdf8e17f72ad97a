"""One training run: model, method (plain, norm decay, weight decay, SVC, adversarial training),
per-epoch metrics and layer norms, a checkpoint every epoch, resume, robust evaluation.

    python -m experiments.train --dataset digits --model small --method nd-linf --strength 0.1 --out runs/demo
    torchrun --nproc_per_node 2 -m experiments.train ...   # data parallel (gloo on CPU, nccl on GPU)

Runs on the GPU when one is present, otherwise on the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import normopt
from experiments.attacks import robust_accuracy
from experiments.data import DataError, dataset, loader, shape_of
from experiments.methods import METHODS, loss_of, make_optimizer
from experiments.models import MODELS, build_model


@dataclass
class RunConfig:
    """Everything that defines one run; ``strength`` is beta (norm decay), the weight decay, or the SVC bound."""

    dataset: str = "digits"
    model: str = "small"
    method: str = "plain"
    strength: float = 0.0
    epochs: int = 15
    lr: float = 0.05
    momentum: float = 0.9
    milestones: tuple[int, ...] = (8, 11, 13)
    batch_size: int = 64
    seed: int = 0
    svc_every: int = 100
    bn_radius: float = 5.0
    adv_eps: float = 0.031
    adv_step: float = 0.007
    adv_steps: int = 10
    trades_beta: float = 6.0
    alp_weight: float = 0.5
    eval_eps: float = 1.0  # in 1/255 units
    eval_images: int = 256
    eval_iterations: int = 50
    eval_targets: int = 3
    attacks: tuple[str, ...] = ("apgd-ce", "apgd-t")
    amp: bool = False
    data_dir: str = "data"
    download: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose from {sorted(MODELS)}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {list(METHODS)}")
        self.milestones, self.attacks = tuple(self.milestones), tuple(self.attacks)

    @classmethod
    def paper_cifar10(cls, **changes) -> RunConfig:
        """The paper's CIFAR-10 schedule: lr 0.01, momentum 0.9, 120 epochs, lr x0.1 at 75, 90 and 100."""
        base = {
            "dataset": "cifar10",
            "model": "resnet18",
            "lr": 0.01,
            "epochs": 120,
            "milestones": (75, 90, 100),
            "batch_size": 128,
        }
        return cls(**{**base, "eval_images": 1024, "eval_iterations": 100, "eval_targets": 9, **changes})


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def layer_norm_rows(model: nn.Module, specs, epoch: int) -> list[dict]:
    """Every layer's l1 and l_inf norm as table rows."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    rows = []
    with torch.no_grad():
        for ord_name, ord in (("l1", 1), ("linf", math.inf)):
            for index, (name, norm) in enumerate(normopt.layer_norms(tensors, specs, ord).items()):
                kind = type(specs[name]).__name__.removesuffix("Spec").lower()
                rows.append({"epoch": epoch, "layer": name, "index": index, "kind": kind, "ord": ord_name, "norm": float(norm)})
    return rows


def _save(path: str, state: dict) -> None:
    # Write then rename: an interruption leaves the previous checkpoint intact.
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(config: RunConfig, out: str, resume: bool = True, progress: bool = True) -> dict:
    """Train (or resume), evaluate, and write ``out/result.json``; returns the result."""
    os.makedirs(out, exist_ok=True)
    result_path, checkpoint_path = os.path.join(out, "result.json"), os.path.join(out, "checkpoint.pt")
    if resume and os.path.exists(result_path):
        with open(result_path) as f:
            return json.load(f)
    if _distributed() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    where = device()
    torch.manual_seed(config.seed)
    train_set = dataset(config.dataset, True, config.data_dir, download=config.download)
    test_set = dataset(config.dataset, False, config.data_dir)
    channels, height, width = shape_of(config.dataset)
    model = build_model(config.model, 10, channels).to(where)
    example = torch.zeros(1, channels, height, width, device=where)
    specs = normopt.layer_specs(model, example)
    net = nn.parallel.DistributedDataParallel(model) if dist.is_initialized() else model
    optimizer, svc = make_optimizer(config, net, example)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(config.milestones), gamma=0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and where.type == "cuda")
    history, norms, start = [], layer_norm_rows(model, specs, 0), 1
    if resume and os.path.exists(checkpoint_path):
        state = torch.load(checkpoint_path, map_location=where, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if svc is not None:
            svc.load_state_dict(state["svc"])
        history, norms, start = state["history"], state["norms"], state["epoch"] + 1
    for epoch in range(start, config.epochs + 1):
        # Seeded per epoch, so a resumed run draws the same batches and augmentations.
        torch.manual_seed(config.seed * 100_003 + epoch)
        batches = loader(
            train_set, config.batch_size, True, seed=config.seed * 100_003 + epoch, distributed=dist.is_initialized()
        )
        if dist.is_initialized():
            batches.sampler.set_epoch(epoch)
        net.train()
        total = correct = seen = steps = 0
        for x, y in tqdm(
            batches, desc=f"epoch {epoch}/{config.epochs}", leave=False, disable=None if progress and _is_main() else True
        ):
            x, y = x.to(where), y.to(where)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(where.type, enabled=config.amp and where.type == "cuda"):
                loss, logits = loss_of(config, net, x, y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            steps += 1
        scheduler.step()
        test_accuracy = evaluate(model, test_set, where)
        world = dist.get_world_size() if dist.is_initialized() else 1
        history.append(
            {"epoch": epoch, "loss": total / seen, "train_accuracy": correct / seen, "test_accuracy": test_accuracy}
            | {"steps": steps, "world_size": world}
        )
        norms += layer_norm_rows(model, specs, epoch)
        if _is_main():
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            state.update(scaler=scaler.state_dict(), svc=svc.state_dict() if svc else None, epoch=epoch)
            _save(checkpoint_path, {**state, "history": history, "norms": norms})
            if progress:
                print(f"  epoch {epoch}: loss {total / seen:.4f}, test accuracy {test_accuracy:.4f}", file=sys.stderr)
    # The JSON form, so a fresh run returns exactly what a finished run reads back.
    result = json.loads(json.dumps({"config": dataclasses.asdict(config), "history": history, "norms": norms}))
    if _is_main():
        images, labels = _first(test_set, config.eval_images)
        result["accuracy"] = robust_accuracy(
            model,
            images.to(where),
            labels.to(where),
            config.eval_eps,
            attacks=config.attacks,
            iterations=config.eval_iterations,
            targets=config.eval_targets,
        )
        with open(result_path + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(result_path + ".tmp", result_path)
    if dist.is_initialized():
        dist.barrier()
    return result


def _first(data, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    count = min(count, len(data))
    xs, ys = zip(*(data[i] for i in range(count)))
    return torch.stack(xs), torch.tensor(ys)


@torch.no_grad()
def evaluate(model: nn.Module, data, where: torch.device) -> float:
    model.eval()
    correct = 0
    for x, y in loader(data, 512, False):
        correct += int((model(x.to(where)).argmax(1) == y.to(where)).sum())
    return correct / len(data)


def parse_args(argv=None) -> tuple[RunConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", choices=["digits", "cifar10"])
    parser.add_argument("--model", default="small")
    parser.add_argument("--method", default="plain")
    parser.add_argument("--strength", type=float, default=0.0)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-images", type=int)
    parser.add_argument("--eval-eps", type=float, help="attack radius in 1/255 units")
    parser.add_argument("--amp", action="store_true", help="mixed precision (GPU only)")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--out", default="runs/train")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    args = parser.parse_args(argv)
    base = RunConfig.paper_cifar10 if args.dataset == "cifar10" else RunConfig
    changes = {k: v for k, v in vars(args).items() if v is not None and k in {f.name for f in dataclasses.fields(RunConfig)}}
    try:
        config = base(**{**changes, "data_dir": args.data_dir})
    except ValueError as error:
        parser.error(str(error))
    return config, args


def main(argv=None) -> None:
    config, args = parse_args(argv)
    try:
        result = train(config, args.out, resume=args.resume)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if _is_main():
        print(json.dumps(result["accuracy"]))


if __name__ == "__main__":
    main()
