"""Forward + backward of the output layer and its summed cross entropy, for the plain path and the chunked ones.

Prints, per d_model, one row per implementation: median ms of forward + backward (gradients of the hidden states
and of the weight, as training takes them), TFLOP/s of the three GEMMs' ``6 N V D`` FLOPs, peak memory above the
inputs (the returned gradients included, the same for every row), and the largest differences from the plain path
(loss relative; ``dh``, ``dW`` relative to their largest entry). Rows:

  reference         full logits, ``F.cross_entropy`` on their fp32 copy (what the model does without
                    ``fused_cross_entropy``)
  gemms             the three bf16 GEMMs alone at full N (logits, dh, dW), no cross entropy: the floor
  torch C=...       the chunked path with the elementwise chain in PyTorch (the reference ops, the CPU path)
  triton C=...      the chunked path with the Triton kernel, per chunk size; ``[BLOCK_V/warps]`` rows try other
                    tile shapes of the kernel at the default chunk

    python benchmarks/cross_entropy.py                       # H200: N=16384, V=100352, D in {2048, 4096}, bf16
    python benchmarks/cross_entropy.py --device cpu          # tiny smoke run (the Triton rows need CUDA)

Also prints the weight-gradient accumulation this torch uses (fp32-output GEMM or compute-dtype product + add).
Legend: N tokens, V vocabulary, D d_model, C tokens in a chunk.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import moe_layer  # noqa: E402  (its CUDA-event timer)
from foundry_dbrx.ops import cross_entropy_kernels as kernels  # noqa: E402
from foundry_dbrx.ops.cross_entropy import (DEFAULT_CHUNK_TOKENS, _linear_cross_entropy,  # noqa: E402
                                            linear_cross_entropy_reference)

TINY = dict(tokens=512, vocab=1000, d_models=[64], chunks=[128, 256])


def make_inputs(n, v, d, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(v, d, generator=gen) * d ** -0.5).to(device=device, dtype=dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=gen)
    t[::50] = -100  # a few ignored targets, as masked prompts or padding give
    return h, w, t.to(device)


def gemms_only(h, w, t):
    """Three GEMMs of the output layer's shapes; a loss whose gradient is the logits themselves."""
    class ThreeGemms(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, w):
            ctx.save_for_backward(h, w)
            ctx.logits = h @ w.t()
            return ctx.logits.new_zeros((), dtype=torch.float32)

        @staticmethod
        def backward(ctx, grad):
            h, w = ctx.saved_tensors
            logits, ctx.logits = ctx.logits, None
            return logits @ w, logits.t() @ h

    return ThreeGemms.apply(h, w)


def step_fn(fn, h, w, t):
    def step():
        loss = fn(h, w, t)
        dh, dw = torch.autograd.grad(loss, (h, w))
        return loss.detach(), dh, dw
    return step


def timed(step, device, warmup, iters):
    """Median ms of ``iters`` steps after ``warmup``, and peak bytes allocated above what was live before."""
    if device.type == 'cuda':
        base = torch.cuda.memory_allocated()
        ms, peak = moe_layer.timed(step, warmup, iters)
        return ms, peak - base
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), None


def differences(got, want):
    loss, dh, dw = (g.float() for g in got)
    rloss, rdh, rdw = (w.float() for w in want)
    return ((loss - rloss).abs() / rloss.abs()).item(), ((dh - rdh).abs().max() / rdh.abs().max()).item(), \
        ((dw - rdw).abs().max() / rdw.abs().max()).item()


def rows_for(device, chunks, tile_configs):
    # The PyTorch ops at the smallest chunk only: the fp32 copy makes a chunk 4x the memory of the kernel's.
    chunked = [(f'torch C={chunks[0]}', chunks[0], kernels.TorchCrossEntropyOps, None)]
    if device.type == 'cuda' and kernels.triton is not None:
        for c in chunks:
            chunked.append((f'triton C={c}', c, kernels.TritonCrossEntropyOps, None))
        default = DEFAULT_CHUNK_TOKENS if DEFAULT_CHUNK_TOKENS in chunks else chunks[-1]
        for block, warps in tile_configs:
            chunked.append((f'triton C={default} [{block}/{warps}]', default, kernels.TritonCrossEntropyOps,
                            dict(BLOCK_V=block, num_warps=warps)))
    return chunked


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--tokens', type=int, help='N (default 16384 on CUDA, 512 on CPU)')
    parser.add_argument('--vocab', type=int, help='V (default 100352 on CUDA, 1000 on CPU)')
    parser.add_argument('--d-models', help='comma-separated D (default 2048,4096 on CUDA, 64 on CPU)')
    parser.add_argument('--chunks', help='comma-separated C (default 2048,4096,8192,16384 on CUDA)')
    parser.add_argument('--tiles', default='2048/4,8192/8,8192/16',
                        help='extra BLOCK_V/num_warps of the kernel tried at the default chunk')
    parser.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float16', 'float32'])
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--iters', type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cpu = device.type == 'cpu'
    n = args.tokens or (TINY['tokens'] if cpu else 16384)
    v = args.vocab or (TINY['vocab'] if cpu else 100352)
    d_models = [int(x) for x in args.d_models.split(',')] if args.d_models else \
        (TINY['d_models'] if cpu else [2048, 4096])
    chunks = [int(x) for x in args.chunks.split(',')] if args.chunks else \
        (TINY['chunks'] if cpu else [2048, 4096, 8192, 16384])
    tiles = [tuple(int(p) for p in x.split('/')) for x in args.tiles.split(',') if x]
    dtype = getattr(torch, args.dtype)

    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'
    triton_version = getattr(kernels.triton, '__version__', 'not installed')
    dw_path = 'fp32-output GEMM (addmm out_dtype)' if kernels.fp32_out_gemm(device) else \
        'compute-dtype product + fp32 add'
    print(f'# {name}, torch {torch.__version__}, triton {triton_version}; N={n}, V={v}, {args.dtype}; '
          f'median of {args.iters} after {args.warmup}; dW accumulation: {dw_path}; default chunk '
          f'{DEFAULT_CHUNK_TOKENS}; kernel tiles {kernels.TRITON_CE_CONFIG}')
    if cpu:
        print('# CPU: timings are a smoke check only; the Triton rows need CUDA')
    for d in d_models:
        h, w, t = make_inputs(n, v, d, dtype, device)
        flops = 6 * n * v * d
        print(f'\n## D={d}\n| impl | ms | TFLOP/s | peak GB above inputs | loss rel diff | dh diff | dW diff |')
        print('|---|---|---|---|---|---|---|')
        want = step_fn(linear_cross_entropy_reference, h, w, t)()
        rows = [('reference', linear_cross_entropy_reference, None), ('gemms', gemms_only, None)]
        for label, c, ops, tile in rows_for(device, chunks, tiles):
            rows.append((label, (lambda c, ops: lambda h, w, t: _linear_cross_entropy(h, w, t, -100, c, None, ops))(
                c, ops), tile))
        for label, fn, tile in rows:
            saved = dict(kernels.TRITON_CE_CONFIG)
            kernels.TRITON_CE_CONFIG.update(tile or {})
            try:
                step = step_fn(fn, h, w, t)
                diffs = '| - | - | - |' if label == 'gemms' else '| {:.1e} | {:.1e} | {:.1e} |'.format(
                    *differences(step(), want))
                ms, peak = timed(step, device, args.warmup, args.iters)
            finally:
                kernels.TRITON_CE_CONFIG.clear()
                kernels.TRITON_CE_CONFIG.update(saved)
            peak_gb = '-' if peak is None else f'{peak / 1e9:.2f}'
            print(f'| {label} | {ms:.2f} | {flops / ms / 1e9:.1f} | {peak_gb} {diffs}', flush=True)
        del h, w, t, want
        if device.type == 'cuda':
            torch.cuda.empty_cache()


if __name__ == '__main__':
    main()
