"""One rank of the expert-parallel tests: ``python -m tests.ep_worker CASE RANK WORLD EP OUT_DIR``.

Every rank builds the same layer or model from the same seed, takes its slice of one global batch, runs the
expert-parallel path over gloo, and checks it against the single-process path on the whole batch, computed on the
same rank. A rank that finds a difference raises (non-zero exit, the difference in its output); one that passes
writes ``OUT_DIR/ok-<rank>``.

Legend: T tokens per rank, D d_model, F ffn_hidden_size, E experts, K top_k.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tests.conftest import make_routing

TOL = dict(rtol=1e-5, atol=1e-6)  # fp64 inputs would make gloo all-to-all slower for nothing; fp32 sums differ


def _ep_groups(world: int, ep: int):
    """(this rank's EP group, the group of ranks holding the same experts), as parallelize.build_mesh lays them out:
    EP groups are consecutive ranks."""
    from foundry_dbrx.parallelize import ParallelDims, build_mesh
    mesh = build_mesh(ParallelDims(world, 1, ep, num_experts=ep), 'cpu')
    return mesh['ep'], mesh['shard_mod_ep']


def dispatcher_case(rank: int, world: int, ep: int) -> None:
    """AllToAllDispatcher + eager experts == LocalDispatcher + eager on the whole batch: outputs and every gradient,
    on balanced, skewed and empty-expert routings, with an odd number of tokens per rank."""
    from foundry_dbrx.moe import AllToAllDispatcher, eager_experts
    from foundry_dbrx.moe.layer import routed_experts

    ep_mesh, same_experts = _ep_groups(world, ep)
    ep_rank = ep_mesh.get_local_rank()
    t, d, f, e, k = 13, 16, 24, 8, 3
    el = e // ep
    for kind in ('balanced', 'skewed', 'empty'):
        gen = torch.Generator().manual_seed(11)
        x = torch.randn(world * t, d, generator=gen)
        weights = torch.rand(world * t, k, generator=gen) + 0.1
        experts = make_routing(kind, world * t, k, e, gen)
        ws = [torch.randn(e, f, d, generator=gen) * d ** -0.5 for _ in range(3)]
        dy = torch.randn(world * t, d, generator=gen)

        leaves = [v.clone().requires_grad_() for v in (x, weights, *ws)]
        y_ref = routed_experts(eager_experts, leaves[0], leaves[1], experts, *leaves[2:])
        y_ref.backward(dy)
        ref = [y_ref.detach()] + [v.grad for v in leaves]

        mine = slice(rank * t, (rank + 1) * t)
        local_experts = slice(ep_rank * el, (ep_rank + 1) * el)
        x_l, w_l = x[mine].clone().requires_grad_(), weights[mine].clone().requires_grad_()
        ws_l = [w[local_experts].clone().requires_grad_() for w in ws]
        dispatcher = AllToAllDispatcher(e, ep_mesh.get_group())
        y = routed_experts(eager_experts, x_l, w_l, experts[mine], *ws_l, dispatcher=dispatcher)
        y.backward(dy[mine])
        torch.testing.assert_close(y, ref[0][mine], **TOL, msg=lambda m: f'{kind} y: {m}')
        torch.testing.assert_close(x_l.grad, ref[1][mine], **TOL, msg=lambda m: f'{kind} dx: {m}')
        torch.testing.assert_close(w_l.grad, ref[2][mine], **TOL, msg=lambda m: f'{kind} dweights: {m}')
        for name, w, want in zip(('dw1', 'dv1', 'dw2'), ws_l, ref[3:]):
            # this rank's experts saw the tokens of its EP group; the ranks holding the same experts saw the rest
            grad = w.grad.clone()
            dist.all_reduce(grad, group=same_experts.get_group())
            torch.testing.assert_close(grad, want[local_experts], **TOL, msg=lambda m: f'{kind} {name}: {m}')
            if kind == 'empty' and ep_rank == 0:
                assert torch.count_nonzero(w.grad[0]) == 0  # expert 0 got no row anywhere


def model_case(rank: int, world: int, ep: int) -> None:
    """A whole DbrxForCausalLM made expert-parallel by parallelize.apply_expert_parallel: logits equal the
    single-process model's, and the gradients, averaged as data parallelism averages them (experts over the ranks
    holding them, everything else over the world), equal the single-process gradient of the mean loss. Then the same
    with ``block`` activation checkpointing, which in an expert-parallel block recomputes attention and the expert
    GEMMs but never the dispatch: the backward makes exactly the two gradient exchanges per layer."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointWrapper, apply_activation_checkpointing)

    from foundry_dbrx import DbrxConfig, DbrxForCausalLM
    from foundry_dbrx.config import DbrxTrainingConfig
    from foundry_dbrx.moe import dispatch
    from foundry_dbrx.parallelize import activation_checkpointing_fn, apply_expert_parallel
    from tests.conftest import tiny_config

    ep_mesh, same_experts = _ep_groups(world, ep)
    cfg = DbrxConfig.from_dict(tiny_config(ffn_config__moe_num_experts=8, ffn_config__moe_top_k=2))
    torch.manual_seed(0)
    reference = DbrxForCausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (world * 2, 12), generator=torch.Generator().manual_seed(5))
    g = torch.randn(world * 2, 12, cfg.vocab_size, generator=torch.Generator().manual_seed(6))
    (reference(ids).logits * g).sum().div(world).backward()  # the mean over ranks of each rank's loss
    ref_grads = dict(reference.named_parameters())
    mine = slice(rank * 2, (rank + 1) * 2)

    exchanges = []
    plain_all_to_all = dispatch.dist.all_to_all_single

    def counting_all_to_all(*args, **kwargs):
        exchanges.append(torch.is_grad_enabled())
        return plain_all_to_all(*args, **kwargs)

    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = DbrxForCausalLM(cfg)
        apply_expert_parallel(model, ep_mesh)
        if checkpointing:
            apply_activation_checkpointing(
                model, check_fn=activation_checkpointing_fn(model, DbrxTrainingConfig(activation_checkpointing='block')))
            wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, CheckpointWrapper))
            assert wrapped == sorted(f'transformer.blocks.{i}.{part}' for i in range(cfg.n_layers)
                                     for part in ('norm_attn_norm', 'ffn.experts')), wrapped
        dispatch.dist.all_to_all_single = counting_all_to_all
        try:
            logits = model(ids[mine]).logits
            forward_exchanges = len(exchanges)
            (logits * g[mine]).sum().backward()
        finally:
            dispatch.dist.all_to_all_single = plain_all_to_all
        # forward per layer: row counts, rows, routing weights, rows back; backward: the gradients of the last three,
        # nothing replayed
        assert (forward_exchanges, len(exchanges)) == (4 * cfg.n_layers, 7 * cfg.n_layers), exchanges
        exchanges.clear()
        torch.testing.assert_close(logits, reference(ids[mine]).logits, **TOL)

        for name, param in model.named_parameters():
            name = name.replace('_checkpoint_wrapped_module.', '')
            want = ref_grads[name].grad
            if hasattr(param, 'to_local'):  # an expert weight, sharded by expert over the EP group
                grad = param.grad.to_local().clone()
                dist.all_reduce(grad, group=same_experts.get_group())
                grad /= same_experts.size()
                rows = grad.shape[0]
                want = want[ep_mesh.get_local_rank() * rows:(ep_mesh.get_local_rank() + 1) * rows]
            else:
                grad = param.grad.clone()
                dist.all_reduce(grad)
                grad /= world
            torch.testing.assert_close(grad, want, **TOL, msg=lambda m: f'checkpointing={checkpointing} {name}: {m}')


def init_case(rank: int, world: int, ep: int) -> None:
    """Built on the meta device, made expert-parallel and sharded with FSDP2, then materialised module by module
    the way Composer's FSDP2 does it (``to_empty``, then the model's ``param_init_fn``): every parameter's full value
    equals that of the same model built whole in one process from the same seed."""
    from foundry_dbrx import DbrxConfig, DbrxForCausalLM
    from foundry_dbrx.parallelize import ParallelDims, apply_expert_parallel, apply_fsdp2, build_mesh
    from tests.conftest import tiny_config

    cfg = DbrxConfig.from_dict(tiny_config(ffn_config__moe_num_experts=8, ffn_config__moe_top_k=2))
    torch.manual_seed(0)
    whole = DbrxForCausalLM(cfg)
    torch.manual_seed(0)
    model = DbrxForCausalLM(cfg, device='meta')
    dims = ParallelDims(world, 1, ep, cfg.ffn_config.moe_num_experts)
    mesh = build_mesh(dims, 'cpu')
    if ep > 1:
        apply_expert_parallel(model, mesh['ep'])
    apply_fsdp2(model, mesh['shard'], mesh['shard_mod_ep'])
    for module in model.modules():
        if any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device='cpu', recurse=False)
            model.init_module(module)
    want = dict(whole.named_parameters())
    for name, param in model.named_parameters():
        assert param.placements, name  # every parameter is sharded
        assert torch.equal(param.full_tensor(), want[name]), name


def expert_load_case(rank: int, world: int, ep: int) -> None:
    """dbrx_expert_load's statistics under expert parallelism, reduced over the world, equal those of the
    single-process model on the whole batch; the bias update from the reduced load is the same on every rank."""
    from foundry_dbrx import DbrxConfig, DbrxForCausalLM
    from foundry_dbrx.config import DbrxTrainingConfig
    from foundry_dbrx.expert_load import ExpertLoadStats, expert_load_metrics, update_biases
    from foundry_dbrx.parallelize import apply_expert_parallel
    from tests.conftest import tiny_config

    ep_mesh, _ = _ep_groups(world, ep)
    cfg = DbrxConfig.from_dict(tiny_config(ffn_config__moe_num_experts=8, ffn_config__moe_top_k=2))
    training = DbrxTrainingConfig(moe_bias_balancing=True)
    torch.manual_seed(0)
    reference = DbrxForCausalLM(cfg, training)
    torch.manual_seed(0)
    model = DbrxForCausalLM(cfg, training)
    apply_expert_parallel(model, ep_mesh)
    ids = torch.randint(0, cfg.vocab_size, (world * 2, 12), generator=torch.Generator().manual_seed(5))
    routers = [b.ffn.router for b in model.transformer.blocks]

    ref_stats, stats = ExpertLoadStats(cfg.n_layers, 8, 2), ExpertLoadStats(cfg.n_layers, 8, 2)
    ref_counts = ref_stats.add(reference(ids).routings)
    counts = stats.add(model(ids[rank * 2:(rank + 1) * 2]).routings)
    want, got = ref_stats.reduce(), stats.reduce(dist.group.WORLD)
    assert torch.equal(got.stats.counts_LE, want.stats.counts_LE)
    for (name, a), b in zip(sorted(expert_load_metrics(got, 'switch')[1].items()),
                            [v for _, v in sorted(expert_load_metrics(want, 'switch')[1].items())]):
        assert abs(a - b) <= 1e-6 * max(1.0, abs(b)), (name, a, b)

    update_biases(routers, counts.clone(), 0.01, dist.group.WORLD)
    update_biases([b.ffn.router for b in reference.transformer.blocks], ref_counts.clone(), 0.01)
    bias = torch.stack([r.expert_bias for r in routers])
    assert bias.any()
    assert torch.equal(bias, torch.stack([b.ffn.router.expert_bias for b in reference.transformer.blocks]))
    gathered = [torch.empty_like(bias) for _ in range(world)]
    dist.all_gather(gathered, bias)
    assert all(torch.equal(g, bias) for g in gathered)


CASES = {'dispatcher': dispatcher_case, 'model': model_case, 'init': init_case, 'expert_load': expert_load_case}
CASES['all'] = lambda rank, world, ep: [case(rank, world, ep) for case in (dispatcher_case, model_case, init_case,
                                                                         expert_load_case)]


def main(argv: list[str]) -> None:
    case, rank, world, ep, out = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), Path(argv[4])
    dist.init_process_group('gloo', rank=rank, world_size=world)
    try:
        CASES[case](rank, world, ep)
    finally:
        dist.destroy_process_group()
    (out / f'ok-{rank}').write_text('ok')


if __name__ == '__main__':
    main(sys.argv[1:])
