"""One rank of the low-precision-experts FSDP test: ``python -m tests.fsdp_dtype_worker RANK WORLD OUT_DIR``.

``mpt_dbrx_moe`` with ``ffn_config.bf16: true`` holds fp32 and bf16 parameters in each MPTBlock; FSDP keeps one
dtype per unit. Each rank trains one step under FSDP2, through Composer's own ``parallelize_composer_model`` (the
path of ``FSDP_VERSION=2``), and under FSDP1 with Composer's wrap rule (a module's ``_fsdp_wrap`` first, else the
model's ``fsdp_wrap_fn``; Composer's FSDP1 entry itself needs CUDA). Writes ``OUT_DIR/ok-<rank>`` when both pass.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist


def _step(model, opt, low_precision_bf16: bool) -> None:
    from tests.test_mpt_low_precision_experts import _batch

    batch = _batch(seed=1 + dist.get_rank())
    model.train()
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=low_precision_bf16):
        loss = model.loss(model(batch), batch)['total']
    experts = [p for layer in model._moe_layers for p in layer.ffn.experts.mlp.parameters()]
    before = [p.detach().clone() for p in experts]
    loss.backward()
    opt.step()
    assert torch.isfinite(loss), loss
    # Under FSDP1 a rank's share of a flat parameter can leave some of them empty; together they must train.
    assert {p.dtype for p in experts} == {torch.bfloat16}
    assert {p.grad.dtype for p in experts if p.grad is not None} == {torch.bfloat16}
    assert any(not torch.equal(p.detach(), b) for p, b in zip(experts, before)), 'the bf16 experts did not train'
    assert {s.dtype for p in experts for k, s in opt.state[p].items() if k != 'step'} == {torch.bfloat16}


def main(rank: int, world: int, out: Path) -> None:
    dist.init_process_group('gloo', rank=rank, world_size=world)
    from composer.core import Precision
    from composer.distributed.prepare_distributed import parallelize_composer_model
    from composer.utils.parallelism import FSDP2Config
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
    from torch.distributed.fsdp.wrap import CustomPolicy

    from tests.test_mpt_low_precision_experts import _mpt

    model = _mpt(bf16=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    parallelize_composer_model(model, opt, FSDP2Config(mixed_precision='PURE'), precision=Precision.FP32)
    _step(model, opt, low_precision_bf16=False)

    model = _mpt(bf16=True)
    hf = model.model
    policy = CustomPolicy(lambda m: bool(m._fsdp_wrap) if hasattr(m, '_fsdp_wrap') else hf.fsdp_wrap_fn(m))
    model.model = FullyShardedDataParallel(hf, auto_wrap_policy=policy, device_id=torch.device('cpu'),
                                           use_orig_params=True, mixed_precision=MixedPrecision(*[torch.bfloat16] * 3))
    _step(model, torch.optim.AdamW(model.parameters(), lr=1e-2), low_precision_bf16=True)
    dist.destroy_process_group()
    (out / f'ok-{rank}').write_text('ok')


if __name__ == '__main__':
    main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
