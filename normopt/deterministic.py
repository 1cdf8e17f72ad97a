"""Operations whose results do not depend on torch's global modes: writes at flat indices that
its deterministic mode accepts, and matrix products that autocast leaves in full precision.

``Tensor.put_`` (without ``accumulate``) is what a step uses to write the arg-max slices into the
decay buffers: its positions are distinct, or take one and the same value, so its result is
deterministic. Torch flags it all the same under ``torch.use_deterministic_algorithms(True)``
(any index may repeat, as far as it knows), and would refuse the whole step; ``index_put_`` is
not flagged there, but takes about 1.5x as long on a CPU, so it is used only in that mode.

Line sums multiply the kernel's absolute values by 0/1 tables of taps (:mod:`normopt.lines`), and
singular values multiply kernels by tables of phases (:mod:`normopt.spectrum`). ``torch.autocast``
runs every matrix product in bfloat16 or float16, and a step called inside it (the whole training
step under one ``with torch.autocast(...)``) would get norms off in the third digit and the wrong
arg-max line; torch.optim's steps are elementwise, which autocast leaves alone.
"""

from __future__ import annotations

import torch


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in the inputs' dtype, also inside ``torch.autocast`` (for their device type).

    Example:
        >>> a = torch.tensor([[1.0, 1e-3]])
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     (a @ a.T).dtype, matmul(a, a.T).dtype
        (torch.bfloat16, torch.float32)
    """
    kind = a.device.type  # autocast has no mode for some (the meta device)
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        with torch.autocast(kind, enabled=False):
            return a @ b
    return a @ b


def put(target: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``target.put_(index, values)`` (flat indices into ``target`` as if contiguous), also under
    ``torch.use_deterministic_algorithms(True)``, where ``index`` must not repeat a position with
    different values. Returns ``target``, changed in place.

    Example:
        >>> import torch
        >>> put(torch.zeros(2, 2), torch.tensor([3, 0]), torch.tensor([1.0, 2.0]))
        tensor([[2., 0.],
                [0., 1.]])
    """
    if not torch.are_deterministic_algorithms_enabled():
        return target.put_(index, values)
    if target.is_contiguous():
        target.view(-1).index_put_((index,), values)
        return target
    return target.copy_(target.contiguous().view(-1).index_put_((index,), values).view(target.shape))
