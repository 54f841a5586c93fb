"""prep-data and training against a real S3-compatible server on loopback (moto's S3 app; no boto3 mocks), and the
faults: a corrupt or missing shard stops training with an error naming it, a store gone for good stops it with a
clear error and leaves the last checkpoint intact. (A store that comes back is in test_resume.py.)"""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from foundry_dbrx.data.prep import PrepConfig, PrepError, prep_data
from tests.s3_server import LoopbackS3, set_env
from tests.train_runs import TrainRun, release_streaming_shm, s3_env

SMALL = dict(default=True, max_tokens=3300, max_seq_len=64, val_fraction=0.02, shard_size='2kb', progress=False)
BIG = dict(default=True, max_files=40, max_seq_len=64, shard_size='16kb', progress=False)


@pytest.fixture(scope='module')
def store(tmp_path_factory):
    """The server, and the data sets the fault runs read: a big one, and a small one (50 samples in 7 shards,
    so that 12 steps of 4 read every shard) copied twice, once with shard 3 corrupted, once with shard 5 gone."""
    server = LoopbackS3().start()
    with pytest.MonkeyPatch.context() as mp:
        set_env(mp, server)
        s3 = server.client()
        s3.create_bucket(Bucket='store')
        prep_data(PrepConfig(out='s3://store/big', **BIG))
        prep_data(PrepConfig(out='s3://store/small', **SMALL))
        for copy in ('corrupt', 'missing'):
            for key in server.keys('store', 'small/'):
                s3.copy_object(Bucket='store', Key=key.replace('small/', f'{copy}/', 1),
                               CopySource={'Bucket': 'store', 'Key': key})
        s3.put_object(Bucket='store', Key='corrupt/train/shard.00003.mds', Body=b'\0' * 2000)
        s3.delete_object(Bucket='store', Key='missing/train/shard.00005.mds')
        yield server, mp
    server.stop()


@pytest.fixture(scope='module')
def fault_runs(store, tmp_path_factory):
    """The three fault runs, started together (they share two cores; each spends most of its time importing).
    The store-gone run talks to its own server on another port, which its test stops."""
    server, _ = store
    gone_server = LoopbackS3().start()  # the same moto backend, so the same objects
    root = tmp_path_factory.mktemp('fault_runs')
    runs = {
        'corrupt': TrainRun(root / 'corrupt', ['variables.data_remote=s3://store/corrupt', 'max_duration=12ba'],
                            s3_env(server)),
        'missing': TrainRun(root / 'missing', ['variables.data_remote=s3://store/missing', 'max_duration=12ba',
                                               'variables.download_retry=2'], s3_env(server)),
        'gone': TrainRun(root / 'gone', ['variables.data_remote=s3://store/big', 'max_duration=40ba'],
                         s3_env(gone_server)),
    }
    runs['gone'].server = gone_server
    yield runs
    for run in runs.values():
        run.kill()
    release_streaming_shm(root)
    gone_server.stop()


def _sha1_tree(folder):
    return {os.path.relpath(os.path.join(d, n), folder): hashlib.sha1(open(os.path.join(d, n), 'rb').read()).hexdigest()
            for d, _, names in os.walk(folder) for n in names}


def test_prep_to_s3_uploads_exactly_the_local_dataset(store, tmp_path):
    server, mp = store
    local = prep_data(PrepConfig(out=str(tmp_path / 'local'), **BIG))
    want = _sha1_tree(tmp_path / 'local')
    s3 = server.client()
    got = {key[len('big/'):]: hashlib.sha1(s3.get_object(Bucket='store', Key=key)['Body'].read()).hexdigest()
           for key in server.keys('store', 'big/')}
    assert got == want  # same shards, same index files, nothing else
    assert local.shards['train'] == 62 == len([k for k in got if k.startswith('train/shard.')])

    with pytest.raises(PrepError, match=r'--out s3://store/big already holds a dataset \(train/index\.json\); '
                                        r'pass --overwrite'):
        prep_data(PrepConfig(out='s3://store/big', **BIG))
    with pytest.raises(PrepError, match=r'--out s3://nobucket/x: cannot write to s3://nobucket/x/train: '
                                        r'ClientError: .*\(404\).*HeadBucket.*check the bucket, S3_ENDPOINT_URL'):
        prep_data(PrepConfig(out='s3://nobucket/x', **SMALL))


def test_prep_to_unreachable_store_fails_before_any_work(store, tmp_path, monkeypatch):
    monkeypatch.setenv('S3_ENDPOINT_URL', 'http://127.0.0.1:9')  # discard port: nothing listens
    monkeypatch.setenv('AWS_MAX_ATTEMPTS', '1')
    with pytest.raises(PrepError, match=r'--out s3://store/elsewhere: cannot write to .*EndpointConnectionError'):
        prep_data(PrepConfig(out='s3://store/elsewhere', tmp_dir=str(tmp_path), **SMALL))
    assert os.listdir(tmp_path) == []  # the staging folder is gone too


def _assert_stopped_on(run, shard):
    rc = run.wait()
    out = run.output(20000)
    assert rc != 0, f'the run finished although {shard} was unusable:\n{out[-3000:]}'
    assert 'ShardUnavailableError: streaming s3://store/' in out, out[-3000:]
    error = [line for line in out.splitlines() if 'ShardUnavailableError:' in line][-1]
    assert shard in error, error
    # Nothing past the failure was trained on and called a finished run.
    assert not run.summary.exists() and not run.checkpoint(12).exists()
    return error


def test_corrupt_shard_stops_training_naming_it(fault_runs):
    run = fault_runs['corrupt']
    error = _assert_stopped_on(run, 'train/shard.00003.mds')
    assert 'Checksum failure' in error
    # The bad copy does not stay in the cache, where the next run would read it unchecked.
    assert not (run.folder / 'cache' / 'train' / 'shard.00003.mds').exists()
    assert (run.folder / 'cache' / 'train' / 'index.json').is_file()


def test_missing_shard_stops_training_naming_it(fault_runs):
    error = _assert_stopped_on(fault_runs['missing'], 's3://store/missing/train/shard.00005.mds')
    assert 'not found' in error


def test_store_gone_for_good_stops_and_keeps_the_last_checkpoint(fault_runs):
    run = fault_runs['gone']
    run.wait_until(lambda: run.step >= 6 and run.checkpoint(4).is_file(), what='step 6 with a checkpoint at 4')
    run.server.stop()
    rc = run.wait()
    out = run.output(20000)
    assert rc != 0
    error = [line for line in out.splitlines() if 'ShardUnavailableError:' in line][-1]
    assert 'Could not connect to the endpoint URL' in error and f':{run.server.port}/store/big/train/shard.' in error
    saved = sorted(run.checkpoints.glob('ep0-ba*-rank0.pt'))
    assert saved and run.step < 40
    latest = run.checkpoints / 'latest-rank0.pt'
    assert latest.resolve() in [p.resolve() for p in saved]
    state = torch.load(latest, map_location='cpu', weights_only=False)['state']  # loads: not truncated
    assert latest.resolve().name == f'ep0-ba{state["timestamp"]["Timestamp"]["batch"]}-rank0.pt'
    assert 'model.lm_head.weight' in state['model'] and state['dataset_state']
