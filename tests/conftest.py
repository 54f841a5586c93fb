"""Shared test helpers: tiny named configs, in the spirit of LLM Foundry's and torchtitan's test suites."""

from __future__ import annotations

import copy
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

# A tiny DBRX with every feature on: GQA, clip_qkv, theta 500000, 16 experts top-4.
TINY = {
    'd_model': 32, 'n_heads': 4, 'n_layers': 2, 'max_seq_len': 64, 'vocab_size': 512,
    'attn_config': {'kv_n_heads': 2, 'clip_qkv': 8.0, 'rope_theta': 500000},
    'ffn_config': {'ffn_hidden_size': 48, 'moe_num_experts': 16, 'moe_top_k': 4, 'moe_jitter_eps': 0.0,
                   'moe_loss_weight': 0.05, 'moe_normalize_expert_weights': 1},
}

# The released DBRX (databricks/dbrx config.json), as HF writes it.
DBRX_132B = {
    'd_model': 6144, 'n_heads': 48, 'n_layers': 40, 'max_seq_len': 32768, 'vocab_size': 100352,
    'resid_pdrop': 0.0, 'emb_pdrop': 0.0, 'initializer_range': 0.02, 'tie_word_embeddings': False,
    'model_type': 'dbrx', 'architectures': ['DbrxForCausalLM'], 'output_router_logits': False,
    'attn_config': {'attn_pdrop': 0.0, 'clip_qkv': 8, 'kv_n_heads': 8, 'rope_theta': 500000},
    'ffn_config': {'ffn_hidden_size': 10752, 'moe_jitter_eps': 0, 'moe_loss_weight': 0.05,
                   'moe_normalize_expert_weights': 1, 'moe_num_experts': 16, 'moe_top_k': 4,
                   'ffn_act_fn': {'name': 'silu'}},
}


def tiny_config(**overrides) -> dict:
    """A deep copy of TINY with top-level or nested (``attn_config__kv_n_heads=4``) overrides."""
    cfg = copy.deepcopy(TINY)
    for key, value in overrides.items():
        if '__' in key:
            outer, inner = key.split('__', 1)
            cfg[outer][inner] = value
        else:
            cfg[key] = value
    return cfg


def subprocess_env(**extra: str) -> dict:
    """Environment for a child process: this venv first on PATH, no GPU, quiet warnings."""
    env = dict(os.environ)
    env['PATH'] = f'{VENV_BIN}{os.pathsep}{env.get("PATH", "")}'
    env.setdefault('PYTHONWARNINGS', 'ignore')
    env['CUDA_VISIBLE_DEVICES'] = ''
    env.update(extra)
    return env


def default_sigint() -> None:
    """``preexec_fn`` for children that a test sends Ctrl-C: SIGINT handled as usual even where this test process
    was started with it ignored (a background job of a shell without job control ignores SIGINT, and its children
    inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def make_routing(kind: str, t: int, k: int, e: int, gen: torch.Generator) -> torch.Tensor:
    """experts_TK with distinct experts per token. 'skewed': expert 0 in every token's top-k and expert 1 in a
    third of them; 'empty': only experts 1..k+1 are used (expert 0 and the last ones get nothing)."""
    scores_TE = torch.rand(t, e, generator=gen)
    if kind == 'skewed':
        scores_TE[:, 0] += 2.0
        scores_TE[: t // 3, 1] += 1.0
    elif kind == 'empty':
        scores_TE[:, 1:k + 2] += 2.0
    elif kind != 'balanced':
        raise ValueError(kind)
    return scores_TE.topk(k, dim=1).indices


@pytest.fixture(scope='session')
def micro_corpus(tmp_path_factory):
    """A slice of the embedded default corpus in 64-token samples, by `foundry-dbrx prep-data` (shared by the tests
    that train tests/yamls/dbrx-micro.yaml in child processes)."""
    from foundry_dbrx.cli import main

    out = tmp_path_factory.mktemp('micro-corpus') / 'default'
    rc = main(['prep-data', '--default', '--out', str(out), '--max-tokens', '100000', '--max-seq-len', '64',
               '--no-progress', '--workers', '1'])
    assert rc == 0 and (out / 'train' / 'index.json').is_file()
    return out


@pytest.fixture
def tiny():
    return tiny_config
