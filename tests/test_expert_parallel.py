"""Expert parallelism on CPU over gloo, against the single-process path: the all-to-all dispatcher with the eager
experts (2 and 4 ranks, balanced, skewed and empty-expert routings), a whole model made expert-parallel by
``parallelize.apply_expert_parallel``, outputs and every gradient, and the expert-load statistics and bias updates
of ``dbrx_expert_load``."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tests.conftest import ROOT, subprocess_env


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
def test_expert_parallel_layer_and_model_match_one_process(tmp_path, world, ep):
    """Every case of tests/ep_worker.py in one launch (process start-up is most of the cost): the dispatcher with
    explicit routings (with ep 4 and the 'empty' routing, a whole rank receives no rows), the whole model, and the
    expert-load statistics reduced over the ranks."""
    run_ranks('both', world, ep, tmp_path)
