"""``dbrx_run_summary``: a Composer callback that ends a run with a short account of it, and turns a first Ctrl-C
into a stop at a step boundary with a checkpoint.

Registered in LLM Foundry's callbacks and added by ``foundry_dbrx.train`` to every YAML, so every launcher
(``make train``, ``llmfoundry train``, ``composer -m foundry_dbrx.train``) prints the same closing lines.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any, Optional

import torch
from composer.core import State
from composer.core.callback import Callback
from composer.loggers import Logger
from composer.utils import dist, format_name_with_dist

__all__ = ['RunSummary', 'RunInterrupted', 'SIGNALS']

PREFIX = '[foundry-dbrx]'
# The signals that stop a run at the next step boundary: Ctrl-C, and what launchers and schedulers send.
SIGNALS = (signal.SIGINT, signal.SIGTERM)
_NAMES = {signal.SIGINT: 'Ctrl-C (SIGINT)', signal.SIGTERM: 'SIGTERM'}


class RunInterrupted(KeyboardInterrupt):
    """A second Ctrl-C stopped training at once; the run's closing lines say what was saved."""


def _say(text: str) -> None:
    # os.write, not print: this may run inside a signal handler that interrupted a print (a reentrant print raises).
    os.write(sys.stderr.fileno(), (text + '\n').encode())


class RunSummary(Callback):
    """What the run did, said once at its very end; Ctrl-C and SIGTERM stop it at a step boundary.

    The closing lines (rank 0, when Composer closes the trainer: after the last metrics and the final evaluation)
    give the steps and tokens trained by this process (a resumed run counts only its own), its tokens/s, its first
    and last training loss, the last evaluation cross-entropy, the checkpoints, and where the per-step losses went.

    A first SIGINT or SIGTERM during training lets the step in progress finish; every rank then stops at the same
    step (they agree through a one-element all-reduce per step), the end-of-training evaluation is skipped, and
    Composer writes its end-of-training checkpoint when ``save_folder`` is set: a rerun with ``autoresume``
    continues from there with the losses an uninterrupted run would have had. The same signal again stops at once
    (once a checkpoint being written is complete), as Composer's own handler does. A SIGTERM after a SIGINT
    (Composer's launcher forwards Ctrl-C that way) does not count as a second one.

    Args:
        json_path: also write the summary and every step's loss as JSON here (rank 0, runs that end by reaching
            ``max_duration`` or by a signal; not runs that fail); ``{run_name}`` is filled in.
    """

    def __init__(self, json_path: Optional[str] = None):
        self.json_path = json_path
        self.losses: list[tuple[int, float]] = []
        self.eval_loss: Optional[tuple[int, float]] = None
        self.stop_signal: Optional[int] = None  # the first stopping signal this process received
        self.stopped_at: Optional[int] = None  # the step at which the ranks agreed to stop
        self._start_step = self._start_tokens = 0
        self._max_duration = ''
        self._start_time = self._last_batch_time = 0.0
        self._eval_seconds = 0.0
        self._eval_start = 0.0
        self._fit_started = self._fit_ended = self._closed = False
        self.forced = False  # a second signal stopped the run at once
        self._saving = False  # between a *_CHECKPOINT event and the next step: a checkpoint may be being written
        self._force_after_save: Optional[int] = None
        self._previous_handlers: dict[int, Any] = {}

    # --- training events ------------------------------------------------------------------------------------------
    def init(self, state: State, logger: Logger) -> None:
        # LLM Foundry prints the resolved config once (its log_config); Composer's console logger would print the same
        # hyperparameters again at fit start (another ~120 lines before the first step). Its own flag says "already
        # printed"; set it so the config appears once.
        for destination in logger.destinations:
            if hasattr(destination, 'hparams_already_logged_to_console'):
                destination.hparams_already_logged_to_console = True

    def fit_start(self, state: State, logger: Logger) -> None:
        self._fit_started = True
        self._start_step = int(state.timestamp.batch)
        self._start_tokens = int(state.timestamp.token)
        self._max_duration = str(state.max_duration or '')
        self._start_time = self._last_batch_time = time.time()
        if self._start_step > 0:
            self._adopt_resumed_checkpoint(state)
            if dist.get_global_rank() == 0:
                print(f'{PREFIX} resuming at step {self._start_step} (of {self._max_duration}) from a checkpoint of '
                      f'run {state.run_name!r}', flush=True)
        self._install_handlers()

    def batch_end(self, state: State, logger: Logger) -> None:
        self._last_batch_time = time.time()
        total = state.total_loss_dict.get('loss/train/total') if state.total_loss_dict else None
        if total is not None:
            self.losses.append((int(state.timestamp.batch), float(total)))
        if self._ranks_agree_to_stop(state):
            self.stopped_at = int(state.timestamp.batch)
            # Composer ends the loop after this step and saves its end-of-training checkpoint. The final evaluation
            # is skipped: whoever pressed Ctrl-C wants the run to end, not a pass over the eval set.
            state.stop_training()
            for evaluator in state.evaluators:
                evaluator.eval_interval = lambda state, event: False

    def eval_start(self, state: State, logger: Logger) -> None:
        self._eval_start = time.time()

    def eval_end(self, state: State, logger: Logger) -> None:
        self._eval_seconds += time.time() - self._eval_start
        value = state.eval_metric_values.get('LanguageCrossEntropy')
        if value is not None:
            self.eval_loss = (int(state.timestamp.batch), float(value))

    def fit_end(self, state: State, logger: Logger) -> None:
        # The handlers stay until close: a Ctrl-C during the final evaluation is still this callback's to report.
        self._fit_ended = True
        self._saved()

    def close(self, state: State, logger: Logger) -> None:
        # Composer closes the trainer after FIT_END's evaluation (trainer.close(), or at exit): the last metrics are
        # printed by then, so these lines come last.
        if self._closed:
            return
        self._closed = True
        self._restore_handlers()
        if dist.get_global_rank() != 0 or not self._fit_started:
            return
        summary = self.summary(state)
        # A failed or force-stopped run writes no JSON: a script that finds one may take the run as complete.
        if self.json_path and (self._fit_ended or self.stopped_at is not None):
            path = summary['summary_json']
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, 'w') as f:
                json.dump(summary, f, indent=1)
        else:
            summary['summary_json'] = None
        print('\n'.join(self.lines(summary)), flush=True)

    # --- the account ------------------------------------------------------------------------------------------------
    def summary(self, state: State) -> dict[str, Any]:
        """The numbers the closing lines show, as a dict (also the JSON file)."""
        steps = int(state.timestamp.batch) - self._start_step
        tokens = int(state.timestamp.token) - self._start_tokens
        seconds = max(self._last_batch_time - self._start_time - self._eval_seconds, 0.0)
        checkpoints, folders = self._checkpoints(state)
        if self.stopped_at is not None:
            ended = 'signal'
        elif self.forced:
            ended = 'forced'
        elif self._fit_ended:
            ended = 'max_duration'
        else:
            ended = 'error'
        return {
            'run_name': state.run_name,
            'ended': ended,
            'signal': _NAMES.get(self.stop_signal) if self.stop_signal is not None else None,
            'start_step': self._start_step,
            'last_step': int(state.timestamp.batch),
            'max_duration': self._max_duration,
            'steps': steps,
            'tokens': tokens,
            'world_size': dist.get_world_size(),
            'seconds': round(seconds, 1),
            'tokens_per_second': round(tokens / seconds, 1) if seconds > 0 else None,
            'first_loss': self.losses[0][1] if self.losses else None,
            'last_loss': self.losses[-1][1] if self.losses else None,
            'eval_step': self.eval_loss[0] if self.eval_loss else None,
            'eval_loss': self.eval_loss[1] if self.eval_loss else None,
            'checkpoint_folders': folders,
            'checkpoints': checkpoints,
            'summary_json': (os.path.abspath(format_name_with_dist(self.json_path, state.run_name))
                             if self.json_path else None),
            'losses': self.losses,
        }

    def lines(self, s: dict[str, Any]) -> list[str]:
        """The closing lines for a summary dict."""
        out = []
        if s['ended'] == 'signal':
            out.append(f'{PREFIX} stopped by {s["signal"] or "a signal on another rank"} at step {s["last_step"]} '
                       f'(of {s["max_duration"]})')
        elif s['ended'] == 'forced':
            out.append(f'{PREFIX} stopped at once by a second {s["signal"]} at step {s["last_step"]} (of '
                       f'{s["max_duration"]}); steps after the latest checkpoint are not saved')
        elif s['ended'] == 'error':
            out.append(f'{PREFIX} failed at step {s["last_step"]} (of {s["max_duration"]})')
        if s['steps'] == 0 and s['ended'] == 'max_duration':
            out.append(f'{PREFIX} nothing to train: run {s["run_name"]!r} had already reached max_duration '
                       f'({s["max_duration"]}); raise max_duration to train further, or start a new run (another '
                       'run_name, or remove its checkpoints)')
        else:
            rate = f', {s["tokens_per_second"]:,.0f} tokens/s' if s['tokens_per_second'] else ''
            which = f'steps {s["start_step"] + 1} to {s["last_step"]}' if s['steps'] else 'none'
            resumed = f', resumed from step {s["start_step"]}' if s['start_step'] else ''
            out.append(f'{PREFIX} this process trained {s["steps"]} steps ({which}{resumed}): {s["tokens"]:,} tokens '
                       f'in {s["seconds"]} s{rate}')
        if self.losses:
            out.append(f'{PREFIX} loss: first {s["first_loss"]:.4f} (step {self.losses[0][0]}) -> last '
                       f'{s["last_loss"]:.4f} (step {self.losses[-1][0]})')
        if s['eval_loss'] is not None:
            out.append(f'{PREFIX} eval cross-entropy {s["eval_loss"]:.4f} (after step {s["eval_step"]})')
        if s['checkpoints']:
            out.append(f'{PREFIX} latest checkpoint: {s["checkpoints"][-1]}')
        for folder in s['checkpoint_folders']:
            out.append(f'{PREFIX} checkpoints in {folder}')
        if s['ended'] in ('signal', 'forced', 'error'):
            if s['checkpoints']:
                out.append(f'{PREFIX} to resume: the same command again (with autoresume: true, as '
                           f'yamls/dbrx-tiny.yaml sets it), or load_path: {s["checkpoints"][-1]}')
            else:
                out.append(f'{PREFIX} no checkpoint was saved (no save_folder): a rerun starts from step 0')
        if s['summary_json']:
            out.append(f'{PREFIX} per-step losses: {s["summary_json"]}')
        return out

    def _adopt_resumed_checkpoint(self, state: State) -> None:
        # Composer rotates (save_num_checkpoints_to_keep) only the checkpoints this process saved, so every
        # interrupted-and-resumed run left one more behind. The checkpoint this run resumed from, when it is this
        # save folder's latest, joins the saver's list and is rotated out like the others.
        if state.fsdp_sharded_state_dict_enabled:
            return
        for cb in state.callbacks:
            if type(cb).__name__ != 'CheckpointSaver' or cb.num_checkpoints_to_keep <= 0 or cb.saved_checkpoints:
                continue
            if cb.latest_filename is None:
                continue
            latest = cb.latest_filename.format(state)
            # The saver's state came back with the checkpoint, which lists itself under the step it was saved at.
            loaded = [p for p, t in (cb.all_saved_checkpoints_to_timestamp or {}).items()
                      if int(t.batch) == self._start_step]
            if (loaded and os.path.islink(latest) and os.path.isfile(loaded[-1])
                    and os.path.realpath(latest) == os.path.realpath(loaded[-1])):
                cb.saved_checkpoints.append(loaded[-1])

    def _checkpoints(self, state: State) -> tuple[list[str], list[str]]:
        """(checkpoint files on disk, newest last; the folders they are in)."""
        folders, files = [], []
        for cb in state.callbacks:
            if type(cb).__name__ != 'CheckpointSaver':
                continue
            folder = os.path.abspath(format_name_with_dist(str(cb.folder), state.run_name))
            folders.append(folder)
            saved = getattr(cb, 'all_saved_checkpoints_to_timestamp', None) or {}
            # Rotation (save_num_checkpoints_to_keep) removes older ones: list only what is still there.
            files.extend(os.path.abspath(str(p)) for p in saved if os.path.exists(str(p)))
            # nothing saved by this process: what a rerun would load (the saver's own name for its latest link)
            latest = os.path.abspath(cb.latest_filename.format(state)) if cb.latest_filename else None
            if not saved and latest and os.path.exists(latest):
                files.append(os.path.realpath(latest))
        return files, folders

    # --- stopping on a signal ---------------------------------------------------------------------------------------
    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread() or self._previous_handlers:
            return  # Python delivers signals to the main thread only; elsewhere Composer's handlers stay
        for sig in SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:  # a process told to ignore Ctrl-C (nohup) still does
                self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_handlers(self) -> None:
        for sig, previous in self._previous_handlers.items():
            signal.signal(sig, previous)
        self._previous_handlers = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = _NAMES[signum]
        if self.stop_signal is None:
            self.stop_signal = signum
            now = ('finishing this step, then saving a checkpoint and stopping' if not self._fit_ended else
                   'training is over; finishing the final evaluation')
            _say(f'\n{PREFIX} {name}: {now} ({name.split(" ")[0]} again stops at once, without a new checkpoint)')
            return
        if signum != self.stop_signal:
            return  # the launcher's SIGTERM after the terminal's SIGINT: the same request
        if self._saving:
            # Composer writes a checkpoint straight to its final name: stopping now would leave a cut-short file
            # where the next run looks for checkpoints. Stop as soon as it is written.
            self._force_after_save = signum
            _say(f'{PREFIX} {name} again: stopping as soon as the checkpoint being written is complete')
            return
        self._force_stop(signum, frame)

    def _force_stop(self, signum: int, frame: Any = None) -> None:
        previous = self._previous_handlers.get(signum)
        self._restore_handlers()
        self.forced = True
        _say(f'{PREFIX} {_NAMES[signum]} again: stopping at once')
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)  # Composer's (llmfoundry train): sys.exit(128 + signum), atexit still runs
        raise RunInterrupted

    # Checkpoints are written between a *_CHECKPOINT event and the next step, epoch end or fit end.
    # This callback's batch_checkpoint runs before the CheckpointSaver's: LLM Foundry sorts CheckpointSaver and its
    # HF checkpointer after every other callback (llmfoundry/command_utils/train.py, _sort_key).
    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        self._saving = True

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        self._saving = True

    def iteration_checkpoint(self, state: State, logger: Logger) -> None:
        self._saving = True

    def batch_start(self, state: State, logger: Logger) -> None:
        self._saved()

    def epoch_end(self, state: State, logger: Logger) -> None:
        self._saved()

    def _saved(self) -> None:
        self._saving = False
        if self._force_after_save is not None:
            self._force_stop(self._force_after_save)

    def _ranks_agree_to_stop(self, state: State) -> bool:
        stop = self.stop_signal is not None
        if dist.get_world_size() > 1:
            # Every rank must stop after the same step, or the next collective hangs: stop when any rank was asked.
            flag = state.device.tensor_to_device(torch.tensor([int(stop)], dtype=torch.int32))
            dist.all_reduce(flag, reduce_operation='MAX')
            stop = bool(flag.item())
        return stop
