"""HF DBRX <-> foundry-dbrx: checkpoints in both directions, and HF weights into a model.

Where things are:

- :mod:`~foundry_dbrx.hf.keys`: the key map (DBRX parameter names and shapes per config) and the key check.
- :mod:`~foundry_dbrx.hf.config_map`: config.json <-> :class:`~foundry_dbrx.config.DbrxConfig`, architecture fields
  against training choices, configs from a folder, a config.json or a training YAML.
- :mod:`~foundry_dbrx.hf.files`: the HF folder's file names and the tokenizer / config files carried in a ``.pt``.
- :mod:`~foundry_dbrx.hf.readers`: one reader per checkpoint format (HF safetensors, Composer ``.pt``, Composer
  sharded folder, in-memory state dict).
- :mod:`~foundry_dbrx.hf.safe_load`: reading pickled checkpoints with an allowlist of types, no code run.
- :mod:`~foundry_dbrx.hf.convert`: the conversions, streamed one shard at a time.
- :mod:`~foundry_dbrx.hf.router_bias`: the routers' balancing bias in state dicts and in config.json.
- :mod:`~foundry_dbrx.hf.pretrained`: HF weights straight into a model (``pretrained_hf_dir``).
- :mod:`~foundry_dbrx.hf.gather`: the full weights of an FSDP model, for the HF checkpointer callback.
- :mod:`~foundry_dbrx.hf.cli`: ``foundry-dbrx convert``.
"""

from foundry_dbrx.hf.config_map import (HF_LAYER_NORM_EPS, architecture_differences, config_with_hf,
                                        hf_config_dict, load_hf_config, read_config_source)
from foundry_dbrx.hf.convert import (DTYPES, HF_EXPORT, PT_EXPORT, NonFiniteWeightsError, composer_to_hf,
                                     hf_to_composer, parse_size, save_hf_checkpoint)
from foundry_dbrx.hf.files import CARRIED_FILES, HF_CONFIG, HF_GENERATION_CONFIG, HF_INDEX, HF_SINGLE_FILE
from foundry_dbrx.hf.gather import gather_full_state_dict, unwrap_ddp
from foundry_dbrx.hf.keys import (COMPOSER_MODEL_PREFIX, DCP_STATE_MODEL, KEY_TABLE, KeyMismatchError, check_keys,
                                  expected_shapes)
from foundry_dbrx.hf.pretrained import hf_param_init_fn, load_hf_weights, load_pretrained_hf
from foundry_dbrx.hf.readers import CARRY_KEY
from foundry_dbrx.hf.router_bias import (ROUTER_BIAS_KEY, router_bias_from_hf_config, router_bias_from_state,
                                         set_router_bias, split_router_bias)
from foundry_dbrx.hf.safe_load import CHECKPOINT_TYPES, UnsafeCheckpointError

__all__ = ['KEY_TABLE', 'COMPOSER_MODEL_PREFIX', 'DCP_STATE_MODEL', 'KeyMismatchError', 'expected_shapes',
           'check_keys', 'hf_to_composer', 'composer_to_hf', 'save_hf_checkpoint', 'load_hf_config',
           'config_with_hf', 'read_config_source', 'hf_config_dict', 'architecture_differences', 'load_hf_weights',
           'hf_param_init_fn', 'load_pretrained_hf', 'gather_full_state_dict', 'unwrap_ddp', 'parse_size', 'DTYPES',
           'HF_CONFIG', 'HF_SINGLE_FILE', 'HF_INDEX', 'HF_GENERATION_CONFIG', 'HF_LAYER_NORM_EPS', 'CARRIED_FILES',
           'CARRY_KEY', 'CHECKPOINT_TYPES', 'UnsafeCheckpointError', 'NonFiniteWeightsError', 'HF_EXPORT',
           'PT_EXPORT', 'ROUTER_BIAS_KEY', 'split_router_bias', 'router_bias_from_state',
           'router_bias_from_hf_config', 'set_router_bias']
