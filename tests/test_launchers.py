"""The three ways users launch foundry-dbrx, each in a fresh process: entry points alone make the registrations
visible; `llmfoundry train` and the `composer` launcher (2 processes, gloo) train the tiny YAML."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, VENV_BIN, subprocess_env

STEPS = 6


def test_entry_points_register_everything_in_a_fresh_process():
    """Every line of registry.ENTRY_POINTS resolves through LLM Foundry's registries alone."""
    code = '''
import json, sys
from llmfoundry import registry, layers_registry
groups = {r.namespace and '_'.join(r.namespace): r for r in
          [getattr(registry, n) for n in dir(registry)] + [getattr(layers_registry, n) for n in dir(layers_registry)]
          if hasattr(r, 'namespace') and hasattr(r, 'get_all')}
assert 'foundry_dbrx' not in sys.modules  # nothing imported the package yet
found = {g: {name: f'{obj.__module__}:{obj.__qualname__}' for name, obj in r.get_entry_points().items()}
         for g, r in groups.items()}
print(json.dumps(found))
'''
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=subprocess_env(),
                         timeout=300, cwd='/')
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    from foundry_dbrx.registry import ENTRY_POINTS

    expected = {group: dict(tuple(part.strip() for part in line.split('=')) for line in lines)
                for group, lines in ENTRY_POINTS.items() if group != 'console_scripts'}
    assert len(expected) >= 5
    for group, entries in expected.items():
        ours = {name: target for name, target in found[group].items() if target.startswith('foundry_dbrx')}
        assert ours == entries, group


@pytest.fixture(scope='module')
def small_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp('launch') / 'data'
    proc = subprocess.run([str(VENV_BIN / 'foundry-dbrx'), 'prep-data', '--default', '--out', str(out),
                           '--max-tokens', '60000', '--max-seq-len', '64', '--no-progress', '--workers', '1'],
                          capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _overrides(data, run_dir):
    return [f'variables.data_local={data}', 'variables.max_seq_len=64', 'model.n_layers=2', 'model.d_model=32',
            'model.ffn_config.ffn_hidden_size=64', f'max_duration={STEPS}ba', 'global_train_batch_size=4',
            'device_train_microbatch_size=2', 'console_log_interval=100ba', f'save_folder={run_dir}/ckpt',
            f'save_interval={STEPS}ba', f'callbacks.dbrx_run_summary.json_path={run_dir}/summary.json',
            f'loggers.mlflow.tracking_uri={run_dir}/mlruns']


def _check_run(proc, run_dir):
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    summary = json.loads((run_dir / 'summary.json').read_text())
    assert summary['steps'] == STEPS and len(summary['losses']) == STEPS
    assert summary['first_loss'] > 10  # fresh model on a 100352-token vocabulary
    assert (run_dir / 'ckpt' / f'ep0-ba{STEPS}-rank0.pt').is_file()
    assert '[foundry-dbrx] loss: first' in proc.stdout


def test_llmfoundry_train_cli(small_corpus, tmp_path):
    """`llmfoundry train yamls/dbrx-tiny.yaml` with no code_paths: the entry points do it."""
    proc = subprocess.run([str(VENV_BIN / 'llmfoundry'), 'train', str(ROOT / 'yamls' / 'dbrx-tiny.yaml'),
                           *_overrides(small_corpus, tmp_path)],
                          capture_output=True, text=True, env=subprocess_env(), timeout=600, cwd=tmp_path)
    _check_run(proc, tmp_path)


def test_composer_launcher_two_processes(small_corpus, tmp_path):
    """`composer -n 2 -m foundry_dbrx.train ...`: two CPU ranks over gloo, each reading its half of the data."""
    proc = subprocess.run([str(VENV_BIN / 'composer'), '-n', '2', '--stdout', str(tmp_path / 'rank{rank}.out'),
                           '-m', 'foundry_dbrx.train', str(ROOT / 'yamls' / 'dbrx-tiny.yaml'),
                           *_overrides(small_corpus, tmp_path)],
                          capture_output=True, text=True, env=subprocess_env(), timeout=600, cwd=tmp_path)
    _check_run(proc, tmp_path)
    assert json.loads((tmp_path / 'summary.json').read_text())['world_size'] == 2
    assert (tmp_path / 'rank1.out').exists()
