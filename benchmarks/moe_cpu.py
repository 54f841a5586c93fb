"""CPU: our `eager` MoE backend against LLM Foundry's `torch_dmoe` (a per-expert loop with host syncs).

Both layers get the same weights and the same input; the script checks they agree, then times forward+backward
(median of --iters after --warmup) at the tiny YAML's FFN shape and any extra shapes given.

    .venv/bin/python benchmarks/moe_cpu.py                 # tiny shape: d 64, f 128, E 16, k 4, 1024 tokens
    .venv/bin/python benchmarks/moe_cpu.py --shape 256,512,16,4,4096
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from llmfoundry.models.layers.dmoe import dMoE

from foundry_dbrx.config import DbrxFFNConfig
from foundry_dbrx.moe import DbrxFFN


def build_pair(d: int, f: int, e: int, k: int):
    torch.manual_seed(0)
    ours = DbrxFFN(d, DbrxFFNConfig(ffn_hidden_size=f, moe_num_experts=e, moe_top_k=k), backend='eager')
    theirs = dMoE(device='cpu', hidden_size=d, ffn_hidden_size=f, moe_num_experts=e, moe_top_k=k, mlp_type='glu',
                  activation_fn=torch.nn.functional.silu, moe_normalize_expert_weights=1, bias=False)
    with torch.no_grad():
        theirs.router.layer.weight.copy_(ours.router.layer.weight)
        theirs.experts.mlp.w1.copy_(ours.experts.mlp.w1)
        theirs.experts.mlp.v1.copy_(ours.experts.mlp.v1)
        theirs.experts.mlp.w2.copy_(ours.experts.mlp.w2)
    return ours, theirs


def time_fwd_bwd(fn, x, iters: int, warmup: int) -> float:
    times = []
    for i in range(warmup + iters):
        x.grad = None
        start = time.perf_counter()
        fn(x).sum().backward()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--shape', action='append', default=[],
                        help='d,f,E,k,tokens (repeatable); the tiny YAML shape always runs first')
    parser.add_argument('--iters', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=3)
    args = parser.parse_args()
    shapes = [(64, 128, 16, 4, 1024)] + [tuple(int(v) for v in s.split(',')) for s in args.shape]
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.iters}')
    print(f'{"d":>5} {"f":>5} {"E":>3} {"k":>2} {"tokens":>6} | {"eager ms":>9} {"torch_dmoe ms":>13} | ratio | max|diff|')
    for d, f, e, k, t in shapes:
        ours, theirs = build_pair(d, f, e, k)
        x = torch.randn(t, d, requires_grad=True)
        diff = (ours(x)[0] - theirs(x.view(1, t, d)).view(t, d)).abs().max().item()
        ours_ms = 1e3 * time_fwd_bwd(lambda inp: ours(inp)[0], x, args.iters, args.warmup)
        theirs_ms = 1e3 * time_fwd_bwd(lambda inp: theirs(inp.view(1, t, d)), x, args.iters, args.warmup)
        print(f'{d:>5} {f:>5} {e:>3} {k:>2} {t:>6} | {ours_ms:>9.2f} {theirs_ms:>13.2f} | '
              f'{theirs_ms / ours_ms:>4.2f}x | {diff:.2e}')


if __name__ == '__main__':
    main()
