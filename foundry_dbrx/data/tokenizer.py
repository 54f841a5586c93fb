"""DBRX's tokenizer: tiktoken ``cl100k_base`` plus DBRX's special tokens, registered as ``dbrx``; works offline.

Token ids (the released DBRX tokenizer): ``<|endoftext|>`` 100257 is bos, eos and unk; ``<|pad|>`` 100277,
``<|im_start|>`` 100278, ``<|im_end|>`` 100279; ChatML chat template. The model pads its embedding rows to 100352.
The cl100k_base file comes from a local tiktoken cache or the ``bpe-openai`` package, never the network
(:mod:`foundry_dbrx.data.cl100k`).
"""

from __future__ import annotations

from typing import Any

from llmfoundry.tokenizers.tiktoken import TiktokenTokenizerWrapper

from foundry_dbrx.data.cl100k import ENDOFTEXT_ID, TokenizerFileError, ensure_cl100k_cache, load_cl100k_encoding

__all__ = ['DbrxTokenizer', 'TokenizerFileError', 'ensure_cl100k_cache', 'load_cl100k_encoding', 'ENDOFTEXT_ID',
           'PAD_ID', 'IM_START_ID', 'IM_END_ID', 'DBRX_VOCAB_SIZE']

ENDOFTEXT = '<|endoftext|>'
PAD = '<|pad|>'
IM_START = '<|im_start|>'
IM_END = '<|im_end|>'
PAD_ID = 100277
IM_START_ID = 100278
IM_END_ID = 100279
# Embedding rows in the released model: the tokenizer's 100280 ids rounded up to a multiple of 2048.
DBRX_VOCAB_SIZE = 100352


class DbrxTokenizer(TiktokenTokenizerWrapper):
    """DBRX's tokenizer: cl100k_base, ``<|endoftext|>`` as bos/eos/unk, ``<|pad|>``, ``<|im_start|>``,
    ``<|im_end|>`` and the ChatML chat template; works offline and pickles (dataloader workers).

    Keyword arguments are Hugging Face tokenizer options (``model_max_length``, ``padding_side``, ``add_bos_token``,
    ``add_eos_token``, ``chat_template`` ...). The encoding and DBRX's special tokens are fixed.
    """

    def __init__(self, **kwargs: Any):
        fixed = {'model_name': None, 'encoding_name': 'cl100k_base', 'unk_token': ENDOFTEXT,
                 'eos_token': ENDOFTEXT, 'bos_token': ENDOFTEXT, 'pad_token': PAD,
                 'additional_special_tokens': [IM_START, IM_END]}
        for key, value in fixed.items():
            # Reloading a saved tokenizer passes these back with the same values; anything else is a mistake.
            if key in kwargs and kwargs[key] != value:
                raise ValueError(f'DbrxTokenizer: {key} ({kwargs[key]!r}) is fixed to {value!r} for DBRX')
        kwargs.update(fixed)
        # Byte-level BPE: decoding must give back the text exactly, so no cleanup and no spaces added
        # around special tokens (the released DBRX tokenizer is a fast tokenizer, which adds none).
        kwargs.setdefault('clean_up_tokenization_spaces', False)
        ensure_cl100k_cache()
        super().__init__(**kwargs)
        # Pad, im_start and im_end come after cl100k's 100277 ids as HF added tokens, in this order.
        got = {tok: self.convert_tokens_to_ids(tok) for tok in (ENDOFTEXT, PAD, IM_START, IM_END)}
        want = {ENDOFTEXT: ENDOFTEXT_ID, PAD: PAD_ID, IM_START: IM_START_ID, IM_END: IM_END_ID}
        if got != want:
            raise RuntimeError(f'DbrxTokenizer: special token ids {got} differ from DBRX\'s {want}')

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None,
                spaces_between_special_tokens: bool = False, **kwargs: Any) -> str:
        return super()._decode(token_ids, skip_special_tokens=skip_special_tokens,
                               clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                               spaces_between_special_tokens=spaces_between_special_tokens, **kwargs)
