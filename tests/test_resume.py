"""Deterministic resume from an S3-compatible store: a run SIGKILLed mid-epoch and started again (autoresume)
records exactly the losses of an uninterrupted run at every step after its checkpoint, even though the store goes
away for a few seconds while it runs (Streaming's download_retry carries it through)."""

from __future__ import annotations

import time

import pytest

from foundry_dbrx.data.prep import PrepConfig, prep_data
from tests.s3_server import LoopbackS3, set_env
from tests.train_runs import TrainRun, release_streaming_shm, s3_env

STEPS, SAVE_EVERY, OUTAGE_S = 14, 4, 5.0


@pytest.fixture(scope='module')
def store():
    """A loopback S3 server holding ~240k tokens of the default corpus in 62 shards of 16 kB."""
    server = LoopbackS3().start()
    with pytest.MonkeyPatch.context() as mp:
        set_env(mp, server)
        server.client().create_bucket(Bucket='resume')
        prep_data(PrepConfig(default=True, max_files=40, max_seq_len=64, shard_size='16kb',
                             out='s3://resume/corpus', progress=False))
    yield server
    server.stop()


def test_sigkill_then_autoresume_matches_uninterrupted_run(store, tmp_path):
    overrides = ['variables.data_remote=s3://resume/corpus', f'max_duration={STEPS}ba', f'save_interval={SAVE_EVERY}ba']
    env = s3_env(store)
    # Both start together: the CPU math does not depend on what else runs on the machine.
    reference = TrainRun(tmp_path / 'reference', overrides, env)
    killed = TrainRun(tmp_path / 'killed', overrides, env)
    try:
        killed.wait_until(lambda: killed.step >= SAVE_EVERY + 3 and killed.checkpoint(SAVE_EVERY).is_file(),
                          what=f'step {SAVE_EVERY + 3} with a checkpoint at {SAVE_EVERY}')
        killed.kill()  # SIGKILL, mid-epoch (an epoch is 900+ steps)
        assert killed.proc.returncode == -9
        saved = sorted(int(p.name.split('-ba')[1].split('-')[0]) for p in killed.checkpoints.glob('ep0-ba*-rank0.pt'))
        resume_from = saved[-1]
        assert SAVE_EVERY <= resume_from < STEPS and not killed.summary.exists()

        killed.start()  # the same command again
        killed.wait_until(lambda: killed.step >= resume_from + 1, what="the restarted run to train")
        store.stop(count_attempts=True)
        time.sleep(OUTAGE_S)
        store.start()
        # Connections were made, and turned away, while it was down: the run needed the store then.
        assert store.dropped > 0, 'nobody tried the store while it was down: the outage tested nothing'

        assert killed.wait() == 0, killed.output()
        assert reference.wait() == 0, reference.output()
    finally:
        reference.kill()
        killed.kill()
        release_streaming_shm(tmp_path)
        if not store.running:
            store.start()

    want, got = reference.losses(), killed.losses()
    assert sorted(want) == list(range(1, STEPS + 1))
    # Composer restored the model, optimizer, RNG and the position in the shuffled stream from the checkpoint.
    assert sorted(got) == list(range(resume_from + 1, STEPS + 1)), 'the restarted run did not resume'
    assert {s: got[s] for s in got} == {s: want[s] for s in got}  # exactly, not approximately
    assert len(set(want.values())) == STEPS  # every step a different batch: equal losses mean the same data
