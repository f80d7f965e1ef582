"""Text generation with a fixed-size state (paper Section 3.3: the recurrent mode).

    prefill (parallel scan over each prompt) → decode_step (single-step ops, state updated in place) → sample

A Mamba carries, per sequence, a conv state (E·D, W−1) and an SSM state (E·D, N) per layer (Mamba-2: (S + 2GN,
W−1) and (h, p, N); see model.MambaState), whatever the length: nothing grows with the generated tokens (no KV cache), and rows of a batch never interact. So
prompts of different lengths batch without attention masks: each distinct length is prefilled on its own
(rows of equal length together), the per-row states are stacked into one batch state, and then all rows
decode together. A row that has finished keeps being fed a pad token; its outputs are ignored.
Hybrids (attention layers, model.MambaState.attn) add a KV cache that does grow with the tokens; each row keeps
its own length in it (attention.AttentionState), so the same batching stays exact row for row.

Sampling is per row as well: row i draws from its own `torch.Generator` seeded with `seed + i`, so a
batch gives, row for row, what `generate([prompt_i], seed=seed + i)` gives alone.

Logit processing, in this order (that of transformers): repetition penalty → (greedy if temperature == 0)
→ temperature → top-k → top-p → min-p → sample.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor

from . import engine
from .model import MambaLM, MambaState
from .tokenizer import DecodeStream


# --------------------------------------------------------------------------------------------- outputs
@dataclass
class GenerationOutput:
    """tokens (b, T) int64: the new tokens of every row, padded with pad_token_id after the row ended
    (T = the longest row). sequences: the same, unpadded. texts: decoded (when there is a tokenizer), cut
    before a stop string. finish_reasons: "eos", "stop" or "length". state: the final decode state."""

    tokens: Tensor
    sequences: list[list[int]]
    finish_reasons: list[str]
    texts: list[str] | None
    prompt_lengths: list[int]
    state: MambaState
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0


@dataclass
class GenerationStep:
    """What one decode step produced, per row: the new token (None if the row had already ended), the new
    text (with a tokenizer; text that could still turn into a stop string is held back), and whether the
    row is now finished."""

    token_ids: list[int | None]
    texts: list[str] | None
    finished: list[bool]


class GenerationStream:
    """The iterator `generate(..., stream=True)` returns: yields a GenerationStep per step; once it is
    exhausted, `.output` holds the GenerationOutput."""

    def __init__(self, steps: Iterator[GenerationStep], decoder: "_Decoder"):
        self._steps, self._decoder = steps, decoder

    def __iter__(self):
        return self

    def __next__(self) -> GenerationStep:
        return next(self._steps)

    @property
    def output(self) -> GenerationOutput:
        if not self._decoder.done:
            raise RuntimeError("the stream is not exhausted yet: iterate over it first")
        return self._decoder.output()


# ----------------------------------------------------------------------------------- logit processing
# Sampling runs in float64 (logits are converted once a step; greedy needs no conversion): a temperature, penalty
# or top_p near the ends of the float range (1e-300, 5e-324) must act as the limit it approaches, and in float32
# it rounds to 0 or inf.
def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty (Keskar et al. 2019), as transformers: a token already in the row (prompt or output)
    has its logit divided by `penalty` if positive, multiplied if negative. logits (b, V); seen (b, V) bool.

    A penalty so extreme that a penalised logit overflows (a row's maximum becomes +inf, or every logit −inf)
    gives the row its limit: the largest of the overflowed logits (ties alike) keeps 0, all others −inf."""
    if penalty == 1.0:
        return logits
    return _penalise_(logits.clone(), seen, penalty)


def _penalise_(x: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """apply_repetition_penalty in place on x. A row has seen few of its V tokens: only those are touched."""
    rows, cols = seen.nonzero(as_tuple=True)
    old = x[rows, cols]
    new = torch.where(old > 0, old / penalty, old * penalty)
    x[rows, cols] = new
    top = x.amax(-1)  # (b,)
    for r in (~torch.isfinite(top)).nonzero()[:, 0].tolist():  # overflowed rows (rare): their limit
        mine = rows == r
        hit = new[mine] == top[r]  # the overflowed entries: all +inf, or (every entry) −inf
        if not bool(hit.any()):  # a NaN row (next_tokens refuses those before): left as it is
            continue
        best = old[mine][hit].max()
        x[r] = -math.inf
        x[r, cols[mine][hit & (old[mine] == best)]] = 0.0
    return x


def filter_logits(
    logits: Tensor, top_k: int | None = None, top_p: float | None = None, min_p: float | None = None
) -> Tensor:
    """Sets the logits of the tokens each filter removes to −inf, row by row. logits (b, V) float.

    top_k: keep the k largest (ties with the k-th are kept). top_p (nucleus, Holtzman et al. 2019): keep
    the smallest set of most likely tokens whose probability reaches p. min_p: keep tokens whose probability
    is at least min_p × that of the row's most likely token (the threshold is per row). Each filter keeps
    at least the row's most likely token."""
    return _filter_(logits.clone(), top_k, top_p, min_p)


def _filter_(x: Tensor, top_k: int | None, top_p: float | None, min_p: float | None) -> Tensor:
    """filter_logits in place on x."""
    if top_k is not None and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]  # (b, 1)
        x.masked_fill_(x < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        x.masked_fill_(x < _top_p_threshold(x, top_p), -math.inf)
    if min_p is not None and min_p > 0.0:
        # p_i < min_p · p_max  ⟺  logit_i < logit_max + log(min_p): per row, and no softmax needed
        x.masked_fill_(x < x.amax(-1, keepdim=True) + math.log(min_p), -math.inf)
    return x


def _top_p_threshold(logits: Tensor, top_p: float, candidates: int = 256) -> Tensor:
    """(b, 1): per row, the logit of the least likely token of the nucleus (tokens at or above it are kept).

    A nucleus is usually a few tokens: the top `candidates` are found with topk (no full sort of the
    vocabulary); rows whose candidates do not reach top_p are sorted in full."""
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (b, 1): probabilities are exp(logit − lse)
    k = min(candidates, logits.shape[-1])
    top = torch.topk(logits, k, dim=-1).values  # (b, k), descending
    probs = torch.exp(top - lse)
    mass_before = probs.cumsum(-1) - probs  # probability of the more likely tokens
    # kept: tokens whose more likely tokens hold less than top_p; the first always (a top_p below the
    # rounding of mass_before, or compared in a narrower dtype, would keep none)
    n_keep = (mass_before < top_p).sum(-1, keepdim=True).clamp_(min=1)  # (b, 1), in 1..k
    threshold = top.gather(-1, n_keep - 1)
    short = (n_keep == k) & (probs.sum(-1, keepdim=True) < top_p)  # the nucleus may go beyond the candidates
    if k < logits.shape[-1] and bool(short.any()):
        rows = short[:, 0].nonzero()[:, 0]
        threshold[rows] = _top_p_threshold(logits[rows], top_p, candidates=logits.shape[-1])
    return threshold


def sample(logits: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
    """One token per row from softmax(logits) (b, V), row i drawing one uniform from generators[i]
    (inverse-CDF sampling): a row's draw never depends on the other rows. Returns (b,) int64."""
    x = logits.to(torch.float64, copy=True)
    return _draw(x.sub_(x.amax(-1, keepdim=True)), generators)


def _draw(x: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
    """sample() of logits x (b, V) float64 whose row maxima are 0; x is overwritten (no (b, V) allocation: at
    b = 32 and V = 50k each costs as much as the arithmetic)."""
    cdf = x.exp_().cumsum_(-1)  # (b, V), unnormalised (exp ≤ 1, total ≥ 1); float64: the tail's tiny weights count
    total = cdf[:, -1:].contiguous()  # (b, 1)
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])  # (b,)
    # the first index whose cdf exceeds u·total; a zero-probability token never gets picked
    idx = torch.searchsorted(cdf, u.unsqueeze(1) * total, right=True)
    # u·total can round up to total: then the last token with probability (where the cdf reaches total)
    return torch.minimum(idx, torch.searchsorted(cdf, total)).squeeze(1)


def next_tokens(logits: Tensor, seen: Tensor | None, params: "SamplingParams", generators) -> Tensor:
    """The whole logit-processing chain for one step: logits (b, V) → token ids (b,).

    ValueError if a row's logits hold a NaN or +inf or are all −inf (the model is broken: a token drawn from
    them would be arbitrary, e.g. always the last id, the padding)."""
    top = logits.amax(-1, keepdim=True)  # (b, 1); NaN if the row has one
    if not bool(torch.isfinite(top).all()):
        row = int((~torch.isfinite(top[:, 0])).nonzero()[0, 0])
        raise ValueError(f"model: its logits for row {row} are not finite (NaN or inf): are its weights finite?")
    if params.temperature == 0 and params.repetition_penalty == 1.0:
        return logits.argmax(-1)  # exact in any dtype
    x = logits.to(torch.float64, copy=True)  # ours: the steps below work in place
    if params.repetition_penalty != 1.0:
        x = _penalise_(x, seen, params.repetition_penalty)
        top = x.amax(-1, keepdim=True)
        if params.temperature == 0:
            return x.argmax(-1)
    # the row's maximum is moved to 0 before dividing, so a tiny temperature sends the other logits to −inf
    # and leaves the maximum (and its ties) at 0: the greedy limit, never inf − inf
    x.sub_(top.to(torch.float64)).div_(params.temperature)
    x = _filter_(x, params.top_k, params.top_p, params.min_p)  # (each keeps the row's maximum, 0)
    return _draw(x, generators)


# --------------------------------------------------------------------------------------------- prefill
@torch.inference_mode()
def extend(model: MambaLM, ids: Tensor, state: MambaState | None = None,
           chunk_tokens: int | None = None) -> tuple[MambaState, Tensor]:
    """Runs ids (b, l) through the parallel forward after `state` (None: from the start), `chunk_tokens`
    positions a call (None: one call) with the state carried: returns the state after the l tokens and the
    final-normed hidden state at the last position (b, D) (model.lm_head of it: the next token's logits). The
    one prefill of mambakit: generate, the server and eval all go through it. Ids are not range-checked here."""
    step = ids.shape[1] if chunk_tokens is None else chunk_tokens
    h = None
    for s in range(0, ids.shape[1], step):
        h, state = model.backbone(ids[:, s: s + step], state, True)  # (b, c, D)
    return state, h[:, -1]


@torch.inference_mode()
def prefill(model: MambaLM, prompts: list[list[int]], max_tokens_per_call: int = 16384) -> tuple[MambaState, Tensor]:
    """Runs every prompt through the parallel forward and returns (state, last_logits): the batch state
    (n_layer, b, …) after each prompt, and the logits (b, V) at each prompt's last token.

    Rows of equal length go through one call (up to max_tokens_per_call tokens), so no padding or mask is
    ever needed; their states are written into rows of one preallocated batch state."""
    b = len(prompts)
    state = model.allocate_state(b)
    last_logits = None
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    device = state.ssm.device
    for length, rows in by_length.items():
        per_call = max(1, max_tokens_per_call // length)
        for k in range(0, len(rows), per_call):
            chunk = rows[k:k + per_call]
            ids = torch.tensor([prompts[i] for i in chunk], dtype=torch.long, device=device)  # (g, length)
            row_state, h = extend(model, ids)
            logits = model.lm_head(h)  # (g, V)
            if last_logits is None:
                last_logits = logits.new_empty(b, logits.shape[-1])
            index = torch.tensor(chunk, device=device)
            last_logits[index] = logits
            state.set_rows_(index, row_state)  # a hybrid's KV caches too, each row at its own length
    return state, last_logits


# ------------------------------------------------------------------------------------------ validation
# (also used by the server, mambakit.serve, which validates each request with the same rules)
@dataclass(frozen=True)
class SamplingParams:
    """The logit-processing settings of one generation (checked by `check_sampling`)."""

    temperature: float
    top_k: int | None
    top_p: float | None
    min_p: float | None
    repetition_penalty: float


def _float(x) -> float | None:
    """x as a float (an int too large for one: ±inf), or None if x is not a real number (True is not 1.0)."""
    if not isinstance(x, numbers.Real) or isinstance(x, bool):
        return None
    try:
        return float(x)
    except OverflowError:
        return math.inf if x > 0 else -math.inf


def _int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_sampling(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty) -> SamplingParams:
    """ValueError naming the first setting that is out of range. Every accepted value is honoured, down to
    the smallest float: sampling runs in float64 and an extreme value acts as its limit (next_tokens)."""
    if not _int(max_new_tokens) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    t = _float(temperature)
    if t is None or not math.isfinite(t) or t < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not _int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    p = None if top_p is None else _float(top_p)
    if top_p is not None and not (p is not None and 0 < p <= 1):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    m = None if min_p is None else _float(min_p)
    if min_p is not None and not (m is not None and 0 <= m <= 1):
        raise ValueError(f"min_p must be None or in [0, 1], got {min_p!r}")
    r = _float(repetition_penalty)
    if r is None or not 0 < r < math.inf:
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), got {repetition_penalty!r}")
    return SamplingParams(t, None if top_k is None else int(top_k), p, m, r)


def encode_prompts(prompts, tokenizer, vocab_size: int) -> list[list[int]]:
    """prompts (a batch of strings or id lists, or a single one) → lists of ids, all checked."""
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and
                                    isinstance(prompts[0], int) and not isinstance(prompts[0], bool)):
        prompts = [prompts]  # one prompt
    if isinstance(prompts, Tensor):
        prompts = [prompts] if prompts.dim() == 1 else list(prompts)
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings or token-id lists")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError(f"prompt {i} is a string: pass tokenizer= (or give token ids)")
            ids = tokenizer.encode(p)
        else:
            ids = p.tolist() if isinstance(p, Tensor) else list(p)
            if any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
                raise TypeError(f"prompt {i} must be a string or a list of int token ids")
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty: a Mamba needs at least one token to condition on "
                             "(e.g. the tokenizer's eos/bos token)")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]}, outside the model's vocabulary [0, {vocab_size})")
        out.append(ids)
    return out


def check_stop(stop, tokenizer) -> list[str]:
    """stop (None, a string or a list of them) → a list of non-empty strings; they need a tokenizer."""
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer (pass tokenizer=, or use eos_token_id for token ids)")
    if any(not isinstance(s, str) or not s for s in stop):
        raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return stop


def eos_ids(eos_token_id, tokenizer) -> set[int]:
    if eos_token_id is None:
        eos = getattr(tokenizer, "eos_token_id", None)
        return set() if eos is None else {eos}
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
        raise ValueError(f"eos_token_id must be an int or a list of ints >= 0, got {eos_token_id!r}")
    return set(ids)


def pad_id(pad_token_id, tokenizer, eos: set[int], vocab_size: int) -> int:
    """The id fed to rows that have ended: pad_token_id, else the tokenizer's pad, else the eos, else 0
    (the first the model can take)."""
    if pad_token_id is None:
        options = [getattr(tokenizer, "pad_token_id", None), min(eos) if eos else None, 0]
        pad_token_id = next(t for t in options if t is not None and t < vocab_size)
    if not _int(pad_token_id) or not 0 <= pad_token_id < vocab_size:
        raise ValueError(f"pad_token_id {pad_token_id!r} is not an int or is outside the vocabulary [0, {vocab_size})")
    return int(pad_token_id)


def sampling_vocab(model: MambaLM, tokenizer) -> int:
    """How many ids can be sampled: the model's vocabulary without its padding, and no more ids than the
    tokenizer has (logits beyond are cut off before sampling)."""
    v = model.config.vocab_size
    return v if tokenizer is None else min(v, tokenizer.vocab_size)


def row_generators(seed, b: int) -> list[torch.Generator]:
    """One generator per row: seed + i (or seed[i] for a list); seed None draws the base seed from torch's
    global generator, so torch.manual_seed makes the call reproducible."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    seeds = [int(seed) + i for i in range(b)] if _int(seed) else list(seed) if isinstance(seed, (list, tuple)) else []
    # the range torch.Generator.manual_seed takes (beyond it: a RuntimeError from torch)
    if len(seeds) != b or any(not _int(s) or not -2**63 <= s < 2**64 for s in seeds):
        raise ValueError(f"seed must be an int or a list of {b} ints (one per prompt) in [-2**63, 2**64), "
                         f"got {seed!r}")
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


# ------------------------------------------------------------------------------------------- per row
class RowOutput:
    """One row's output: its tokens, and with a tokenizer its text, stop-string check and streamed part.
    `push` takes each sampled token; `finish_reason` is set once the row has ended."""

    def __init__(self, tokenizer, stop: list[str]):
        self.ids: list[int] = []
        self.finish_reason: str | None = None
        self.stream = DecodeStream(tokenizer) if tokenizer is not None else None
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1  # chars that may start a stop string
        self.text = ""
        self.end: int | None = None  # where the text is cut (before a stop string)
        self.emitted = 0

    def push(self, token: int, is_eos: bool, last_step: bool) -> str:
        """Appends the row's token of a decode step (last_step: the max_new_tokens-th); returns the text
        that is now safe to show (all of the rest, once the row has ended)."""
        text = self.add(token, is_eos)
        if self.finish_reason is None and last_step:
            self.finish_reason = "length"
            text += self.flush_text(final=True)
        return text

    def add(self, token: int, is_eos: bool) -> str:
        """Appends a token; returns the text that is now safe to show."""
        self.ids.append(token)
        if is_eos:
            self.finish_reason = "eos"
        if self.stream is not None and not is_eos:
            piece = self.stream.push(token)
            if piece and self.stop:
                start = max(0, len(self.text) - self.hold)  # a stop string may straddle the last piece
                self.text += piece
                hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
                if hits:
                    self.end, self.finish_reason = min(hits), "stop"
            else:
                self.text += piece
        return self.flush_text(final=self.finish_reason is not None)

    def flush_text(self, final: bool) -> str:
        if self.stream is None:
            return ""
        if final and self.end is None:
            self.text += self.stream.flush()
        upto = self.end if self.end is not None else len(self.text) - (0 if final else self.hold)
        if upto <= self.emitted:
            return ""
        piece, self.emitted = self.text[self.emitted:upto], upto
        return piece

    def final_text(self) -> str:
        return self.text[: self.end] if self.end is not None else self.text


# --------------------------------------------------------------------------------------------- decoder
class _Decoder:
    """Holds one generation's state: prefill in __init__, then `steps()` decodes until every row ends."""

    def __init__(self, model, prompts, max_new_tokens, params, eos, stop, generators, tokenizer, pad_id, step_fn):
        self.model, self.params, self.eos, self.pad_id = model, params, eos, pad_id
        self.max_new_tokens, self.generators, self.tokenizer = max_new_tokens, generators, tokenizer
        self.step_fn = step_fn
        self.prompt_lengths = [len(p) for p in prompts]
        self.rows = [RowOutput(tokenizer, stop) for _ in prompts]
        self.vocab = sampling_vocab(model, tokenizer)
        t0 = time.perf_counter()
        self.state, self.logits = prefill(model, prompts)
        self.prefill_seconds = time.perf_counter() - t0
        self.decode_seconds, self.steps_done, self.done = 0.0, 0, False
        b = len(prompts)
        self.seen = None
        if params.repetition_penalty != 1.0:  # which tokens each row has seen: (b, V) bool
            self.seen = torch.zeros(b, self.vocab, dtype=torch.bool, device=self.logits.device)
            for i, p in enumerate(prompts):
                # a prompt may hold ids the tokenizer cannot decode (its vocabulary < the model's): never sampled
                self.seen[i, [t for t in p if t < self.vocab]] = True

    @torch.inference_mode()
    def steps(self) -> Iterator[GenerationStep]:
        rows, b = self.rows, len(self.rows)
        logits = self.logits[:, : self.vocab]  # (b, V) without the padded ids
        tokens = torch.empty(b, dtype=torch.long, device=logits.device)
        t0 = time.perf_counter()
        for step in range(self.max_new_tokens):
            tokens.copy_(next_tokens(logits, self.seen, self.params, self.generators))
            new = tokens.tolist()
            token_ids, texts = [], []
            for i, (row, tok) in enumerate(zip(rows, new)):
                if row.finish_reason is not None:
                    token_ids.append(None)
                    texts.append("")
                    new[i] = self.pad_id  # finished rows are fed a pad token; their outputs are ignored
                    continue
                token_ids.append(tok)
                texts.append(row.push(tok, tok in self.eos, last_step=step == self.max_new_tokens - 1))
            finished = [r.finish_reason is not None for r in rows]
            last = all(finished) or step == self.max_new_tokens - 1
            if not last:
                tokens.copy_(torch.tensor(new))
                if self.seen is not None:  # ended rows are fed the pad id, which may lie beyond self.vocab
                    live = [i for i, r in enumerate(rows) if r.finish_reason is None]
                    self.seen[live, tokens[live]] = True
                logits = self.step_fn(tokens, self.state)[:, : self.vocab]  # (b, V); state updated in place
                self.steps_done += 1
            if last:
                self.decode_seconds = time.perf_counter() - t0
                self.done = True
            yield GenerationStep(token_ids, texts if self.tokenizer is not None else None, finished)
            if last:
                return

    def output(self) -> GenerationOutput:
        seqs = [r.ids for r in self.rows]
        width = max(len(s) for s in seqs)
        tokens = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        texts = [r.final_text() for r in self.rows] if self.tokenizer is not None else None
        return GenerationOutput(tokens, seqs, [r.finish_reason for r in self.rows], texts, self.prompt_lengths,
                                self.state, self.prefill_seconds, self.decode_seconds, self.steps_done)


# -------------------------------------------------------------------------------------------- generate
def generate(
    model: MambaLM,
    prompts,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    stop: str | Sequence[str] | None = None,
    seed: int | Sequence[int] | None = None,
    stream: bool = False,
    tokenizer=None,
    pad_token_id: int | None = None,
    fused: bool | None = None,
    compile: bool = False,
) -> GenerationOutput | GenerationStream:
    """Generates up to max_new_tokens tokens after each prompt.

    prompts: token-id lists, or strings (with a tokenizer), of any lengths, in one batch (a single prompt
    is a batch of one). temperature 0 is greedy. Each row stops on its own at an eos token (eos_token_id,
    default: the tokenizer's) or a stop string (needs a tokenizer; the text is cut before it), and is
    padded with pad_token_id (default: the tokenizer's pad, else its eos, else 0) in `tokens`. seed: row i
    samples with a generator seeded by seed + i (or seed[i]). stream=True returns a GenerationStream,
    which yields a GenerationStep per decode step. tokenizer defaults to `model.tokenizer` (set by
    from_pretrained). fused: the decode step (`mambakit.engine.step_function`): None takes the fused CPU step
    wherever it applies and MambaLM.step elsewhere (logged once), False always MambaLM.step, True requires the
    fused step. compile=True runs MambaLM.step through torch.compile instead (slower than eager on CPU today,
    docs/engine.md), so it is off by default.
    """
    if not isinstance(model, MambaLM):
        raise TypeError(f"generate needs a MambaLM, got {type(model).__name__}")
    params = check_sampling(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty)
    for name, flag in (("stream", stream), ("compile", compile)):
        if not isinstance(flag, bool):  # "no" is truthy: it must not switch a mode on
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is not None and not all(hasattr(tokenizer, a) for a in ("encode", "decode", "vocab_size")):
        raise TypeError(f"tokenizer must have encode, decode and vocab_size (a mambakit tokenizer), got "
                        f"{type(tokenizer).__name__}")
    ids = encode_prompts(prompts, tokenizer, model.config.vocab_size)
    stop = check_stop(stop, tokenizer)
    eos = eos_ids(eos_token_id, tokenizer)
    pad_token_id = pad_id(pad_token_id, tokenizer, eos, model.config.vocab_size)
    if compile and fused:
        raise ValueError("compile=True compiles MambaLM.step; it cannot be combined with fused=True")
    step_fn = torch.compile(model.step, dynamic=True) if compile else engine.step_function(model, fused)
    # (a Mamba has no dropout or batch norm: train and eval modes compute the same, nothing to switch)
    decoder = _Decoder(model, ids, max_new_tokens, params, eos, stop, row_generators(seed, len(ids)), tokenizer,
                       pad_token_id, step_fn)
    if stream:
        return GenerationStream(decoder.steps(), decoder)
    for _ in decoder.steps():
        pass
    return decoder.output()
