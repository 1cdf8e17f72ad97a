"""Worker of the 2-process DDP test (a module of its own so that 'spawn' can import it)."""

from __future__ import annotations

import datetime
import gc

import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import batches, digits, small_cnn
from torch import nn

import normopt

STEPS, BATCH = 6, 32


def _in_group(body, rank: int, world_size: int, folder: str, *args) -> None:
    """Run ``body(rank, world_size, folder, *args)`` in a gloo group. Every DDP model, optimizer and
    decay (which hold the group) is gone before the group is: freed after it, one aborted the
    process now and then ("terminate called without an active exception")."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120)
    )
    try:
        body(rank, world_size, folder, *args)
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def train_ddp(rank: int, world_size: int, folder: str) -> None:
    _in_group(_train_ddp, rank, world_size, folder)


def _train_ddp(rank: int, world_size: int, folder: str) -> None:
    model = nn.parallel.DistributedDataParallel(small_cnn())
    optimizer = normopt.NormDecayOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, ord="linf", beta=0.05
    )
    x, y = digits()
    share = BATCH // world_size
    for inputs, labels in batches(x, y, STEPS, BATCH):
        optimizer.zero_grad()
        part = slice(rank * share, (rank + 1) * share)
        F.cross_entropy(model(inputs[part]), labels[part]).backward()
        optimizer.step()
    torch.save(model.module.state_dict(), f"{folder}/rank{rank}.pt")


def train_single() -> dict[str, torch.Tensor]:
    """The same training on the global batch in one process."""
    model = small_cnn()
    optimizer = normopt.NormDecayOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, ord="linf", beta=0.05
    )
    x, y = digits()
    for inputs, labels in batches(x, y, STEPS, BATCH):
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    return model.state_dict()


def _zero(model: nn.Module, through: str):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD, lr=0.05, momentum=0.9)
    if through == "hooks":
        normopt.attach_norm_decay(zero, model, ord="linf", beta=0.05)
        return zero, zero
    return normopt.NormDecayOptimizer(zero, model, ord="linf", beta=0.05), zero


def resume_zero(rank: int, world_size: int, folder: str, through: str) -> None:
    """ZeRO with norm decay: a consolidated checkpoint resumes a run as if never interrupted."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world_size)
    try:
        _resume_zero(rank, world_size, folder, through)
        # Every DDP model and ZeRO optimizer gone before the group: freed after it, one aborted
        # the process now and then ("terminate called without an active exception").
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


class WithSpareHead(nn.Module):
    """small_cnn, then a head used only from the fourth step: no gradient before (its h moves all
    the same, and a checkpoint taken before must carry it)."""

    def __init__(self):
        super().__init__()
        self.net = small_cnn()
        self.spare = nn.Linear(10, 10)

    def forward(self, x, spare):
        out = self.net(x)
        return self.spare(out) if spare else out


def _resume_zero(rank: int, world_size: int, folder: str, through: str) -> None:
    x, y = digits()
    data = list(batches(x, y, STEPS, BATCH))
    share = BATCH // world_size
    part = slice(rank * share, (rank + 1) * share)

    def train(model, optimizer, steps, spare=True):
        for inputs, labels in steps:
            optimizer.zero_grad()
            F.cross_entropy(model(inputs[part], spare), labels[part]).backward()
            optimizer.step()

    model = nn.parallel.DistributedDataParallel(WithSpareHead(), find_unused_parameters=True)
    optimizer, zero = _zero(model, through)
    train(model, optimizer, data[:3], spare=False)
    zero.consolidate_state_dict(to=0)
    if rank == 0:
        torch.save(optimizer.state_dict(), f"{folder}/optimizer.pt")
    dist.barrier()
    weights = {k: v.clone() for k, v in model.module.state_dict().items()}
    train(model, optimizer, data[3:])
    resumed = nn.parallel.DistributedDataParallel(WithSpareHead(), find_unused_parameters=True)
    resumed.module.load_state_dict(weights)
    resumed_optimizer, _ = _zero(resumed, through)
    resumed_optimizer.load_state_dict(torch.load(f"{folder}/optimizer.pt"))
    train(resumed, resumed_optimizer, data[3:])
    torch.save({"continued": model.module.state_dict(), "resumed": resumed.module.state_dict()}, f"{folder}/rank{rank}.pt")


def replicas_agree(rank: int, world_size: int, folder: str, bn_projection: str, through: str) -> None:
    """DDP replicas whose first batches differ in size, and whose batch norms each update their own
    running variances, regularizing those batch norms and capping them: their weights must stay equal."""
    _in_group(_replicas_agree, rank, world_size, folder, bn_projection, through)


def _replicas_agree(rank: int, world_size: int, folder: str, bn_projection: str, through: str) -> None:
    torch.manual_seed(0)
    inner = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    model = nn.parallel.DistributedDataParallel(inner)
    options = dict(ord="linf", beta=0.05, layers=("conv", "linear", "batchnorm"), bn_max_norm=0.9, bn_projection=bn_projection)
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if through == "hooks":
        decay, optimizer = normopt.attach_norm_decay(sgd, model, **options), sgd
    else:
        optimizer = normopt.NormDecayOptimizer(sgd, model, **options)
        decay = optimizer.norm_decay
    x, y = digits()
    share = BATCH // world_size
    for step, (inputs, labels) in enumerate(batches(x, y, STEPS, BATCH)):
        part = inputs[rank * share : (rank + 1) * share]
        if step == 0 and rank == 1:
            part = part[..., ::2, ::2]  # a smaller first batch: 4x4 where rank 0 has 8x8
        optimizer.zero_grad()
        F.cross_entropy(model(part), labels[rank * share : (rank + 1) * share]).backward()
        optimizer.step()
    sizes = {name: spec.input_size for name, spec in decay.specs.items() if hasattr(spec, "input_size")}
    torch.save({"params": dict(inner.named_parameters()), "sizes": sizes}, f"{folder}/rank{rank}.pt")


def periodic_svc_agrees(rank: int, world_size: int, folder: str) -> None:
    """PeriodicSVC on DDP replicas whose first batches differ in size: each used to describe the
    model from its own sizes, skip other layers, and wait forever in a broadcast the other never made."""
    _in_group(_periodic_svc_agrees, rank, world_size, folder)


def _periodic_svc_agrees(rank: int, world_size: int, folder: str) -> None:
    torch.manual_seed(0)
    inner = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    model = nn.parallel.DistributedDataParallel(inner)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    normopt.PeriodicSVC(optimizer, model, bound=0.5, every=1, input_size="raw")
    x = torch.randn(4, 1, 8, 8)
    # 4x4 on rank 1: its second conv sees 2x2, smaller than its kernel, which "raw" skips there only.
    inputs = x[..., ::2, ::2] if rank == 1 else x
    try:
        model(inputs).sum().backward()
        optimizer.step()
        outcome = "stepped"
    except ValueError as error:
        outcome = str(error)
    with open(f"{folder}/rank{rank}.txt", "w") as f:
        f.write(outcome)


def periodic_svc_rank_zero_decides(rank: int, world_size: int, folder: str, bad_rank: int) -> None:
    """A clip whose kernel comes out not finite on one rank only: the rank that raised left the
    other waiting in the broadcast. Rank 0's kernels are the ones broadcast: its finding decides."""
    _in_group(_periodic_svc_rank_zero_decides, rank, world_size, folder, bad_rank)


def _periodic_svc_rank_zero_decides(rank: int, world_size: int, folder: str, bad_rank: int) -> None:
    import normopt.periodic_svc

    if rank == bad_rank:  # this rank's LAPACK went wrong
        clip = normopt.periodic_svc.clip_layer_counted

        def not_finite(*args, **kwargs):
            clipped, count, exceeded = clip(*args, **kwargs)
            return torch.full_like(clipped, float("nan")), count, exceeded

        normopt.periodic_svc.clip_layer_counted = not_finite
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with torch.no_grad():
        model.module[0].weight.mul_(10)  # above the bound: work to do
    normopt.PeriodicSVC(optimizer, model, bound=0.5, every=1, example_input=torch.zeros(1, 1, 6, 6))
    try:
        optimizer.step()
        outcome = "stepped"
    except ValueError as error:
        outcome = str(error)
    torch.save({"outcome": outcome, "weight": model.module[0].weight.detach()}, f"{folder}/rank{rank}.pt")


def join_warned(rank: int, world_size: int, folder: str, through: str) -> None:
    """Under torch's Join, where the step is a collective: a rank out of batches takes no step, and
    the others waited for it until the process group's timeout; the step warns (once)."""
    _in_group(_join_warned, rank, world_size, folder, through)


def _join_warned(rank: int, world_size: int, folder: str, through: str) -> None:
    import warnings

    from torch.distributed.algorithms.join import Join

    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = nn.parallel.DistributedDataParallel(inner)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    if through == "svc":
        normopt.PeriodicSVC(optimizer, model, bound=0.5, every=1)
    else:  # "discovery": the first step also gathers the input sizes that every rank recorded
        optimizer = normopt.NormDecayOptimizer(optimizer, model, beta=0.05, layers=("conv", "batchnorm"))

    def steps(count):
        for _ in range(count):
            optimizer.zero_grad()
            model(torch.randn(4, 1, 6, 6)).sum().backward()
            optimizer.step()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if through != "discovery":
            steps(1)  # before any Join: no warning
        with Join([model]):  # even inputs here: every rank steps twice
            steps(2)
        steps(1)  # torch leaves the model's join setting on: not warned again
    with open(f"{folder}/rank{rank}.txt", "w") as f:
        f.write("\n".join(str(w.message) for w in caught if "Join" in str(w.message)))


class ConvOnlySometimes(nn.Module):
    """A conv branch that a forward may leave out (a rank's first batch takes the other branch)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 4))
        self.head = nn.Linear(4, 10)

    def forward(self, x, use_conv: bool = True):
        return self.head(self.conv(x) if use_conv else self.pool(x))


def no_conv_on_one_rank(rank: int, world_size: int, folder: str, through: str) -> None:
    """Rank 1's first forward runs no convolution: it used to skip the size gather rank 0 waited in."""
    _in_group(_no_conv_on_one_rank, rank, world_size, folder, through)


def _no_conv_on_one_rank(rank: int, world_size: int, folder: str, through: str) -> None:
    torch.manual_seed(0)
    inner = ConvOnlySometimes()
    model = nn.parallel.DistributedDataParallel(inner, find_unused_parameters=True)
    sgd = torch.optim.SGD(model.parameters(), lr=0.05)
    if through == "svc":
        normopt.PeriodicSVC(sgd, model, bound=0.5, every=1)
        optimizer = sgd
    elif through == "hooks":
        normopt.attach_norm_decay(sgd, model, ord="linf", beta=0.05)
        optimizer = sgd
    else:
        optimizer = normopt.NormDecayOptimizer(sgd, model, ord="linf", beta=0.05)
    for step in range(3):
        x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(10 * step + rank))
        optimizer.zero_grad()
        model(x, use_conv=not (rank == 1 and step == 0)).sum().backward()
        optimizer.step()
    torch.save(dict(inner.named_parameters()), f"{folder}/rank{rank}.pt")
