"""``decoupled_adamw_fused``: Composer's ``DecoupledAdamW``, computed by torch's fused (or foreach) AdamW kernels.

Composer's ``DecoupledAdamW`` (``optimizer: name: decoupled_adamw``) updates one parameter at a time in a Python
loop: a ``step.item()`` host sync and about nine elementwise kernels per parameter (~88 bytes of memory traffic per
parameter element). Its math is torch's AdamW except for one term, the weight decay:

    Composer:  p *= 1 - (lr / initial_lr) * wd        (decay follows the schedule, is not scaled by lr)
    torch:     p *= 1 - lr * wd_t                     (decay scaled by lr)

so with ``wd_t = wd / initial_lr`` torch's kernels compute Composer's update exactly (up to rounding): moments,
bias corrections (step counted per parameter, incremented before use), ``eps`` added after dividing by
``sqrt(1 - beta2**t)``, amsgrad. :class:`DecoupledAdamWFused` keeps Composer's class, arguments, defaults, param
groups (``weight_decay`` and ``initial_lr`` as Composer writes them; schedulers write ``lr``), state keys
(``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) and ``OptimizerMonitor`` metrics, and translates the
decay per group at every step. Checkpoints move between the two optimizers in both directions.

Which kernel (``implementation='auto'``): torch's fused AdamW (one kernel launch per device, dtype and device mesh)
wherever it applies: floating, non-complex parameters on a device type with a fused kernel (CUDA, and CPU since
torch 2.4), plain tensors or DTensors (FSDP2). torch 2.7's DTensor refuses a fused op whose tensors live on
different device meshes ("Could not run pointwise computation across different mesh"; expert-parallel experts and
the dense layers do), so the parameters of a group are split by mesh, one fused call each. Anything else takes
torch's foreach path. Neither reads a value back to the host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Iterable, Union

import torch
from composer.optim import DecoupledAdamW
from torch.optim.adamw import adamw as _torch_adamw

try:  # private, but the list torch's own fused check reads (torch 2.1 and later)
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
except ImportError:  # a torch without it: CUDA and CPU have had fused AdamW since 2.4
    def _get_fused_kernels_supported_devices() -> list[str]:
        return ['cuda', 'cpu']

__all__ = ['DecoupledAdamWFused']

IMPLEMENTATIONS = ('auto', 'fused', 'foreach')


def _check_args(lr, betas, eps, weight_decay, implementation) -> None:
    """One-line errors naming the field, its value and the rule (torch's say 'Invalid learning rate: -1')."""
    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not number(lr) or lr < 0:
        raise ValueError(f'optimizer.lr ({lr!r}) must be a finite float >= 0 (a tensor lr is not supported)')
    if isinstance(betas, str) or not isinstance(betas, Sequence) or len(betas) != 2:
        raise ValueError(f'optimizer.betas ({betas!r}) must be two floats [beta1, beta2]')
    for i, beta in enumerate(betas):
        if not number(beta) or not 0.0 <= beta < 1.0:
            raise ValueError(f'optimizer.betas[{i}] ({beta!r}) must be a float in [0, 1)')
    if not number(eps) or eps < 0:
        raise ValueError(f'optimizer.eps ({eps!r}) must be a finite float >= 0')
    if not number(weight_decay) or weight_decay < 0:
        raise ValueError(f'optimizer.weight_decay ({weight_decay!r}) must be a finite float >= 0')
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f'optimizer.implementation ({implementation!r}) must be one of {", ".join(IMPLEMENTATIONS)}')


class DecoupledAdamWFused(DecoupledAdamW):
    """Composer's :class:`~composer.optim.DecoupledAdamW` (same arguments, defaults, param groups, state and
    metrics) with its step computed by torch's fused AdamW kernel, or its foreach one where the fused kernel does
    not apply; see the module docstring.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate (``initial_lr`` of each group is its ``lr`` at construction, as in Composer).
        betas: coefficients of the running averages of the gradient and its square.
        eps: added to the denominator after the bias correction.
        weight_decay: decoupled decay: every step multiplies the weights by ``1 - (lr / initial_lr) *
            weight_decay`` (by ``1 - weight_decay`` where ``initial_lr`` is 0), as Composer does.
        amsgrad: the AMSGrad variant.
        implementation: ``'auto'`` (fused where it applies, foreach elsewhere), ``'fused'`` (an error where it
            does not apply) or ``'foreach'``.
    """

    def __init__(self, params: Union[Iterable[torch.Tensor], Iterable[dict]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 1e-5,
                 amsgrad: bool = False, *, implementation: str = 'auto'):
        _check_args(lr, betas, eps, weight_decay, implementation)
        super().__init__(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
        self.implementation = implementation
        self._fused_devices = None

    def _use_fused(self, p: torch.Tensor) -> bool:
        if self._fused_devices is None:
            self._fused_devices = frozenset(_get_fused_kernels_supported_devices())
        ok = (p.device.type in self._fused_devices and torch.is_floating_point(p)
              and not torch.is_complex(p))
        if self.implementation == 'fused' and not ok:
            raise RuntimeError(f'decoupled_adamw_fused: implementation=fused needs floating-point parameters on a '
                               f'device with a fused kernel, got {p.dtype} on {p.device}; use implementation=auto')
        return ok and self.implementation != 'foreach'

    def _state(self, p: torch.Tensor, fused: bool, amsgrad: bool) -> dict:
        """The state of ``p``, created as Composer creates it, with ``step`` where the chosen kernel reads it
        without a host sync: on the parameter's device for the fused kernel (which reads it there), on the CPU for
        foreach (which reads it with ``.item()``). A checkpoint from the other placement is moved once."""
        state = self.state[p]
        step_device = p.device if fused else torch.device('cpu')
        if 'step' not in state:
            state['step'] = torch.zeros((), dtype=torch.float32, device=step_device)
            state['exp_avg'] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state['exp_avg_sq'] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif state['step'].device != step_device or state['step'].dtype != torch.float32:
            state['step'] = state['step'].to(device=step_device, dtype=torch.float32)
        if amsgrad and 'max_exp_avg_sq' not in state:
            state['max_exp_avg_sq'] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step over every parameter with a gradient (parameters without one, or with
        ``requires_grad=False``, are skipped and their step count is unchanged, as in Composer)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            lr, wd = group['lr'], group['weight_decay']
            initial_lr = group.setdefault('initial_lr', lr)
            amsgrad = group['amsgrad']
            # One kernel call per (fused?, device mesh): see the module docstring for why meshes are split.
            buckets: dict = {}
            for p in group['params']:
                if p.grad is None or not p.requires_grad:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError('decoupled_adamw_fused does not support sparse gradients')
                fused = self._use_fused(p)
                state = self._state(p, fused, amsgrad)
                lists = buckets.setdefault((fused, getattr(p, 'device_mesh', None)), ([], [], [], [], [], []))
                for values, item in zip(lists, (p, p.grad, state['exp_avg'], state['exp_avg_sq'],
                                                state.get('max_exp_avg_sq'), state['step'])):
                    if item is not None:
                        values.append(item)

            # Composer's decay factor is lr / initial_lr (1 where initial_lr is 0); torch's is lr * wd_t.
            decay_wd = 0.0
            if wd == 0:
                wd_t = 0.0
            elif initial_lr:
                wd_t = wd / initial_lr
            elif lr:
                wd_t = wd / lr
            else:  # lr = initial_lr = 0: Composer still decays by (1 - wd) and the Adam update is 0
                wd_t, decay_wd = 0.0, wd
            beta1, beta2 = group['betas']
            for (fused, _mesh), (params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps) in buckets.items():
                if decay_wd:
                    torch._foreach_mul_(params, 1.0 - decay_wd)
                _torch_adamw(params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, foreach=not fused, fused=fused,
                             capturable=False, differentiable=False, grad_scale=None, found_inf=None,
                             has_complex=any(torch.is_complex(p) for p in params), amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=lr,
                             weight_decay=wd_t, eps=group['eps'], maximize=False)
        return loss
