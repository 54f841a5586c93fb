"""DbrxConfig: HF config.json loads as it is; every bad value names its field, value and rule; architecture sizes
are required; training choices live apart (DbrxTrainingConfig); 132B counts."""

import copy
import json

import pytest
import torch

from foundry_dbrx import DbrxConfig, DbrxForCausalLM
from foundry_dbrx.config import DbrxTrainingConfig
from tests.conftest import DBRX_132B, tiny_config


def test_hf_config_json_loads_as_is():
    cfg = DbrxConfig.from_dict(json.loads(json.dumps(DBRX_132B)))
    assert cfg.attn_config.rope_theta == 500000  # read from attn_config, not a top-level rope default
    assert cfg.attn_config.kv_n_heads == 8 and cfg.head_dim == 128
    assert cfg.ffn_config.moe_top_k == 4 and cfg.ffn_config.moe_normalize_expert_weights == 1
    assert DbrxConfig.from_dict(cfg.to_hf_dict()) == cfg


def test_yaml_dict_is_not_mutated():
    raw = tiny_config()
    before = json.dumps(raw, sort_keys=True)
    DbrxConfig.from_dict(raw)
    assert json.dumps(raw, sort_keys=True) == before


@pytest.mark.parametrize('overrides, message', [
    ({'not_a_key': 1}, r"model config: unknown key\(s\) \['not_a_key'\]"),
    ({'attn_config__kv_heads': 2}, r"attn_config: unknown key\(s\) \['kv_heads'\]"),
    ({'ffn_config__moe_topk': 2}, r"ffn_config: unknown key\(s\) \['moe_topk'\]"),
    ({'attn_config__kv_n_heads': 3}, r'attn_config.kv_n_heads \(3\) must divide n_heads \(4\)'),
    ({'ffn_config__moe_top_k': 17}, r'ffn_config.moe_top_k \(17\) must be at most ffn_config.moe_num_experts \(16\)'),
    ({'d_model': 0}, r'd_model \(0\) must be a positive integer'),
    ({'n_layers': -2}, r'n_layers \(-2\) must be a positive integer'),
    ({'vocab_size': 1.5}, r'vocab_size \(1.5\) must be a positive integer'),
    ({'ffn_config__ffn_hidden_size': 0}, r'ffn_config.ffn_hidden_size \(0\) must be a positive integer'),
    ({'ffn_config__moe_num_experts': 0}, r'ffn_config.moe_num_experts \(0\) must be a positive integer'),
    ({'n_heads': 5}, r'n_heads \(5\) must divide d_model \(32\)'),
    ({'attn_config__clip_qkv': -1}, r'attn_config.clip_qkv \(-1\) must be a positive number or null'),
    ({'attn_config__rope_theta': 0}, r'attn_config.rope_theta \(0\) must be a positive number'),
    ({'ffn_config__moe_jitter_eps': 1.5}, r'ffn_config.moe_jitter_eps \(1.5\) must be a number in \[0, 1\)'),
    ({'ffn_config__moe_loss_weight': -0.1}, r'ffn_config.moe_loss_weight \(-0.1\) must be a number >= 0'),
    # training choices are not part of the HF config: the error says where they went
    ({'ffn_config__moe_backend': 'eager'},
     r'ffn_config: moe_backend is a training choice, .* set model.training.moe_backend instead'),
    ({'ffn_config__moe_lb_loss_type': 'switch'}, r'set model.training.moe_lb_loss_type instead'),
    ({'ffn_config__ffn_act_fn': {'name': 'gelu'}}, r'ffn_config.ffn_act_fn .* must be'),
    ({'resid_pdrop': 1.0}, r'resid_pdrop \(1.0\) must be a number in \[0, 1\)'),
    # NaN passes every `x <= 0` check; infinities and bools are not numbers a config means either.
    ({'attn_config__rope_theta': float('nan')}, r'attn_config.rope_theta \(nan\) must be a positive number'),
    ({'attn_config__clip_qkv': float('nan')}, r'attn_config.clip_qkv \(nan\) must be a positive number or null'),
    ({'attn_config__clip_qkv': True}, r'attn_config.clip_qkv \(True\) must be a positive number or null'),
    ({'ffn_config__moe_loss_weight': float('nan')}, r'ffn_config.moe_loss_weight \(nan\) must be a number >= 0'),
    ({'ffn_config__moe_normalize_expert_weights': float('nan')}, r'moe_normalize_expert_weights \(nan\) must be'),
    ({'layer_norm_eps': float('inf')}, r'layer_norm_eps \(inf\) must be a positive number'),
    ({'ffn_config__ffn_act_fn': 'gelu'}, r"ffn_config.ffn_act_fn \('gelu'\) must be \{'name': 'silu'\}"),
    ({'init_std': 0.02}, r"model config: unknown key\(s\) \['init_std'\]"),
])
def test_bad_config_names_field_value_and_rule(overrides, message):
    with pytest.raises(ValueError, match=message):
        DbrxConfig.from_dict(tiny_config(**overrides))


@pytest.mark.parametrize('path', ['n_layers', 'd_model', 'vocab_size', 'max_seq_len', 'attn_config.rope_theta',
                                  'attn_config.kv_n_heads', 'attn_config.clip_qkv', 'ffn_config.moe_num_experts',
                                  'ffn_config.moe_top_k', 'ffn_config.ffn_hidden_size'])
def test_an_omitted_architecture_field_is_an_error_not_a_default(path):
    cfg = tiny_config()
    *outer, name = path.split('.')
    del (cfg[outer[0]] if outer else cfg)[name]
    where = outer[0] if outer else 'model config'
    with pytest.raises(ValueError, match=rf"{where}: missing required key\(s\) \['{name}'\]"):
        DbrxConfig.from_dict(cfg)


@pytest.mark.parametrize('values, message', [
    ({'moe_backend': 'fast'}, r"training.moe_backend \('fast'\) must be one of"),
    ({'moe_lb_loss_type': 'x'}, r"training.moe_lb_loss_type \('x'\) must be one of \['switch', 'megablocks'\]"),
    ({'expert_parallel_degree': 0}, r'training.expert_parallel_degree \(0\) must be a positive integer'),
    ({'activation_checkpointing': 'mlp'}, r"training.activation_checkpointing \('mlp'\) must be one of"),
    ({'activation_checkpointing_every': True}, r'activation_checkpointing_every \(True\) must be a positive'),
    ({'ffn_hidden_size': 8}, r"model.training: unknown key\(s\) \['ffn_hidden_size'\]"),
])
def test_bad_training_choice_names_field_value_and_rule(values, message):
    with pytest.raises(ValueError, match=message):
        DbrxTrainingConfig.from_dict(values)


def test_expert_parallel_degree_must_divide_the_experts():
    cfg = DbrxConfig.from_dict(tiny_config())  # 16 experts
    DbrxTrainingConfig(expert_parallel_degree=4).check_model(cfg)
    with pytest.raises(ValueError, match=r'expert_parallel_degree \(3\) must divide ffn_config.moe_num_experts'):
        DbrxTrainingConfig(expert_parallel_degree=3).check_model(cfg)


def test_the_hf_config_carries_no_training_choice():
    hf = DbrxConfig.from_dict(copy.deepcopy(DBRX_132B)).to_hf_dict()
    assert set(hf['ffn_config']) == set(DBRX_132B['ffn_config'])
    assert set(hf['attn_config']) == set(DBRX_132B['attn_config'])


def test_clip_qkv_none_is_accepted():
    cfg = DbrxConfig.from_dict(tiny_config(attn_config__clip_qkv=None))
    model = DbrxForCausalLM(cfg)
    assert model(torch.randint(0, 512, (1, 8))).logits.isfinite().all()


def test_dbrx_132b_on_meta_matches_published_counts():
    cfg = DbrxConfig.from_dict(DBRX_132B)
    counts = cfg.num_params()
    model = DbrxForCausalLM(cfg, device='meta')
    built = sum(p.numel() for p in model.parameters())
    assert built == counts['total']
    # Databricks: 132B in all, 36B active per token.
    assert 131.0e9 < counts['total'] < 133.0e9, counts
    assert 35.5e9 < counts['active'] < 37.0e9, counts
    assert all(p.is_meta for p in model.parameters())


def test_132b_yaml_builds_on_meta_and_logs_counts(caplog):
    from omegaconf import OmegaConf as om

    from foundry_dbrx.composer_model import ComposerDbrxCausalLM
    from tests.conftest import ROOT

    model_cfg = om.to_container(om.load(ROOT / 'yamls' / 'dbrx-132b.yaml').model, resolve=True)
    model_cfg.pop('name')
    model_cfg['init_device'] = 'meta'
    with caplog.at_level('INFO', logger='foundry_dbrx'):
        model = ComposerDbrxCausalLM(**model_cfg)
    assert sum(p.numel() for p in model.parameters()) == model.config.num_params()['total']
    assert '131.60B parameters in all, 36.47B active per token' in caplog.text


def test_readme_yaml_example_is_a_valid_model_section():
    """The README's YAML example builds the configs it shows (a field in the wrong section would be an error)."""
    import re
    from pathlib import Path

    import yaml

    readme = (Path(__file__).resolve().parent.parent / 'README.md').read_text()
    model = dict(yaml.safe_load(re.search(r'```yaml\n(model:\n  name: dbrx\n.*?)```', readme, re.S).group(1))['model'])
    training = DbrxTrainingConfig.from_dict(model.pop('training'))
    for key in ('name', 'init_device'):
        model.pop(key)
    cfg = DbrxConfig.from_dict(model)
    training.check_model(cfg)
    assert cfg.ffn_config.moe_num_experts == 16 and training.moe_backend == 'auto'
