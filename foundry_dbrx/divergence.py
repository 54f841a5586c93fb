"""``dbrx_divergence_guard``: a Composer callback that stops a diverging run before it writes non-finite weights.

A run whose loss turns NaN or infinite otherwise trains on: the next optimizer step makes every weight NaN, the
checkpoints and HF exports after it hold NaN, ``save_num_checkpoints_to_keep`` rotates the last good checkpoint out,
and autoresume restarts from NaN. The guard checks, at every step,

- after the backward pass and before the optimizer step (``AFTER_TRAIN_BATCH``): the microbatch loss and the global
  gradient norm (computed here, every rank's share summed with one small all-reduce, so that every rank makes the
  same decision), and
- after the losses are averaged over ranks (``BATCH_END``, before ``BATCH_CHECKPOINT``): every logged loss,

and raises :class:`DivergenceError`, whose message is one line naming the step, on the first non-finite value.
The weights are then those of the previous step, and no checkpoint of non-finite weights has been written.
Under fp16 loss scaling (``precision: amp_fp16``) infinite gradients are the scaler's business (it skips that
step), so only the losses are checked there.

It works for any Composer model (``dbrx`` and ``mpt_dbrx_moe`` alike); every shipped YAML lists it, and
``python -m foundry_dbrx.train`` adds it to a YAML that does not.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import torch
from composer.core import Callback, Precision, State
from composer.loggers import Logger
from composer.utils import dist

__all__ = ['DivergenceError', 'DivergenceGuard']


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or gradient norm; the message is one line naming the step."""


def _loss_tensors(loss: Any) -> dict[str, torch.Tensor]:
    """name -> value (a 0-d fp32 tensor, still on its device) of every tensor in a model's ``loss`` output (a
    tensor, a dict or a sequence of them)."""
    if isinstance(loss, torch.Tensor):
        return {'total': loss.detach().float().sum()}
    if isinstance(loss, dict):
        return {k: v.detach().float().sum() for k, v in loss.items() if isinstance(v, torch.Tensor)}
    if isinstance(loss, (list, tuple)):
        return {f'loss[{i}]': v.detach().float().sum() for i, v in enumerate(loss) if isinstance(v, torch.Tensor)}
    return {}


def _local_grad_sq(model: torch.nn.Module) -> Optional[torch.Tensor]:
    """The sum of squares of this rank's gradient elements (its shards under FSDP), in fp32; None without grads."""
    grads = []
    for p in model.parameters():
        g = p.grad
        if g is None:
            continue
        if hasattr(g, 'to_local'):  # FSDP2 / DTensor: this rank's shard
            g = g.to_local()
        if g.numel():
            grads.append(g)
    if not grads:
        return None
    norms = torch._foreach_norm(grads)  # one fused pass; a non-finite element makes its norm non-finite
    return torch.stack([n.float() for n in norms]).square().sum()


class DivergenceGuard(Callback):
    """Stops training on a non-finite loss or gradient norm, before the optimizer step applies it.

    Args:
        check_grad_norm: also check the global gradient norm before each optimizer step (default True).
    """

    def __init__(self, check_grad_norm: bool = True):
        self.check_grad_norm = check_grad_norm

    def after_train_batch(self, state: State, logger: Logger) -> None:
        losses = _loss_tensors(state.loss)
        grad_sq = None
        if self.check_grad_norm and state.precision != Precision.AMP_FP16:
            grad_sq = _local_grad_sq(state.model)
        # One all-reduce carries both, and one read-back is the step's only host sync here: every rank must stop at
        # the same step, or the others hang in a collective.
        device = grad_sq.device if grad_sq is not None else state.device.tensor_to_device(torch.zeros(1)).device
        bad_flag = (~torch.isfinite(torch.stack([v.to(device) for v in losses.values()]))).any().float() \
            if losses else torch.zeros((), device=device)
        flags = torch.stack([grad_sq if grad_sq is not None else torch.zeros((), device=device), bad_flag]).float()
        if dist.get_world_size() > 1:
            dist.all_reduce(flags, reduce_operation='SUM')
        norm_sq, any_bad_loss = flags.tolist()
        bad_loss = {k: float(v) for k, v in losses.items() if not math.isfinite(float(v))} if any_bad_loss else {}
        norm = math.sqrt(norm_sq) if math.isfinite(norm_sq) and norm_sq >= 0 else norm_sq
        if any_bad_loss or not math.isfinite(norm):
            what = (['loss ' + ', '.join(f'{k}={v}' for k, v in bad_loss.items())] if bad_loss else
                    ['a loss on another rank is non-finite'] if any_bad_loss else [])
            if grad_sq is not None and not math.isfinite(norm):
                what.append(f'gradient norm={norm}')
            self._stop(state, int(state.timestamp.batch) + 1, ', '.join(what),
                       'stopped before the optimizer step, so the weights are still those of the step before')

    def batch_end(self, state: State, logger: Logger) -> None:
        # Composer has averaged the losses over ranks already: every rank sees the same values here.
        bad = {k: v for k, v in (state.total_loss_dict or {}).items() if not math.isfinite(v)}
        if bad:
            what = ', '.join(f'{k}={v}' for k, v in bad.items())
            self._stop(state, int(state.timestamp.batch), what,
                       'stopped before this step is checkpointed')

    @staticmethod
    def _stop(state: State, step: int, what: str, when: str) -> None:
        last = None
        for cb in state.callbacks:
            saved = getattr(cb, 'all_saved_checkpoints_to_timestamp', None)
            if type(cb).__name__ == 'CheckpointSaver' and saved:
                last = os.path.abspath(str(list(saved)[-1]))
        where = f'; the last checkpoint is {last}' if last else '; no checkpoint was written'
        raise DivergenceError(f'training diverged at step {step}: {what}; {when}{where}. Lower the learning rate, '
                              'raise the warm-up or clip gradients, then resume from a checkpoint')
