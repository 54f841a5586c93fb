"""The Composer model: DBRX plus its loss (cross entropy + weighted load-balancing loss), metrics and FLOPs.

Registered as ``dbrx`` in LLM Foundry's ``models`` registry; a YAML ``model:`` section is a DBRX config
(HF ``config.json`` names) plus ``name: dbrx`` and the few training keys below.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import ComposerModel

from foundry_dbrx.config import DbrxConfig, DbrxFFNConfig, DbrxTrainingConfig
from foundry_dbrx.model import DbrxForCausalLM, DbrxLossOutput, DbrxOutput
from foundry_dbrx.moe.losses import auxiliary_losses
from foundry_dbrx.parallelize import attach_composer_hooks

__all__ = ['ComposerDbrxCausalLM', 'router_loss_terms', 'lb_loss_group', 'config_from_model_section',
           'check_tokenizer_fits']

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


def _follow_llmfoundry_log_level() -> None:
    # LLM Foundry's train sets the level of its own loggers from the YAML's python_log_level; ours follow it, so
    # the parameter counts and the MoE backend choice show up under every launcher.
    ours = logging.getLogger('foundry_dbrx')
    if ours.level == logging.NOTSET:
        ours.setLevel(logging.getLogger('llmfoundry').getEffectiveLevel())


def _is_right_padded(mask: torch.Tensor) -> bool:
    """Each row is ones then zeros: no zero is followed by a one."""
    mask = mask.to(torch.int8)
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


# Keys of a YAML ``model:`` section that are not DBRX config fields: LLM Foundry's registry name and the arguments
# of ComposerDbrxCausalLM itself.
_CONSTRUCTOR_KEYS = ('name', 'tokenizer', 'init_device', 'use_train_metrics', 'pretrained_hf_dir', 'training')


def _parse_config(model_config: Mapping[str, Any], pretrained_hf_dir: Optional[str]) -> DbrxConfig:
    if pretrained_hf_dir is None:
        return DbrxConfig.from_dict(dict(model_config))
    from foundry_dbrx.hf import config_with_hf
    return config_with_hf(pretrained_hf_dir, model_config)


def _parse_training(training: Optional[Mapping[str, Any]], config: DbrxConfig) -> DbrxTrainingConfig:
    parsed = DbrxTrainingConfig.from_dict(training)
    parsed.check_model(config)
    return parsed


def config_from_model_section(section: Mapping[str, Any]) -> tuple[DbrxConfig, DbrxTrainingConfig]:
    """The :class:`DbrxConfig` and :class:`DbrxTrainingConfig` that a YAML ``model:`` section (``name: dbrx``)
    builds, parsed and checked exactly as the constructor does; ``foundry_dbrx.train`` calls it to check the YAML
    before anything is built."""
    fields = {k: v for k, v in section.items() if k not in _CONSTRUCTOR_KEYS}
    config = _parse_config(fields, section.get('pretrained_hf_dir'))
    return config, _parse_training(section.get('training'), config)


def check_tokenizer_fits(tokenizer_size: int, vocab_size: int, tokenizer_name: str = 'the tokenizer') -> None:
    """Every token id must have an embedding row: ``ValueError`` when the tokenizer has more ids than
    ``vocab_size`` (the model would fail, or read another token's row, at the first large id)."""
    if tokenizer_size > vocab_size:
        raise ValueError(f'model.vocab_size ({vocab_size}) is smaller than {tokenizer_name} ({tokenizer_size} '
                         f'tokens, ids 0-{tokenizer_size - 1}): every token id needs an embedding row; set '
                         f'model.vocab_size to at least {tokenizer_size} (DBRX uses 100352)')


class _UpdateFromSums:
    """Lets LanguageCrossEntropy / LanguagePerplexity take the fused loss's output: no logits, but the two
    states the metric keeps (``sum_loss``, ``total_items``, documented in its docstring) are exactly the sums the
    loss has. Overriding ``update`` keeps torchmetrics' update bookkeeping (count, cache) in force."""

    def update(self, output: Any, target: torch.Tensor) -> None:
        if not isinstance(output, DbrxLossOutput):
            return super().update(output, target)
        self.sum_loss += output.ce_sum.detach().to(self.sum_loss.device, self.sum_loss.dtype)
        self.total_items += (target != IGNORE_INDEX).sum().to(self.total_items.device, self.total_items.dtype)


class _TrainCrossEntropy(_UpdateFromSums, LanguageCrossEntropy):
    pass


class _TrainPerplexity(_UpdateFromSums, LanguagePerplexity):
    pass


def lb_loss_group(training: DbrxTrainingConfig):
    """The data-parallel ranks whose routing statistics the auxiliary losses sum (``moe_lb_loss_scope`` global: all
    of them, so the losses are those of the global batch), or None for this rank's alone."""
    import torch.distributed as dist
    if (training.moe_lb_loss_scope == 'global' and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1):
        return dist.group.WORLD
    return None


def router_loss_terms(model: torch.nn.Module, ce: torch.Tensor, routings, ffn: DbrxFFNConfig,
                      training: DbrxTrainingConfig, lb_loss_key: str) -> dict[str, torch.Tensor]:
    """The loss dict of a model with DBRX MoE layers (``dbrx`` and ``mpt_dbrx_moe`` share it): ``total``, ``ce``,
    the load-balancing loss under ``lb_loss_key`` and ``z_loss``, formed from the routing of every layer."""
    lbl, z_loss = auxiliary_losses(routings, ffn.moe_num_experts, training.moe_lb_loss_type,
                                   group=lb_loss_group(training))
    if model.training and torch.is_grad_enabled():
        weighted = ffn.moe_loss_weight > 0 or training.moe_z_loss_weight > 0
        if weighted and not lbl.requires_grad:
            raise RuntimeError(
                'the load-balancing loss has no gradient: the router statistics were computed without autograd. '
                'With activation checkpointing set fsdp_config.activation_checkpointing_reentrant: false '
                '(reentrant checkpointing drops every block output but the hidden states from the graph)')
        if training.moe_bias_balancing and not getattr(model, 'bias_updates_attached', False):
            # Without the callback the bias would steer the routing but never move: refuse rather than train
            # silently unbalanced.
            raise RuntimeError('training.moe_bias_balancing needs the dbrx_expert_load callback, which updates the '
                               'routers\' bias after each optimizer step: add callbacks: {dbrx_expert_load: {}}')
    total = ce + ffn.moe_loss_weight * lbl + training.moe_z_loss_weight * z_loss
    return {'total': total, 'ce': ce, lb_loss_key: lbl, 'z_loss': z_loss}


def _fmt_params(n: int) -> str:
    return f'{n / 1e9:.2f}B' if n >= 1e9 else f'{n / 1e6:.2f}M'


class ComposerDbrxCausalLM(ComposerModel):
    """DBRX for Composer and LLM Foundry.

    Args:
        tokenizer: passed by LLM Foundry; kept for checkpoint export, unused by the math. It may not have more
            tokens than ``vocab_size`` (``ValueError``).
        init_device: ``cpu``, ``cuda``, ``meta`` (FSDP materialises and initialises block by block) or
            ``mixed`` (LLM Foundry's name for meta on all ranks but 0, treated as meta here).
        use_train_metrics: compute cross entropy and perplexity metrics on training batches.
        pretrained_hf_dir: a local HF DBRX folder to start from: its config.json fills in every field the YAML
            leaves out (architecture fields the YAML does give must agree) and its weights are loaded.
        training: the training choices (``DbrxTrainingConfig`` field names: moe_backend, moe_lb_loss_type,
            expert_parallel_degree, activation_checkpointing, fused_cross_entropy, gqa_impl, ...); not part of the
            HF config.
        **model_config: the architecture, a DBRX config (HF ``config.json`` names: d_model, n_heads, ...,
            attn_config, ffn_config), every size given.
    """

    def __init__(self, tokenizer: Any = None, init_device: str = 'cpu', use_train_metrics: bool = True,
                 pretrained_hf_dir: Optional[str] = None, training: Optional[Mapping[str, Any]] = None,
                 **model_config: Any):
        super().__init__()
        _follow_llmfoundry_log_level()
        self.config = _parse_config(model_config, pretrained_hf_dir)
        self.training_config = _parse_training(training, self.config)
        if tokenizer is not None:  # before a single weight is allocated
            check_tokenizer_fits(len(tokenizer), self.config.vocab_size,
                                 f'the tokenizer ({type(tokenizer).__name__})')
        if init_device not in ('cpu', 'cuda', 'meta', 'mixed'):
            raise ValueError(f"init_device ({init_device!r}) must be one of ['cpu', 'cuda', 'meta', 'mixed']")
        device = 'meta' if init_device == 'mixed' else init_device
        model = DbrxForCausalLM(self.config, self.training_config, device=device)
        init_fn = None
        if pretrained_hf_dir is not None:
            from foundry_dbrx.hf import load_pretrained_hf
            init_fn = load_pretrained_hf(model, pretrained_hf_dir)  # now, or as FSDP materialises meta modules
        self.model = attach_composer_hooks(model, self.training_config, param_init_fn=init_fn)
        self.tokenizer = tokenizer
        counts = self.config.num_params()
        self.n_active_params = counts['active']
        ffn, training = self.config.ffn_config, self.training_config
        lb_type = training.moe_lb_loss_type
        balancing = (f'; bias balancing at rate {training.moe_bias_update_rate:g}' if training.moe_bias_balancing
                     else '')
        log.info('DBRX: %s parameters in all, %s active per token (%d of %d experts); '
                 'load-balancing loss %r x %g; router z-loss x %g%s', _fmt_params(counts['total']),
                 _fmt_params(counts['active']), ffn.moe_top_k, ffn.moe_num_experts, lb_type, ffn.moe_loss_weight,
                 training.moe_z_loss_weight, balancing)
        self.lb_loss_key = f'lb_loss_{lb_type}'
        self.bias_updates_attached = False  # set by the dbrx_expert_load callback, which moves the routers' bias
        self.train_metrics = {'LanguageCrossEntropy': _TrainCrossEntropy(),
                              'LanguagePerplexity': _TrainPerplexity()} if use_train_metrics else {}
        self.eval_metrics = {m.__class__.__name__: m for m in (LanguageCrossEntropy(), LanguagePerplexity())}

    # --- Composer interface ----------------------------------------------------------------------------------------
    def forward(self, batch: Mapping[str, Any]) -> DbrxOutput | DbrxLossOutput:
        mask = batch.get('attention_mask')
        if mask is not None and not _is_right_padded(mask):
            # Positions and the causal mask assume every row starts at position 0; left padding (ICL evaluators,
            # generation) would silently shift them.
            raise ValueError('attention_mask must only pad on the right (each row: ones, then zeros); the dbrx '
                             'model does not take left-padded batches')
        if self.training_config.fused_cross_entropy and self.training:
            return self.model(batch['input_ids'], targets=self.targets(batch))
        return self.model(batch['input_ids'])

    def targets(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Next-token targets: ``labels`` (else the input ids, padding ignored) shifted left by one, the last
        position ignored."""
        labels = batch.get('labels')
        if labels is None:
            labels = batch['input_ids']
            if batch.get('attention_mask') is not None:
                labels = labels.masked_fill(batch['attention_mask'] == 0, IGNORE_INDEX)
        targets = torch.roll(labels, shifts=-1, dims=1)
        targets[:, -1] = IGNORE_INDEX
        return targets

    def loss(self, outputs: DbrxOutput | DbrxLossOutput, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``total = ce + moe_loss_weight * lb_loss + moe_z_loss_weight * z_loss``; each part is logged
        (``loss/train/ce``, ``loss/train/lb_loss_<type>``, ``loss/train/z_loss``), the z-loss even at weight 0."""
        targets = self.targets(batch).reshape(-1)
        # Sum over valid targets / their count (at least 1): a microbatch whose labels are all ignored (a long
        # masked prompt) gives 0, not the NaN of a mean over nothing.
        if isinstance(outputs, DbrxLossOutput):
            ce_sum = outputs.ce_sum
        else:
            logits = outputs.logits
            ce_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets,
                                     ignore_index=IGNORE_INDEX, reduction='sum')
        ce = ce_sum / (targets != IGNORE_INDEX).sum().clamp(min=1)
        return router_loss_terms(self, ce, outputs.routings, self.config.ffn_config, self.training_config,
                                 self.lb_loss_key)

    def eval_forward(self, batch: Mapping[str, Any], outputs: Optional[DbrxOutput | DbrxLossOutput] = None
                     ) -> DbrxOutput | DbrxLossOutput:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict:
        return self.train_metrics if is_train else self.eval_metrics

    def update_metric(self, batch: Any, outputs: DbrxOutput, metric) -> None:
        if not isinstance(metric, (LanguageCrossEntropy, LanguagePerplexity)):
            raise ValueError(f'metric {type(metric).__name__} is not supported by the dbrx model (it computes '
                             'LanguageCrossEntropy and LanguagePerplexity); remove icl_tasks / eval_gauntlet')
        metric.update(outputs if isinstance(outputs, DbrxLossOutput) else outputs.logits, self.targets(batch))

    def flops_per_batch(self, batch: Mapping[str, Any]) -> int:
        """``(6 N_active + 12 L D S) * tokens``: N_active without the input embedding (a lookup, no FLOPs)
        and with experts at top_k / E; the second term is attention (LLM Foundry's and torchtitan's convention)."""
        b, s = batch['input_ids'].shape[:2]
        c = self.config
        per_token = 6 * (self.n_active_params - c.vocab_size * c.d_model) + 12 * c.n_layers * c.d_model * s
        return per_token * b * s
