"""The ``dbrx_expert_load`` callback in Composer trainers on CPU: its numbers against hand computations, a router
forced into imbalance showing it, the same numbers for every backend, bias balancing lowering the imbalance and its
state surviving checkpoint, resume and HF export, the mpt_dbrx_moe model. Under expert parallelism (gloo, several
processes) the statistics are checked by tests/ep_worker.py's expert_load case, in tests/test_expert_parallel.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from composer import Trainer
from composer.loggers import ConsoleLogger, InMemoryLogger
from torch.utils.data import DataLoader, Dataset

from foundry_dbrx.composer_model import ComposerDbrxCausalLM
from foundry_dbrx.expert_load import ExpertLoad, ExpertLoadStats, expert_load_metrics
from foundry_dbrx.moe.router import Routing
from tests.conftest import tiny_config

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


class RandomTokens(Dataset):
    """Sample i is always the same tokens (seeded by i): runs and resumed runs see the same batches."""

    def __init__(self, seq_len: int = 32, vocab: int = 512, size: int = 4096):
        self.seq_len, self.vocab, self.size = seq_len, vocab, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        ids = torch.randint(0, self.vocab, (self.seq_len,), generator=torch.Generator().manual_seed(i))
        return {'input_ids': ids, 'labels': ids.clone()}


def make_model(seed: int = 0, biased: bool = False, n_layers: int = 2, **training) -> ComposerDbrxCausalLM:
    torch.manual_seed(seed)
    model = ComposerDbrxCausalLM(**tiny_config(ffn_config__moe_loss_weight=0.0, n_layers=n_layers),
                                 training={'moe_backend': 'eager', **training})
    if biased:
        force_imbalance(model)
    return model


def force_imbalance(model: ComposerDbrxCausalLM, hot: int = 2) -> None:
    """A biased init: every token embedding shares one direction v (zero-mean, so LayerNorm keeps it) and the router
    rows of experts 0..hot-1 are v, so those experts lead every token's top-k."""
    d = model.config.d_model
    v = torch.randn(d, generator=torch.Generator().manual_seed(1))
    v = (v - v.mean()) / (v - v.mean()).norm()
    with torch.no_grad():
        model.model.transformer.wte.weight += 3 * v
        for block in model.model.transformer.blocks:
            block.ffn.router.layer.weight[:hot] = 4 * v


def fit(model, steps: int, log_interval: int = 1, loggers=(), **kwargs) -> InMemoryLogger:
    memory = InMemoryLogger()
    trainer = Trainer(model=model, train_dataloader=DataLoader(RandomTokens(), batch_size=8),
                      max_duration=f'{steps}ba', callbacks=[ExpertLoad(log_interval=log_interval)],
                      loggers=[memory, *loggers], optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
                      progress_bar=False, seed=0, **kwargs)
    trainer.fit()
    trainer.close()
    return memory


def series(memory: InMemoryLogger, key: str) -> list[float]:
    return [value for _, value in memory.data[key]]


def test_metrics_match_hand_computation():
    # One layer, E 4, K 2, three tokens: slots per expert (3, 2, 1, 0); entropies ln 2, ln 4, 0; logsumexp 1, 2, 3.
    probs = torch.tensor([[.5, .5, 0., 0.], [.25, .25, .25, .25], [1., 0., 0., 0.]])
    routing = Routing(probs, torch.ones(3, 2), torch.tensor([[0, 1], [0, 2], [0, 1]]), torch.tensor([1., 2., 3.]))
    stats = ExpertLoadStats(num_layers=1, num_experts=4, top_k=2)
    stats.add([routing])
    stats.add([routing])  # two microbatches: the same shares, twice the counts
    report = stats.reduce()
    assert report.stats.counts_LE.tolist() == [[6, 4, 2, 0]] and stats.sums is None  # read and reset
    overall, detail = expert_load_metrics(report, 'megablocks')
    shares = [3 / 6, 2 / 6, 1 / 6, 0]
    cv = math.sqrt(sum((s - .25) ** 2 for s in shares) / 4) / .25
    assert overall['moe/expert_share_min'] == 0 and overall['moe/expert_share_max'] == pytest.approx(.5)
    assert overall['moe/expert_share_cv'] == pytest.approx(cv) == pytest.approx(0.745356, rel=1e-5)
    assert overall['moe/dead_experts'] == 1
    assert overall['moe/router_entropy'] == pytest.approx((math.log(2) + math.log(4)) / 3)
    assert overall['moe/z_loss'] == pytest.approx(14 / 3)
    # MegaBlocks: E / (T K) * sum_e count_e * mean p_e over the six tokens
    mean_p = [(.5 + .25 + 1) / 3, (.5 + .25) / 3, .25 / 3, .25 / 3]
    assert overall['moe/lb_loss_megablocks'] == pytest.approx(4 / (6 * 2) * sum(c * p for c, p in
                                                                                 zip([6, 4, 2, 0], mean_p)))
    assert detail['moe/layer_0/expert_share_cv'] == overall['moe/expert_share_cv']
    assert [detail[f'moe/layer_0/share_expert_{e}'] for e in range(4)] == pytest.approx(shares)


def test_imbalanced_router_shows_in_the_metrics(capsys):
    healthy = fit(make_model(), steps=2, loggers=[ConsoleLogger(log_interval='1ba', stream='stderr')])
    forced = fit(make_model(biased=True), steps=2)
    print(f'\n[expert-load] healthy init: cv {series(healthy, "moe/expert_share_cv")}, max share '
          f'{series(healthy, "moe/expert_share_max")}; forced: cv {series(forced, "moe/expert_share_cv")}, max share '
          f'{series(forced, "moe/expert_share_max")}, dead {series(forced, "moe/dead_experts")}')
    # Experts 0 and 1 are in every token's top-4: a quarter of all slots each, four times their fair 1/16.
    assert series(forced, 'moe/expert_share_max') == pytest.approx([0.25, 0.25])
    assert series(forced, 'moe/layer_0/share_expert_00') == pytest.approx([0.25, 0.25])
    assert min(series(forced, 'moe/expert_share_cv')) > 1.0 > 2 * max(series(healthy, 'moe/expert_share_cv'))
    assert min(series(forced, 'moe/dead_experts')) >= 8 and max(series(healthy, 'moe/dead_experts')) == 0
    assert max(series(forced, 'moe/router_entropy')) < min(series(healthy, 'moe/router_entropy'))
    assert all(series(forced, 'moe/lb_loss_megablocks')[i] > series(healthy, 'moe/lb_loss_megablocks')[i]
               for i in range(2))
    # The console gets the overall values only; the per-layer and per-expert ones go to the other loggers.
    printed = ''.join(capsys.readouterr())
    assert 'moe/expert_share_cv' in printed and 'moe/layer_' not in printed


def test_same_numbers_for_every_backend_on_cpu(monkeypatch):
    """eager and grouped_mm (its CPU stand-in GEMMs): the same routing, so the same metrics, to the bit for the
    counts. One step, logged before any update could let the backends' rounding move the weights apart."""
    from foundry_dbrx.moe import BACKENDS
    monkeypatch.setattr(BACKENDS['grouped_mm'], 'available', lambda device: None)
    monkeypatch.setattr(BACKENDS['grouped_mm'], 'dtypes', None)
    runs = {backend: fit(make_model(biased=True, moe_backend=backend), steps=1) for backend in ('eager', 'grouped_mm')}
    _assert_same_metrics(runs)


def _assert_same_metrics(runs: dict, min_keys: int = 40) -> None:
    (ref_name, ref), *others = runs.items()
    keys = [k for k in ref.data if k.startswith('moe/')]
    assert len(keys) > min_keys
    for name, memory in others:
        assert sorted(k for k in memory.data if k.startswith('moe/')) == sorted(keys)
        for key in keys:
            got, want = series(memory, key), series(ref, key)
            if 'share' in key or 'dead' in key:
                assert got == want, (name, key, got, want)
            else:
                assert got == pytest.approx(want, rel=1e-5, abs=1e-6), (name, key)


@cuda
def test_same_numbers_for_every_backend_cuda():
    """Every backend this GPU has, in bf16. One MoE layer: its routing depends on the attention only, so it is the
    same routing whatever runs the experts (a second layer would see each backend's bf16 rounding)."""
    from foundry_dbrx.moe import BACKENDS
    runs = {}
    for backend in ('eager', 'grouped_mm', 'megablocks', 'grouped_mm_triton'):
        if BACKENDS[backend].available(torch.device('cuda')):
            continue
        model = make_model(biased=True, n_layers=1, moe_backend=backend)
        runs[backend] = fit(model, steps=1, device='gpu', precision='amp_bf16')
    print(f'\n[expert-load] backends compared on the GPU: {sorted(runs)}')
    assert len(runs) >= 2, 'needs eager and at least one fast backend'
    _assert_same_metrics(runs, min_keys=20)


@cuda
def test_no_host_sync_between_log_steps_cuda():
    """What the callback does on a step it does not log (add a forward's statistics, the bias update from the
    step's load) never waits for the GPU."""
    from foundry_dbrx.expert_load import update_biases
    model = make_model(biased=True, moe_bias_balancing=True).cuda()
    ids = torch.randint(0, 512, (8, 32), device='cuda')
    routings = model({'input_ids': ids}).routings
    routers = [b.ffn.router for b in model.model.transformer.blocks]
    stats = ExpertLoadStats(2, 16, 4)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        counts = stats.add(routings)
        counts = counts + stats.add(routings)
        update_biases(routers, counts, 0.01)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert routers[0].expert_bias.any()


def test_bias_balancing_lowers_the_imbalance_and_resumes_exactly(tmp_path):
    steps, rate = 12, 0.05
    without = fit(make_model(biased=True), steps=steps, log_interval=3)
    balanced_model = make_model(biased=True, moe_bias_balancing=True, moe_bias_update_rate=rate)
    balanced = fit(balanced_model, steps=steps, log_interval=3, save_folder=str(tmp_path / 'ckpt'),
                   save_interval='6ba')
    cv_without, cv_with = series(without, 'moe/expert_share_cv'), series(balanced, 'moe/expert_share_cv')
    print(f'\n[bias balancing] rate {rate}, cv at steps 3, 6, 9, 12: without {[round(v, 3) for v in cv_without]}, '
          f'with {[round(v, 3) for v in cv_with]}; bias range {series(balanced, "moe/bias_range")}')
    assert cv_with[-1] < 0.5 * cv_with[0] and cv_with[-1] < 0.5 * cv_without[-1]
    assert series(balanced, 'moe/dead_experts')[-1] < series(without, 'moe/dead_experts')[-1]
    final_bias = torch.stack([b.ffn.router.expert_bias.clone() for b in balanced_model.model.transformer.blocks])
    assert final_bias[:, :2].max() < final_bias[:, 2:].min()  # the hot experts were pushed down

    # The checkpoint holds the bias of step 6, and a run resumed from it ends with the uninterrupted run's bias.
    ckpt = tmp_path / 'ckpt' / 'ep0-ba6-rank0.pt'
    saved = torch.load(ckpt, weights_only=False)['state']['model']
    at6 = saved['model.transformer.blocks.0.ffn.router.expert_bias']
    assert at6.any() and not torch.equal(at6, final_bias[0])
    resumed_model = make_model(seed=1, biased=False, moe_bias_balancing=True, moe_bias_update_rate=rate)
    resumed = fit(resumed_model, steps=steps, log_interval=3, load_path=str(ckpt))
    resumed_bias = torch.stack([b.ffn.router.expert_bias for b in resumed_model.model.transformer.blocks])
    torch.testing.assert_close(resumed_bias, final_bias, rtol=0, atol=0)
    assert series(resumed, 'moe/expert_share_cv') == pytest.approx(cv_with[2:], rel=1e-6)


def test_bias_survives_hf_export_and_comes_back(tmp_path):
    import transformers

    from foundry_dbrx import hf
    from foundry_dbrx.config import ROUTER_BIAS_HF_KEY

    model = make_model(moe_bias_balancing=True)
    bias = torch.randn(2, 16, generator=torch.Generator().manual_seed(4)) / 10
    for block, row in zip(model.model.transformer.blocks, bias):
        block.ffn.router.expert_bias.copy_(row)
    out = hf.save_hf_checkpoint(hf.gather_full_state_dict(model), model.config, tmp_path / 'hf')
    config = json.loads((out / 'config.json').read_text())
    assert torch.equal(torch.tensor(config[ROUTER_BIAS_HF_KEY]), bias)  # fp32 -> JSON -> fp32, bit for bit
    theirs, info = transformers.DbrxForCausalLM.from_pretrained(out, output_loading_info=True)
    assert info['missing_keys'] == [] and info['unexpected_keys'] == [] and info['mismatched_keys'] == []

    # Back: pretrained_hf_dir (materialised, and on the meta device through the init function) ...
    for init_device in ('cpu', 'meta'):
        back = ComposerDbrxCausalLM(**tiny_config(), pretrained_hf_dir=str(out), init_device=init_device,
                                    training={'moe_bias_balancing': True})
        if init_device == 'meta':
            back.model.to_empty(device='cpu')
            for module in back.model.modules():
                back.model.param_init_fn(module)
        got = torch.stack([b.ffn.router.expert_bias for b in back.model.transformer.blocks])
        assert torch.equal(got, bias), init_device
    # ... and HF -> Composer -> HF, through a strict Composer load.
    pt = hf.hf_to_composer(out, tmp_path / 'model.pt')
    fresh = make_model(seed=3, moe_bias_balancing=True)
    fresh.load_state_dict(torch.load(pt, weights_only=True)['state']['model'], strict=True)
    assert torch.equal(torch.stack([b.ffn.router.expert_bias for b in fresh.model.transformer.blocks]), bias)
    again = hf.composer_to_hf(pt, tmp_path / 'hf2')
    assert json.loads((again / 'config.json').read_text())[ROUTER_BIAS_HF_KEY] == config[ROUTER_BIAS_HF_KEY]

    # A zero bias (no balancing) writes nothing: the export is a plain HF DBRX config.
    plain = hf.save_hf_checkpoint(hf.gather_full_state_dict(make_model()), model.config, tmp_path / 'plain')
    assert ROUTER_BIAS_HF_KEY not in json.loads((plain / 'config.json').read_text())
    with pytest.raises(ValueError, match=f'{ROUTER_BIAS_HF_KEY} must be 2 lists'):
        hf.router_bias_from_hf_config({ROUTER_BIAS_HF_KEY: [[0.0] * 16]}, model.config, 'config.json')


def test_mpt_dbrx_moe_with_the_callback():
    from foundry_dbrx.mpt import ComposerMPTDbrxMoE
    from foundry_dbrx.registry import register_all

    register_all()
    torch.manual_seed(0)
    ffn = {'ffn_type': 'dbrx_moe', 'moe_num_experts': 4, 'moe_top_k': 2, 'moe_backend': 'eager',
           'moe_bias_balancing': True, 'moe_bias_update_rate': 0.01, 'moe_z_loss_weight': 0.001}
    model = ComposerMPTDbrxMoE(d_model=32, n_heads=4, n_layers=3, expansion_ratio=2, max_seq_len=32, vocab_size=512,
                               no_bias=True, attn_config={'attn_impl': 'torch'}, ffn_config=ffn,
                               loss_fn='torch_crossentropy')
    memory = fit(model, steps=2)
    assert len(series(memory, 'moe/expert_share_cv')) == 2
    assert {k.split('/')[1] for k in memory.data if k.startswith('moe/layer_')} == {'layer_0', 'layer_1', 'layer_2'}
    assert series(memory, 'loss/train/z_loss')[0] > 0 and 'loss/train/lb_loss_megablocks' in memory.data
    assert all(b.ffn.ffn.router.expert_bias.any() for b in model.model.transformer.blocks)  # balancing moved it


def test_callback_arguments_and_model_are_checked():
    with pytest.raises(ValueError, match=r"log_interval \('1ep'\) must be a positive number of batches"):
        ExpertLoad(log_interval='1ep')
    from composer.models import ComposerClassifier
    with pytest.raises(ValueError, match='needs a model with DBRX MoE layers'):
        Trainer(model=ComposerClassifier(torch.nn.Linear(2, 2), num_classes=2), callbacks=[ExpertLoad()])
