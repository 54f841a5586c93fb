"""Every registration of foundry-dbrx into LLM Foundry, one line each.

``ENTRY_POINTS`` is the single table: ``setup.py`` reads it (by executing this file, which imports nothing at
module level) to declare the package's entry points, which catalogue loads in any process where the package is
installed, so ``llmfoundry train`` finds ``dbrx`` with no ``code_paths``. :func:`register_all` does the same
registrations in code, for a process that imported LLM Foundry before this package was installed.
"""

ENTRY_POINTS = {
    'llmfoundry_models': ['dbrx = foundry_dbrx.composer_model:ComposerDbrxCausalLM',
                          'mpt_dbrx_moe = foundry_dbrx.mpt:ComposerMPTDbrxMoE'],
    'llmfoundry_ffns': ['dbrx_moe = foundry_dbrx.moe.layer:build_dbrx_moe_ffn'],
    'llmfoundry_module_init_fns': ['dbrx_experts = foundry_dbrx.moe.layer:init_dbrx_experts_in_mpt'],
    'llmfoundry_tokenizers': ['dbrx = foundry_dbrx.data.tokenizer:DbrxTokenizer'],
    'llmfoundry_dataloaders': ['dbrx_text = foundry_dbrx.data.loader:build_dbrx_text_dataloader'],
    'llmfoundry_callbacks': ['dbrx_run_summary = foundry_dbrx.summary:RunSummary',
                             'dbrx_hf_checkpointer = foundry_dbrx.callbacks:DbrxHFCheckpointer',
                             'dbrx_parallelize = foundry_dbrx.parallelize:DbrxParallelize',
                             'dbrx_divergence_guard = foundry_dbrx.divergence:DivergenceGuard',
                             'dbrx_expert_load = foundry_dbrx.expert_load:ExpertLoad'],
    'llmfoundry_optimizers': ['decoupled_adamw_fused = foundry_dbrx.optim:DecoupledAdamWFused'],
    'console_scripts': ['foundry-dbrx = foundry_dbrx.cli:main'],
}


def register_all() -> None:
    """Registers every LLM Foundry entry of :data:`ENTRY_POINTS` in code (idempotent)."""
    import importlib

    from llmfoundry import registry
    from llmfoundry import layers_registry

    registries = {'llmfoundry_models': registry.models, 'llmfoundry_ffns': layers_registry.ffns,
                  'llmfoundry_module_init_fns': layers_registry.module_init_fns,
                  'llmfoundry_tokenizers': registry.tokenizers, 'llmfoundry_callbacks': registry.callbacks,
                  'llmfoundry_dataloaders': registry.dataloaders, 'llmfoundry_optimizers': registry.optimizers}
    for group, lines in ENTRY_POINTS.items():
        if group not in registries:
            continue
        for line in lines:
            name, target = (part.strip() for part in line.split('='))
            module_name, attr = target.split(':')
            registries[group].register(name, func=getattr(importlib.import_module(module_name), attr))
