"""`python -m foundry_dbrx.train` at the boundary: bad input is found before anything is built and reported in one
line with the fix (the data, the tokenizer against vocab_size, the YAML, the checkpoint to load); `--fresh`, a run
that is already complete, and `make train`'s command line."""

from __future__ import annotations

import os
import re
import subprocess
import zipfile

import pytest
import torch

from tests.conftest import ROOT

TINY_YAML = str(ROOT / 'yamls' / 'dbrx-tiny.yaml')


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    from foundry_dbrx.data.prep import PrepConfig, prep_data

    out = tmp_path_factory.mktemp('tiny') / 'data'
    prep_data(PrepConfig(default=True, out=str(out), max_tokens=20_000, max_seq_len=128, progress=False, workers=1))
    return out


@pytest.fixture(autouse=True)
def _outputs_in_tmp(tmp_path, monkeypatch):
    # What the tiny YAML writes relative to the working directory (./mlruns, ./runs) stays out of the repository.
    monkeypatch.chdir(tmp_path)


def _train(capsys, *argv) -> tuple[int, str, str]:
    from foundry_dbrx.train import main

    rc = main([*argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('foundry-dbrx train: error: '), err
    assert 'Traceback' not in err
    return lines[0]


def test_missing_data_names_the_prep_data_command(capsys, tmp_path):
    rc, out, err = _train(capsys, TINY_YAML, f'variables.data_local={tmp_path}/nodata')
    line = _one_error_line(err)
    assert rc == 2
    assert f'train_loader.dataset.local: no dataset at {tmp_path}/nodata/train (no index.json)' in line
    assert f'`foundry-dbrx prep-data --default --out {tmp_path}/nodata --max-seq-len 128`' in line


def test_tokenizer_larger_than_the_vocabulary_is_refused_before_the_model_is_built(capsys, corpus):
    rc, _, err = _train(capsys, TINY_YAML, f'variables.data_local={corpus}', 'model.vocab_size=50000')
    assert rc == 2
    assert _one_error_line(err).endswith(
        "model.vocab_size (50000) is smaller than tokenizer 'dbrx' (100280 tokens, ids 0-100279): every token id "
        'needs an embedding row; set model.vocab_size to at least 100280 (DBRX uses 100352)')


def test_the_model_constructor_refuses_a_tokenizer_larger_than_vocab_size(tiny):
    from foundry_dbrx.composer_model import ComposerDbrxCausalLM
    from foundry_dbrx.data.tokenizer import DbrxTokenizer

    with pytest.raises(ValueError, match=r'model\.vocab_size \(512\) is smaller than the tokenizer \(DbrxTokenizer\) '
                                         r'\(100280 tokens'):
        ComposerDbrxCausalLM(tokenizer=DbrxTokenizer(), **tiny(vocab_size=512))
    ComposerDbrxCausalLM(tokenizer=DbrxTokenizer(), **tiny(vocab_size=100352))  # exactly enough rows: fine


@pytest.mark.parametrize('overrides, expected', [
    (['model.attn_config.kv_n_heads=3'], r'model: attn_config\.kv_n_heads \(3\) must divide n_heads \(4\)'),
    (['not_a_key=1'], r"not a valid LLM Foundry training config: Unused parameters \['not_a_key'\]"),
    (['model.training.moe_bakend=eager'], r"model: model\.training: unknown key\(s\) \['moe_bakend'\]"),
    (['model.training.expert_parallel_degree=3'],
     r'model: training\.expert_parallel_degree \(3\) must divide ffn_config\.moe_num_experts \(16\)'),
    (['model.ffn_config.moe_backend=eager'], r'set model\.training\.moe_backend instead'),
    (['max_duration'], r"overrides \['max_duration'\] must look like key=value"),
])
def test_a_bad_config_is_one_line_naming_the_field(capsys, corpus, overrides, expected):
    rc, _, err = _train(capsys, TINY_YAML, f'variables.data_local={corpus}', *overrides)
    assert rc == 2 and re.search(expected, _one_error_line(err)), err


def test_invalid_yaml_names_the_file_and_line(capsys, tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('model:\n  name: dbrx\n   d_model: 64\n')
    rc, _, err = _train(capsys, str(bad))
    assert rc == 2 and re.search(rf'{re.escape(str(bad))}: not valid YAML at line 3, column \d+', _one_error_line(err))


def _torch_zip(path, payload: bytes = b'not a pickle'):
    """A zip laid out like torch.save's (so only loading it can tell that the pickle is garbage)."""
    with zipfile.ZipFile(path, 'w') as zf:
        zf.writestr('archive/data.pkl', payload)
        zf.writestr('archive/version', '3\n')


def test_a_cut_short_checkpoint_is_named_before_anything_is_built(capsys, corpus, tmp_path):
    ckpt = tmp_path / 'ep0-ba4-rank0.pt'
    _torch_zip(ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:-30])  # the end, with the zip directory, is gone
    rc, _, err = _train(capsys, TINY_YAML, f'variables.data_local={corpus}', f'load_path={ckpt}',
                        f'save_folder={tmp_path}/elsewhere')
    assert rc == 2
    assert re.search(rf'load_path: {re.escape(str(ckpt))} is not a complete checkpoint \(.*\): cut short while '
                     'being written', _one_error_line(err)), err
    rc, _, err = _train(capsys, TINY_YAML, f'variables.data_local={corpus}', f'load_path={tmp_path}/none.pt')
    assert rc == 2 and _one_error_line(err).endswith(f'load_path: {tmp_path}/none.pt does not exist')


def test_autoresume_names_a_cut_short_checkpoint(capsys, corpus, tmp_path):
    folder = tmp_path / 'checkpoints'
    folder.mkdir()
    good = folder / 'ep0-ba4-rank0.pt'
    _torch_zip(good)
    (folder / 'latest-rank0.pt').symlink_to(good.name)
    cut = folder / 'ep0-ba8-rank0.pt'  # a save killed half-way: newer than `latest`, and incomplete
    cut.write_bytes(good.read_bytes()[:40])
    rc, _, err = _train(capsys, TINY_YAML, f'variables.data_local={corpus}', f'save_folder={folder}')
    assert rc == 2
    assert re.search(rf'{re.escape(str(cut))} is newer than the checkpoint autoresume continues from '
                     rf'\({re.escape(str(folder))}/latest-rank0.pt, step 4\) and is not a complete checkpoint',
                     _one_error_line(err)), err
    cut.unlink()
    good.write_bytes(good.read_bytes()[:-10])
    rc, _, err = _train(capsys, TINY_YAML, f'variables.data_local={corpus}', f'save_folder={folder}')
    assert rc == 2 and re.search(rf'autoresume would load {re.escape(str(good))} \(through .*latest-rank0.pt\), '
                                 'but it is not a complete checkpoint', _one_error_line(err)), err


def test_a_checkpoint_that_fails_to_load_is_named(capsys, corpus, tmp_path):
    ckpt = tmp_path / 'garbage.pt'
    _torch_zip(ckpt)  # a complete zip whose pickle is garbage: only loading it tells
    rc, _, err = _train(capsys, TINY_YAML, f'variables.data_local={corpus}', f'load_path={ckpt}',
                        f'save_folder={tmp_path}/run')
    assert rc == 2 and 'Traceback' not in err
    # After LLM Foundry's progress lines (it built the model before loading), one line names the file.
    assert err.strip().splitlines()[-1].startswith(f'foundry-dbrx train: error: cannot load checkpoint {ckpt}: ')


def test_fresh_deletes_only_the_runs_checkpoints_and_a_complete_run_trains_nothing(capsys, corpus, tmp_path):
    from foundry_dbrx.train import TrainInputError, start_over

    folder = tmp_path / 'run' / 'checkpoints'
    folder.mkdir(parents=True)
    done = folder / 'ep0-ba100-rank0.pt'
    torch.save({'state': {}}, done)
    (folder / 'latest-rank0.pt').symlink_to(done.name)
    keep = tmp_path / 'run' / 'notes.txt'
    keep.write_text('mine')
    args = [TINY_YAML, f'variables.data_local={corpus}', f'save_folder={folder}']

    rc, out, _ = _train(capsys, *args)  # the run reached max_duration (100ba): nothing is built
    assert rc == 0 and 'nothing to train: this run is complete' in out and 'FRESH=1' in out

    cfg = {'autoresume': True, 'run_name': 'r', 'save_folder': str(folder)}
    (folder / 'mine.txt').write_text('not a checkpoint')
    with pytest.raises(TrainInputError, match=r"holds files that are not Composer checkpoints \(\['mine.txt'\]\)"):
        start_over(cfg)
    (folder / 'mine.txt').unlink()
    assert start_over(cfg).startswith(f'--fresh: deleted the previous checkpoints of this run ({folder}, 2 files')
    assert not folder.exists() and keep.read_text() == 'mine'
    with pytest.raises(TrainInputError, match='needs autoresume: true'):
        start_over({**cfg, 'autoresume': False})


def test_make_train_forwards_overrides_and_fresh():
    def dry_run(*args):
        out = subprocess.run(['make', '-n', 'train', *args], cwd=ROOT, capture_output=True, text=True, check=True)
        return [line for line in out.stdout.splitlines() if '-m foundry_dbrx.train' in line][-1]

    assert dry_run().endswith('-m foundry_dbrx.train yamls/dbrx-tiny.yaml run_name=dbrx-tiny')
    line = dry_run('max_duration=20ba', 'model.n_layers=2', "ARGS=seed=3 eval_interval=5ba", 'FRESH=1')
    assert '-m foundry_dbrx.train --fresh yamls/dbrx-tiny.yaml run_name=dbrx-tiny' in line
    assert all(f' {o}' in line for o in ('max_duration=20ba', 'model.n_layers=2', 'seed=3', 'eval_interval=5ba'))
    assert 'FRESH' not in line and 'ARGS' not in line
    assert dry_run('RUN_NAME=other').endswith('run_name=other')
