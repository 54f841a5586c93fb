"""``dbrx_run_summary``: a Composer callback that says, at the end of a run, how the loss moved and where the
checkpoints are. Registered in LLM Foundry's callbacks, so every launcher (``make train``, ``llmfoundry train``,
``composer -m foundry_dbrx.train``) prints the same closing lines when the YAML lists it."""

from __future__ import annotations

import json
import os
import time
from typing import Optional

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist, format_name_with_dist

__all__ = ['RunSummary']


class RunSummary(Callback):
    """Records the training loss each batch; at fit end prints first/last loss, steps, time and checkpoints.

    Args:
        json_path: also write the summary (and every step's loss) as JSON here (rank 0), for scripts and tests.
    """

    def __init__(self, json_path: Optional[str] = None):
        self.json_path = json_path
        self.losses: list[tuple[int, float]] = []
        self._start = time.time()

    def fit_start(self, state: State, logger: Logger) -> None:
        self._start = time.time()

    def batch_end(self, state: State, logger: Logger) -> None:
        total = state.total_loss_dict.get('loss/train/total') if state.total_loss_dict else None
        if total is not None:
            self.losses.append((int(state.timestamp.batch), float(total)))

    def fit_end(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() != 0:
            return
        folders, files = [], []
        for cb in state.callbacks:
            if type(cb).__name__ == 'CheckpointSaver':
                folders.append(format_name_with_dist(str(cb.folder), state.run_name))
                saved = getattr(cb, 'all_saved_checkpoints_to_timestamp', None) or {}
                files.extend(os.path.abspath(str(p)) for p in saved)
        summary = {
            'steps': int(state.timestamp.batch),
            'world_size': dist.get_world_size(),
            'seconds': round(time.time() - self._start, 1),
            'first_loss': self.losses[0][1] if self.losses else None,
            'last_loss': self.losses[-1][1] if self.losses else None,
            'checkpoint_folders': folders,
            'checkpoints': files,
            'losses': self.losses,
        }
        lines = [f'[foundry-dbrx] trained {summary["steps"]} steps in {summary["seconds"]} s']
        if self.losses:
            lines.append(f'[foundry-dbrx] loss: first {summary["first_loss"]:.4f} (step {self.losses[0][0]}) '
                         f'-> last {summary["last_loss"]:.4f} (step {self.losses[-1][0]})')
        for folder in folders:
            lines.append(f'[foundry-dbrx] checkpoints in {os.path.abspath(folder)}')
        if files:
            lines.append(f'[foundry-dbrx] latest checkpoint: {files[-1]}')
        print('\n'.join(lines), flush=True)
        if self.json_path:
            os.makedirs(os.path.dirname(os.path.abspath(self.json_path)), exist_ok=True)
            with open(self.json_path, 'w') as f:
                json.dump(summary, f, indent=1)
