"""The sharded-gradient norm reduction, with torch.distributed on gloo (2 processes)."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from healthmon.numerics.gradients import global_norm, reduce_sharded_norms, tensor_norms

pytestmark = pytest.mark.slow


def _full_tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(10, 3, generator=g), torch.randn(7, generator=g), torch.randn(4, 4, generator=g)]


def _worker(rank: int, world: int, port: int, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # uneven shards along dim 0, as FSDP's flat-parameter padding or row sharding produce
        shards = [t.tensor_split(world, dim=0)[rank] for t in _full_tensors()]
        out[rank] = reduce_sharded_norms(tensor_norms(shards)).tolist()
    finally:
        dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_norms_equal_unsharded_norms() -> None:
    world = 2
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(world, _port(), out), nprocs=world, join=True)
    expected = tensor_norms(_full_tensors())
    for rank in range(world):
        got = torch.tensor(out[rank])
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
        torch.testing.assert_close(global_norm(got), global_norm(expected), rtol=1e-6, atol=0)


def test_without_a_process_group_it_is_the_identity() -> None:
    norms = tensor_norms(_full_tensors())
    torch.testing.assert_close(reduce_sharded_norms(norms), norms)
