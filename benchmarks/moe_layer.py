"""Forward + backward of one DBRX MoE FFN layer in bf16, for every expert implementation, in one run.

Prints TFLOP/s (``18 * T * K * D * F`` FLOPs: nine GEMMs of ``2 * T*K * D * F``; the router is not counted) and
peak GPU memory of a training step (gradients set to None before each step, so they are allocated inside it),
for: our backends through ``DbrxFFN`` (router included), MegaBlocks' ``dMoE`` used directly, LLM Foundry's
``torch_dmoe``, and the nine dense GEMMs of the same shapes (the ceiling). Every implementation gets the same
inputs and the same router weights, so the same routing. Median of ``--iters`` after ``--warmup``.

    python benchmarks/moe_layer.py                      # DBRX at 8192 tokens, token sweep, skewed routing
    python benchmarks/moe_layer.py --cases dbrx --only grouped_mm,mb_dmoe,dense
    python benchmarks/moe_layer.py --cases gateup       # is fusing gate and up into one GEMM worth a weight copy?

Writes ``moe_layer.md`` and ``moe_layer.json`` to ``--out`` (default ``$OUT``, else the working directory).
Legend: T tokens, D d_model, F ffn_hidden_size, E experts, K top_k, N = T*K routed slots.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from functools import partial

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from foundry_dbrx.config import DbrxFFNConfig  # noqa: E402
from foundry_dbrx.moe import BACKENDS, DbrxFFN  # noqa: E402

IMPLS = ('dense', 'grouped_mm', 'megablocks', 'grouped_mm_triton', 'mb_dmoe', 'torch_dmoe', 'eager')
SLOW = ('torch_dmoe', 'eager')  # run at --slow-tokens with --slow-iters only, in the dbrx case


# --- inputs: the same tokens and router for everyone ------------------------------------------------------------

def make_inputs(t, d, e, k, hot_fraction, seed=0):
    """x_TD, dy_TD and router weight_ED. With ``hot_fraction`` > 0, expert 0 gets that share of the T*K routed
    slots (at most 1/K: it can be in every token's top-k, not more), the rest routed at random."""
    gen = torch.Generator(device='cuda').manual_seed(seed)
    x_TD = torch.randn(t, d, device='cuda', generator=gen)
    router_ED = torch.randn(e, d, device='cuda', generator=gen) * d ** -0.5
    n_hot = 0
    if hot_fraction > 0:
        n_hot = min(t, round(hot_fraction * t * k))
        m_D = torch.randn(d, device='cuda', generator=gen)
        m_D /= m_D.norm()
        x_TD -= (x_TD @ m_D)[:, None] * m_D  # no token leans towards expert 0 ...
        x_TD[:n_hot] += 4.0 * m_D  # ... except the hot ones, strongly
        router_ED[0] += 4.0 * m_D
    dy_TD = torch.randn(t, d, device='cuda', generator=gen)
    return x_TD.bfloat16(), dy_TD.bfloat16(), router_ED.bfloat16(), n_hot


def expert_weights(d, f, e, seed=1):
    gen = torch.Generator(device='cuda').manual_seed(seed)
    return [(torch.randn(e * f, d, device='cuda', generator=gen) * 0.02).bfloat16() for _ in range(3)]


# --- implementations: each returns (module, step) where step() runs forward + backward once -------------------

def _wire(module, router, mlp, x_TD, dy_TD, router_ED, ws, forward):
    """Loads the shared router and expert weights into ``module``; returns its training step."""
    with torch.no_grad():
        router.weight.copy_(router_ED)
        for p, w in zip((mlp.w1, mlp.v1, mlp.w2), ws):
            p.copy_(w)
    x = x_TD.detach().clone().requires_grad_()

    def step():
        for p in module.parameters():
            p.grad = None
        x.grad = None
        forward(x).backward(dy_TD)

    return module, step


def build_ours(backend, x_TD, dy_TD, router_ED, ws, d, f, e, k):
    cfg = DbrxFFNConfig(ffn_hidden_size=f, moe_num_experts=e, moe_top_k=k, moe_normalize_expert_weights=1.0,
                        moe_loss_weight=0.0)
    ffn = DbrxFFN(d, cfg, backend=backend, device='meta').to_empty(device='cuda').to(torch.bfloat16)
    return _wire(ffn, ffn.router.layer, ffn.experts.mlp, x_TD, dy_TD, router_ED, ws, lambda x: ffn(x)[0])


def build_mb_dmoe(x_TD, dy_TD, router_ED, ws, d, f, e, k):
    from megablocks.layers.arguments import Arguments
    from megablocks.layers.dmoe import dMoE
    # moe_loss_weight 0: MegaBlocks then keeps no load-balancing statistics in its module-level list.
    args = Arguments(hidden_size=d, ffn_hidden_size=f, moe_num_experts=e, moe_top_k=k, mlp_type='glu',
                     mlp_impl='grouped', activation_fn=F.silu, bias=False, return_bias=False, bf16=True, fp16=False,
                     moe_normalize_expert_weights=1, moe_loss_weight=0.0, device=torch.cuda.current_device(),
                     init_method=partial(torch.nn.init.normal_, std=0.02))
    moe = dMoE(args)
    return _wire(moe, moe.router.layer, moe.experts.mlp, x_TD, dy_TD, router_ED, ws, moe)


def build_torch_dmoe(x_TD, dy_TD, router_ED, ws, d, f, e, k):
    from llmfoundry.models.layers.dmoe import dMoE
    with torch.device('meta'):
        moe = dMoE(device=None, hidden_size=d, ffn_hidden_size=f, moe_num_experts=e, moe_top_k=k, mlp_type='glu',
                   activation_fn=F.silu, moe_normalize_expert_weights=1, bias=False)
    moe = moe.to_empty(device='cuda').to(torch.bfloat16)
    return _wire(moe, moe.router.layer, moe.experts.mlp, x_TD, dy_TD, router_ED, ws, moe)


def build_dense(t, d, f, k):
    """The nine GEMMs of a dense GLU fwd+bwd over N = T*K rows, into preallocated outputs: the ceiling."""
    n = t * k
    gen = torch.Generator(device='cuda').manual_seed(2)
    r = lambda *s: torch.randn(*s, device='cuda', generator=gen, dtype=torch.bfloat16)  # noqa: E731
    x, dy, h, dg, du = r(n, d), r(n, d), r(n, f), r(n, f), r(n, f)
    w1, v1, w2 = r(f, d), r(f, d), r(f, d)
    o_nf, o_nd, o_fd = r(n, f), r(n, d), r(f, d)
    gemms = [(x, w1.t(), o_nf), (x, v1.t(), o_nf), (h, w2, o_nd),  # forward
             (dy, w2.t(), o_nf), (h.t(), dy, o_fd),  # down-projection backward
             (dg, w1, o_nd), (du, v1, o_nd), (dg.t(), x, o_fd), (du.t(), x, o_fd)]  # gate/up backward

    def step():
        for a, b, o in gemms:
            torch.mm(a, b, out=o)

    return gemms, step


def timed(step, warmup, iters):
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events), torch.cuda.max_memory_allocated()


def burn_in(seconds, t, d, f, k):
    if seconds <= 0:
        return
    gemms, step = build_dense(t, d, f, k)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        torch.cuda.synchronize()
    del gemms, step
    torch.cuda.empty_cache()


def merge_rounds(rounds):
    """One row from the rounds of one measurement: the median time, and the TFLOP/s range over rounds."""
    ok = [r for r in rounds if 'error' not in r]
    if not ok:
        return rounds[0]
    row = dict(ok[0])
    row['ms'] = statistics.median(r['ms'] for r in ok)
    row['tflops'] = ok[0]['tflops'] * ok[0]['ms'] / row['ms']  # same FLOPs each round
    row['tflops_range'] = (min(r['tflops'] for r in ok), max(r['tflops'] for r in ok))
    row['peak_gib'] = max(r['peak_gib'] for r in ok)
    return row


def measure(impl, case, t, d, f, e, k, hot_fraction, warmup, iters):
    x_TD, dy_TD, router_ED, n_hot = make_inputs(t, d, e, k, hot_fraction)
    row = dict(case=case, impl=impl, tokens=t, d=d, f=f, experts=e, top_k=k, hot_tokens=n_hot)
    held = step = None
    try:
        if impl == 'dense':
            held, step = build_dense(t, d, f, k)
        else:
            ws = expert_weights(d, f, e)
            if impl == 'mb_dmoe':
                held, step = build_mb_dmoe(x_TD, dy_TD, router_ED, ws, d, f, e, k)
            elif impl == 'torch_dmoe':
                held, step = build_torch_dmoe(x_TD, dy_TD, router_ED, ws, d, f, e, k)
            else:
                reason = BACKENDS[impl].available(torch.device('cuda'))
                if reason:
                    raise RuntimeError(f'not available: {reason}')
                held, step = build_ours(impl, x_TD, dy_TD, router_ED, ws, d, f, e, k)
            del ws
        ms, peak = timed(step, warmup, iters)
        row.update(ms=ms, tflops=18 * t * k * d * f / ms / 1e9, peak_gib=peak / 2 ** 30)
    except Exception as exc:  # one broken implementation must not hide the others' numbers
        row.update(error=f'{type(exc).__name__}: {exc}'.splitlines()[0][:160])
        traceback.print_exc()
    finally:
        del held, step
        gc.collect()
        torch.cuda.empty_cache()
    return row


def gateup(t, d, f, e, k, warmup, iters):
    """Gate+up as two grouped GEMMs, as one on [w1|v1] concatenated per expert each step, and as one on weights
    stored concatenated (what a fused parameter layout would give, not HF's)."""
    from foundry_dbrx.moe.dispatch import plan_routing
    gen = torch.Generator(device='cuda').manual_seed(3)
    n = t * k
    x_ND = torch.randn(n, d, device='cuda', generator=gen, dtype=torch.bfloat16)
    experts_TK = torch.rand(t, e, device='cuda', generator=gen).topk(k, dim=1).indices
    offs_E = plan_routing(experts_TK, e).offs_E
    w1, v1 = (torch.randn(e, f, d, device='cuda', generator=gen, dtype=torch.bfloat16) for _ in range(2))
    w1v1 = torch.cat([w1, v1], dim=1)
    variants = {
        'two GEMMs (x@w1_e.T, x@v1_e.T)': lambda: (torch._grouped_mm(x_ND, w1.transpose(1, 2), offs=offs_E),
                                                   torch._grouped_mm(x_ND, v1.transpose(1, 2), offs=offs_E)),
        'cat [w1|v1] per step + one GEMM': lambda: torch._grouped_mm(
            x_ND, torch.cat([w1, v1], dim=1).transpose(1, 2), offs=offs_E),
        'cat alone': lambda: torch.cat([w1, v1], dim=1),
        'one GEMM on pre-concatenated [w1|v1]': lambda: torch._grouped_mm(x_ND, w1v1.transpose(1, 2), offs=offs_E),
    }
    rows = []
    for name, fn in variants.items():
        ms, peak = timed(fn, warmup, iters)
        flops = 0 if name == 'cat alone' else 4 * n * d * f
        rows.append(dict(case='gateup', impl=name, tokens=t, ms=ms, tflops=flops / ms / 1e9 if flops else None,
                         peak_gib=peak / 2 ** 30))
        print(f'gateup  {name:40s} {ms:8.3f} ms' + (f'  {flops / ms / 1e9:6.1f} TFLOP/s' if flops else ''))
    return rows


def gemm_study(t, d, f, e, k, warmup, iters):
    """Each grouped-GEMM shape of a step, in the operand layouts torch._grouped_mm accepts, against the same
    GEMMs as a per-expert cuBLAS loop (sizes read on the host, as MegaBlocks does): which layouts run fastest?"""
    gen = torch.Generator(device='cuda').manual_seed(4)
    n = t * k
    r = lambda *s: torch.randn(*s, device='cuda', generator=gen, dtype=torch.bfloat16)  # noqa: E731
    # Equal groups of a multiple of 8 rows: layouts whose ragged dimension is the contiguous one need every group
    # boundary 16-byte aligned (torch asserts it on the device), which real routing does not give without padding.
    bounds = [i * n // e // 8 * 8 for i in range(e)] + [n]
    offs = torch.tensor(bounds[1:], dtype=torch.int32, device='cuda')
    x_ND, h_NF, w_EFD = r(n, d), r(n, f), r(e, f, d)
    xT_DN, hT_FN = x_ND.t().contiguous(), h_NF.t().contiguous()
    gmm = torch._grouped_mm

    def loop(kind):
        def fn():
            for i in range(e):
                s0, s1 = bounds[i], bounds[i + 1]
                if kind == 'up':
                    torch.mm(x_ND[s0:s1], w_EFD[i].t())
                elif kind == 'down':
                    torch.mm(h_NF[s0:s1], w_EFD[i])
                else:
                    torch.mm(h_NF[s0:s1].t(), x_ND[s0:s1])
        return fn

    variants = {
        'up   x@w.T     A row, B col (ours: gate, up, dhw)': lambda: gmm(x_ND, w_EFD.transpose(1, 2), offs=offs),
        'up   x@w.T     A col, B col': lambda: gmm(xT_DN.t(), w_EFD.transpose(1, 2), offs=offs),
        'up   3d x 2d   w @ x.T -> [F, N], B row': lambda: gmm(w_EFD, xT_DN, offs=offs),
        'up   3d x 2d   w @ x.T -> [F, N], B col': lambda: gmm(w_EFD, x_ND.t(), offs=offs),
        'up   cuBLAS loop': loop('up'),
        'down h@w       A row, B row (ours: down, dx)': lambda: gmm(h_NF, w_EFD, offs=offs),
        'down h@w       A col, B row': lambda: gmm(hT_FN.t(), w_EFD, offs=offs),
        'down 3d x 2d   w.T @ h.T -> [D, N], B row': lambda: gmm(w_EFD.transpose(1, 2), hT_FN, offs=offs),
        'down 3d x 2d   w.T @ h.T -> [D, N], B col': lambda: gmm(w_EFD.transpose(1, 2), h_NF.t(), offs=offs),
        'down cuBLAS loop': loop('down'),
        'wgrad h.T@x    A col, B row (ours: dW1, dV1, dW2)': lambda: gmm(h_NF.t(), x_ND, offs=offs),
        'wgrad h.T@x    A row, B row': lambda: gmm(hT_FN, x_ND, offs=offs),
        'wgrad h.T@x    A col, B col': lambda: gmm(h_NF.t(), xT_DN.t(), offs=offs),
        'wgrad h.T@x    A row, B col': lambda: gmm(hT_FN, xT_DN.t(), offs=offs),
        'wgrad cuBLAS loop': loop('wgrad'),
    }
    rows = []
    for name, fn in variants.items():
        ms, peak = timed(fn, warmup, iters)
        tf = 2 * n * d * f / ms / 1e9
        rows.append(dict(case='gemms', impl=name, tokens=t, ms=ms, tflops=tf, peak_gib=peak / 2 ** 30))
        print(f'gemms  {name:55s} {ms:7.3f} ms {tf:6.1f} TFLOP/s', flush=True)
    return rows


TRITON_CONFIGS = {
    '128x256x64 w8 s3': dict(BM=128, BN=256, BK=64, num_warps=8, num_stages=3),
    '128x256x64 w8 s4': dict(BM=128, BN=256, BK=64, num_warps=8, num_stages=4),
    '256x128x64 w8 s3': dict(BM=256, BN=128, BK=64, num_warps=8, num_stages=3),
    '128x128x64 w4 s4': dict(BM=128, BN=128, BK=64, num_warps=4, num_stages=4),
}


def triton_gemm_study(t, d, f, e, k, warmup, iters):
    """The Triton grouped GEMM against torch._grouped_mm, per GEMM form of a step, on real (unaligned) routing."""
    from foundry_dbrx.moe.dispatch import plan_routing
    from foundry_dbrx.moe.kernels import triton_gmm
    gen = torch.Generator(device='cuda').manual_seed(5)
    n = t * k
    r = lambda *s: torch.randn(*s, device='cuda', generator=gen, dtype=torch.bfloat16)  # noqa: E731
    experts_TK = torch.rand(t, e, device='cuda', generator=gen).topk(k, dim=1).indices
    offs = plan_routing(experts_TK, e).offs_E
    x_ND, h_NF, w_EFD = r(n, d), r(n, f), r(e, f, d)
    forms = {'up x@w.T': (x_ND, w_EFD.transpose(1, 2)), 'down h@w': (h_NF, w_EFD), 'wgrad h.T@x': (h_NF.t(), x_ND)}
    rows = []
    for form, (a, b) in forms.items():
        want = torch._grouped_mm(a, b, offs=offs)
        candidates = {'torch._grouped_mm': lambda: torch._grouped_mm(a, b, offs=offs)}
        for cname, cfg in TRITON_CONFIGS.items():
            candidates[f'triton {cname}'] = partial(triton_gmm, a, b, offs, cfg)
        for name, fn in candidates.items():
            try:
                err = (fn().float() - want.float()).abs().max().item()
                ms, peak = timed(fn, warmup, iters)
            except Exception as exc:
                print(f'triton_gemm {form:12s} {name:28s} error: {exc}'.splitlines()[0][:200], flush=True)
                continue
            tf = 2 * n * d * f / ms / 1e9
            rows.append(dict(case='triton_gemm', impl=f'{form}: {name}', tokens=t, ms=ms, tflops=tf,
                             peak_gib=peak / 2 ** 30, max_abs_diff=err))
            print(f'triton_gemm {form:12s} {name:28s} {ms:7.3f} ms {tf:6.1f} TFLOP/s  max|diff| {err:.3g}',
                  flush=True)
    return rows


def _tflops_cell(r):
    tf, rng = r.get('tflops'), r.get('tflops_range')
    if not tf:
        return ''
    return f'{tf:.1f} [{rng[0]:.0f}-{rng[1]:.0f}]' if rng and len(set(map(round, rng))) > 1 else f'{tf:.1f}'


def table(rows):
    """Markdown table; ratios against MegaBlocks' dMoE and the dense ceiling of the same case and token count."""
    lines = ['| case | impl | tokens | hot tokens | ms | TFLOP/s | peak GiB | vs mb_dmoe | vs dense |',
             '|---|---|---|---|---|---|---|---|---|']
    ref = {(r['case'], r['tokens'], r['impl']): r['tflops'] for r in rows
           if r.get('tflops') and r['impl'] in ('mb_dmoe', 'dense')}
    for r in rows:
        if 'error' in r:
            lines.append(f"| {r['case']} | {r['impl']} | {r['tokens']} | | | error: {r['error']} | | | |")
            continue
        tf = r.get('tflops')
        mb, dense = ref.get((r['case'], r['tokens'], 'mb_dmoe')), ref.get((r['case'], r['tokens'], 'dense'))
        cells = [r['case'], r['impl'], r['tokens'], r.get('hot_tokens', ''), f"{r['ms']:.2f}",
                 _tflops_cell(r), f"{r['peak_gib']:.2f}", f'{tf / mb:.3f}x' if tf and mb else '',
                 f'{tf / dense:.1%}' if tf and dense else '']
        lines.append('| ' + ' | '.join(map(str, cells)) + ' |')
    return '\n'.join(lines)


def profile(impl, t, d, f, e, k, out_dir):
    """Kernel-level CUDA times of two steps (after warm-up), to see where a step's time goes."""
    x_TD, dy_TD, router_ED, _ = make_inputs(t, d, e, k, 0.0)
    ws = expert_weights(d, f, e)
    builders = {'mb_dmoe': build_mb_dmoe, 'torch_dmoe': build_torch_dmoe}
    build = builders.get(impl, partial(build_ours, impl))
    held, step = build(x_TD, dy_TD, router_ED, ws, d, f, e, k)
    del ws
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    text = prof.key_averages().table(sort_by='cuda_time_total', row_limit=30, max_name_column_width=90)
    with open(os.path.join(out_dir, f'profile_{impl}.txt'), 'w') as fh:
        fh.write(text)
    print(f'== profile {impl} (2 steps)\n{text}', flush=True)
    del held, step
    gc.collect()
    torch.cuda.empty_cache()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--cases', default='dbrx,sweep,skew', help='comma list of: dbrx, sweep, skew, gateup, gemms, triton_gemm')
    p.add_argument('--only', default=','.join(IMPLS), help=f'comma list of: {", ".join(IMPLS)}')
    p.add_argument('--tokens', type=int, default=8192, help='tokens of the dbrx and skew cases')
    p.add_argument('--sweep', default='2048,4096,8192,16384,32768', help='token counts of the sweep')
    p.add_argument('--d', type=int, default=6144)
    p.add_argument('--f', type=int, default=10752)
    p.add_argument('--experts', type=int, default=16)
    p.add_argument('--top-k', type=int, default=4)
    p.add_argument('--hot-fraction', type=float, default=1 / 3,
                   help="skew case: expert 0's share of the routed slots (capped at 1/top_k)")
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--iters', type=int, default=10)
    p.add_argument('--slow-tokens', type=int, default=8192, help='tokens for torch_dmoe and eager')
    p.add_argument('--slow-iters', type=int, default=3)
    p.add_argument('--out', default=os.environ.get('OUT', '.'))
    p.add_argument('--rounds', type=int, default=2, help='times to run the plan, alternating its order')
    p.add_argument('--burn-seconds', type=float, default=10.0,
                   help='dense GEMMs first, so that clocks and temperature are at their steady state')
    p.add_argument('--profile', default='', help='comma list of implementations to profile at the dbrx shape')
    args = p.parse_args(argv)
    cases, only = args.cases.split(','), args.only.split(',')
    for name in only:
        if name not in IMPLS:
            p.error(f'--only: unknown implementation {name!r}; known: {IMPLS}')
    d, f, e, k = args.d, args.f, args.experts, args.top_k

    header = (f'# MoE layer fwd+bwd, bf16: {torch.cuda.get_device_name()}, torch {torch.__version__}, '
              f'd {d}, f {f}, E {e}, top-{k}; median of {args.iters} after {args.warmup} warm-up '
              f'({args.slow_iters} for {", ".join(SLOW)}), median of {args.rounds} rounds in alternating order '
              f'(TFLOP/s range over rounds in brackets)')
    print(header, flush=True)
    plan = []
    if 'dbrx' in cases:
        plan += [('dbrx', impl, args.slow_tokens if impl in SLOW else args.tokens, 0.0) for impl in only]
    if 'sweep' in cases:
        plan += [('sweep', impl, t, 0.0) for t in map(int, args.sweep.split(',')) for impl in only
                 if impl not in SLOW]
    if 'skew' in cases:
        plan += [('skew', impl, args.tokens, min(args.hot_fraction, 1 / k)) for impl in only if impl not in SLOW]
    burn_in(args.burn_seconds, t=args.tokens, d=d, f=f, k=k)
    runs: dict[tuple, list] = {}
    for rnd in range(args.rounds):
        # Alternate the order, so that no implementation always runs on the coolest (fastest-clocked) GPU.
        for case, impl, t, hot in (plan if rnd % 2 == 0 else plan[::-1]):
            slow = impl in SLOW
            row = measure(impl, case, t, d, f, e, k, hot, 1 if slow else args.warmup,
                          args.slow_iters if slow else args.iters)
            runs.setdefault((case, impl, t), []).append(row)
            print(json.dumps(dict(row, round=rnd)), flush=True)
    rows = [merge_rounds(runs[(case, impl, t)]) for case, impl, t, _ in plan]
    if 'gateup' in cases:
        rows += gateup(args.tokens, d, f, e, k, args.warmup, args.iters)
    if 'gemms' in cases:
        rows += gemm_study(args.tokens, d, f, e, k, args.warmup, args.iters)
    if 'triton_gemm' in cases:
        rows += triton_gemm_study(args.tokens, d, f, e, k, args.warmup, args.iters)
    os.makedirs(args.out, exist_ok=True)
    for impl in filter(None, args.profile.split(',')):
        try:
            profile(impl, args.tokens, d, f, e, k, args.out)
        except Exception:
            traceback.print_exc()

    md = header + '\n\n' + table(rows) + '\n'
    with open(os.path.join(args.out, 'moe_layer.md'), 'w') as fh:
        fh.write(md)
    with open(os.path.join(args.out, 'moe_layer.json'), 'w') as fh:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), fh, indent=1)
    print('\n' + md)


if __name__ == '__main__':
    main()
