"""``dbrx_expert_load``: a Composer callback that shows how the routers spread the tokens over the experts, and
moves the routers' balancing bias when the model asks for aux-loss-free balancing.

Every microbatch's forward returns each MoE layer's :class:`~foundry_dbrx.moe.router.Routing` (``dbrx`` and
``mpt_dbrx_moe`` alike). The routing is decided before the tokens are dispatched, so what is measured here is the
same for every expert backend and every expert-parallel degree. After each forward the callback adds the routing's
statistics (slots per expert, router probability sums, token counts, entropy and log-sum-exp sums) to one small
float64 tensor on the device: no host sync. On a log step (every ``log_interval`` batches and the last one) it sums
that tensor over all ranks (one all-reduce), reads it back once, and logs, per layer and overall:

    moe/expert_share_{min,max,cv}  share of the routed slots each expert got (balanced: 1/E each; cv = std / mean)
    moe/router_entropy             mean over tokens of the entropy of the router distribution, nats (max log E)
    moe/dead_experts               experts that got no token in the interval (overall: summed over layers)
    moe/lb_loss_<type>             the run's load-balancing formula on the interval's tokens
    moe/z_loss                     the router z-loss on the interval's tokens
    moe/bias_range                 max - min of the balancing bias (with training.moe_bias_balancing)
    moe/layer_<i>/...              the same for layer i (overall: min and max over layers, mean cv, entropy, z)
    moe/layer_<i>/share_expert_<e> each expert's share, for the heatmap of ``foundry-dbrx plot``

The overall values go to every logger; the per-layer and per-expert ones to every logger but the console (they
would bury its lines). Each is over all tokens of the batches since the previous log step, on all ranks.

With ``model.training.moe_bias_balancing`` the callback also sums each step's expert counts over all ranks after
the optimizer step (one all-reduce of L*E numbers per step, no host sync) and calls each router's
``update_expert_bias``, so every rank makes the same update. The model refuses to train with bias balancing on
when this callback is missing.

At the end of training rank 0 prints where an MLflow logger put the run and how to plot it.

Legend: L layers, E experts, T tokens, K top_k.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional, Sequence, Union
from urllib.parse import urlparse

import torch
import torch.distributed as torch_dist
from composer.core import Callback, State, Time, TimeUnit
from composer.loggers import ConsoleLogger, Logger, MLFlowLogger, ProgressBarLogger
from composer.utils import dist

from foundry_dbrx.moe.losses import LB_LOSSES, RoutingStats, router_z_loss, routing_stats
from foundry_dbrx.moe.router import DbrxRouter, Routing

__all__ = ['ExpertLoad', 'ExpertLoadStats', 'ExpertLoadReport', 'expert_load_metrics', 'update_biases', 'METRIC_PREFIX',
           'layer_prefix']

METRIC_PREFIX = 'moe'


def _width(n: int) -> int:
    return len(str(max(n - 1, 0)))


def layer_prefix(layer: int, num_layers: int) -> str:
    """``moe/layer_07`` (zero-padded so that names sort in layer order)."""
    return f'{METRIC_PREFIX}/layer_{layer:0{_width(num_layers)}d}'


class ExpertLoadReport(NamedTuple):
    """Summed statistics on the host: the loss statistics and the sum over tokens of the router entropy."""

    stats: RoutingStats
    entropy_sums_L: torch.Tensor


class ExpertLoadStats:
    """Routing statistics of many microbatches, summed on the device in one float64 tensor.

    Layout: counts [L*E], probability sums [L*E], tokens [L], sums of logsumexp^2 [L], sums of router entropy [L].
    """

    def __init__(self, num_layers: int, num_experts: int, top_k: int):
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.sums: Optional[torch.Tensor] = None

    @torch.no_grad()
    def add(self, routings: Sequence[Routing]) -> torch.Tensor:
        """Adds one forward's routing; returns its expert counts ``[L, E]`` (float64, on the device)."""
        if len(routings) != self.num_layers:
            raise ValueError(f'expected the routing of {self.num_layers} MoE layers, got {len(routings)}')
        stats = routing_stats(routings, self.num_experts)
        lse_sq_L = stats.lse_sq_sums_L if stats.lse_sq_sums_L is not None else torch.zeros_like(stats.tokens_L)
        entropy_L = torch.stack([torch.special.entr(r.probs_TE.float()).sum() for r in routings])
        packed = torch.cat([stats.counts_LE.reshape(-1), stats.prob_sums_LE.reshape(-1), stats.tokens_L, lse_sq_L,
                            entropy_L]).double()
        self.sums = packed.clone() if self.sums is None else self.sums.add_(packed)
        return packed[:self.num_layers * self.num_experts].view(self.num_layers, self.num_experts)

    def reduce(self, group: Optional[torch_dist.ProcessGroup] = None) -> Optional[ExpertLoadReport]:
        """The sums over every rank of ``group`` (a collective: every rank calls it, in step), read back to the
        host, and reset. None when nothing was added since the last call (on any rank: ranks train in step)."""
        sums, self.sums = self.sums, None
        if sums is None:
            return None
        if group is not None:
            torch_dist.all_reduce(sums, group=group)
        sums = sums.cpu()
        le = self.num_layers * self.num_experts
        tokens_L, lse_sq_L, entropy_L = sums[2 * le:].view(3, self.num_layers)
        if not tokens_L.any():
            return None
        stats = RoutingStats(sums[:le].view(self.num_layers, self.num_experts),
                             sums[le:2 * le].view(self.num_layers, self.num_experts), tokens_L, self.top_k, lse_sq_L)
        return ExpertLoadReport(stats, entropy_L)


def expert_load_metrics(report: ExpertLoadReport, lb_loss_type: str) -> tuple[dict[str, float], dict[str, float]]:
    """(overall metrics, per-layer and per-expert metrics) of summed routing statistics (see the module doc)."""
    stats, entropy_sums_L = report
    counts_LE = stats.counts_LE.double()
    num_layers, num_experts = counts_LE.shape
    tokens_L = stats.tokens_L.double()
    shares_LE = counts_LE / counts_LE.sum(1, keepdim=True).clamp(min=1)
    cv_L = shares_LE.std(1, unbiased=False) / shares_LE.mean(1)
    dead_L = (counts_LE == 0).sum(1)
    entropy_L = entropy_sums_L.double() / tokens_L.clamp(min=1)
    z_L = stats.lse_sq_sums_L.double() / tokens_L.clamp(min=1)
    lb = LB_LOSSES[lb_loss_type]
    lb_L = [float(lb(RoutingStats(stats.counts_LE[i:i + 1], stats.prob_sums_LE[i:i + 1], stats.tokens_L[i:i + 1],
                                  stats.top_k))) for i in range(num_layers)]
    p = METRIC_PREFIX
    lb_key = f'lb_loss_{lb_loss_type}'
    overall = {
        f'{p}/expert_share_min': float(shares_LE.min()),
        f'{p}/expert_share_max': float(shares_LE.max()),
        f'{p}/expert_share_cv': float(cv_L.mean()),
        f'{p}/router_entropy': float(entropy_L.mean()),
        f'{p}/dead_experts': float(dead_L.sum()),
        f'{p}/{lb_key}': float(lb(stats)),
        f'{p}/z_loss': float(router_z_loss(stats)),
    }
    detail = {}
    width = _width(num_experts)
    for i in range(num_layers):
        lp = layer_prefix(i, num_layers)
        detail.update({
            f'{lp}/expert_share_min': float(shares_LE[i].min()),
            f'{lp}/expert_share_max': float(shares_LE[i].max()),
            f'{lp}/expert_share_cv': float(cv_L[i]),
            f'{lp}/router_entropy': float(entropy_L[i]),
            f'{lp}/dead_experts': float(dead_L[i]),
            f'{lp}/{lb_key}': lb_L[i],
            f'{lp}/z_loss': float(z_L[i]),
        })
        detail.update({f'{lp}/share_expert_{e:0{width}d}': float(shares_LE[i, e]) for e in range(num_experts)})
    return overall, detail


def _world_group() -> Optional[torch_dist.ProcessGroup]:
    return torch_dist.group.WORLD if dist.get_world_size() > 1 else None


class ExpertLoad(Callback):
    """Expert-load metrics of every MoE layer, logged every ``log_interval`` batches; bias balancing updates.

    Works with the ``dbrx`` and ``mpt_dbrx_moe`` models, every expert backend and expert-parallel degree (the
    statistics come from the routing, before dispatch). See the module docstring for the metric names.

    Args:
        log_interval: batches between log steps, ``'10ba'`` or an int; the last batch of training is always
            logged. Nothing is read back from the device in between.
        per_layer: also log each layer's metrics and each expert's share (needed by ``foundry-dbrx plot``'s
            heatmap). They go to every logger but the console.
    """

    def __init__(self, log_interval: Union[int, str, Time] = '10ba', per_layer: bool = True):
        interval = Time.from_input(log_interval, TimeUnit.BATCH)
        if interval.unit != TimeUnit.BATCH or interval.value <= 0:
            raise ValueError(f'dbrx_expert_load: log_interval ({log_interval!r}) must be a positive number of '
                             "batches, such as '10ba' or 10")
        if not isinstance(per_layer, bool):
            raise ValueError(f'dbrx_expert_load: per_layer ({per_layer!r}) must be true or false')
        self.log_interval = int(interval.value)
        self.per_layer = per_layer
        self.routers: list[DbrxRouter] = []
        self.stats: Optional[ExpertLoadStats] = None
        self.step_counts_LE: Optional[torch.Tensor] = None
        self.lb_loss_type = 'megablocks'
        self.bias_balancing = False
        self.bias_rate = 0.0

    # --- Composer events ---------------------------------------------------------------------------------------
    def init(self, state: State, logger: Logger) -> None:
        from foundry_dbrx.hf.gather import unwrap_ddp
        model = unwrap_ddp(state.model)
        self.routers = [m for m in model.modules() if isinstance(m, DbrxRouter)]
        training = getattr(model, 'training_config', None)
        if not self.routers or training is None:
            raise ValueError('dbrx_expert_load needs a model with DBRX MoE layers (model name dbrx or mpt_dbrx_moe); '
                             f'got {type(model).__name__}')
        first = self.routers[0]
        self.stats = ExpertLoadStats(len(self.routers), first.num_experts, first.top_k)
        self.lb_loss_type = training.moe_lb_loss_type
        self.bias_balancing = training.moe_bias_balancing
        if self.bias_balancing:
            self.bias_rate = float(training.moe_bias_update_rate)
            model.bias_updates_attached = True

    def fit_start(self, state: State, logger: Logger) -> None:
        # At FIT_START, not INIT: every logger has started its run by then (MLflow would otherwise open a stray one).
        first = self.routers[0]
        logger.log_hyperparameters({f'{METRIC_PREFIX}/num_layers': len(self.routers),
                                    f'{METRIC_PREFIX}/num_experts': first.num_experts,
                                    f'{METRIC_PREFIX}/top_k': first.top_k,
                                    f'{METRIC_PREFIX}/lb_loss_type': self.lb_loss_type,
                                    f'{METRIC_PREFIX}/bias_balancing': self.bias_balancing})

    def after_forward(self, state: State, logger: Logger) -> None:
        routings = getattr(state.outputs, 'routings', None)
        if routings is None:
            raise ValueError(f'dbrx_expert_load: the model output ({type(state.outputs).__name__}) carries no routings')
        counts_LE = self.stats.add(routings)
        if self.bias_rate > 0:
            self.step_counts_LE = counts_LE.clone() if self.step_counts_LE is None else self.step_counts_LE + counts_LE

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.step_counts_LE is not None:
            self._update_biases()
        batch = int(state.timestamp.batch)
        elapsed = state.get_elapsed_duration()
        if batch % self.log_interval == 0 or (elapsed is not None and elapsed >= 1.0):
            self._log(batch, logger)

    def fit_end(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() == 0:
            lines = mlflow_location_lines(logger, state.run_name)
            if lines:
                print('\n'.join(lines), flush=True)

    # --- the work ------------------------------------------------------------------------------------------------
    def _update_biases(self) -> None:
        counts_LE, self.step_counts_LE = self.step_counts_LE, None
        update_biases(self.routers, counts_LE, self.bias_rate, _world_group())

    def _log(self, batch: int, logger: Logger) -> None:
        report = self.stats.reduce(_world_group())
        if report is None:
            return
        overall, detail = expert_load_metrics(report, self.lb_loss_type)
        if any(r.select_with_bias for r in self.routers):
            ranges = torch.stack([r.expert_bias.max() - r.expert_bias.min() for r in self.routers]).tolist()
            overall[f'{METRIC_PREFIX}/bias_range'] = max(ranges)
            detail.update({f'{layer_prefix(i, len(ranges))}/bias_range': v for i, v in enumerate(ranges)})
        logger.log_metrics(overall, step=batch)
        if self.per_layer:
            for destination in logger.destinations:
                if not isinstance(destination, (ConsoleLogger, ProgressBarLogger)):
                    destination.log_metrics(detail, step=batch)


def update_biases(routers: Sequence[DbrxRouter], counts_LE: torch.Tensor, rate: float,
                  group: Optional[torch_dist.ProcessGroup] = None) -> None:
    """One step of bias balancing: ``counts_LE`` (this rank's slots per expert over the step's microbatches) summed
    over ``group`` in place, then each router's update from its layer's row. Every rank of ``group`` calls it and
    makes the same update, so the biases stay identical on every rank."""
    if group is not None:
        torch_dist.all_reduce(counts_LE, group=group)
    for router, counts_E in zip(routers, counts_LE):
        router.update_expert_bias(counts_E, rate)


def mlflow_location_lines(logger: Logger, run_name: str) -> list[str]:
    """Where an MLflow logger of ``logger`` keeps this run, and the commands that show it (empty without one)."""
    for destination in logger.destinations:
        if isinstance(destination, MLFlowLogger) and getattr(destination, 'tracking_uri', None):
            uri = display_tracking_uri(destination.tracking_uri)
            name = destination.run_name or run_name
            run_id = getattr(destination, '_run_id', None)  # Composer keeps it there (and logs it as mlflow_run_id)
            plot = f'foundry-dbrx plot {name}'
            # Not default_tracking_uri(): MLflow's set_tracking_uri has put this store into MLFLOW_TRACKING_URI of
            # this process, not of the user's shell, where the plot's default is ./mlruns.
            if uri != os.path.abspath('mlruns'):
                plot += f' --tracking-uri {uri}'
            local = os.path.isabs(uri)
            return [f'[foundry-dbrx] MLflow run {name} (id {run_id}) in {uri}',
                    f'[foundry-dbrx]   browse it:  ' + (f'mlflow ui --backend-store-uri {uri}' if local else uri),
                    f'[foundry-dbrx]   router plots:  {plot}']
    return []


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``./mlruns`` (the store the shipped YAMLs write)."""
    return os.environ.get('MLFLOW_TRACKING_URI') or './mlruns'


def display_tracking_uri(uri: str) -> str:
    """A local store as an absolute path (what ``mlflow ui --backend-store-uri`` takes); anything else as it is."""
    parsed = urlparse(str(uri))
    if parsed.scheme in ('', 'file'):
        return os.path.abspath(parsed.path if parsed.scheme else str(uri))
    return str(uri)
