"""Training end to end on CPU, in this process: the loss falls on the embedded corpus, and a run resumed from a
checkpoint continues with exactly the losses of the uninterrupted run."""

from __future__ import annotations

import gc
import json
import math

import pytest

from tests.conftest import ROOT

STEPS, SAVE_AT = 30, 15


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    """A slice of the embedded default corpus (the stdlib sources), prepared by `foundry-dbrx prep-data`."""
    from foundry_dbrx.cli import main

    out = tmp_path_factory.mktemp('corpus') / 'default'
    rc = main(['prep-data', '--default', '--out', str(out), '--max-tokens', '200000', '--max-seq-len', '64',
               '--no-progress', '--workers', '1'])
    assert rc == 0 and (out / 'train' / 'index.json').is_file()
    return out


def _train(corpus, run_dir, *extra):
    from llmfoundry.command_utils import train

    from foundry_dbrx.registry import register_all
    from foundry_dbrx.train import load_config

    register_all()
    overrides = [
        f'variables.data_local={corpus}', 'variables.max_seq_len=64', 'model.n_layers=2', 'model.d_model=32',
        'model.ffn_config.ffn_hidden_size=64', f'max_duration={STEPS}ba', 'global_train_batch_size=4',
        'device_train_microbatch_size=4', 'eval_subset_num_batches=1', 'console_log_interval=100ba',
        'scheduler.t_warmup=5ba', 'optimizer.lr=1.0e-2', f'save_folder={run_dir}/checkpoints', f'save_interval={SAVE_AT}ba',
        'save_num_checkpoints_to_keep=-1',  # the mid-run checkpoint is resumed from below
        f'callbacks.dbrx_run_summary.json_path={run_dir}/summary.json', f'loggers.mlflow.tracking_uri={run_dir}/mlruns',
        *extra,
    ]
    trainer = train(load_config(str(ROOT / 'yamls' / 'dbrx-tiny.yaml'), overrides))
    trainer.close()
    del trainer
    gc.collect()
    with open(run_dir / 'summary.json') as f:
        return json.load(f)


def test_loss_falls_then_resume_continues_identically(corpus, tmp_path):
    first = _train(corpus, tmp_path / 'a')
    losses = dict(first['losses'])
    assert first['steps'] == STEPS and sorted(losses) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in losses.values())
    start = sum(losses[s] for s in range(1, 4)) / 3
    end = sum(losses[s] for s in range(STEPS - 2, STEPS + 1)) / 3
    assert start > 10.5  # about ln(100352): an untrained model
    assert end < start - 2.0, (start, end)  # the unigram statistics alone are worth more than that
    # The closing summary: this process's tokens and speed, and the evaluation at the end (eval_interval > 30ba).
    assert first['tokens'] == STEPS * 4 * 64 and first['tokens_per_second'] > 0
    assert first['ended'] == 'max_duration' and first['eval_step'] == STEPS and 0 < first['eval_loss'] < start

    ckpt = tmp_path / 'a' / 'checkpoints' / f'ep0-ba{SAVE_AT}-rank0.pt'
    assert ckpt.is_file(), sorted(p.name for p in (tmp_path / 'a' / 'checkpoints').iterdir())
    resumed = _train(corpus, tmp_path / 'b', f'load_path={ckpt}')
    resumed_losses = dict(resumed['losses'])
    assert sorted(resumed_losses) == list(range(SAVE_AT + 1, STEPS + 1))
    assert resumed['start_step'] == SAVE_AT and resumed['steps'] == STEPS - SAVE_AT  # this process's own
    for step in range(SAVE_AT + 1, STEPS + 1):
        assert resumed_losses[step] == pytest.approx(losses[step], rel=1e-6, abs=1e-6), step


def test_load_config_adds_the_dbrx_plan_to_dbrx_models_only(tmp_path):
    """`foundry-dbrx train` adds `dbrx_parallelize` to dbrx runs; an MPT run (mpt_dbrx_moe) would fail with it."""
    from foundry_dbrx.train import load_config

    dbrx = load_config(str(ROOT / 'yamls' / 'dbrx-tiny.yaml'))
    assert {'dbrx_run_summary', 'dbrx_parallelize'} <= set(dbrx.callbacks)
    mpt = load_config(str(ROOT / 'yamls' / 'dbrx-tiny.yaml'), ['model.name=mpt_dbrx_moe'])
    assert 'dbrx_run_summary' in mpt.callbacks and 'dbrx_parallelize' not in mpt.callbacks
