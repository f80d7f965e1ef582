"""The input checks every language model in mambakit applies (MambaLM and the Transformer baseline alike):
token ids (b, l) inside the vocabulary, next-token labels, num_last_tokens. Bad input gets an error that names
it, before any work is done."""

from __future__ import annotations

import torch
from torch import Tensor

_ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def check_lm_inputs(input_ids, labels, num_last_tokens, vocab_size: int, padded_vocab_size: int) -> None:
    """input_ids: an integer tensor (b, l), b, l ≥ 1, ids in [0, vocab_size); labels: None or integer (b, l) in
    [0, padded_vocab_size) or −100 (ignored); num_last_tokens: an int ≥ 0, and 0 when labels are given."""
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids (b, l), got {type(input_ids).__name__}")
    if input_ids.dtype not in _ID_DTYPES:
        raise TypeError(f"input_ids must hold integer token ids (e.g. torch.long), got dtype {input_ids.dtype}")
    if input_ids.dim() != 2:
        hint = " (use input_ids[None] for a single sequence)" if input_ids.dim() == 1 else ""
        raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}{hint}")
    if input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must hold at least one token per row, got shape {tuple(input_ids.shape)}")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"input_ids contains token id {bad}, outside the vocabulary [0, {vocab_size})")
    if isinstance(num_last_tokens, bool) or not isinstance(num_last_tokens, int) or num_last_tokens < 0:
        raise ValueError(f"num_last_tokens must be an int >= 0, got {num_last_tokens!r}")
    if labels is None:
        return
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError("labels must be an integer tensor of shape (batch, length), like input_ids")
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
    valid = (labels == -100) | ((labels >= 0) & (labels < padded_vocab_size))
    if not bool(valid.all()):
        raise ValueError(f"labels must be in [0, {padded_vocab_size}) or -100 (ignored)")
    if num_last_tokens > 0:
        raise ValueError("num_last_tokens > 0 keeps only some logits; it cannot be combined with labels")
