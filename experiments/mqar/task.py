"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology", §3; the Mamba-2 paper's §9.1, Figure 8).

A sequence opens with n key-value pairs k₁ v₁ k₂ v₂ … kₙ vₙ; after them, every key comes back once as a query, at
its own position among filler tokens, and the model must output the key's value there. Unlike Induction Heads
(one pair, one query) the model has to hold all n associations at once, so the task measures how much a
fixed-size recurrent state can store: the reason the Mamba-2 paper uses it for its larger state (N = 64 … 256
against Mamba-1's 16).

Layout (Zoology's generator, as its paper and code describe it; written afresh here):
- vocabulary V: keys are tokens 1 … V/2 − 1, values V/2 … V − 1 (token 0 is never a key); a sequence's n keys
  are distinct, and so are its n values;
- positions 0 … 2n − 1 hold the pairs; the rest of the sequence, l − 2n positions, is split into (l − 2n) / 2
  slots of two tokens; query i sits at the first token of slot gᵢ (distinct slots), drawn with probability
  ∝ (g + 1)^(a − 1), a = power_a (Zoology's default 0.01: short gaps are likelier, a power law);
- every other position holds a filler token, uniform over the vocabulary minus the sequence's own keys.
  Zoology draws fillers over the whole vocabulary; with V = 8192 a filler rarely repeats a key, but at the
  small vocabularies a CPU run affords (e.g. 512 with 64 pairs: 1 filler in 8) it would often plant a false
  "key, random token" pair before the query. Here every key after the pairs is a query.
- targets: −100 everywhere except at each query, which holds its key's value (the output at t is scored
  against targets[:, t], after reading the query: mambakit.data.synthetic's convention).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mambakit.data.synthetic import IGNORE_INDEX


def mqar(batch_size: int, seq_len: int, n_pairs: int, vocab_size: int, power_a: float = 0.01,
         generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """A batch of MQAR: (inputs, targets), each (b, seq_len) int64; exactly n_pairs scored positions per row."""
    for name, v, lo in (("batch_size", batch_size, 1), ("n_pairs", n_pairs, 1), ("vocab_size", vocab_size, 4)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"mqar: {name} must be an int >= {lo}, got {v!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 4 * n_pairs:
        raise ValueError(f"mqar: seq_len must be an int >= 4 · n_pairs = {4 * n_pairs} (room for the pairs and "
                         f"as many query slots), got {seq_len!r}")
    half = vocab_size // 2
    if n_pairs > half - 1:
        raise ValueError(f"mqar: n_pairs ({n_pairs}) must be <= vocab_size // 2 − 1 = {half - 1}, the number of "
                         "distinct keys (and values) the vocabulary holds")
    if not 0 < power_a <= 1:
        raise ValueError(f"mqar: power_a must be in (0, 1], got {power_a!r}")
    b, n, l, V = batch_size, n_pairs, seq_len, vocab_size
    rows = torch.arange(b)[:, None]  # (b, 1)
    # n distinct keys in 1 … half − 1 and n distinct values in half … V − 1 per row: the first n of a random order
    keys = torch.rand(b, half - 1, generator=generator).argsort(1)[:, :n] + 1  # (b, n)
    values = torch.rand(b, V - half, generator=generator).argsort(1)[:, :n] + half  # (b, n)
    # fillers: uniform over the tokens that are not this row's keys
    allowed = torch.ones(b, V)
    allowed[rows, keys] = 0.0
    inputs = torch.multinomial(allowed, l, replacement=True, generator=generator)  # (b, l)
    inputs[:, 0:2 * n:2] = keys
    inputs[:, 1:2 * n:2] = values
    # query slots: n distinct slots among (l − 2n) // 2, power-law in the gap
    slots = (l - 2 * n) // 2
    weight = torch.arange(1, slots + 1, dtype=torch.float64) ** (power_a - 1)  # (slots,)
    gaps = torch.multinomial(weight.expand(b, slots), n, replacement=False, generator=generator)  # (b, n)
    query_pos = 2 * n + 2 * gaps  # (b, n)
    inputs[rows, query_pos] = keys
    targets = torch.full((b, l), IGNORE_INDEX, dtype=torch.long)
    targets[rows, query_pos] = values
    return inputs, targets
