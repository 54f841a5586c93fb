"""Safe by default (issue 8): each test is an attack or an accident, and asserts that it does no harm.

Untrusted checkpoints (code hidden in a pickle, carried file names that escape the output folder, symlinks out of
an HF folder, duplicate parameter names, a --config that contradicts the checkpoint), users' folders (--overwrite
into a folder that is not ours, OUT equal to or holding the input, two runs writing one OUT, stale temporaries), a
diverging run, a half-replaced dataset on S3, a corrupt local-only shard, a full disk, credentials in messages, and
one-line CLI errors.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import multiprocessing
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from foundry_dbrx import hf
from foundry_dbrx.cli import main as cli
from foundry_dbrx.data.prep import PrepConfig, PrepError, prep_data
from foundry_dbrx.outputs import MARKER, OutputError, atomic_output, rename_no_replace

from tests.conftest import subprocess_env
from tests.s3_server import LoopbackS3, set_env
from tests.test_hf_convert import CFG, build_hf_dir, read_hf_weights

TEXT_A = 'The first dataset, about apples and orchards. ' * 300
TEXT_B = 'A second dataset, about rivers, boats and bridges; nothing like the first. ' * 300


def hidden_leftovers(folder: Path) -> list[str]:
    """Temporaries and locks our outputs may leave beside OUT."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith('.') and
                  ('.partial-' in p.name or '.old-' in p.name or p.name.endswith('.lock')))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if 'error:' in line or 'Traceback' in line]
    assert len(lines) == 1 and 'Traceback' not in err, err
    return lines[0]


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp('hf') / 'dbrx-tiny'
    build_hf_dir(path)
    return path


@pytest.fixture(scope='module')
def converted(hf_dir, tmp_path_factory):
    """hf_dir as a Composer checkpoint: the weights and the carried config / tokenizer files."""
    return hf.hf_to_composer(hf_dir, tmp_path_factory.mktemp('pt') / 'dbrx.pt')


def write_text(folder: Path, text: str, name: str = 'doc.txt') -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder


def prep(inputs, out, **kw) -> object:
    kw = {'max_seq_len': 16, 'progress': False, 'workers': 1, **kw}
    return prep_data(PrepConfig(inputs=tuple(str(i) for i in inputs), out=str(out), **kw))


# ------------------------------------------------------------------------------------------ untrusted checkpoints
class _CreatesFile:
    """Unpickling this runs open(path, 'w'): the file's existence proves the payload ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, 'w'))


def test_pickled_payload_in_a_checkpoint_never_runs(converted, tmp_path, capsys):
    proof = tmp_path / 'payload-ran'
    ckpt = torch.load(converted, weights_only=True)
    ckpt['state']['extra'] = _CreatesFile(proof)
    torch.save(ckpt, tmp_path / 'evil.pt')
    assert not proof.exists()

    assert cli(['convert', 'composer-to-hf', str(tmp_path / 'evil.pt'), str(tmp_path / 'out')]) == 1
    line = one_error_line(capsys)
    assert f'{tmp_path / "evil.pt"}: refused to load: it names io.open' in line  # pickle's name for open
    assert '--trust-checkpoint-code' in line
    assert not proof.exists() and not (tmp_path / 'out').exists()

    # The payload is real: the explicit opt-in runs it (and the conversion itself goes through).
    assert cli(['convert', 'composer-to-hf', str(tmp_path / 'evil.pt'), str(tmp_path / 'out'),
                '--trust-checkpoint-code', '--quiet']) == 0
    assert proof.exists()


def test_pickled_payload_in_a_sharded_checkpoint_metadata_never_runs(tmp_path, capsys):
    """A sharded checkpoint's .metadata is a pickle too, unpickled before any tensor is read."""
    import torch.distributed.checkpoint as dcp

    from foundry_dbrx.config import DbrxConfig
    from foundry_dbrx.model import DbrxForCausalLM
    cfg = DbrxConfig.from_dict(CFG)
    state = {'model.' + k: v for k, v in DbrxForCausalLM(cfg).state_dict().items()}
    with contextlib.ExitStack() as stack:
        stack.enter_context(__import__('warnings').catch_warnings())
        __import__('warnings').simplefilter('ignore')
        dcp.save({'state': {'model': state, 'rank_zero_seed': 0}}, storage_writer=dcp.FileSystemWriter(tmp_path / 'ck'),
                 no_dist=True)
    with open(tmp_path / 'ck' / '.metadata', 'rb') as f:
        metadata = pickle.load(f)  # our own file, written just now
    metadata.planner_data = {'extra': _CreatesFile(tmp_path / 'payload-ran')}
    with open(tmp_path / 'ck' / '.metadata', 'wb') as f:
        pickle.dump(metadata, f)

    assert cli(['convert', 'composer-to-hf', str(tmp_path / 'ck'), str(tmp_path / 'out'), '--config',
                str(_config_json(tmp_path, cfg))]) == 1
    line = one_error_line(capsys)
    assert f'{tmp_path / "ck" / ".metadata"}: refused to load: it names io.open' in line
    assert not (tmp_path / 'payload-ran').exists() and not (tmp_path / 'out').exists()
    assert cli(['convert', 'composer-to-hf', str(tmp_path / 'ck'), str(tmp_path / 'out'), '--config',
                str(_config_json(tmp_path, cfg)), '--trust-checkpoint-code', '--quiet']) == 0
    assert (tmp_path / 'payload-ran').exists()


def _config_json(folder: Path, cfg) -> Path:
    path = folder / 'config.json'
    path.write_text(json.dumps(cfg.to_hf_dict()))
    return path


def test_allowlist_is_exactly_what_composer_checkpoints_hold():
    """Every allowlisted type says where real checkpoints hold it; nothing that runs code (builtins, os, eval)
    is in it."""
    assert all(isinstance(where, str) and where for where in hf.CHECKPOINT_TYPES.values())
    modules = {t.__module__ for t in hf.CHECKPOINT_TYPES}
    assert modules <= {'datetime', 'numpy', 'numpy._core.multiarray', 'numpy.dtypes', 'torch.torch_version',
                       'torch.distributed.checkpoint.metadata', 'torch.distributed.checkpoint.filesystem',
                       'pathlib'}, modules


@pytest.mark.parametrize('name', ['../escaped', '/tmp/absolute-escape', 'model.safetensors', 'sub/tokenizer.json'])
def test_carried_file_names_cannot_write_outside_or_over_the_weights(converted, tmp_path, capsys, name):
    ckpt = torch.load(converted, weights_only=True)
    ckpt[hf.CARRY_KEY]['hf_files'][name] = b'written where the checkpoint says'
    torch.save(ckpt, tmp_path / 'crafted.pt')  # loads with weights_only=True: no code involved
    (tmp_path / 'out').mkdir()
    assert cli(['convert', 'composer-to-hf', str(tmp_path / 'crafted.pt'), str(tmp_path / 'out' / 'export'),
                '--quiet']) == 1
    line = one_error_line(capsys)
    assert f'crafted.pt carries file(s) {name!r}: not among the tokenizer / config file names' in line
    assert list((tmp_path / 'out').iterdir()) == [] and not (tmp_path / 'escaped').exists()
    assert not Path('/tmp/absolute-escape').exists()


def test_hf_folder_symlink_out_of_the_folder_is_not_carried(hf_dir, tmp_path):
    secret = tmp_path / 'secret.key'
    secret.write_text('not for a shared checkpoint')
    folder = tmp_path / 'hf'
    shutil.copytree(hf_dir, folder)
    (folder / 'tokenizer.json').symlink_to(secret)
    (folder / 'modeling_dbrx.py').write_text('import os  # remote code, not a tokenizer file')
    with pytest.raises(ValueError, match=r'hf/tokenizer.json is a symlink to .*secret.key, outside .*hf; copy'):
        hf.hf_to_composer(folder, tmp_path / 'x.pt')
    assert not (tmp_path / 'x.pt').exists()

    # The Hugging Face cache's snapshot layout (every file a link into ../../blobs) is an HF folder as usual.
    snapshot = tmp_path / 'models--x' / 'snapshots' / 'abc'
    blobs = tmp_path / 'models--x' / 'blobs'
    shutil.copytree(hf_dir, snapshot)
    blobs.mkdir()
    (blobs / 'f00d').write_bytes(b'{"model_max_length": 64}\n')
    (snapshot / 'tokenizer_config.json').unlink()
    (snapshot / 'tokenizer_config.json').symlink_to('../../blobs/f00d')
    (snapshot / 'modeling_dbrx.py').write_text('import os')
    pt = hf.hf_to_composer(snapshot, tmp_path / 'y.pt')
    carried = torch.load(pt, weights_only=True)[hf.CARRY_KEY]['hf_files']
    assert carried['tokenizer_config.json'] == b'{"model_max_length": 64}\n'
    assert 'modeling_dbrx.py' not in carried  # code that is not a tokenizer's stays behind


def test_duplicate_names_after_wrapper_prefixes_are_an_error(converted, tmp_path):
    ckpt = torch.load(converted, weights_only=True)
    model = ckpt['state']['model']
    model['model._orig_mod.lm_head.weight'] = torch.zeros_like(model['model.lm_head.weight'])
    torch.save(ckpt, tmp_path / 'twice.pt')
    with pytest.raises(ValueError, match=r"'model.lm_head.weight' and 'model._orig_mod.lm_head.weight' are both "
                                         r"'model.lm_head.weight'"):
        hf.composer_to_hf(tmp_path / 'twice.pt', tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


# ------------------------------------------------------------------------------------------------- users' folders
def test_overwrite_into_a_folder_holding_user_files_deletes_nothing(tmp_path, capsys):
    docs = write_text(tmp_path / 'docs', TEXT_A)
    home = tmp_path / 'project'
    write_text(home, 'my notes', 'notes.txt')
    (home / '.git').mkdir()
    (home / '.git' / 'HEAD').write_text('ref: refs/heads/main\n')
    args = ['prep-data', str(docs), '--out', str(home), '--max-seq-len', '16', '--no-progress', '--workers', '1']

    assert cli(args) == 1
    assert "holds 2 entries that foundry-dbrx prep-data did not write (.git/, notes.txt); choose another output" in \
        one_error_line(capsys)
    assert cli(args + ['--overwrite']) == 1
    line = one_error_line(capsys)
    assert '--overwrite replaces only an earlier output of foundry-dbrx prep-data' in line and 'notes.txt' in line
    assert (home / 'notes.txt').read_text() == 'my notes' and (home / '.git' / 'HEAD').is_file()

    # Our own earlier output is replaced; once a user has put a file into it, it is not.
    out = tmp_path / 'data'
    assert cli(args[:3] + [str(out)] + args[4:]) == 0
    assert cli(args[:3] + [str(out)] + args[4:] + ['--overwrite']) == 0
    (out / 'train' / 'my-analysis.ipynb').write_text('{}')
    assert cli(args[:3] + [str(out)] + args[4:] + ['--overwrite']) == 1
    assert 'plus 1 entries it did not write (train/my-analysis.ipynb)' in one_error_line(capsys)
    assert (out / 'train' / 'my-analysis.ipynb').exists()
    assert hidden_leftovers(tmp_path) == []


def test_out_equal_to_or_holding_the_input_is_refused(tmp_path, converted, capsys):
    docs = write_text(tmp_path / 'docs', TEXT_A)
    with pytest.raises(PrepError, match=r'--out .*docs is the input .*docs'):
        prep([docs], docs, overwrite=True)
    with pytest.raises(PrepError, match=r'--out .* holds the input .*docs; replacing .* would delete it'):
        prep([docs], tmp_path, overwrite=True)
    with pytest.raises(PrepError, match=r'is inside the input folder .*docs, so it would be read as input'):
        prep([docs], docs / 'tokens')
    assert sorted(p.name for p in docs.iterdir()) == ['doc.txt']

    # Converting into the run folder that holds the checkpoint.
    run = tmp_path / 'run'
    run.mkdir()
    shutil.copy(converted, run / 'ep0-ba4-rank0.pt')
    assert cli(['convert', 'composer-to-hf', str(run / 'ep0-ba4-rank0.pt'), str(run), '--overwrite']) == 1
    assert 'holds the input' in one_error_line(capsys)
    assert (run / 'ep0-ba4-rank0.pt').stat().st_size == converted.stat().st_size


def _prep_in_child(docs: str, out: str, barrier, results) -> None:
    barrier.wait()
    try:
        prep([docs], out)
        results.put(('ok', ''))
    except PrepError as e:
        results.put(('error', str(e)))


def test_two_concurrent_prep_data_runs_cannot_both_succeed(tmp_path):
    """Two processes, started at the same moment, write the same OUT: one succeeds, the other says why, and the
    dataset at OUT is the winner's, whole."""
    a, b = write_text(tmp_path / 'a', TEXT_A), write_text(tmp_path / 'b', TEXT_B)
    out = tmp_path / 'out'
    ctx = multiprocessing.get_context('fork')  # the children share this process's imports: no 10 s start-up
    barrier, results = ctx.Barrier(2), ctx.Queue()
    children = [ctx.Process(target=_prep_in_child, args=(str(d), str(out), barrier, results)) for d in (a, b)]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
    outcomes = sorted(results.get(timeout=5) for _ in children)
    assert [o[0] for o in outcomes] == ['error', 'ok'], outcomes
    assert str(out) in outcomes[0][1] and ('being written by another process' in outcomes[0][1] or
                                           'holds an earlier output of foundry-dbrx prep-data' in outcomes[0][1])
    prep([a], tmp_path / 'ref_a')
    prep([b], tmp_path / 'ref_b')
    got = _local_split(out, 'train')
    assert got in (_local_split(tmp_path / 'ref_a', 'train'), _local_split(tmp_path / 'ref_b', 'train'))
    assert hidden_leftovers(tmp_path) == []

    # The rename underneath refuses to replace, whatever another process did a moment before.
    (tmp_path / 'x').mkdir()
    (tmp_path / 'y').mkdir()
    with pytest.raises(FileExistsError):
        rename_no_replace(tmp_path / 'x', tmp_path / 'y')


def test_stale_temporaries_of_dead_processes_are_cleaned_and_reported(tmp_path, caplog):
    from foundry_dbrx.outputs import temporary_sibling
    out = tmp_path / 'export'
    dead = 2**22 + 12345  # above pid_max's default: no such process
    partial = Path(str(temporary_sibling(out)).replace(f'-{os.getpid()}-', f'-{dead}-'))
    partial.mkdir()
    (partial / 'half-written.safetensors').write_bytes(b'\0' * 100)
    elsewhere = tmp_path / '.export.partial-otherhost-1-0123abcd'
    elsewhere.mkdir()
    with caplog.at_level(logging.WARNING, logger='foundry_dbrx.outputs'):
        with atomic_output(out, command='test', overwrite=False, is_dir=True) as tmp:
            (tmp / 'a').write_text('new')
    assert not partial.exists() and elsewhere.exists()
    assert f'left by process {dead}, which died' in caplog.text and 'left by process 1 on host otherhost' in caplog.text

    # A run that died between moving the old output aside and installing the new one: the old one comes back.
    old = Path(str(temporary_sibling(out, 'old')).replace(f'-{os.getpid()}-', f'-{dead}-'))
    out.rename(old)
    with atomic_output(tmp_path / 'export', command='test', overwrite=True, is_dir=True) as tmp:
        assert (out / 'a').read_text() == 'new' and not old.exists()
        (tmp / 'b').write_text('newer')
    assert sorted(p.name for p in out.iterdir()) == [MARKER, 'b']


# ---------------------------------------------------------------------------------------------------- divergence
def _tiny_trainer(model, folder: Path, lr: float, steps: int = 8):
    from composer import Trainer
    from torch.utils.data import DataLoader

    from foundry_dbrx.divergence import DivergenceGuard
    g = torch.Generator().manual_seed(0)
    data = [{'input_ids': (ids := torch.randint(0, 256, (16,), generator=g)), 'labels': ids.clone()}
            for _ in range(2 * steps)]
    return Trainer(model=model, train_dataloader=DataLoader(data, batch_size=2), max_duration=f'{steps}ba',
                   optimizers=torch.optim.AdamW(model.parameters(), lr=lr), callbacks=[DivergenceGuard()],
                   save_folder=str(folder), save_interval='1ba', save_num_checkpoints_to_keep=2, device='cpu',
                   run_name='run', progress_bar=False, log_to_console=False, seed=0)


def _model(name: str):
    torch.manual_seed(0)
    if name == 'dbrx':
        from foundry_dbrx.composer_model import ComposerDbrxCausalLM
        return ComposerDbrxCausalLM(d_model=32, n_heads=4, n_layers=2, vocab_size=256, max_seq_len=32,
                                    attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000),
                                    ffn_config=dict(ffn_hidden_size=24, moe_num_experts=4, moe_top_k=2),
                                    training={'moe_backend': 'eager'})
    from foundry_dbrx.mpt import ComposerMPTDbrxMoE
    from foundry_dbrx.registry import register_all
    register_all()
    return ComposerMPTDbrxMoE(d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=32, vocab_size=256,
                              no_bias=True, attn_config={'attn_impl': 'torch'}, loss_fn='torch_crossentropy',
                              ffn_config={'ffn_type': 'dbrx_moe', 'moe_num_experts': 4, 'moe_top_k': 2,
                                          'moe_backend': 'eager'})


@pytest.mark.parametrize('name', ['dbrx', 'mpt_dbrx_moe'])
def test_huge_learning_rate_stops_before_a_nan_checkpoint(tmp_path, name):
    from foundry_dbrx.divergence import DivergenceError
    trainer = _tiny_trainer(_model(name), tmp_path / 'ckpt', lr=1e4)
    with pytest.raises(DivergenceError) as e:
        trainer.fit()
    message = str(e.value)
    step = int(message.split('training diverged at step ')[1].split(':')[0])
    assert '\n' not in message and 'total=nan' in message and 1 < step < 8, message
    saved = sorted((tmp_path / 'ckpt').glob('ep0-ba*-rank0.pt'))
    assert saved and all(int(p.name.split('-ba')[1].split('-')[0]) < step for p in saved)
    for path in saved:  # what autoresume would restart from: every weight finite
        weights = torch.load(path, weights_only=False)['state']['model']
        assert all(torch.isfinite(v).all() for v in weights.values()), path
    assert str(saved[-1]) in message


def test_diverging_yaml_run_ends_with_one_line_naming_the_step(tmp_path, capsys):
    """python -m foundry_dbrx.train with a huge learning rate: exit status 1, one line, the last checkpoint kept."""
    from foundry_dbrx.train import load_config, main
    from tests.train_runs import MICRO_YAML
    data = tmp_path / 'data'
    prep([write_text(tmp_path / 'docs', TEXT_A + TEXT_B)], data, max_seq_len=64, val_fraction=0.0)
    rc = main([str(MICRO_YAML), f'variables.data_local={data}', f'save_folder={tmp_path / "ckpt"}', 'optimizer.lr=1e4',
               'scheduler.t_warmup=0ba', 'max_duration=8ba', 'save_interval=1ba', 'autoresume=false'])
    assert rc == 1
    line = one_error_line(capsys)
    assert line.startswith('foundry-dbrx train: error: training diverged at step '), line
    step = int(line.split('at step ')[1].split(':')[0])
    saved = sorted((tmp_path / 'ckpt').glob('ep0-ba*-rank0.pt'))
    assert [int(p.name.split('-ba')[1].split('-')[0]) for p in saved] == list(range(1, step)), (line, saved)

    # Added to every YAML run through foundry_dbrx.train, like the run summary.
    plain = tmp_path / 'plain.yaml'
    plain.write_text(MICRO_YAML.read_text().replace('  dbrx_divergence_guard: {}\n', ''))
    assert 'dbrx_divergence_guard' not in plain.read_text()
    assert {'dbrx_run_summary', 'dbrx_divergence_guard'} <= set(load_config(str(plain)).callbacks)


def test_export_refuses_nan_weights_and_reports_fp16_overflow(tmp_path):
    from foundry_dbrx.config import DbrxConfig
    from foundry_dbrx.model import DbrxForCausalLM
    cfg = DbrxConfig.from_dict(CFG)
    state = DbrxForCausalLM(cfg).state_dict()
    state['transformer.blocks.1.ffn.experts.mlp.w2'][3, 5] = float('nan')
    with pytest.raises(hf.NonFiniteWeightsError, match=r'transformer.blocks.1.ffn.experts.mlp.w2 holds 1 '
                                                       r'non-finite value\(s\)'):
        hf.save_hf_checkpoint(state, cfg, tmp_path / 'nan')
    state['transformer.blocks.1.ffn.experts.mlp.w2'][3, 5] = 1e6  # finite in fp32, above fp16's 65504
    with pytest.raises(hf.NonFiniteWeightsError, match=r'casting transformer.blocks.1.ffn.experts.mlp.w2 to float16 '
                                                       r'overflows: 1 value\(s\) exceed .*65504 .*1e\+06'):
        hf.save_hf_checkpoint(state, cfg, tmp_path / 'fp16', dtype=torch.float16)
    hf.save_hf_checkpoint(state, cfg, tmp_path / 'bf16', dtype=torch.bfloat16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['bf16']


# --------------------------------------------------------------------------------------------------- object store
@pytest.fixture(scope='module')
def s3(tmp_path_factory):
    server = LoopbackS3().start()
    with pytest.MonkeyPatch.context() as mp:
        set_env(mp, server)
        server.client().create_bucket(Bucket='dsets')
        yield server
    server.stop()


def _read_split(remote: str, split: str, cache: Path):
    """Every sample of ``remote/split`` as a reader with a fresh cache sees it: an int array per sample."""
    from streaming import StreamingDataset
    ds = StreamingDataset(remote=f'{remote}/{split}', local=str(cache), batch_size=1, shuffle=False,
                          download_retry=1)
    return [ds[i]['tokens'].tolist() for i in range(len(ds))]


def _local_split(folder: Path, split: str):
    from streaming import StreamingDataset
    return [s['tokens'].tolist() for s in StreamingDataset(local=str(folder / split), batch_size=1, shuffle=False)]


def test_s3_overwrite_failing_part_way_never_shows_a_mix(s3, tmp_path):
    """The store refuses writes from the n-th on, for every n of a replacement: after each failure, a reader sees
    the old dataset whole, or no dataset (an error), for train and for val; never new samples among old ones."""
    docs_a, docs_b = write_text(tmp_path / 'a', TEXT_A), write_text(tmp_path / 'b', TEXT_B)
    kw = dict(val_fraction=0.2, shard_size='4kb')
    prep([docs_a], tmp_path / 'old', **kw)
    prep([docs_b], tmp_path / 'new', **kw)
    want = {name: {s: _local_split(tmp_path / name, s) for s in ('train', 'val')} for name in ('old', 'new')}
    assert want['old']['train'] != want['new']['train'] and len(want['old']['train']) > 4

    remote = 's3://dsets/corpus'
    prep([docs_a], remote, **kw)
    s3.fail_writes_after(None)
    prep([docs_b], remote, overwrite=True, **kw)  # a full replacement, its writes counted
    writes = s3.writes
    prep([docs_a], remote, overwrite=True, **kw)  # the old dataset again, as an overwrite leaves it
    assert writes > 8
    client = s3.client()
    snapshot = {k: client.get_object(Bucket='dsets', Key=k)['Body'].read() for k in s3.keys('dsets', 'corpus/')}
    seen = set()
    # The last write releases the lock; a failure there leaves the new dataset whole (and the lock behind).
    for n in range(1, writes - 1):
        s3.fail_writes_after(n)
        with pytest.raises(PrepError, match='AccessDenied'):
            prep([docs_b], remote, overwrite=True, **kw)
        s3.fail_writes_after(None)
        for split in ('train', 'val'):
            try:
                got = _read_split(remote, split, tmp_path / 'cache' / f'{n}-{split}')
            except Exception as e:  # no index: the reader cannot start
                assert 'index.json' in str(e) or 'Not Found' in str(e) or '404' in str(e), (n, split, e)
                seen.add((split, 'none'))
                continue
            which = [name for name in ('old', 'new') if got == want[name][split]]
            assert which, f'write {n} failing left {split} readable as neither dataset (a mix)'
            seen.add((split, which[0]))
        # Back to the old dataset for the next round (the store refused the failed run's cleanup, its lock too).
        for key in s3.keys('dsets', 'corpus/'):
            client.delete_object(Bucket='dsets', Key=key)
        for key, body in snapshot.items():
            client.put_object(Bucket='dsets', Key=key, Body=body)
    # The failures happened at every stage: before anything changed, with val gone, after the train swap.
    assert {('train', 'old'), ('val', 'none'), ('train', 'new')} <= seen, seen
    assert ('val', 'new') not in seen or ('train', 'old') in seen

    # An overwrite with no val split leaves no old val behind; nothing but the new dataset and its marker remains.
    prep([docs_b], tmp_path / 'new_noval', val_fraction=0.0, shard_size='1kb')
    prep([docs_b], remote, overwrite=True, val_fraction=0.0, shard_size='1kb')
    assert _read_split(remote, 'train', tmp_path / 'cache' / 'final') == _local_split(tmp_path / 'new_noval', 'train')
    index = json.loads(s3.client().get_object(Bucket='dsets', Key='corpus/train/index.json')['Body'].read())
    assert s3.keys('dsets', 'corpus/') == sorted(['corpus/' + MARKER, 'corpus/train/index.json'] +
                                              [f'corpus/train/{s["raw_data"]["basename"]}' for s in index['shards']])


def test_s3_prefix_being_written_by_another_run_is_refused(s3, tmp_path):
    docs = write_text(tmp_path / 'docs', TEXT_A)
    lock = {'host': 'trainer-7', 'pid': 4242, 'since': 0}
    s3.client().put_object(Bucket='dsets', Key='busy/.foundry-dbrx.lock', Body=json.dumps(lock).encode())
    with pytest.raises(PrepError, match=r'--out s3://dsets/busy is being written by another prep-data \(pid 4242 on '
                                        r'trainer-7, .*\); if that process is gone, delete s3://dsets/busy/.foundry-dbrx.lock'):
        prep([docs], 's3://dsets/busy')
    assert s3.keys('dsets', 'busy/') == ['busy/.foundry-dbrx.lock']


def test_credentials_in_the_endpoint_url_never_reach_the_message(tmp_path, monkeypatch, capsys):
    from foundry_dbrx.data.remote import redact
    docs = write_text(tmp_path / 'docs', TEXT_A)
    monkeypatch.setenv('S3_ENDPOINT_URL', 'http://AKIAEXAMPLE:wJalrXUtnFEMI@127.0.0.1:9')  # nothing listens
    monkeypatch.setenv('AWS_MAX_ATTEMPTS', '1')
    monkeypatch.setenv('AWS_ACCESS_KEY_ID', 'x')
    monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', 'y')
    assert cli(['prep-data', str(docs), '--out', 's3://b/p', '--no-progress', '--tmp-dir', str(tmp_path)]) == 1
    line = one_error_line(capsys)
    assert 'wJalrXUtnFEMI' not in line and 'AKIAEXAMPLE' not in line and 'http://***@127.0.0.1:9' in line, line
    signed = 'https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F2026&X-Amz-Signature=abc123&x=1'
    assert redact(signed) == 'https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&x=1'


# ------------------------------------------------------------------------------------------------------ the loader
def test_flipped_byte_in_a_local_only_shard_is_reported_not_deleted(tmp_path):
    from foundry_dbrx.data.loader import ShardUnavailableError, StrictStreamingTextDataset
    from foundry_dbrx.data.tokenizer import DbrxTokenizer
    data = tmp_path / 'data'
    prep([write_text(tmp_path / 'docs', TEXT_A)], data, val_fraction=0.0, shard_size='1kb', compression='zstd')
    shard = sorted((data / 'train').glob('shard.*.mds.zstd'))[1]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))

    ds = StrictStreamingTextDataset(tokenizer=DbrxTokenizer(), max_seq_len=16, local=str(data), remote=None,
                                    split='train', shuffle=False, batch_size=1, validate_hash='xxh3_64')
    with pytest.raises(ShardUnavailableError, match=rf'Checksum failure: .*{shard.name}'):
        for _ in ds:
            pass
    assert shard.read_bytes() == bytes(raw)  # the only copy is still there, for the user to inspect or restore


# ----------------------------------------------------------------------------------------------------- disk full
@pytest.fixture
def small_disk(tmp_path):
    """A 600 kB filesystem: a tmpfs where this process may mount one (root), else None (the tests then simulate
    ENOSPC; FOUNDRY_DBRX_TEST_SIMULATE_ENOSPC=1 forces that path where a mount would work)."""
    mount = tmp_path / 'small'
    mount.mkdir()
    simulate = os.environ.get('FOUNDRY_DBRX_TEST_SIMULATE_ENOSPC') == '1'
    if not simulate and os.geteuid() == 0 and shutil.which('mount'):
        r = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=600k', 'tmpfs', str(mount)], capture_output=True)
        if r.returncode == 0:
            yield mount
            subprocess.run(['umount', '-l', str(mount)], check=False)
            return
    yield None


def _simulate_enospc(monkeypatch, after: int) -> None:
    """Writes to files under a folder named ``small`` fail with ENOSPC once ``after`` bytes were written (and
    fallocate at once), as on a disk that fills."""
    import builtins
    real_open, written = builtins.open, [0]

    class Full:
        def __init__(self, f):
            self._f = f

        def write(self, data):
            written[0] += len(data)
            if written[0] > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self._f.write(data)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

    def opener(file, mode='r', *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return Full(f) if any(c in mode for c in 'wax+') and 'small' in str(file) else f

    def fallocate(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def save_file(tensors, filename, metadata=None):  # safetensors writes from Rust: the same bytes, through open
        with opener(filename, 'wb') as f:
            f.write(safetensors.torch.save(tensors, metadata=metadata))

    import safetensors.torch
    monkeypatch.setattr(builtins, 'open', opener)
    monkeypatch.setattr(os, 'posix_fallocate', fallocate)
    monkeypatch.setattr(safetensors.torch, 'save_file', save_file)


@pytest.mark.parametrize('when', ['checked up front', 'found while writing'])
def test_disk_full_during_conversion_is_one_line_and_leaves_nothing(hf_dir, converted, tmp_path, small_disk,
                                                                    monkeypatch, capsys, when):
    disk = small_disk or tmp_path / 'small'
    if when == 'found while writing' or small_disk is None:
        # Past the up-front check (another process could fill the disk just after it): the write itself fails.
        monkeypatch.setattr('foundry_dbrx.outputs.check_free_space', lambda *a, **k: None)
    if small_disk is None:
        _simulate_enospc(monkeypatch, after=200_000)
    # float32 doubles the bf16 weights: about 806 kB on a 600 kB disk (the SIGBUS case before the fix).
    fp32_bytes = sum(t.numel() * 4 for t in read_hf_weights(hf_dir).values())
    up_front = when == 'checked up front' and small_disk is not None
    for args, out in ((['hf-to-composer', str(hf_dir)], disk / 'dbrx.pt'),
                      (['composer-to-hf', str(converted)], disk / 'export')):
        assert cli(['convert', *args, str(out), '--dtype', 'float32', '--quiet']) == 1
        line = one_error_line(capsys)
        assert line.startswith(f'foundry-dbrx convert: error: {out}: '), line
        assert ('not enough space on its filesystem' if up_front else 'no space left on device') in line, line
        assert _needed(line) == fp32_bytes, line
        assert list(disk.iterdir()) == []  # no hidden partial file left to fill the disk


def _needed(line: str) -> int:
    return int(re.search(r'it needs (?:about )?([\d,]+) bytes', line).group(1).replace(',', ''))


def test_disk_full_during_prep_data_is_one_line_and_leaves_nothing(tmp_path, small_disk, monkeypatch, capsys):
    disk = small_disk or tmp_path / 'small'
    if small_disk is None:
        _simulate_enospc(monkeypatch, after=300_000)
    docs = write_text(tmp_path / 'docs', 'Plenty of words to tokenize, many times over. ' * 40_000)
    assert cli(['prep-data', str(docs), '--out', str(disk / 'data'), '--no-progress', '--workers', '1',
                '--shard-size', '64kb']) == 1
    line = one_error_line(capsys)
    assert f'{disk / "data"}: no space left on device' in line and 'it needs about ' in line, line
    assert 1_000_000 < _needed(line) < 3_000_000  # 1.84 MB of text, about 4 bytes per token of 4.6 characters
    assert list(disk.iterdir()) == []


def test_a_shared_memory_prefix_taken_by_another_process_meanwhile_is_looked_up_again(tmp_path, monkeypatch):
    """Streaming's race (mosaicml/streaming#884): another process creates the prefix this one just found free."""
    from multiprocessing.shared_memory import SharedMemory

    from streaming.base.shared import prefix as shm_prefix

    from foundry_dbrx.data.loader import StrictStreamingTextDataset
    from foundry_dbrx.data.tokenizer import DbrxTokenizer
    data = tmp_path / 'data'
    prep([write_text(tmp_path / 'docs', TEXT_A)], data, val_fraction=0.0)
    find, taken = shm_prefix._check_and_find_retrying, []

    def find_then_lose_it(*args, **kwargs):
        found = find(*args, **kwargs)
        if not taken:  # the other process registers the same prefix first
            taken.append((found, SharedMemory(shm_prefix._get_path(found, shm_prefix.LOCALS), create=True, size=8)))
        return found

    monkeypatch.setattr(shm_prefix, '_check_and_find_retrying', find_then_lose_it)
    try:
        ds = StrictStreamingTextDataset(tokenizer=DbrxTokenizer(), max_seq_len=16, local=str(data), remote=None,
                                        split='train', shuffle=False, batch_size=1)
        assert taken and ds._shm_prefix_int != taken[0][0]
        assert len(next(iter(ds))) == 16
    finally:
        for _, shm in taken:
            shm.close()
            shm.unlink()


_ABANDONED_EPOCH_SCRIPT = '''
import sys, threading, time
from streaming.base.dataset import _ShardState
from foundry_dbrx.data.loader import StrictStreamingTextDataset
from foundry_dbrx.data.tokenizer import DbrxTokenizer

ds = StrictStreamingTextDataset(tokenizer=DbrxTokenizer(), max_seq_len=16, local=sys.argv[1], remote=None,
                                split='train', shuffle=False, batch_size=1, predownload=2)
it = iter(ds)
next(it)
# The later shards are being fetched by someone else, who never finishes: Streaming's ready thread waits for them.
for shard in range(1, len(ds._shard_states)):
    ds._shard_states[shard] = _ShardState.PREPARING
ds.prepare_shard = lambda shard_id, blocking=True: None
threading.Thread(target=lambda: [x for x in it], daemon=True).start()
time.sleep(1)
print('done', flush=True)
'''


def test_a_process_with_an_abandoned_epoch_still_exits(tmp_path):
    """A run that stops mid-epoch while a shard is still being fetched must end when its work is done, not hang
    at interpreter exit joining Streaming's background threads (seen at the end of a test session)."""
    data = tmp_path / 'data'
    prep([write_text(tmp_path / 'docs', TEXT_A)], data, val_fraction=0.0, shard_size='1kb')
    assert len(list((data / 'train').glob('shard.*.mds'))) >= 3
    start = time.monotonic()
    res = subprocess.run([sys.executable, '-c', _ABANDONED_EPOCH_SCRIPT, str(data)], capture_output=True, text=True,
                         timeout=90, env=subprocess_env())
    assert res.returncode == 0 and res.stdout.strip().endswith('done'), res.stdout + res.stderr
    assert time.monotonic() - start < 60
