"""Phases of tasks inside one parallel region (mambakit/ops/_tasks.py): every task runs once, a phase sees all
of the previous phase's results, and more planned threads than the pool has cannot deadlock."""

import numpy as np
import pytest
import torch
from numba import njit, prange

from mambakit.ops._tasks import atomic_add, atomic_load, done, take, wait


@njit(parallel=True)
def _two_phases(first, second, runs, sync, threads):
    n = first.shape[0]
    for _ in prange(threads):
        k = take(sync, 0)
        while k < n:
            first[k] = 2.0 * k
            atomic_add(runs, k, 1)
            done(sync, 0)
            k = take(sync, 0)
        wait(sync, 0, n)
        k = take(sync, 1)
        while k < n:
            second[k] = first[k] + first[n - 1 - k]  # written by any thread in phase 0
            done(sync, 1)
            k = take(sync, 1)
        wait(sync, 1, n)


@pytest.mark.parametrize("threads", [1, 2, 7])  # 7: more than the pool's threads; the rest run in turn
def test_phases_run_every_task_once_in_order(threads):
    n = 500
    first, second, runs = np.zeros(n), np.zeros(n), np.zeros(n, np.int64)
    sync = np.zeros(4, np.int64)
    _two_phases(first, second, runs, sync, threads)
    assert (runs == 1).all()
    np.testing.assert_array_equal(second, 2.0 * (n - 1) * np.ones(n))
    assert sync[1] == n and sync[3] == n and sync[0] == n + threads  # each thread's last take found none


def test_atomics():
    a = np.zeros(3, np.int64)

    @njit
    def f(a):
        return atomic_add(a, 1, 5), atomic_add(a, 1, 2), atomic_load(a, 1)

    assert f(a) == (0, 5, 7) and a[1] == 7


def test_fused_step_planned_for_more_threads_than_run():
    """The fused decode step's layer region planned for 5 threads on a pool of 2 gives the same logits."""
    from _models import random_model

    from mambakit import decode_fused

    model = random_model(d_model=32, n_layer=2)
    ids = torch.tensor([3, 7, 1])
    want = model.step(ids, model.allocate_state(3), fused=False)
    real = decode_fused.numba.get_num_threads
    try:
        decode_fused.numba.get_num_threads = lambda: 5
        before = torch.get_num_threads()
        torch.set_num_threads(2)
        got = model.step(ids, model.allocate_state(3), fused=True)
    finally:
        decode_fused.numba.get_num_threads = real
        torch.set_num_threads(before)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
