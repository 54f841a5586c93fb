"""One rank of tests/test_optim.py's FSDP2 case: a two-layer model under ``fully_shard`` with its layers on two
different device meshes (as expert-parallel experts and dense layers are), trained 3 steps by Composer's
DecoupledAdamW and by ``decoupled_adamw_fused`` (fused and foreach) from the same weights and batches; every
parameter, gathered, must agree."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from composer.optim import DecoupledAdamW
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from foundry_dbrx.optim import DecoupledAdamWFused


def train(make_optimizer, dense_mesh, other_mesh) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    fully_shard(model[2], mesh=other_mesh)
    fully_shard(model, mesh=dense_mesh)
    meshes = {p.device_mesh for p in model.parameters()}
    assert all(isinstance(p, DTensor) for p in model.parameters()) and len(meshes) == 2, meshes
    opt = make_optimizer(model.parameters())
    gen = torch.Generator().manual_seed(1 + dist.get_rank())
    for step in range(3):
        x = torch.randn(4, 16, generator=gen)
        model(x).square().mean().backward()
        for group in opt.param_groups:
            group['lr'] = group['initial_lr'] * (1.0 - 0.3 * step)
        opt.step()
        opt.zero_grad()
    return [p.full_tensor() for p in model.parameters()]


def main(argv: list[str]) -> None:
    rank, world, out = int(argv[0]), int(argv[1]), Path(argv[2])
    dist.init_process_group('gloo', rank=rank, world_size=world)
    try:
        # Two 1-D meshes over the same ranks, cut from one 2-D mesh as parallelize.build_mesh cuts them.
        root = init_device_mesh('cpu', (1, world), mesh_dim_names=('ep', 'shard_mod_ep'))
        dense_mesh = root['ep', 'shard_mod_ep']._flatten('shard')
        other_mesh = root['shard_mod_ep']
        kwargs = dict(lr=1e-2, weight_decay=1e-3)
        reference = train(lambda ps: DecoupledAdamW(ps, **kwargs), dense_mesh, other_mesh)
        for implementation in ('fused', 'foreach'):
            ours = train(lambda ps: DecoupledAdamWFused(ps, implementation=implementation, **kwargs), dense_mesh,
                         other_mesh)
            for a, b in zip(ours, reference):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    finally:
        dist.destroy_process_group()
    (out / f'ok-{rank}').write_text('ok')


if __name__ == '__main__':
    main(sys.argv[1:])
