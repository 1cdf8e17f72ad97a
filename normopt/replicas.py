"""What the replicas of a DistributedDataParallel model must agree on before a norm-decay step.

DDP averages the gradients, so replicas stay equal as long as each computes the same step from
them. Two inputs of norm decay are each replica's own, though:

* the input sizes that its training forwards record: replicas whose first batches differ in size
  would describe a convolution at different sizes, and so give it different norms;
* the running variances of its batch norms, which its own forward has just updated from its own
  batch (DDP sends rank 0's to the others only at the start of the next forward): a batch norm's
  norm ``|gamma| / sqrt(running_var + eps)``, its decay and its cap would differ.

Given the DDP model, norm decay and :class:`~normopt.PeriodicSVC` take the sizes that every rank
recorded (:meth:`normopt.InputSizeRecorder.gather`, once) and the running variances of the group's first rank
(:func:`first_rank_copies`, at every step that uses them). Given the module inside DDP they cannot
know of the replicas: pass ``example_input``, and leave batch norms to ``SyncBatchNorm`` there.
"""

from __future__ import annotations

import functools
import warnings
import weakref

import torch
import torch.distributed as dist
from torch import nn

from normopt.discovery import user_stacklevel, wrappers


class Replicas:
    """The process group of a DDP model's replicas, as norm decay keeps it: ``copy.deepcopy`` keeps
    the group itself (the copy steps in the same processes), and ``pickle``, which cannot hold a
    process group, writes the default group as itself, found again where the pickle is loaded,
    and any other as None (the copy then no longer agrees with the other ranks).
    """

    def __init__(self, group, ddp: nn.Module | None = None):
        self.group = group
        # Weakly: the group is the model's, not the model ours. Lost in a pickle (then no Join is seen).
        self._ddp = None if ddp is None else weakref.ref(ddp)
        self._join_warned: set[str] = set()

    def warn_join(self, what: str, when: str = "per step") -> None:
        """Warn, once for each ``what``, where the DDP model has been under torch's ``Join`` (uneven
        inputs) and the step is a collective (``when``: how often it runs).

        A rank out of batches inside ``Join`` takes no step, so the ranks still stepping would wait
        for it in the collective until the process group's timeout (30 minutes on gloo). Whether a
        ``Join`` block is running cannot be told: torch leaves the DDP model's join setting on after
        the block (its own forward keeps acting on it), so this warns, and does not refuse.
        """
        ddp = None if self._ddp is None else self._ddp()
        config = getattr(ddp, "_join_config", None)
        if config is not None and config.enable and what not in self._join_warned:
            self._join_warned.add(what)
            warnings.warn(
                f"{what} under DDP is one collective {when} (so that every replica takes the same one), and the "
                "model has been under torch's Join: inside it, a rank out of batches takes no step, and the others "
                "would wait for it until the process group's timeout. Give every rank the same number of batches "
                "(drop_last=True) instead of Join",
                stacklevel=user_stacklevel(),
            )

    def __deepcopy__(self, memo) -> Replicas:
        return self

    def __reduce__(self):
        return _world_replicas, (self.group is dist.group.WORLD,)


def _world_replicas(world: bool) -> Replicas | None:
    return Replicas(dist.group.WORLD) if world and dist.is_available() and dist.is_initialized() else None


def replica_group(model: nn.Module) -> Replicas | None:
    """The replicas of the DDP wrapper among ``model``'s wrappers (:func:`normopt.discovery.wrappers`),
    or None where there is none.

    Example:
        >>> replica_group(nn.Linear(2, 2)) is None
        True
    """
    ddp = next((m for m in wrappers(model) if isinstance(m, nn.parallel.DistributedDataParallel)), None)
    return None if ddp is None else Replicas(ddp.process_group, ddp)


def _first_rank_copies(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    common = functools.reduce(torch.promote_types, [t.dtype for t in tensors])  # holds every one exactly
    flat = torch.cat([t.detach().reshape(-1).to(common) for t in tensors])
    dist.broadcast(flat, src=dist.get_global_rank(group, 0), group=group)
    return [part.view_as(t).to(t.dtype) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def first_rank_copies(tensors: list[torch.Tensor], replicas: Replicas) -> list[torch.Tensor]:
    """Copies of ``tensors`` as the replicas' first rank holds them (one broadcast of them laid
    end to end; a collective: every rank calls it). The tensors themselves are left as they are.
    Under ``torch.compile`` it runs outside the graph (a graph break)."""
    if torch.compiler.is_compiling():
        return torch.compiler.disable(_first_rank_copies)(tensors, replicas.group)
    return _first_rank_copies(tensors, replicas.group)
