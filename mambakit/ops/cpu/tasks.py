"""Phases of work inside one parallel region: each thread works through its own range of a phase's tasks, then
takes what is left of the others' ranges, and waits for the phase to be done before the next (numba intrinsics
over LLVM atomics). Used by the fused decode step (mambakit/engine); measurements in docs/kernels.md.

Why one region: a fused decode step is a chain of dependent loops (in_proj → x_proj → state update →
out_proj). As one numba `prange` each, every loop is an OpenMP parallel region, and mambakit runs OpenMP with
OMP_WAIT_POLICY=PASSIVE (the `mambakit` command sets it; mambakit/cli): between regions the other threads sleep, and waking them
at every region of every layer costs more than the work of a small step.

Why home ranges: thread t of T first takes tasks t·n/T … (t + 1)·n/T − 1 of every phase, in order, so when two
phases number their tasks alike (the fused layer's in_proj and state-update tasks cover the same channels), a
thread reads what it wrote itself, from its own caches; where cores do not share a cache, every line written by
another thread has to cross between them. Fixed ranges alone would stall on a thread that is slow or
descheduled, so a thread that has finished its range goes on to take tasks from the other ranges' counters.

Each range has its own counter on a cache line of its own, so a thread touches the other's line only when
stealing, and a phase costs each thread one atomic add to the done-counter, not one per task.

No thread ever waits for another thread to *arrive*, only for tasks already taken by a running thread to
finish. So the scheme cannot deadlock when the region runs with fewer threads than planned (nested
parallelism, a busy OpenMP pool): one thread then takes every range's tasks. A waiter spins briefly, then
yields the core (sched_yield), so a descheduled worker on a shared machine gets it back.

`sync` is a flat int64 array of `sync_size(phases, threads)` zeros, made before the region: for phase k, T + 1
counters a cache line apart: range u's next task (0 … its length, then beyond) and the phase's done tasks.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .primitives import kernel_options

SPINS_BEFORE_YIELD = 256


@intrinsic
def atomic_add(typingctx, arr, i, v):
    """arr[i] += v atomically (sequentially consistent); returns the old value. arr: a C-contiguous int64 array."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64 and arr.layout == "C"):
        return None

    def codegen(context, builder, signature, args):
        a = context.make_array(signature.args[0])(context, builder, args[0])
        idx = context.cast(builder, args[1], signature.args[1], types.int64)
        val = context.cast(builder, args[2], signature.args[2], types.int64)
        return builder.atomic_rmw("add", builder.gep(a.data, [idx]), val, "seq_cst")

    return types.int64(arr, i, v), codegen


@intrinsic
def atomic_load(typingctx, arr, i):
    """arr[i], read atomically (sequentially consistent): sees every write made before another thread's
    atomic_add that this read observes."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64 and arr.layout == "C"):
        return None

    def codegen(context, builder, signature, args):
        a = context.make_array(signature.args[0])(context, builder, args[0])
        idx = context.cast(builder, args[1], signature.args[1], types.int64)
        ptr = builder.gep(a.data, [idx])
        return builder.load_atomic(ptr, "seq_cst", 8)

    return types.int64(arr, i), codegen


@intrinsic
def sched_yield(typingctx):
    """Gives the core to another runnable thread (POSIX sched_yield)."""

    def codegen(context, builder, signature, args):
        fn = builder.module.globals.get("sched_yield") or ir.Function(
            builder.module, ir.FunctionType(ir.IntType(32), []), name="sched_yield")
        builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


LINE = 8  # int64s in a 64-byte cache line: one counter a line


def sync_size(phases: int, threads: int) -> int:
    """The length of a region's `sync` array: per phase, one counter a thread's range and one of done tasks."""
    return phases * (threads + 1) * LINE


def home(n, u, threads):
    """Range u of a phase's n tasks: tasks lo … hi − 1, as (lo, hi)."""
    return max(u * n // threads, 0), max((u + 1) * n // threads, 0)


def claim(sync, phase, n, t, threads, r):
    """The next task of the phase for thread t (of `threads`) and where to look next: (task, r). A thread
    starts with r = 0, its own range, and goes on to range t + 1, t + 2, … (mod threads) as each runs out;
    task ≥ n: none left anywhere.

    The max with 0 changes nothing (a counter starts at 0 and only grows) but tells LLVM the index is not
    negative, and so neither are the array indices computed from it. Without it numba's negative-index
    wraparound stays on every access, and LLVM leaves the phases' channel loops scalar (docs/kernels.md)."""
    while r < threads:
        u = (t + r) % threads
        lo, hi = home(n, u, threads)
        k = lo + max(atomic_add(sync, (phase * (threads + 1) + u) * LINE, 1), 0)
        if k < hi:
            return k, r
        r += 1
    return n, r


def finish(sync, phase, threads, count):
    """Adds the `count` tasks this thread did in the phase to its done tasks (after their results are written)."""
    atomic_add(sync, (phase * (threads + 1) + threads) * LINE, count)


def wait(sync, phase, threads, n):
    """Returns once n tasks of the phase are done."""
    spins = 0
    while atomic_load(sync, (phase * (threads + 1) + threads) * LINE) < n:
        spins += 1
        if spins > SPINS_BEFORE_YIELD:
            sched_yield()


home = njit(inline="always", **kernel_options(parallel=False))(home)
claim = njit(inline="always", **kernel_options(parallel=False))(claim)
finish = njit(inline="always", **kernel_options(parallel=False))(finish)
wait = njit(inline="always", **kernel_options(parallel=False))(wait)
