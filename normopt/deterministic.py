"""Writes at flat indices that torch's deterministic mode accepts.

``Tensor.put_`` (without ``accumulate``) is what a step uses to write the arg-max slices into the
decay buffers: its positions are distinct, or take one and the same value, so its result is
deterministic. Torch flags it all the same under ``torch.use_deterministic_algorithms(True)``
(any index may repeat, as far as it knows), and would refuse the whole step; ``index_put_`` is
not flagged there, but takes about 1.5x as long on a CPU, so it is used only in that mode.
"""

from __future__ import annotations

import torch


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
