"""Training runs of ``tests/yamls/dbrx-micro.yaml`` in child processes, watched step by step, for the resume and
object-store tests (a run that is SIGKILLed, or whose store goes away, has to be another process)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from tests.conftest import ROOT, default_sigint, subprocess_env
from tests.s3_server import LoopbackS3

MICRO_YAML = ROOT / 'tests' / 'yamls' / 'dbrx-micro.yaml'
_STEP = re.compile(r'\[batch=(\d+)/\d+\]')  # Composer's console line after each logged batch


def s3_env(server: LoopbackS3) -> dict:
    """A child's environment: the loopback store and its credentials, no AWS configuration from this machine."""
    return subprocess_env(**server.env(), AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)


class TrainRun:
    """``python -m foundry_dbrx.train tests/yamls/dbrx-micro.yaml ...`` under ``folder`` (checkpoints, local shard
    cache, summary JSON), started at once; its output is read in a thread so the test can watch the steps."""

    def __init__(self, folder: Path, overrides: list[str], env: dict):
        self.folder = folder
        self.checkpoints = folder / 'checkpoints'
        self.summary = folder / 'summary.json'
        self.cmd = [sys.executable, '-m', 'foundry_dbrx.train', str(MICRO_YAML),
                    f'variables.data_local={folder / "cache"}', f'save_folder={self.checkpoints}',
                    f'callbacks.dbrx_run_summary.json_path={self.summary}', *overrides]
        self.env = env
        self.lines: list[str] = []
        self.steps: list[tuple[int, float]] = []
        self.proc: Optional[subprocess.Popen] = None
        self.start()

    def start(self) -> None:
        """Starts (or, after a kill, restarts) the same command; autoresume picks up the latest checkpoint."""
        self.lines, self.steps = [], []
        # Own process group: the SIGKILL reaches the run and anything it started, and nothing else.
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                     preexec_fn=default_sigint)
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.append(line)
            match = _STEP.search(line)
            if match:
                self.steps.append((int(match.group(1)), time.time()))

    @property
    def step(self) -> int:
        return self.steps[-1][0] if self.steps else 0

    def output(self, tail: int = 6000) -> str:
        return ''.join(self.lines)[-tail:]

    def wait_until(self, condition: Callable[[], bool], timeout: float = 300, what: str = '') -> None:
        deadline = time.time() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f'run ended (rc {self.proc.returncode}) before {what}:\n{self.output()}')
            if time.time() > deadline:
                self.kill()
                raise AssertionError(f'timed out waiting for {what}:\n{self.output()}')
            time.sleep(0.05)

    def wait(self, timeout: float = 300) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f'run still going after {timeout} s:\n{self.output()}')
        self._reader.join(10)
        return rc

    def interrupt(self, sig: int = signal.SIGINT) -> float:
        """Ctrl-C as a terminal sends it: SIGINT to the run's whole process group. Returns when it was sent."""
        os.killpg(self.proc.pid, sig)
        return time.time()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def checkpoint(self, batch: int) -> Path:
        return self.checkpoints / f'ep0-ba{batch}-rank0.pt'

    def losses(self) -> dict[int, float]:
        with open(self.summary) as f:
            return {int(step): loss for step, loss in json.load(f)['losses']}


def release_streaming_shm(folder: Path) -> int:
    """Removes the shared memory (and lock files) that Streaming leaves behind when a run of ours dies without its
    cleanup (SIGKILL): the prefixes whose ``locals`` segment names a cache under ``folder``. Call it once those runs
    have exited; another process's segments never name our temporary folders. Returns how many prefixes it freed."""
    shm, freed = Path('/dev/shm'), 0
    if not shm.is_dir():
        return 0
    for segment in shm.glob('*_locals'):
        try:
            ours = str(folder).encode() in segment.read_bytes()
        except OSError:
            continue
        if ours:
            prefix = segment.name.split('_', 1)[0]
            for leftover in [*shm.glob(f'{prefix}_*'), *Path(tempfile.gettempdir()).glob(f'{prefix}_*_filelock')]:
                leftover.unlink(missing_ok=True)
            freed += 1
    return freed
