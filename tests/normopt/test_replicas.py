"""What DDP replicas agree on: the wrapper found among a model's wrappers, and its process group
kept through copies (the two-process runs are in test_optim.py)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.distributed as dist
from helpers import small_cnn
from torch import nn

import normopt
from normopt.replicas import Replicas, first_rank_copies, replica_group


@pytest.fixture
def world(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "wrap",
    [
        lambda m: m,
        lambda m: nn.parallel.DistributedDataParallel(m),
        lambda m: torch.compile(nn.parallel.DistributedDataParallel(m)),
        lambda m: nn.parallel.DistributedDataParallel(torch.compile(m)),
    ],
    ids=["module", "ddp", "compiled-ddp", "ddp-of-compiled"],
)
def test_the_ddp_wrapper_is_found_among_the_wrappers(world, wrap):
    model = wrap(small_cnn())
    replicas = replica_group(model)
    if model.__class__ is nn.Sequential:
        assert replicas is None
    else:
        assert replicas.group is dist.group.WORLD


def test_a_copy_keeps_the_group_and_a_pickle_finds_the_default_one_again(world):
    replicas = Replicas(dist.group.WORLD)
    assert copy.deepcopy(replicas) is replicas
    assert pickle.loads(pickle.dumps(replicas)).group is dist.group.WORLD
    other = Replicas(object())  # any group but the default one: a pickle cannot name it
    assert pickle.loads(pickle.dumps(other)) is None


def test_a_wrapper_of_a_ddp_model_copies_and_pickles(world):
    model = nn.parallel.DistributedDataParallel(small_cnn(batchnorm=True))
    optimizer = normopt.NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, layers=("conv", "batchnorm"))
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    optimizer.step()
    for copied in (copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))):
        assert copied.norm_decay._replicas.group is dist.group.WORLD


def test_first_rank_copies_are_copies_in_each_tensors_dtype_and_shape(world):
    tensors = [torch.arange(6.0).view(2, 3), torch.ones(4, dtype=torch.float64)]
    copies = first_rank_copies(tensors, Replicas(dist.group.WORLD))
    for t, c in zip(tensors, copies):
        assert c.dtype == t.dtype and c.shape == t.shape and torch.equal(c, t)
        assert c.data_ptr() != t.data_ptr()


def test_first_rank_copies_of_mixed_dtypes_are_exact(world):
    """Laid end to end in the first tensor's dtype, a float32 tensor after a bfloat16 one was rounded."""
    tensors = [torch.tensor([1.0, 2.0], dtype=torch.bfloat16), torch.tensor([1.0001, 2.0003, 3.0007])]
    for t, c in zip(tensors, first_rank_copies(tensors, Replicas(dist.group.WORLD))):
        assert c.dtype == t.dtype and torch.equal(c, t)
