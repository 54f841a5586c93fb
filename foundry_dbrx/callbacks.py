"""``dbrx_hf_checkpointer``: a Composer callback that writes HF DBRX folders during training.

Like LLM Foundry's ``hf_checkpointer``, but for :class:`ComposerDbrxCausalLM`: the folders hold transformers' own
DBRX format (config.json, safetensors shards, index, tokenizer), so ``DbrxForCausalLM.from_pretrained`` loads them
with no remote code. Under FSDP every rank takes part in gathering the full weights and rank 0 writes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

from composer.core import Callback, Event, State, Time, TimeUnit
from composer.loggers import Logger
from composer.utils import dist
from composer.utils.file_helpers import format_name_with_dist_and_time
from composer.utils.misc import create_interval_scheduler

from foundry_dbrx.hf import DTYPES, gather_full_state_dict, save_hf_checkpoint, unwrap_ddp

__all__ = ['DbrxHFCheckpointer']

log = logging.getLogger(__name__)


class DbrxHFCheckpointer(Callback):
    """Writes an HF DBRX checkpoint every ``save_interval`` and at the end of training.

    Args:
        save_folder: local folder for the checkpoints; ``{run_name}`` is filled in.
        save_interval: Composer time (``'500ba'``, ``'1ep'``, ``'1dur'``) or an int number of epochs.
        huggingface_folder_name: name of each checkpoint's folder, a Composer format string (``'ba{batch}'``).
        precision: ``'float32'``, ``'bfloat16'`` or ``'float16'``: the dtype of the saved weights.
        shard_size: largest safetensors shard, e.g. ``'5GB'``.
        overwrite: replace a folder of the same name if it is an earlier HF export (it holds the marker these
            exports write, and nothing else); anything else there stops the run rather than be deleted. Default
            True: a run resumed from an earlier Composer checkpoint reaches the same batch again and rewrites that
            batch's folder, as LLM Foundry's hf_checkpointer does.
    """

    def __init__(self, save_folder: str, save_interval: Union[str, int, Time],
                 huggingface_folder_name: str = 'ba{batch}', precision: str = 'float32',
                 shard_size: Union[int, str] = '5GB', overwrite: bool = True):
        if '://' in save_folder:
            raise ValueError(f'save_folder ({save_folder!r}) must be a local folder: dbrx_hf_checkpointer does not '
                             'upload to object stores')
        if precision not in DTYPES:
            raise ValueError(f'precision ({precision!r}) must be one of {sorted(DTYPES)}')
        self.save_folder = save_folder
        self.folder_name = huggingface_folder_name
        self.dtype = DTYPES[precision]
        self.shard_size = shard_size
        self.overwrite = overwrite
        self.save_interval = Time.from_input(save_interval, TimeUnit.EPOCH)
        self.check_interval = create_interval_scheduler(self.save_interval, include_end_of_training=True)
        self.last_checkpoint_batch: Optional[Time] = None
        self.saved: list[Path] = []  # folders written by this rank (rank 0 only), in order

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            model = unwrap_ddp(state.model)
            if not hasattr(model, 'config') or not hasattr(model, 'model'):
                raise ValueError(f'dbrx_hf_checkpointer needs the dbrx model (ComposerDbrxCausalLM); got '
                                 f'{type(model).__name__}')
            return
        if (state.get_elapsed_duration() is not None and self.check_interval(state, event)
                and self.last_checkpoint_batch != state.timestamp.batch):
            self._save(state)
            self.last_checkpoint_batch = state.timestamp.batch

    def _save(self, state: State) -> None:
        model = unwrap_ddp(state.model)
        state_dict = gather_full_state_dict(state.model)
        try:
            if dist.get_global_rank() == 0:
                folder = format_name_with_dist_and_time(self.save_folder, state.run_name, state.timestamp)
                name = format_name_with_dist_and_time(self.folder_name, state.run_name, state.timestamp)
                out = Path(folder) / name
                save_hf_checkpoint(state_dict, model.config, out, shard_size=self.shard_size, dtype=self.dtype,
                                   tokenizer=getattr(model, 'tokenizer', None), overwrite=self.overwrite)
                self.saved.append(out)
                log.info('dbrx_hf_checkpointer: wrote HF DBRX checkpoint %s at batch %d', out,
                         int(state.timestamp.batch))
        finally:
            del state_dict
            # Every rank reaches the barrier even when rank 0's write failed, so the others do not hang until a
            # collective timeout; rank 0's error propagates after it.
            dist.barrier()  # no rank runs ahead (and, say, exits) while rank 0 is still writing
