from __future__ import annotations

import pytest
import torch

from benchmarks import svc
from normopt.svc import clip_singular_values, conv_singular_values


def _results(weights, size: int, bound: float) -> dict[str, list]:
    return {
        f"{kind} {method}": [
            conv_singular_values(w, size, method=method) if kind == "sv" else clip_singular_values(w, size, bound, method=method)
            for w in weights
        ]
        for kind in ("sv", "clip")
        for method in ("gram", "svd")
    }


@pytest.mark.parametrize(("shape", "size"), [((4, 3, 3, 3), 6), ((6, 6, 3, 3), 5), ((2, 5, 1, 1), 4), ((3, 2, 5), 7)])
def test_the_two_methods_agree_within_the_gram_paths_stated_error(shape, size):
    """The Gram path's documented error is about sqrt(eps) of the largest value (3e-4 in single)."""
    torch.manual_seed(0)
    apart = svc.disagreement(_results([torch.randn(shape), torch.randn(shape)], size, 0.5))
    assert set(apart) == {"sv", "clip"}
    assert apart["sv"] < 3e-4 and apart["clip"] < 3e-4


def test_a_result_that_is_not_the_same_computation_shows():
    """A benchmark that times a faster path must also say when it computed something else."""
    torch.manual_seed(0)
    weights = [torch.randn(4, 3, 3, 3), torch.randn(4, 3, 3, 3)]
    results = _results(weights, 6, 0.5)
    results["clip gram"][1] = weights[1]  # not clipped: its largest value is above 0.5
    results["sv gram"][0] = results["sv gram"][0] * 1.01
    apart = svc.disagreement(results)
    assert apart["sv"] == pytest.approx(0.01, rel=1e-3)
    assert apart["clip"] > 0.01


def test_the_singular_values_are_compared_whatever_their_order():
    values = torch.rand(20).double().numpy()
    kernel = torch.randn(2, 2, 3)
    apart = svc.disagreement({"sv gram": [values], "sv svd": [values[::-1]], "clip gram": [kernel], "clip svd": [kernel]})
    assert apart == {"sv": 0.0, "clip": 0.0}
