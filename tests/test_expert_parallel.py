"""Expert parallelism on CPU over gloo, against the single-process path: the all-to-all dispatcher with the eager
experts (2 and 4 ranks, balanced, skewed and empty-expert routings), a whole model made expert-parallel by
``parallelize.apply_expert_parallel`` (outputs and every gradient), meta-device initialisation at any world size
and EP degree, the expert-load statistics and bias updates of ``dbrx_expert_load``, and training under the
``composer`` launcher with FSDP2 + EP 2 (the losses of one process on the same global batch; a checkpoint saved at
EP 2 resumed at EP 1).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from tests.conftest import ROOT, VENV_BIN, subprocess_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_ranks(case: str, world: int, ep: int, out) -> None:
    """Runs tests/ep_worker.py's ``case`` on ``world`` gloo ranks; every rank must pass its own checks."""
    env = subprocess_env(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(_free_port()), OMP_NUM_THREADS='1')
    procs = [subprocess.Popen([sys.executable, '-m', 'tests.ep_worker', case, str(rank), str(world), str(ep),
                               str(out)], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in range(world)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    failed = [f'--- rank {r} (exit {p.returncode})\n{log[-3000:]}' for r, (p, log) in enumerate(zip(procs, logs))
              if p.returncode != 0]
    assert not failed, '\n'.join(failed)
    assert sorted(f.name for f in out.glob('ok-*')) == [f'ok-{r}' for r in range(world)]


@pytest.mark.parametrize('world, ep', [(2, 2), (4, 2), (4, 4)])
def test_expert_parallel_layer_model_and_init_match_one_process(tmp_path, world, ep):
    """The cases of tests/ep_worker.py in one launch (process start-up is most of the cost): the dispatcher with
    explicit routings (with ep 4 and the 'empty' routing, a whole rank receives no rows), the whole model,
    meta-device initialisation under FSDP2 + EP (the same weights as one process), and the expert-load statistics
    reduced over the ranks."""
    run_ranks('all', world, ep, tmp_path)


MICRO_YAML = ROOT / 'tests' / 'yamls' / 'dbrx-micro.yaml'


def _train(run_dir, corpus, nproc: int, *overrides: str, **env: str) -> dict[int, float]:
    """Trains the micro YAML (6 steps of 4 samples) in child processes; the loss of every step (Composer logs the
    mean over ranks)."""
    # Norm clipping at a threshold every step's gradient exceeds: under EP the gradients live on two device meshes
    # and the clipping must combine their norms (parallelize.clip_grad_norm_) to give one process's steps.
    args = [str(MICRO_YAML), f'variables.data_local={corpus}', 'max_duration=6ba', 'save_interval=3ba',
            f'save_folder={run_dir}/checkpoints', f'callbacks.dbrx_run_summary.json_path={run_dir}/summary.json',
            'autoresume=false', 'variables.validate_hash=null', 'algorithms.gradient_clipping.clipping_type=norm',
            'algorithms.gradient_clipping.clipping_threshold=0.05', *overrides]
    if nproc == 1:
        cmd = [sys.executable, '-m', 'foundry_dbrx.train', *args]
    else:
        cmd = [str(VENV_BIN / 'composer'), '-n', str(nproc), '--master_port', str(_free_port()), '-m',
               'foundry_dbrx.train', *args, 'fsdp_config={state_dict_type: sharded}']
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS='1', **env), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    with open(run_dir / 'summary.json') as f:
        return dict(json.load(f)['losses'])


def test_composer_training_with_expert_parallelism_matches_one_process_and_resumes_at_ep1(tmp_path, micro_corpus):
    one = _train(tmp_path / 'one', micro_corpus, 1)
    ep2 = _train(tmp_path / 'ep2', micro_corpus, 2, 'model.training.expert_parallel_degree=2')
    assert sorted(one) == sorted(ep2) == list(range(1, 7))
    for step in one:  # fp32 sums in another order, nothing more
        assert ep2[step] == pytest.approx(one[step], rel=1e-4), (step, one, ep2)
    assert len(set(one.values())) == 6

    # The sharded checkpoint holds the experts with their global shapes: it loads at EP 1 (FSDP2 alone), and the
    # run continues with the losses of the uninterrupted EP 2 run.
    checkpoint = tmp_path / 'ep2' / 'checkpoints' / 'ep0-ba3'
    assert checkpoint.is_dir(), sorted(p.name for p in (tmp_path / 'ep2' / 'checkpoints').iterdir())
    resumed = _train(tmp_path / 'ep1', micro_corpus, 2, f'load_path={checkpoint}', FSDP_VERSION='2')
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step] == pytest.approx(ep2[step], rel=1e-4), (step, ep2, resumed)
