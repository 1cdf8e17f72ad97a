"""Shared test helpers: the explicit-matrix oracle and a tolerance-aware comparison."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

# Relative tolerance of an exact norm against the oracle, by weight dtype. Low-precision weights
# are exact in float64; the library accumulates them in float32.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def assert_close(actual, expected, rtol: float = 1e-5, atol: float = 1e-8, msg: str = "") -> None:
    """Compare tensors or numbers as float64, with a message that shows both."""
    actual = torch.as_tensor(actual, dtype=torch.float64).cpu()
    expected = torch.as_tensor(expected, dtype=torch.float64).cpu()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{msg}\n{m}")


def explicit_matrix(module: nn.Module, input_shape: tuple[int, ...], weight: torch.Tensor | None = None) -> torch.Tensor:
    """The matrix of ``module``'s linear part on one sample of shape ``(channels, *spatial)``.

    Built by brute force from the real module: a float64 copy in eval mode maps every basis
    vector, and the image of zero is subtracted to remove biases and batch-norm shifts. Rows are
    the output in PyTorch's ``(channels, *spatial)`` order, columns the input in the same order.
    With ``weight`` (float64), the matrix is computed from it with ``functional_call`` and is
    differentiable in it.
    """
    module = copy.deepcopy(module).to(torch.float64).eval()
    size = math.prod(input_shape)
    basis = torch.eye(size, dtype=torch.float64).reshape(size, *input_shape)
    with torch.set_grad_enabled(weight is not None):
        params = {} if weight is None else {"weight": weight}
        run = lambda x: torch.func.functional_call(module, params, (x,))
        images = run(basis) - run(torch.zeros_like(basis[:1]))
    return images.reshape(size, -1).T


def brute_norms(matrix: torch.Tensor) -> dict:
    """l1, l_inf and l2 operator norms of an explicit matrix, with arg-max column and row sums."""
    column_sums = matrix.abs().sum(0)
    row_sums = matrix.abs().sum(1)
    return {
        1: column_sums.max(),
        math.inf: row_sums.max(),
        2: torch.linalg.matrix_norm(matrix, 2),
        "column_sums": column_sums,
        "row_sums": row_sums,
    }
