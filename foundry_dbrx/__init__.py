"""foundry-dbrx: DBRX-class mixture-of-experts models for Composer and LLM Foundry.

``import foundry_dbrx`` gives the model, its config and the Composer wrapper; the LLM Foundry registrations
(``dbrx`` model, ``dbrx_moe`` FFN, ``dbrx`` tokenizer) come through entry points once the package is installed.
"""

from foundry_dbrx.config import DbrxAttentionConfig, DbrxConfig, DbrxFFNConfig

__version__ = '0.1.0'

__all__ = ['ComposerDbrxCausalLM', 'DbrxAttentionConfig', 'DbrxConfig', 'DbrxFFNConfig', 'DbrxForCausalLM',
           'DbrxOutput']


def __getattr__(name: str):
    # torch and Composer take seconds to import; the model modules load when first asked for, so that
    # `foundry-dbrx --help` is quick and the command line owns Ctrl-C before any of them starts loading.
    if name in ('DbrxForCausalLM', 'DbrxOutput'):
        from foundry_dbrx import model
        return getattr(model, name)
    if name == 'ComposerDbrxCausalLM':
        from foundry_dbrx.composer_model import ComposerDbrxCausalLM
        return ComposerDbrxCausalLM
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
