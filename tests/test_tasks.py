"""Phases of tasks inside one parallel region (mambakit/ops/cpu/tasks.py): every task runs once, a phase sees all
of the previous phase's results, and more planned threads than the pool has cannot deadlock."""

import numpy as np
import pytest
import torch
from numba import njit, prange

from mambakit.ops.cpu.tasks import atomic_add, atomic_load, claim, finish, home, sync_size, wait


@njit(parallel=True)
def _two_phases(first, second, runs, owner, sync, threads):
    n = first.shape[0]
    for t in prange(threads):
        k, q = claim(sync, 0, n, t, threads, 0)
        count = 0
        while k < n:
            first[k] = 2.0 * k
            atomic_add(runs, k, 1)
            owner[k] = t
            count += 1
            k, q = claim(sync, 0, n, t, threads, q)
        finish(sync, 0, threads, count)
        wait(sync, 0, threads, n)
        k, q = claim(sync, 1, n, t, threads, 0)
        count = 0
        while k < n:
            second[k] = first[k] + first[n - 1 - k]  # written by any thread in phase 0
            count += 1
            k, q = claim(sync, 1, n, t, threads, q)
        finish(sync, 1, threads, count)
        wait(sync, 1, threads, n)


@pytest.mark.parametrize("threads", [1, 2, 7])  # 7: more than the pool's threads; the rest run in turn
@pytest.mark.parametrize("n", [500, 3, 1])  # 3, 1: some threads' ranges are empty
def test_phases_run_every_task_once_in_order(threads, n):
    first, second, runs, owner = np.zeros(n), np.zeros(n), np.zeros(n, np.int64), np.full(n, -1, np.int64)
    sync = np.zeros(sync_size(2, threads), np.int64)
    _two_phases(first, second, runs, owner, sync, threads)
    assert (runs == 1).all() and (owner >= 0).all()
    np.testing.assert_array_equal(second, 2.0 * (n - 1) * np.ones(n))


@njit
def _interleaved(n, threads, order, sync):
    """Threads 0 … threads − 1 claiming in turn (one OS thread): [(thread, task), …] until all are done."""
    q = np.zeros(threads, np.int64)
    out = []
    active = threads
    while active > 0:
        active = 0
        for t in order:
            if q[t] < threads:
                k, q[t] = claim(sync, 0, n, t, threads, q[t])
                if k < n:
                    out.append((t, k))
                    active += 1
    return out


def test_threads_take_their_own_range_first_then_the_others():
    # 10 tasks, 2 threads: ranges 0–4 and 5–9; thread 0 claims twice as often, so it steals from range 1's
    # front once its own range is done
    got = _interleaved(10, 2, np.array([0, 0, 1]), np.zeros(sync_size(1, 2), np.int64))
    assert got[:5] == [(0, 0), (0, 1), (1, 5), (0, 2), (0, 3)]
    assert sorted(k for _, k in got) == list(range(10))
    mine = [k for t, k in got if t == 0]
    assert mine[:5] == [0, 1, 2, 3, 4] and all(k >= 5 for k in mine[5:]) and len(mine) > 5
    assert [k for t, k in got if t == 1] == sorted(k for t, k in got if t == 1)  # range 1 in order by both
    # three threads: each starts at its own range's front
    got = _interleaved(9, 3, np.array([0, 1, 2]), np.zeros(sync_size(1, 3), np.int64))
    assert got[:3] == [(0, 0), (1, 3), (2, 6)]
    assert [home(9, u, 3) for u in range(3)] == [(0, 3), (3, 6), (6, 9)]


def test_atomics():
    a = np.zeros(3, np.int64)

    @njit
    def f(a):
        return atomic_add(a, 1, 5), atomic_add(a, 1, 2), atomic_load(a, 1)

    assert f(a) == (0, 5, 7) and a[1] == 7


def test_fused_step_planned_for_more_threads_than_run():
    """The fused decode step's layer region planned for 5 threads on a pool of 2 gives the same logits."""
    from _models import random_model

    from mambakit.engine import FusedDecoder
    from mambakit.engine import fused as decode_fused

    model = random_model(d_model=32, n_layer=2)
    ids = torch.tensor([3, 7, 1])
    want = model.step(ids, model.allocate_state(3))
    real = decode_fused.numba.get_num_threads
    try:
        decode_fused.numba.get_num_threads = lambda: 5
        before = torch.get_num_threads()
        torch.set_num_threads(2)
        got = FusedDecoder(model).step(ids, model.allocate_state(3))
    finally:
        decode_fused.numba.get_num_threads = real
        torch.set_num_threads(before)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
