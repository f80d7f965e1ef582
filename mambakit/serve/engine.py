"""Continuous batching for a Mamba: a fixed pool of state slots, one decode loop, requests joining and
leaving at step boundaries.

A Mamba's state per sequence has a fixed size (per layer: conv (E·D, W−1) + SSM (E·D, N); paper §3.3),
so serving many sequences needs no paged KV cache: the engine allocates one batch state of `max_batch`
rows once (the pool) and gives each running sequence a row (a slot).

    request arrives → waits in a bounded queue → prefilled with the parallel scan (generate.prefill; the
    prompts admitted at one step boundary share the call, equal lengths batched) → its state copied into a
    free slot (n slots for n choices: one prefill) → first token sampled
    → every step: the active slots decode together (the engine's step: the fused CPU step where it applies,
      MambaLM.step elsewhere, `mambakit.engine.step_function`; the state updated in place) → sample
    → a sequence that ends (eos, stop string, max_tokens) or is cancelled frees its slot at once

A prompt longer than `prefill_chunk` tokens would stall every running stream for its whole prefill;
it is instead prefilled in chunks of `prefill_chunk` tokens, one chunk between two decode steps, with the
state carried (its n slots reserved meanwhile). Shorter prompts, the usual case, take one call.

The active slots are kept in the pool's first k rows: a freed slot is filled by moving the last active
row into it (two row copies per layer), so each step runs on a view of the first k rows and costs what a
batch of k costs, not a batch of max_batch (benchmarks/serve_load.py --step-cost). That view is not contiguous
(the layers' blocks keep the pool's stride); the fused step reads it in place (`engine.fused._layer_view`).

Sampling is generate's own (`next_tokens`, per-row generators seeded seed + i, `RowOutput` for eos /
stop strings / streamed text), so a sequence gives what `generate([prompt], seed=seed + i)` gives alone
(up to the rounding of a batched matmul, which can in principle flip a near-tie; tests check equality;
a chunked prompt's logits equal the one-call prefill's up to rounding as well).

Threading: all torch work runs in the engine's one thread. Callers `submit` a Job from any thread and
receive its events through the job's `emit` callback (called from the engine thread, one call per step
with that job's events); `Job.cancel()` may be called from any thread and frees the job's slots at the
next step boundary. Every sequence of a job gets exactly one final event (finish_reason set), and nothing
after it: also when it is cancelled, fails, or the engine closes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import engine as cpu_engine
from ..generate import RowOutput, SamplingParams, extend, next_tokens, prefill, row_generators, sampling_vocab
from ..model import MambaLM, MambaState

log = logging.getLogger("mambakit.serve")


# --------------------------------------------------------------------------------------------- events
@dataclass
class Event:
    """What one sequence of a job produced in one step. index: the sequence (prompt i, choice j →
    i·n + j). text: the new text safe to show. finish_reason: None while running, else "eos", "stop",
    "length", "cancelled" or "error" (then `error` says why)."""

    index: int
    text: str
    token_id: int | None
    finish_reason: str | None = None
    error: str | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None


class EngineBusy(RuntimeError):
    """The queue of waiting jobs is full (answer 429 and let the client retry)."""


class EngineClosed(RuntimeError):
    """The engine is shut down (or its thread died): answer 503."""


# ----------------------------------------------------------------------------------------------- jobs
@dataclass(eq=False)
class Job:
    """One client request: every prompt × n sequences, with the same settings.

    prompts: token-id lists (already checked against the vocabulary). seed: sequence k samples with a
    generator seeded seed + k (k = prompt index · n + choice), as `generate(prompts repeated n times,
    seed=seed)` does. emit(events) is called from the engine thread with a list of Events."""

    prompts: list[list[int]]
    n: int
    max_new_tokens: int
    params: SamplingParams
    stop: list[str]
    seed: int
    emit: Callable[[list[Event]], None]
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    submitted_at: float = field(default_factory=time.perf_counter)
    _ended: set = field(default_factory=set, repr=False)  # sequences whose final event was emitted

    def cancel(self) -> None:
        """Frees the job's slots at the next step boundary (idempotent; safe from any thread)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def num_sequences(self) -> int:
        return len(self.prompts) * self.n


class _Sequence:
    """A running sequence: its job, output (RowOutput), generator, repetition mask, and the next token."""

    __slots__ = ("job", "index", "row", "generator", "seen", "next_token")

    def __init__(self, job: Job, index: int, row: RowOutput, generator: torch.Generator, seen):
        self.job, self.index, self.row, self.generator, self.seen = job, index, row, generator, seen
        self.next_token = -1


class _Prefill:
    """A long prompt being prefilled chunk by chunk: the state after its first `pos` tokens."""

    __slots__ = ("job", "p", "pos", "state", "logits")

    def __init__(self, job: Job, p: int):
        self.job, self.p, self.pos, self.state, self.logits = job, p, 0, None, None


# --------------------------------------------------------------------------------------------- engine
class Engine:
    """The decode loop over a pool of `max_batch` state slots (see the module docstring).

    model: a MambaLM (its weights are only read). tokenizer: for text and stop strings (None: tokens
    only). eos: ids that end a sequence. max_queue: jobs that may wait for slots; `submit` raises
    EngineBusy beyond. Start with `start()` (or use as a context manager); `close()` stops the thread."""

    def __init__(self, model: MambaLM, tokenizer=None, eos: set[int] | None = None, max_batch: int = 32,
                 max_queue: int = 64, prefill_chunk: int = 512, fused: bool | None = None):
        if max_batch < 1 or max_queue < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch, max_queue and prefill_chunk must be >= 1, got {max_batch}, {max_queue}, "
                             f"{prefill_chunk}")
        if getattr(model.config, "attn", None) is not None:
            raise ValueError("the server does not serve hybrids with attention layers yet: its slot pool holds "
                             "fixed-size Mamba states, not growing KV caches (use mambakit.generate)")
        self.prefill_chunk = prefill_chunk
        self.model, self.tokenizer = model, tokenizer
        self.step_fn = cpu_engine.step_function(model, fused)  # fused where it applies (logged once)
        self.eos = set(eos or ())
        self.max_batch, self.max_queue = max_batch, max_queue
        self.vocab = sampling_vocab(model, tokenizer)
        self._pool: MambaState = model.allocate_state(max_batch)  # (n_layer, max_batch, …)
        self._active: list[_Sequence] = []  # slot i ↔ pool row i, for i < len(_active)
        self._inbox: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._head: deque[tuple[Job, int]] = deque()  # the job being admitted, prompt by prompt
        self._prefilling: deque[_Prefill] = deque()  # long prompts, prefilled a chunk per step
        self._reserved = 0  # slots held for them
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards the counters read by stats()
        self._submit_lock = threading.Lock()  # no job enters the inbox once close() has begun
        self._shutdown_lock = threading.Lock()  # one drain at a time (the loop's exit and close())
        # fused_steps: decode steps that took the fused CPU step (the rest took MambaLM.step; the log says why once)
        self.counters = dict(jobs=0, sequences=0, tokens=0, steps=0, fused_steps=0, cancelled=0, errors=0, rejected=0)
        self.last_error: str | None = None

    # ----------------------------------------------------------------------------------- lifecycle
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mambakit-decode", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stops the loop; every job not finished gets its final events ("error": shutting down). If the loop
        is still inside a step after `timeout` s, it tells the jobs itself once the step returns."""
        with self._submit_lock:
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                # the loop still owns the queues and slots: draining them from here would race with it
                log.warning("the decode loop did not stop within %.1f s; it ends its jobs when its step returns",
                            timeout)
                return
        self._shutdown()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    # -------------------------------------------------------------------------------------- submit
    def submit(self, job: Job) -> Job:
        """Queues a job (thread-safe; before `start` too). Raises EngineBusy when max_queue jobs already
        wait, EngineClosed when the engine is closed (or its thread died), ValueError when the job needs
        more slots than the pool has."""
        if job.n > self.max_batch:
            raise ValueError(f"n = {job.n} sequences per prompt exceed the server's {self.max_batch} slots")
        with self._submit_lock:  # (close() sets _stop under it: a job put here is drained by the shutdown)
            if self._stop.is_set() or (self._thread is not None and not self._thread.is_alive()):
                raise EngineClosed("the decode loop is not running" +
                                   (f": {self.last_error}" if self.last_error else ""))
            try:
                self._inbox.put_nowait(job)
            except queue.Full:
                with self._lock:
                    self.counters["rejected"] += 1
                raise EngineBusy(f"{self.max_queue} requests are already waiting; retry later") from None
        return job

    def stats(self) -> dict:
        with self._lock:
            counters = dict(self.counters)
        return dict(slots=self.max_batch, active=len(self._active), queued=self._inbox.qsize() + bool(self._head),
                    prefilling=len(self._prefilling), max_queue=self.max_queue, running=self.running, **counters)

    # ---------------------------------------------------------------------------------------- loop
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        try:
            while not self._stop.is_set():
                try:
                    self._admit()
                    self._drop_cancelled()
                    if self._prefilling:
                        self._prefill_chunk()
                    if not self._active:
                        if not self._head and not self._prefilling:
                            try:  # idle: sleep until a job arrives
                                self._head.extend(self._split(self._inbox.get(timeout=0.05)))
                            except queue.Empty:
                                pass
                        continue
                    self._step()
                except Exception as e:  # a bug or an out-of-memory: fail the running sequences, keep serving
                    self.last_error = f"{type(e).__name__}: {e}"
                    log.error("decode step failed; failing %d sequences\n%s", len(self._active),
                              traceback.format_exc())
                    self._fail_active(self.last_error)
        finally:  # closed (or the thread dies): tell every job still here, running or waiting
            with self._submit_lock:
                self._stop.set()
            self._shutdown()

    def _shutdown(self, message: str = "the server is shutting down") -> None:
        """Ends every job still held (running, prefilling, waiting) with a final event per sequence. Runs in
        the loop's thread as it exits, or in close()'s once the loop is gone: never beside the loop."""
        with self._shutdown_lock:
            jobs = {id(s.job): s.job for s in self._active}
            self._active.clear()
            for job in [*jobs.values(), *self._drain_waiting()]:  # (a job may be in both: _emit keeps one end)
                self._end_job(job, "cancelled" if job.cancelled else "error", None if job.cancelled else message)

    @staticmethod
    def _split(job: Job) -> list[tuple[Job, int]]:
        return [(job, i) for i in range(len(job.prompts))]

    def _admit(self) -> None:
        """Prefills waiting prompts, in arrival order, while their n sequences fit in the free slots. The
        prompts admitted together go through one `prefill` call, which runs rows of equal length as one
        batch (each row's state and logits are its own: rows never interact)."""
        batch: list[tuple[Job, int]] = []
        free = self.max_batch - len(self._active) - self._reserved
        while True:
            if not self._head:
                try:
                    self._head.extend(self._split(self._inbox.get_nowait()))
                except queue.Empty:
                    break
            job, p = self._head[0]
            if job.cancelled:
                self._head.popleft()
                self._end_job(job, "cancelled")
                continue
            if job.n > free:
                break  # wait for slots (first come, first served: later jobs wait too)
            self._head.popleft()
            free -= job.n
            if len(job.prompts[p]) > self.prefill_chunk:
                self._prefilling.append(_Prefill(job, p))
                self._reserved += job.n
            else:
                batch.append((job, p))
        if not batch:
            return
        try:
            state, logits = prefill(self.model, [job.prompts[p] for job, p in batch])  # (n_layer, g, …), (g, V)
            self._place(batch, state, logits)
        except Exception as e:
            log.error("prefill failed\n%s", traceback.format_exc())
            for job in {id(j): j for j, _ in batch}.values():
                self._free({id(s) for s in self._active if s.job is job})
                self._fail_job(job, f"{type(e).__name__}: {e}")

    @torch.inference_mode()
    def _prefill_chunk(self) -> None:
        """Runs the next chunk of the first long prompt; once it is whole, its sequences take their slots."""
        pf = self._prefilling[0]
        prompt = pf.job.prompts[pf.p]
        done = pf.job.cancelled
        if not done:
            try:
                ids = torch.tensor([prompt[pf.pos: pf.pos + self.prefill_chunk]], device=self._pool.ssm.device)
                pf.state, h = extend(self.model, ids, pf.state)  # ids (1, c)
                pf.logits, pf.pos = self.model.lm_head(h), pf.pos + ids.shape[1]
            except Exception as e:
                log.error("prefill failed\n%s", traceback.format_exc())
                self._fail_job(pf.job, f"{type(e).__name__}: {e}")
                done = True
        if done or pf.pos >= len(prompt):
            self._prefilling.popleft()
            self._reserved -= pf.job.n
            if not done:
                self._place([(pf.job, pf.p)], pf.state, pf.logits)
            elif pf.job.cancelled:
                self._end_job(pf.job, "cancelled")

    @torch.inference_mode()
    def _place(self, batch: list[tuple[Job, int]], state: MambaState, logits) -> None:
        """Gives the n sequences of prompt p of each (job, p) a slot, starting from row r of the prefilled
        state (n_layer, g, …) and logits (g, V), samples their first tokens (from the prompt's last
        logits, as generate's first step) and emits them."""
        logits = logits[:, : self.vocab]
        seqs, rows = [], []
        for r, (job, p) in enumerate(batch):
            first = p * job.n  # sequence index of the prompt's first choice
            generators = row_generators(job.seed + first, job.n)
            if p == 0:
                with self._lock:
                    self.counters["jobs"] += 1
            for j in range(job.n):
                seen = None
                if job.params.repetition_penalty != 1.0:
                    seen = torch.zeros(1, self.vocab, dtype=torch.bool, device=logits.device)  # (1, V)
                    # ids the tokenizer cannot decode (its vocabulary < the model's) are never sampled
                    seen[0, [t for t in job.prompts[p] if t < self.vocab]] = True
                slot = len(self._active)
                self._pool.conv[:, slot] = state.conv[:, r].to(self._pool.conv.dtype)  # the old content is gone
                self._pool.ssm[:, slot] = state.ssm[:, r]
                seq = _Sequence(job, first + j, RowOutput(self.tokenizer, job.stop), generators[j], seen)
                self._active.append(seq)
                seqs.append(seq)
                rows.append(r)
            with self._lock:
                self.counters["sequences"] += job.n
        self._sample_and_emit(seqs, logits[torch.tensor(rows)])

    @torch.inference_mode()
    def _step(self) -> None:
        k = len(self._active)
        tokens = torch.tensor([s.next_token for s in self._active], dtype=torch.long)  # (k,)
        for s, t in zip(self._active, tokens.tolist()):
            if s.seen is not None:
                s.seen[0, t] = True
        view = MambaState(self._pool.conv[:, :k], self._pool.ssm[:, :k])  # the first k rows, updated in place
        logits = self.step_fn(tokens.to(self._pool.ssm.device), view)[:, : self.vocab]  # (k, V)
        with self._lock:
            self.counters["steps"] += 1
            self.counters["fused_steps"] += getattr(self.step_fn, "last", None) == "fused"
        self._sample_and_emit(list(self._active), logits)

    def _sample_and_emit(self, seqs: list[_Sequence], logits) -> None:
        """Samples one token for each sequence (rows of logits in the order of seqs), records it, emits
        the events job by job, and frees the slots of the sequences that ended."""
        tokens = [0] * len(seqs)
        groups: dict[SamplingParams, list[int]] = {}  # rows that share settings sample in one call
        for i, s in enumerate(seqs):
            groups.setdefault(s.job.params, []).append(i)
        for params, rows in groups.items():
            sub = logits if len(rows) == len(seqs) else logits[torch.tensor(rows)]
            seen = None
            if params.repetition_penalty != 1.0:
                seen = torch.cat([seqs[i].seen for i in rows])  # (g, V)
            new = next_tokens(sub, seen, params, [seqs[i].generator for i in rows]).tolist()
            for i, t in zip(rows, new):
                tokens[i] = t
        by_job: dict[Job, list[Event]] = {}
        ended = []
        for s, t in zip(seqs, tokens):
            row = s.row
            text = row.push(t, t in self.eos, last_step=len(row.ids) + 1 >= s.job.max_new_tokens)
            s.next_token = t
            by_job.setdefault(s.job, []).append(Event(s.index, text, t, row.finish_reason))
            if row.finish_reason is not None:
                ended.append(s)
        with self._lock:
            self.counters["tokens"] += len(seqs)
        for job, events in by_job.items():
            self._emit(job, events)
        if ended:
            self._free(set(map(id, ended)))

    def _drop_cancelled(self) -> None:
        gone = [s for s in self._active if s.job.cancelled]
        if gone:
            jobs = {id(s.job): s.job for s in gone}
            with self._lock:
                self.counters["cancelled"] += len(jobs)
            self._free({id(s) for s in gone})
            for job in jobs.values():
                self._end_job(job, "cancelled")

    def _free(self, ids: set[int]) -> None:
        """Removes the given sequences; the last active rows move into the freed slots (pool stays packed)."""
        i = 0
        while i < len(self._active):
            if id(self._active[i]) in ids:
                last = len(self._active) - 1
                if i != last:
                    self._pool.conv[:, i] = self._pool.conv[:, last]
                    self._pool.ssm[:, i] = self._pool.ssm[:, last]
                    self._active[i] = self._active[last]
                self._active.pop()
            else:
                i += 1

    # -------------------------------------------------------------------------------------- errors
    def _emit(self, job: Job, events: list[Event]) -> None:
        """Hands events to the job, dropping any for a sequence that has had its final event (so each gets
        exactly one, whichever path ends it first)."""
        events = [e for e in events if e.index not in job._ended]
        job._ended.update(e.index for e in events if e.final)
        if not events:
            return
        try:
            job.emit(events)
        except Exception:  # a broken consumer must not stop the loop: drop its job
            log.warning("emit failed; cancelling the job\n%s", traceback.format_exc())
            job._ended.update(range(job.num_sequences))  # and call it no more
            job.cancel()

    def _end_job(self, job: Job, reason: str, message: str | None = None) -> None:
        """A final event (reason, error message) for each of the job's sequences that has not had one."""
        self._emit(job, [Event(k, "", None, reason, message) for k in range(job.num_sequences)])

    def _fail_job(self, job: Job, message: str) -> None:
        job.cancel()
        with self._lock:
            self.counters["errors"] += 1
        self._end_job(job, "error", message)

    def _fail_active(self, message: str) -> None:
        jobs = {id(s.job): s.job for s in self._active}
        self._active.clear()
        for job in jobs.values():
            self._fail_job(job, message)

    def _drain_waiting(self) -> list[Job]:
        jobs = [job for job, _ in self._head] + [pf.job for pf in self._prefilling]
        self._head.clear()
        self._prefilling.clear()
        self._reserved = 0
        while True:
            try:
                jobs.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        return list({id(j): j for j in jobs}.values())
