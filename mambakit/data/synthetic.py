"""The synthetic tasks of the Mamba paper's Section 4.1: Selective Copying and Induction Heads.

Both return (inputs, targets), two (b, l) int64 tensors: `inputs` is what a causal model reads, and
targets[:, t] is what the model's output at position t must predict (−100 where nothing is scored; use
`F.cross_entropy(..., ignore_index=-100)`). Scoring the output at t against targets[:, t] — not t + 1 — means
the model has read inputs[:, t] (the marker or the query token) when it answers. Batches are drawn from a
`torch.Generator`, so a (seed, batch index) pair always gives the same data.

Selective Copying (paper §3.1, Figure 2; App. E.1): vocabulary 16 with token 0 the noise ("white") token and
token 15 the marker, data ("coloured") tokens 1..14. The paper gives only "sequence length 4096, vocab 16
including the noise token, 16 tokens to memorize"; the layout (unconfirmed, the code was never released) is
that of the S4 repository's copying generator with variable spacing: the M data tokens sit at sorted random
positions among l − M slots, the rest noise, then M markers; at the j-th marker the model outputs the j-th
data token. `seq_len` counts every input position (markers included), so 4096 is the whole input.

Induction Heads (paper §4.1.2; App. E.1; the generator of the cited H3 work, unconfirmed for Mamba):
vocabulary 16 with token 15 the special "copy" token and 0..14 ordinary tokens. A sequence of random ordinary
tokens holds the special token once at a random position p, followed by the answer token; the sequence ends
with the special token again, and the model must output the answer there (only that position is scored).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "IGNORE_INDEX",
    "SELECTIVE_COPYING_FULL_LEN",
    "selective_copying",
    "induction_heads",
    "scored_accuracy",
]

IGNORE_INDEX = -100
SELECTIVE_COPYING_FULL_LEN = 4096  # the paper's setting (App. E.1)


def _check(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def selective_copying(batch_size: int, seq_len: int = 256, n_memorize: int = 16, vocab_size: int = 16,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """A batch of Selective Copying: (inputs, targets), each (b, seq_len) int64.

    inputs = [n_slots = seq_len − n_memorize positions, n_memorize of them data tokens at sorted random
    positions, the others noise (0)] + [n_memorize markers (vocab_size − 1)]; targets = −100 except the last
    n_memorize positions, which hold the data tokens in order. Data tokens are uniform in 1..vocab_size − 2."""
    _check("batch_size", batch_size, 1)
    _check("n_memorize", n_memorize, 1)
    _check("vocab_size", vocab_size, 3)
    _check("seq_len", seq_len, 2 * n_memorize)
    b, m = batch_size, n_memorize
    n_slots = seq_len - m
    data = torch.randint(1, vocab_size - 1, (b, m), generator=generator)  # (b, M)
    # M distinct positions per row among n_slots, sorted: the first M of a random permutation's order
    keys = torch.rand(b, n_slots, generator=generator)
    pos = keys.topk(m, dim=1).indices.sort(dim=1).values  # (b, M)
    inputs = torch.zeros(b, seq_len, dtype=torch.long)
    inputs.scatter_(1, pos, data)
    inputs[:, n_slots:] = vocab_size - 1  # markers
    targets = torch.full((b, seq_len), IGNORE_INDEX, dtype=torch.long)
    targets[:, n_slots:] = data
    return inputs, targets


def induction_heads(batch_size: int, seq_len: int = 256, vocab_size: int = 16,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """A batch of Induction Heads: (inputs, targets), each (b, seq_len) int64.

    inputs: ordinary tokens uniform in 0..vocab_size − 2, except inputs[p] = special (vocab_size − 1),
    inputs[p + 1] = answer for a random p in [0, seq_len − 3], and inputs[−1] = special (the query).
    targets = −100 except targets[:, −1] = answer."""
    _check("batch_size", batch_size, 1)
    _check("seq_len", seq_len, 3)
    _check("vocab_size", vocab_size, 3)
    b, l = batch_size, seq_len
    special = vocab_size - 1
    inputs = torch.randint(0, special, (b, l), generator=generator)  # (b, l) ordinary tokens
    answer = torch.randint(0, special, (b,), generator=generator)
    p = torch.randint(0, l - 2, (b,), generator=generator)  # p + 1 <= l − 2: the pair precedes the query
    rows = torch.arange(b)
    inputs[rows, p] = special
    inputs[rows, p + 1] = answer
    inputs[:, -1] = special
    targets = torch.full((b, l), IGNORE_INDEX, dtype=torch.long)
    targets[:, -1] = answer
    return inputs, targets


def scored_accuracy(logits: Tensor, targets: Tensor, vocab_size: int | None = None) -> tuple[int, int]:
    """(correct, scored): argmax predictions at the scored positions (targets != −100). With vocab_size,
    logits of padded vocabulary entries are ignored."""
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    mask = targets != IGNORE_INDEX
    pred = logits.argmax(-1)
    return int((pred[mask] == targets[mask]).sum()), int(mask.sum())
