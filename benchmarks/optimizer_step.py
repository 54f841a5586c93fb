"""Milliseconds per optimizer step: Composer's ``DecoupledAdamW`` against ``decoupled_adamw_fused``.

Parameters of realistic shapes (a DBRX-like mix per block: attention Wqkv and out_proj, the router, fused expert
weights split into ``--tensors`` tensors in all, plus norms), about ``--params-billion`` x 1e9 elements in total,
fp32 unless ``--dtype`` says otherwise, with fixed random gradients. Every optimizer gets the same parameters and
gradients, runs ``--warmup`` steps, then ``--steps`` timed steps (synchronised on CUDA); the median step is
printed, and, for ours, the largest difference from Composer's parameters after the same steps.

    python benchmarks/optimizer_step.py --params-billion 3.3 --device cuda      # on an H200
    python benchmarks/optimizer_step.py --params-billion 0.001 --device cpu     # a quick look anywhere
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from composer.optim import DecoupledAdamW  # noqa: E402

from foundry_dbrx.optim import DecoupledAdamWFused  # noqa: E402

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def shapes(total: float, n_tensors: int) -> list[tuple[int, ...]]:
    """``n_tensors`` shapes summing to about ``total`` elements: per block of 5 tensors, a [3D, D] qkv, a [D, D]
    out_proj, a [16, D] router, a [2*E*F, D] expert weight (F = 3.5 D, E = 16) and a [D] norm weight."""
    blocks = max(1, n_tensors // 5)
    per_block = total / blocks
    # 3D^2 + D^2 + 16D + 112D^2 + D = per_block  ->  D from the quadratic term (the others are small)
    d = max(8, int((per_block / 116) ** 0.5) // 8 * 8)
    block = [(3 * d, d), (d, d), (16, d), (2 * 16 * (7 * d // 2), d), (d,)]
    return (block * blocks)[:max(n_tensors, 1)]


def run(make, params0, grads, warmup: int, steps: int, device: torch.device) -> tuple[float, list[torch.Tensor]]:
    params = [torch.nn.Parameter(p.clone()) for p in params0]
    for p, g in zip(params, grads):
        p.grad = g
    opt = make(params)
    times = []
    for i in range(warmup + steps):
        for group in opt.param_groups:  # a schedule, as Composer's schedulers write it
            group['lr'] = group['initial_lr'] * (1.0 - 0.5 * i / (warmup + steps))
        if device.type == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.step()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), params


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--params-billion', type=float, default=0.001)
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--dtype', choices=sorted(DTYPES), default='fp32')
    ap.add_argument('--tensors', type=int, default=100)
    ap.add_argument('--warmup', type=int, default=3)
    ap.add_argument('--steps', type=int, default=10)
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    gen = torch.Generator(device=device).manual_seed(0)
    sizes = shapes(args.params_billion * 1e9, args.tensors)
    params0 = [torch.randn(s, generator=gen, device=device, dtype=dtype) * 0.02 for s in sizes]
    grads = [torch.randn(s, generator=gen, device=device, dtype=dtype) * 1e-3 for s in sizes]
    n = sum(p.numel() for p in params0)
    print(f'{len(sizes)} tensors, {n / 1e9:.4f} B parameters, {args.dtype} on {device} '
          f'(torch {torch.__version__}), median of {args.steps} steps after {args.warmup}')
    kwargs = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-5)
    rows = [('composer decoupled_adamw', lambda ps: DecoupledAdamW(ps, **kwargs))]
    rows += [(f'decoupled_adamw_fused ({impl})', lambda ps, impl=impl: DecoupledAdamWFused(
        ps, implementation=impl, **kwargs)) for impl in ('auto', 'foreach')]
    reference = None
    for name, make in rows:
        ms, params = run(make, params0, grads, args.warmup, args.steps, device)
        if reference is None:  # kept on the host: at 5B parameters the device holds one run's state at a time
            reference, diff = [p.detach().cpu() for p in params], ''
        else:
            worst = max((a.detach().cpu().float() - b.float()).abs().max().item() for a, b in zip(params, reference))
            diff = f'   max |param - composer| {worst:.2e}'
        print(f'{name:<36} {ms:10.3f} ms/step   {n / ms / 1e6:8.3f} G params/s{diff}')
        del params


if __name__ == '__main__':
    main()
