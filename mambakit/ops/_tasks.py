"""Phases of work inside one parallel region: threads take tasks from a shared counter and wait for a phase's
tasks to be done before the next phase starts (numba intrinsics over LLVM atomics).

Why: a fused decode step is a chain of dependent loops (in_proj → x_proj → state update → out_proj). As one
numba `prange` each, every loop is an OpenMP parallel region, and mambakit runs OpenMP with
OMP_WAIT_POLICY=PASSIVE (see mambakit/__init__.py): between regions the second thread sleeps, and waking it
costs tens of microseconds on this VM, 97 times a step (130m: 4 regions a layer, and the head). Here a layer
is one region. Inside it, each phase's tasks are taken with an atomic fetch-add, so whichever threads are
running share them. A thread that has run out of tasks waits until the phase's done-counter reaches its task
count.

No thread ever waits for another thread to *arrive*, only for tasks already taken by a running thread to
finish. So the scheme cannot deadlock when the region runs with fewer threads than planned (nested
parallelism, a busy OpenMP pool): one thread then takes every task. A waiter spins briefly, then yields
the core (sched_yield), so a descheduled worker on a shared machine gets it back.

`sync` is an int64 array of 2 counters a phase, zeroed before the region: sync[2k] = next task of phase k,
sync[2k + 1] = tasks of phase k done.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ._numba import kernel_options

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


def take(sync, phase):
    """The index of a task of this phase for the calling thread (≥ the phase's task count: none left).

    The max with 0 changes nothing (the counter starts at 0 and only grows) but tells LLVM the index is not
    negative, and so neither are the array indices computed from it. Without it numba's negative-index
    wraparound stays on every access, and LLVM leaves the phases' channel loops scalar: the fused layer's
    Δ + state-update phase took 5.1 ms for 24 layers at batch 8 against 3.2 ms with the index known
    non-negative (one thread, 130m; one-off script /work/notes/bench/ssm_situ2.py)."""
    return max(atomic_add(sync, 2 * phase, 1), 0)


def done(sync, phase):
    """Marks one task of this phase done (after its results are written)."""
    atomic_add(sync, 2 * phase + 1, 1)


def wait(sync, phase, n):
    """Returns once n tasks of this phase are done."""
    spins = 0
    while atomic_load(sync, 2 * phase + 1) < n:
        spins += 1
        if spins > SPINS_BEFORE_YIELD:
            sched_yield()


take = njit(inline="always", **kernel_options(parallel=False))(take)
done = njit(inline="always", **kernel_options(parallel=False))(done)
wait = njit(inline="always", **kernel_options(parallel=False))(wait)
