"""Singular value clipping of every conv layer of a model, every N optimizer steps (the paper's SVC baseline)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from normopt.discovery import InputSizeRecorder, layer_specs, unwrap
from normopt.specs import ConvSpec
from normopt.svc import clip_layer, layer_spectral_bound


class PeriodicSVC:
    """Clips the singular values of every conv layer at ``bound`` after every ``every``-th step.

    Installs a step post-hook on ``optimizer`` (any ``torch.optim.Optimizer``, NormDecayOptimizer
    included). Each layer is clipped as the circular convolution on its padded input size, which
    bounds the zero-padded, strided layer (see :mod:`normopt.svc`). Input sizes come from
    ``example_input`` or, without it, from the training forward (hooks). Under
    ``torch.distributed`` the clipped kernels are broadcast from rank 0, so every replica holds the
    same bits whatever its LAPACK does. With ``report=True`` each clip records, in ``last_norms``,
    every layer's circular spectral norm after the crop (one more SVD per layer), which shows how
    far above ``bound`` the crop to the kernel's support left it.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(32, 2))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> svc = PeriodicSVC(optimizer, model, bound=0.5, every=2, example_input=torch.zeros(1, 1, 4, 4))
        >>> for _ in range(2):
        ...     model(torch.randn(3, 1, 4, 4)).sum().backward()
        ...     optimizer.step()
        >>> svc.clips
        1
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        bound: float,
        *,
        every: int = 100,
        iterations: int = 1,
        exclude: Iterable[str] = (),
        example_input=None,
        report: bool = False,
    ):
        if not bound > 0:
            raise ValueError(f"bound must be positive, got {bound!r}")
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.model = unwrap(model)
        self.bound, self.every, self.iterations = float(bound), every, iterations
        self.exclude = frozenset(exclude)
        self.report = report
        self.last_norms: dict[str, float] = {}
        self.steps = self.clips = 0
        self._recorder = None if example_input is not None else InputSizeRecorder(self.model)
        self.specs = layer_specs(self.model, example_input) if example_input is not None else None
        self._handle = optimizer.register_step_post_hook(lambda *_: self._after_step())

    def _after_step(self) -> None:
        self.steps += 1
        if self.steps % self.every == 0:
            self.clip()

    def _conv_specs(self) -> dict[str, ConvSpec]:
        if self.specs is None:  # then no example input was given, and the recorder runs
            if not self._recorder.called:
                raise RuntimeError("PeriodicSVC needs conv input sizes: run a forward first or pass example_input")
            self.specs = self._recorder.specs()
        return {n: s for n, s in self.specs.items() if isinstance(s, ConvSpec) and n not in self.exclude}

    @torch.no_grad()
    def clip(self) -> None:
        """Clip every conv layer now (also called by the hook every ``every`` steps)."""
        modules = dict(self.model.named_modules())
        for name, spec in self._conv_specs().items():
            weight = modules[name].weight
            clipped = clip_layer(weight, spec, self.bound, self.iterations)
            if dist.is_available() and dist.is_initialized():
                dist.broadcast(clipped, src=0)
            weight.copy_(clipped)
            if self.report:
                self.last_norms[name] = layer_spectral_bound(weight, spec)
        self.clips += 1

    def remove(self) -> None:
        """Remove the step hook."""
        self._handle.remove()

    def state_dict(self) -> dict:
        return {"steps": self.steps, "clips": self.clips}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.clips = int(state["steps"]), int(state["clips"])
