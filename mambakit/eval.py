"""Evaluation: log-likelihoods of continuations, perplexity of text files, and an lm-evaluation-harness
adapter registered as "mambakit".

    score(model, [(context ids, continuation ids), ...]) → [(Σ log p(continuation | context), is_greedy)]
    perplexity(model, ids)                               → tokens, nats/token, perplexity (bits/byte for text)
    mambakit eval --model DIR --ppl FILE [--window W --stride S]
    mambakit eval --model DIR --tasks hellaswag,lambada_openai [--include-path DIR --limit N --num-fewshot K]

A Mamba's state after a prefix is all it needs to continue (paper §3.3), which shapes everything here:
- Long inputs go through the parallel forward in chunks of `chunk_tokens`, the state carried from chunk
  to chunk: memory stays bounded and the log-likelihoods are those of one pass over the whole input.
- A context shared by several continuations (the choices of a multiple-choice question) is prefilled
  once; its state is copied to one batch row per continuation, and the continuations run as one batch.
- Rows of a batch are right-padded: the model is causal, so padding after a row's end never changes the
  logits of its real positions (no mask needed); left padding would, since pad tokens would enter the state.
- Perplexity of a file is by default stateful: every token is predicted from the whole file before it,
  at the cost of one forward pass. `window`/`stride` give the usual sliding-window estimate instead
  (windows of W tokens every S tokens, each scoring its last S tokens from a fresh state).

Log-probabilities are log-softmax over the model's vocabulary (config.vocab_size, without the padding
ids of the embedding), in float32.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Callable, Sequence

import torch
from torch import Tensor

from .generate import extend
from .model import MambaLM


# ------------------------------------------------------------------------------------------- scoring
def _check_ids(ids: Sequence[int], vocab: int, what: str) -> list[int]:
    ids = list(ids)
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
    if bad:
        raise ValueError(f"{what} has token id {bad[0]!r}, outside the model's vocabulary [0, {vocab})")
    return ids


def _log_probs(model: MambaLM, h: Tensor, targets: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """h (m, D) hidden states, targets (m,) → log p(target) (m,) float32 and whether it is the argmax."""
    out_lp, out_greedy = [], []
    for s in range(0, h.shape[0], 2048):  # bounded (2048, V) logits at a time
        logits = model.lm_head(h[s: s + 2048])[:, :vocab].float()  # (m', V)
        lp = torch.log_softmax(logits, dim=-1)
        t = targets[s: s + 2048]
        out_lp.append(lp.gather(1, t[:, None])[:, 0])
        out_greedy.append(logits.argmax(-1) == t)
    return torch.cat(out_lp), torch.cat(out_greedy)


@torch.inference_mode()
def score(
    model: MambaLM,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 16,
    chunk_tokens: int = 2048,
    progress: Callable[[int, int], None] | None = None,
) -> list[tuple[float, bool]]:
    """For each (context, continuation) of token ids: (Σ_t log p(continuation_t | context, continuation_<t),
    whether every continuation token is the argmax). Contexts must be non-empty (start them with a BOS/EOS
    token to score a text from its beginning); continuations too.

    batch_size bounds the rows of a forward call; chunk_tokens the positions per row per call. Requests that
    share a context reuse its state. progress(done, total) is called as continuation tokens get scored
    (after each chunk of each batch)."""
    if batch_size < 1 or chunk_tokens < 1:
        raise ValueError(f"batch_size and chunk_tokens must be >= 1, got {batch_size}, {chunk_tokens}")
    vocab = model.config.vocab_size
    device = model.lm_head.weight.device
    items = []
    for i, (ctx, cont) in enumerate(requests):
        ctx, cont = _check_ids(ctx, vocab, f"context {i}"), _check_ids(cont, vocab, f"continuation {i}")
        if not ctx or not cont:
            raise ValueError(f"request {i}: context and continuation must both be non-empty (start the context "
                             "with a BOS/EOS token to score a text from its beginning)")
        items.append((tuple(ctx), cont))
    # unique contexts, longest first (batches of similar lengths); each keeps the requests that use it
    users: dict[tuple, list[int]] = {}
    for i, (ctx, _) in enumerate(items):
        users.setdefault(ctx, []).append(i)
    contexts = sorted(users, key=len, reverse=True)
    results: list[tuple[float, bool] | None] = [None] * len(items)
    done, total_tokens = 0, sum(len(cont) for _, cont in items)  # continuation tokens scored / to score
    for b0 in range(0, len(contexts), batch_size):
        block = contexts[b0: b0 + batch_size]
        # 1. prefill the block's contexts: rows of equal length together, exact (no padding)
        states, last_h = [None] * len(block), [None] * len(block)
        by_len: dict[int, list[int]] = {}
        for j, ctx in enumerate(block):
            by_len.setdefault(len(ctx), []).append(j)
        for rows in by_len.values():
            ids = torch.tensor([block[j] for j in rows], dtype=torch.long, device=device)  # (g, l)
            st, h = extend(model, ids, chunk_tokens=chunk_tokens)
            for r, j in enumerate(rows):
                states[j] = st.rows(torch.tensor([r], device=device))  # a hybrid's KV caches too
                last_h[j] = h[r]
        # 2. the continuations of these contexts, batch_size rows at a time, from their context's state
        pairs = sorted(((j, i) for j, ctx in enumerate(block) for i in users[ctx]),
                       key=lambda p: len(items[p[1]][1]), reverse=True)
        for p0 in range(0, len(pairs), batch_size):
            group = pairs[p0: p0 + batch_size]
            conts = [items[i][1] for _, i in group]
            # first token of each continuation: from the context's last hidden state
            lp0, g0 = _log_probs(model, torch.stack([last_h[j] for j, _ in group]),
                                 torch.tensor([c[0] for c in conts], device=device), vocab)
            total = lp0.double().tolist()
            greedy = g0.tolist()
            width = max(len(c) for c in conts) - 1  # inputs: continuation[:-1], right-padded
            if width > 0:
                inputs = torch.zeros(len(group), width, dtype=torch.long, device=device)  # (g, w)
                targets = torch.zeros_like(inputs)
                valid = torch.zeros(len(group), width, dtype=torch.bool, device=device)
                for r, c in enumerate(conts):
                    n = len(c) - 1
                    inputs[r, :n] = torch.tensor(c[:-1])
                    targets[r, :n] = torch.tensor(c[1:])
                    valid[r, :n] = True
                state = model.allocate_state(len(group))  # (n_layer, g, …), row r the context of group[r]
                for r, (j, _) in enumerate(group):
                    state.set_rows_(torch.tensor([r], device=device), states[j])
                row_of = torch.arange(len(group), device=device)[:, None].expand(-1, width)  # (g, w)
                lp_sum = torch.zeros(len(group), dtype=torch.float64, device=device)
                misses = torch.zeros(len(group), dtype=torch.long, device=device)  # non-argmax targets per row
                for s in range(0, width, chunk_tokens):
                    h, state = model.backbone(inputs[:, s: s + chunk_tokens], state, True)  # (g, c, D)
                    m = valid[:, s: s + chunk_tokens]
                    if not bool(m.any()):
                        break
                    lp, gr = _log_probs(model, h[m], targets[:, s: s + chunk_tokens][m], vocab)
                    rows = row_of[:, s: s + chunk_tokens][m]
                    lp_sum.index_add_(0, rows, lp.double())
                    misses.index_add_(0, rows, (~gr).long())
                    if progress is not None:
                        progress(done + len(group) + int(valid[:, : s + chunk_tokens].sum()), total_tokens)
                total = [a + b for a, b in zip(total, lp_sum.tolist())]
                greedy = [a and m == 0 for a, m in zip(greedy, misses.tolist())]
            for (_, i), t, g in zip(group, total, greedy):
                results[i] = (float(t), bool(g))
            done += sum(len(c) for c in conts)
            if progress is not None:
                progress(done, total_tokens)
    return results  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------- perplexity
def perplexity(
    model: MambaLM,
    ids: Sequence[int],
    *,
    prefix_token_id: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    chunk_tokens: int = 2048,
    batch_size: int = 8,
    num_bytes: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Perplexity of a token sequence: exp(mean −log p(token | everything before it)).

    The first token is scored after prefix_token_id (a BOS/EOS; if None it is not scored, and ids[0] is
    the first context). window None: stateful, one pass, full context for every token. window W (with
    stride S, default W // 2): windows of W tokens every S tokens, each scoring its last S tokens (all of
    the first window) from a fresh state. num_bytes (the text's UTF-8 size) adds bits per byte."""
    ids = _check_ids(ids, model.config.vocab_size, "the text")
    if prefix_token_id is not None:
        _check_ids([prefix_token_id], model.config.vocab_size, "prefix_token_id")
        ids = [prefix_token_id] + ids
    if len(ids) < 2:
        raise ValueError("perplexity needs at least two tokens (or one and a prefix token)")
    n = len(ids) - 1  # scored tokens
    stride = check_window(window, stride)
    requests = [(ids[:1], ids[1:])] if window is None else window_requests(ids, window, stride)
    t0 = time.perf_counter()
    scores = score(model, requests, batch_size=batch_size, chunk_tokens=chunk_tokens, progress=progress)
    nll = -sum(s for s, _ in scores)
    out = dict(tokens=n, nll=nll, nats_per_token=nll / n, perplexity=math.exp(nll / n),
               mode="stateful" if window is None else f"window {window}, stride {stride}",
               seconds=time.perf_counter() - t0)
    if num_bytes:
        out["bits_per_byte"] = nll / num_bytes / math.log(2)
    return out


def check_window(window: int | None, stride: int | None) -> int | None:
    """The stride to use (default window // 2) after checking window >= 2 and 1 <= stride <= window; stride
    without a window is refused (it would mean nothing)."""
    if window is None:
        if stride is not None:
            raise ValueError(f"stride={stride} needs a window (without one every token is scored from the whole "
                             "text before it)")
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an int >= 2 (a context token and a scored one), got {window!r}")
    stride = stride if stride is not None else max(1, window // 2)
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= window:
        raise ValueError(f"stride must be an int with 1 <= stride <= window ({window}), got {stride!r}")
    return stride


def window_requests(ids: list[int], window: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) requests scoring ids[1:] with sliding windows: the first window takes ids[0] as
    context and scores ids[1:window]; then every `stride` tokens, a window of `window` tokens ending at the
    scored part, whose last `stride` tokens are scored."""
    requests, end = [(ids[:1], ids[1:window])], window
    while end < len(ids):
        new_end = min(end + stride, len(ids))
        requests.append((ids[max(0, new_end - window): end], ids[end: new_end]))
        end = new_end
    return requests


def progress_bar(label: str, unit: str = "tok", enabled: bool = True) -> Callable[[int, int], None]:
    """A progress(done, total) callback (as score and perplexity take) that draws a tqdm bar on stderr: count,
    rate and ETA. None when not enabled, nor when stderr is not a terminal (tqdm's disable=None). The bar is made
    at the first call (when the total is known) and closed when done reaches the total."""
    from tqdm.auto import tqdm

    bar = None

    def show(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=label, unit=unit, unit_scale=total >= 10_000, file=sys.stderr,
                       disable=None if enabled else True, dynamic_ncols=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return show


# ------------------------------------------------------------------------------- lm-eval adapter
_ADAPTER = None
_MAX_TOKENS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")  # lm_eval's aliases
_SAMPLING = {"temperature": (0, 0.0, 1, 1.0), "top_p": (None, 1, 1.0), "top_k": (None, 0), "min_p": (None, 0, 0.0)}
GENERATION_KWARGS = ("until", "do_sample", *_SAMPLING, "repetition_penalty", "seed", "num_beams", *_MAX_TOKENS)


def _positive_int(name: str, value) -> int:
    """value (an int, a whole float, or its string from lm_eval's model_args) as an int >= 1; ValueError
    naming `name` otherwise."""
    v = None
    if isinstance(value, int) and not isinstance(value, bool):
        v = value
    elif isinstance(value, float) and value.is_integer():
        v = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        v = int(value)
    if v is None or v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return v


def _number(name: str, value) -> float:
    """value as a finite float; ValueError naming `name` otherwise."""
    try:
        v = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        v = math.nan
    if not math.isfinite(v):
        raise ValueError(f"generate_until: {name} must be a finite number, got {value!r}")
    return v


def _adapter_batch_size(batch_size, max_batch_size) -> int:
    """lm_eval's batch_size: an int, or 'auto' / 'auto:N' (no search here: max_batch_size, else 16)."""
    if isinstance(batch_size, str) and (batch_size == "auto" or batch_size.startswith("auto:")):
        return 16 if max_batch_size is None else _positive_int("max_batch_size", max_batch_size)
    if max_batch_size is not None:
        raise ValueError(f"max_batch_size={max_batch_size!r} only bounds batch_size='auto'; batch_size is "
                         f"{batch_size!r}")
    return _positive_int("batch_size", batch_size)


def generation_settings(gen_kwargs: dict, default_max_tokens: int) -> dict:
    """lm_eval's generation kwargs → keyword arguments of mambakit.generate (max_new_tokens, stop,
    temperature, top_k, top_p, min_p, repetition_penalty, seed), each honoured or refused by name:

    do_sample False is greedy, and then a sampling setting must be neutral (temperature 0 or 1, top_p 1,
    top_k 0, min_p 0: HF's defaults, which tasks spell out); do_sample unset means temperature > 0, as
    lm_eval reads it. num_beams must be 1 (no beam search). Unknown keys are refused."""
    if not isinstance(gen_kwargs, dict):
        raise TypeError(f"generate_until: generation kwargs must be a dict, got {type(gen_kwargs).__name__}")
    kw = dict(gen_kwargs)
    unknown = sorted(set(kw) - set(GENERATION_KWARGS))
    if unknown:
        raise ValueError(f"generate_until: generation kwarg(s) {unknown} are not supported; mambakit honours "
                         f"{', '.join(GENERATION_KWARGS)}")
    lengths = {k: kw.pop(k) for k in _MAX_TOKENS if kw.get(k) is not None}
    for k in _MAX_TOKENS:
        kw.pop(k, None)
    values = {_positive_int(k, v) for k, v in lengths.items()}
    if len(values) > 1:
        raise ValueError(f"generate_until: the generation lengths {lengths} disagree")
    out = {"max_new_tokens": values.pop() if values else default_max_tokens}
    until = kw.pop("until", None) or []
    until = [until] if isinstance(until, str) else until
    if not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
        raise ValueError(f"generate_until: until must be a string or a list of strings, got {until!r}")
    out["stop"] = [u for u in until if u] or None
    beams = kw.pop("num_beams", 1)
    if beams not in (1, None):
        raise ValueError(f"generate_until: num_beams={beams!r}: mambakit generates without beam search (num_beams 1)")
    do_sample = kw.pop("do_sample", None)
    if do_sample is None:
        do_sample = kw.get("temperature") is not None and _number("temperature", kw["temperature"]) > 0
    if not isinstance(do_sample, bool):
        raise ValueError(f"generate_until: do_sample must be true or false, got {do_sample!r}")
    if do_sample:
        out["temperature"] = _number("temperature", kw.pop("temperature", 1.0))
        if out["temperature"] == 0:
            raise ValueError("generate_until: do_sample=True with temperature=0 asks for sampling and for greedy "
                             "decoding at once: set do_sample=False, or a temperature > 0")
        for k in ("top_p", "top_k", "min_p"):
            if kw.get(k) is not None:
                out[k] = kw.pop(k)
    else:
        for k, neutral in _SAMPLING.items():
            v = kw.pop(k, None)
            if v is not None and (isinstance(v, bool) or v not in neutral):
                raise ValueError(f"generate_until: {k}={v!r} with do_sample=False: greedy decoding does not sample; "
                                 f"set do_sample=True to sample, or drop {k}")
        out["temperature"] = 0.0
    out["repetition_penalty"] = _number("repetition_penalty", kw.pop("repetition_penalty", 1.0))
    out["seed"] = kw.pop("seed", 1234)
    return out


def register():
    """Defines and registers the lm-evaluation-harness model "mambakit" (needs lm_eval); returns the class.

    After `import mambakit.eval; mambakit.eval.register()`, lm_eval's Python API takes
    `model="mambakit", model_args="pretrained=DIR,batch_size=16"`."""
    global _ADAPTER
    if _ADAPTER is not None:
        return _ADAPTER
    try:
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError as e:
        raise ImportError("the lm-evaluation-harness adapter needs lm_eval: pip install 'mambakit[eval]'") from e

    class MambakitLM(LM):
        """lm-evaluation-harness adapter for a mambakit checkpoint (or a MambaLM given as `model`).

        pretrained / model: a checkpoint directory, or a MambaLM (exactly one). tokenizer: a path, 'byte', a
        tokenizer object, or None (the checkpoint's). batch_size: rows per forward; 'auto' or 'auto:N' does no
        search here: it is max_batch_size if given, else 16 (chunk_tokens already bounds the memory).
        chunk_tokens: positions per forward call. dtype: float32 or bfloat16, with pretrained only. device: where
        the model runs (moved there). max_gen_toks: the default generation length. window / stride: sliding
        windows for rolling log-likelihood (perplexity) tasks, as mambakit.eval.perplexity; other request
        types are refused while a window is set. progress: tqdm bars of the requests' tokens (or rows) on stderr,
        shown only on a terminal. Any other argument is refused by name."""

        def __init__(self, pretrained: str | None = None, model: MambaLM | None = None, tokenizer=None,
                     batch_size: int | str = 16, max_batch_size: int | None = None, chunk_tokens: int = 2048,
                     dtype: str | None = None, device: str | None = None, max_gen_toks: int = 256,
                     window: int | None = None, stride: int | None = None, progress: bool | str = True, **unknown):
            super().__init__()
            from .tokenizer import ByteTokenizer, load_tokenizer

            if unknown:  # collected rather than left to Python, to name them all and what is taken
                raise TypeError(f"MambakitLM: unknown argument(s) {sorted(unknown)}; it takes pretrained, model, "
                                "tokenizer, batch_size, max_batch_size, chunk_tokens, dtype, device, max_gen_toks, "
                                "window, stride, progress")
            if (pretrained is None) == (model is None):
                raise ValueError("pass exactly one of pretrained=DIR and model=MambaLM")
            if model is None:
                dtype = "float32" if dtype is None else str(dtype)
                if dtype not in ("float32", "bfloat16"):
                    raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
                model = MambaLM.from_pretrained(pretrained, dtype=getattr(torch, dtype))
            elif dtype is not None:
                raise ValueError(f"dtype={dtype!r} applies to pretrained= only; convert the MambaLM you pass "
                                 "(model.to(dtype)) instead")
            if device is not None:
                try:
                    dev = torch.device(device)
                except (RuntimeError, TypeError) as e:
                    raise ValueError(f"device: {device!r} is not a torch device ({e})") from None
                if dev.type == "cuda" and not torch.cuda.is_available():
                    raise ValueError(f"device={device!r} but CUDA is not available here: pass device=cpu "
                                     "(lm_eval: --device cpu)")
                model = model.to(dev)
            if tokenizer == "byte":
                tokenizer = ByteTokenizer()
            elif isinstance(tokenizer, str):
                tokenizer = load_tokenizer(tokenizer)
            self.model = model.eval()
            self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
            if self.tokenizer is None:
                raise ValueError("the model has no tokenizer: pass tokenizer=PATH (or 'byte')")
            self.batch_size = _adapter_batch_size(batch_size, max_batch_size)
            self.chunk_tokens = _positive_int("chunk_tokens", chunk_tokens)
            self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
            self.window = None if window is None else _positive_int("window", window)
            self.stride = check_window(self.window, None if stride is None else _positive_int("stride", stride))
            if isinstance(progress, str) and progress.lower() in ("true", "false"):  # from lm_eval's model_args
                progress = progress.lower() == "true"
            if not isinstance(progress, bool):
                raise ValueError(f"progress must be true or false, got {progress!r}")
            self.progress = progress
            eos = getattr(self.tokenizer, "eos_token_id", None)
            self.prefix_token_id = eos if eos is not None and eos < model.config.vocab_size else None

        def _refuse_window(self, request_type: str) -> None:
            if self.window is not None:
                raise ValueError(f"window={self.window} applies to rolling log-likelihood (perplexity) tasks only; "
                                 f"this task asks for {request_type} requests, which are scored from their whole "
                                 "context: run it without window/stride (mambakit eval: --window/--stride)")

        # --- tokenization (as lm_eval's HF adapter: context spaces move to the continuation)
        def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces > 0:
                continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
            whole = self.tokenizer.encode(context + continuation)
            ctx = self.tokenizer.encode(context)
            return self._with_prefix(ctx), whole[len(ctx):]

        def _with_prefix(self, ctx: list[int]) -> list[int]:
            if ctx:
                return ctx
            if self.prefix_token_id is None:
                raise ValueError("an empty context needs a BOS/EOS token, and the tokenizer has none the model "
                                 "can take")
            return [self.prefix_token_id]

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            self._refuse_window("loglikelihood")
            pairs = [self._encode_pair(*r.args) for r in requests]
            out = score(self.model, pairs, self.batch_size, self.chunk_tokens,
                        progress=progress_bar("loglikelihood", enabled=self.progress))
            for r, o in zip(requests, out):
                self.cache_hook.add_partial("loglikelihood", r.args, o)
            return out

        def loglikelihood_rolling(self, requests) -> list[float]:
            # stateful: each token is scored with the whole document before it (one pass per document); with
            # a window, each document's sliding-window requests, summed
            pairs = [(self._with_prefix([]), self.tokenizer.encode(r.args[0])) for r in requests]
            flat, owner = [], []
            for i, (ctx, cont) in enumerate(pairs):
                if not cont:
                    continue
                parts = [(ctx, cont)] if self.window is None else window_requests(ctx + cont, self.window,
                                                                                  self.stride)
                flat += parts
                owner += [i] * len(parts)
            scored = score(self.model, flat, self.batch_size, self.chunk_tokens,
                           progress=progress_bar("loglikelihood_rolling", enabled=self.progress))
            out = [0.0] * len(pairs)
            for i, (lp, _) in zip(owner, scored):
                out[i] += lp
            for r, o in zip(requests, out):
                self.cache_hook.add_partial("loglikelihood_rolling", r.args, o)
            return out

        def generate_until(self, requests) -> list[str]:
            from .generate import generate

            self._refuse_window("generate_until")
            out: list[str | None] = [None] * len(requests)
            groups: dict[str, list[int]] = {}
            for i, r in enumerate(requests):  # requests with the same settings generate as one batch
                groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
            settings = {key: generation_settings(requests[idx[0]].args[1], self.max_gen_toks)
                        for key, idx in groups.items()}  # every group checked before any generates
            bar = progress_bar("generate_until", unit="req", enabled=self.progress)
            done = 0
            for key, idx in groups.items():
                kw = settings[key]
                max_toks, until = kw.pop("max_new_tokens"), kw.pop("stop")
                for b in range(0, len(idx), self.batch_size):
                    rows = idx[b: b + self.batch_size]
                    prompts = [self._with_prefix(self.tokenizer.encode(requests[i].args[0])) for i in rows]
                    gen = generate(self.model, prompts, max_toks, stop=until, tokenizer=self.tokenizer, **kw)
                    for i, text in zip(rows, gen.texts):
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    done += len(rows)
                    bar(done, len(requests))
            return out  # type: ignore[return-value]

    register_model("mambakit")(MambakitLM)
    _ADAPTER = MambakitLM
    return MambakitLM


def evaluate_tasks(model: MambaLM, tasks: list[str], *, include_path: str | None = None, include_defaults: bool = True,
                   limit: float | None = None, num_fewshot: int | None = None, batch_size: int = 16,
                   seed: int = 1234, tokenizer=None, chunk_tokens: int = 2048, window: int | None = None,
                   stride: int | None = None, progress: bool = True) -> dict:
    """Runs lm-evaluation-harness tasks on `model`; returns lm_eval's results dict (`["results"][task]`).
    include_path: a directory of extra task YAMLs; include_defaults=False skips indexing lm_eval's own
    tasks (seconds of start-up) when every task comes from include_path. chunk_tokens, window and stride go
    to the adapter (window/stride: rolling log-likelihood tasks only, others are refused); progress: its bars."""
    adapter = register()
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError("mambakit eval --tasks needs lm_eval: pip install 'mambakit[eval]'") from e
    lm = adapter(model=model, tokenizer=tokenizer, batch_size=batch_size, chunk_tokens=chunk_tokens, window=window,
                 stride=stride, progress=progress)
    if not include_defaults and not include_path:
        raise ValueError("include_defaults=False needs include_path (there would be no tasks at all)")
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    return simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                           random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                           fewshot_random_seed=seed, log_samples=False)
