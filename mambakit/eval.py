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
from .model import MambaLM, MambaState


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
                states[j] = MambaState(st.conv[:, r: r + 1], st.ssm[:, r: r + 1])
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
                state = MambaState(torch.cat([states[j].conv for j, _ in group], 1),
                                   torch.cat([states[j].ssm for j, _ in group], 1))  # (n_layer, g, …)
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
    if window is None:
        requests = [(ids[:1], ids[1:])]
    else:
        stride = stride if stride is not None else max(1, window // 2)
        if not 1 <= stride <= window:
            raise ValueError(f"need 1 <= stride <= window, got stride {stride}, window {window}")
        # first window: ids[0] as context, scores ids[1:window]; then every stride tokens, a window of
        # `window` tokens ending at the scored part, whose last `stride` tokens are scored
        requests, end = [(ids[:1], ids[1:window])], window
        while end < len(ids):
            new_end = min(end + stride, len(ids))
            requests.append((ids[max(0, new_end - window): end], ids[end: new_end]))
            end = new_end
    t0 = time.perf_counter()
    scores = score(model, requests, batch_size=batch_size, chunk_tokens=chunk_tokens, progress=progress)
    nll = -sum(s for s, _ in scores)
    out = dict(tokens=n, nll=nll, nats_per_token=nll / n, perplexity=math.exp(nll / n),
               mode="stateful" if window is None else f"window {window}, stride {stride}",
               seconds=time.perf_counter() - t0)
    if num_bytes:
        out["bits_per_byte"] = nll / num_bytes / math.log(2)
    return out


def progress_printer(label: str, every: float = 1.0):
    """A progress callback printing `label: done/total tokens (rate, ETA)` on stderr, at most every second."""
    t0 = last = time.perf_counter()
    finished = False

    def show(done: int, total: int) -> None:
        nonlocal last, finished
        now = time.perf_counter()
        if finished or (now - last < every and done < total):
            return
        finished = done >= total
        last, el = now, now - t0
        eta = el / done * (total - done) if done else float("nan")
        print(f"\r{label}: {done}/{total} tokens ({done / max(el, 1e-9):.0f} tokens/s, ETA {eta:.0f} s)", end="",
              file=sys.stderr, flush=True)
        if done >= total:
            print(file=sys.stderr)

    return show


# ------------------------------------------------------------------------------- lm-eval adapter
_ADAPTER = None


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
        """lm-evaluation-harness adapter for a mambakit checkpoint (or a MambaLM given as `model`)."""

        def __init__(self, pretrained: str | None = None, model: MambaLM | None = None, tokenizer=None,
                     batch_size: int | str = 16, chunk_tokens: int = 2048, dtype: str = "float32",
                     max_gen_toks: int = 256, **unused):
            super().__init__()
            from .tokenizer import ByteTokenizer, load_tokenizer

            if (pretrained is None) == (model is None):
                raise ValueError("pass exactly one of pretrained=DIR and model=MambaLM")
            if model is None:
                model = MambaLM.from_pretrained(pretrained, dtype=getattr(torch, str(dtype)))
            if tokenizer == "byte":
                tokenizer = ByteTokenizer()
            elif isinstance(tokenizer, str):
                tokenizer = load_tokenizer(tokenizer)
            self.model = model.eval()
            self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
            if self.tokenizer is None:
                raise ValueError("the model has no tokenizer: pass tokenizer=PATH (or 'byte')")
            self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
            self.chunk_tokens, self.max_gen_toks = int(chunk_tokens), int(max_gen_toks)
            eos = getattr(self.tokenizer, "eos_token_id", None)
            self.prefix_token_id = eos if eos is not None and eos < model.config.vocab_size else None

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
            pairs = [self._encode_pair(*r.args) for r in requests]
            out = score(self.model, pairs, self.batch_size, self.chunk_tokens,
                        progress=progress_printer("loglikelihood") if len(pairs) > 100 else None)
            for r, o in zip(requests, out):
                self.cache_hook.add_partial("loglikelihood", r.args, o)
            return out

        def loglikelihood_rolling(self, requests) -> list[float]:
            # stateful: each token is scored with the whole document before it (one pass per document)
            pairs = [(self._with_prefix([]), self.tokenizer.encode(r.args[0])) for r in requests]
            keep = [i for i, (_, cont) in enumerate(pairs) if cont]
            scored = score(self.model, [pairs[i] for i in keep], self.batch_size, self.chunk_tokens)
            out = [0.0] * len(pairs)
            for i, (lp, _) in zip(keep, scored):
                out[i] = lp
            for r, o in zip(requests, out):
                self.cache_hook.add_partial("loglikelihood_rolling", r.args, o)
            return out

        def generate_until(self, requests) -> list[str]:
            from .generate import generate

            out: list[str | None] = [None] * len(requests)
            groups: dict[str, list[int]] = {}
            for i, r in enumerate(requests):  # requests with the same settings generate as one batch
                groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
            for key, idx in groups.items():
                kw = dict(requests[idx[0]].args[1])
                until = kw.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                max_toks = int(kw.pop("max_gen_toks", self.max_gen_toks))
                do_sample = bool(kw.pop("do_sample", False))
                temperature = float(kw.pop("temperature", 1.0 if do_sample else 0.0)) if do_sample else 0.0
                top_p, top_k = kw.pop("top_p", None), kw.pop("top_k", None)
                seed = kw.pop("seed", 1234)
                for b in range(0, len(idx), self.batch_size):
                    rows = idx[b: b + self.batch_size]
                    prompts = [self._with_prefix(self.tokenizer.encode(requests[i].args[0])) for i in rows]
                    gen = generate(self.model, prompts, max_toks, temperature=temperature, top_p=top_p,
                                   top_k=top_k, stop=[s for s in until if s] or None, seed=seed,
                                   tokenizer=self.tokenizer)
                    for i, text in zip(rows, gen.texts):
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
            return out  # type: ignore[return-value]

    register_model("mambakit")(MambakitLM)
    _ADAPTER = MambakitLM
    return MambakitLM


def evaluate_tasks(model: MambaLM, tasks: list[str], *, include_path: str | None = None, include_defaults: bool = True,
                   limit: float | None = None, num_fewshot: int | None = None, batch_size: int = 16,
                   seed: int = 1234, tokenizer=None) -> dict:
    """Runs lm-evaluation-harness tasks on `model`; returns lm_eval's results dict (["results"][task]).
    include_path: a directory of extra task YAMLs; include_defaults=False skips indexing lm_eval's own
    tasks (seconds of start-up) when every task comes from include_path."""
    adapter = register()
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError("mambakit eval --tasks needs lm_eval: pip install 'mambakit[eval]'") from e
    lm = adapter(model=model, tokenizer=tokenizer, batch_size=batch_size)
    if not include_defaults and not include_path:
        raise ValueError("include_defaults=False needs include_path (there would be no tasks at all)")
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    return simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                           random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                           fewshot_random_seed=seed, log_samples=False)
