"""`mpt_dbrx_moe` with `ffn_config.bf16` / `fp16`: the expert weights are created and kept in that dtype (as
MegaBlocks' `mb_dmoe` does), the rest of the model as before; a training step on CPU; the initialiser after a
meta-device build; the errors for bad values."""

import subprocess
import sys

import pytest
import torch

from foundry_dbrx.moe.layer import build_dbrx_moe_ffn
from tests.conftest import ROOT, subprocess_env

COMMON = dict(d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=32, vocab_size=256, no_bias=True,
              attn_config={'attn_impl': 'torch'}, loss_fn='torch_crossentropy')
FFN = {'ffn_type': 'dbrx_moe', 'moe_num_experts': 4, 'moe_top_k': 2, 'moe_backend': 'eager'}
EXPERT_KEYS = ('.experts.mlp.w1', '.experts.mlp.v1', '.experts.mlp.w2')


def _mpt(seed: int = 0, **ffn):
    from foundry_dbrx.mpt import ComposerMPTDbrxMoE
    from foundry_dbrx.registry import register_all

    register_all()
    torch.manual_seed(seed)
    return ComposerMPTDbrxMoE(**COMMON, ffn_config={**FFN, **ffn})


def _batch(seed: int = 1) -> dict:
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))
    return {'input_ids': ids, 'labels': ids.clone()}


@pytest.mark.parametrize('key,dtype', [('bf16', torch.bfloat16), ('fp16', torch.float16)])
def test_expert_weights_take_the_dtype_and_nothing_else_changes(key, dtype):
    plain, low = _mpt(), _mpt(**{key: True})
    plain_dtypes = {n: p.dtype for n, p in plain.named_parameters()}
    low_dtypes = {n: p.dtype for n, p in low.named_parameters()}
    assert plain_dtypes.keys() == low_dtypes.keys() and set(plain_dtypes.values()) == {torch.float32}
    experts = {n for n in low_dtypes if n.endswith(EXPERT_KEYS)}
    assert len(experts) == 3 * 2  # w1, v1, w2 of both layers
    assert {low_dtypes[n] for n in experts} == {dtype}
    assert {d for n, d in low_dtypes.items() if n not in experts} == {torch.float32}  # router included
    # FSDP keeps one dtype per unit: the experts become their own unit only where their dtype differs.
    for model, wrapped in ((plain, False), (low, True)):
        for layer in model._moe_layers:
            assert getattr(layer.ffn.experts, '_fsdp_wrap', False) is wrapped
    # `bf16: false` is the default.
    assert {p.dtype for p in _mpt(bf16=False, fp16=False).parameters()} == {torch.float32}


def test_bf16_experts_train_on_cpu_and_match_fp32_experts():
    """Same weights (the bf16 model loads the fp32 one's state dict, rounding the experts): one forward agrees
    within bf16 rounding, and an AdamW step trains with bf16 expert gradients and moments."""
    fp32, bf16 = _mpt(), _mpt(seed=5, bf16=True)
    bf16.load_state_dict(fp32.state_dict())
    w1 = bf16._moe_layers[0].ffn.experts.mlp.w1
    assert w1.dtype == torch.bfloat16
    torch.testing.assert_close(w1.float(), fp32._moe_layers[0].ffn.experts.mlp.w1, atol=0, rtol=2 ** -8)
    batch = _batch()
    fp32.train(), bf16.train()
    ref = fp32.loss(fp32(batch), batch)
    # Without autocast the bf16 experts compute in bf16 and return fp32 to the (fp32) residual stream.
    loss = bf16.loss(bf16(batch), batch)
    assert torch.isfinite(loss['total'])
    # bf16 has an 8-bit mantissa: expert outputs differ by ~0.4% relative; at a loss near ln(256) = 5.5 that moves
    # the cross-entropy by well under 1e-2 (measured: about 1e-4).
    torch.testing.assert_close(loss['ce'], ref['ce'], atol=1e-2, rtol=0)
    torch.testing.assert_close(loss['lb_loss_megablocks'], ref['lb_loss_megablocks'], atol=1e-2, rtol=0)
    # CPU autocast (Composer's amp_bf16 path on a CPU) runs too.
    with torch.autocast('cpu', dtype=torch.bfloat16):
        auto = bf16.loss(bf16(batch), batch)
    torch.testing.assert_close(auto['ce'], ref['ce'], atol=5e-2, rtol=0)

    opt = torch.optim.AdamW(bf16.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in bf16.named_parameters()}
    loss['total'].backward()
    for n, p in bf16.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all(), n
    opt.step()
    for n, p in bf16.named_parameters():
        assert not torch.equal(p.detach(), before[n]), f'{n} did not move'
        assert {s.dtype for k, s in opt.state[p].items() if k != 'step'} == {p.dtype}, n
    after = bf16.loss(bf16(batch), batch)['total']
    assert torch.isfinite(after) and after < loss['total']  # one step on the same batch lowers its loss


def test_meta_build_then_mpt_initialiser_keeps_bf16_experts():
    """init_device meta, materialised and initialised the way Composer's FSDP does it (to_empty, then the
    model's param_init_fn on every module): the experts stay bf16 and get MPT's init, w2 scaled down."""
    from foundry_dbrx.mpt import ComposerMPTDbrxMoE

    torch.manual_seed(0)
    model = ComposerMPTDbrxMoE(**COMMON, init_device='meta', ffn_config={**FFN, 'bf16': True})
    glu = model._moe_layers[0].ffn.experts.mlp
    assert glu.w1.device.type == 'meta' and glu.w1.dtype == torch.bfloat16
    model.to_empty(device='cpu')
    for module in model.model.modules():
        model.model.param_init_fn(module)
    assert glu.w1.dtype == torch.bfloat16 and torch.isfinite(glu.w1).all()
    std_w1, std_w2 = glu.w1.float().std().item(), glu.w2.float().std().item()
    assert std_w1 > 0 and 0 < std_w2 < std_w1  # w2 writes into the residual stream: divided like MPT's others
    batch = _batch()
    assert torch.isfinite(model.loss(model(batch), batch)['total'])


@pytest.mark.parametrize('ffn,message', [
    ({'bf16': 'yes'}, "ffn_config.bf16 ('yes') must be true or false"),
    ({'fp16': 1}, 'ffn_config.fp16 (1) must be true or false'),
    ({'bf16': True, 'fp16': True}, 'ffn_config.bf16 (true) and ffn_config.fp16 (true) must not both be true'),
])
def test_bad_dtype_keys_are_one_line_errors(ffn, message):
    with pytest.raises(ValueError) as err:
        build_dbrx_moe_ffn(32, 2, moe_num_experts=4, moe_top_k=2, **ffn)
    assert str(err.value).startswith(message) and '\n' not in str(err.value)


def test_the_dbrx_model_does_not_take_the_mpt_keys():
    """`bf16` is an MPT ffn_config key (the dbrx model has FSDP's mixed precision); its config still refuses it."""
    from foundry_dbrx.config import DbrxFFNConfig

    with pytest.raises(ValueError, match=r"ffn_config: unknown key\(s\) \['bf16'\]"):
        DbrxFFNConfig.from_dict({'ffn_hidden_size': 8, 'moe_num_experts': 4, 'moe_top_k': 2, 'bf16': True})


def test_fsdp_trains_bf16_experts_in_their_own_unit(tmp_path):
    """Two gloo ranks, one step under FSDP2 (Composer's own path) and FSDP1 (Composer's wrap rule): both refuse
    an MPTBlock holding fp32 and bf16 parameters, so this passes only with the experts wrapped on their own."""
    from tests.test_expert_parallel import _free_port

    port = str(_free_port())
    # Composer reads the rank from the environment and checks it against torch.distributed's: each rank gets its
    # own (an in-process Trainer earlier in the session may have left RANK=0 in this one).
    envs = [subprocess_env(MASTER_ADDR='127.0.0.1', MASTER_PORT=port, OMP_NUM_THREADS='1', RANK=str(rank),
                           LOCAL_RANK=str(rank), WORLD_SIZE='2', LOCAL_WORLD_SIZE='2', NODE_RANK='0')
            for rank in range(2)]
    procs = [subprocess.Popen([sys.executable, '-m', 'tests.fsdp_dtype_worker', str(rank), '2', str(tmp_path)],
                              env=envs[rank], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), '\n'.join(log[-3000:] for log in logs)
    assert sorted(f.name for f in tmp_path.glob('ok-*')) == ['ok-0', 'ok-1']
