"""The weight-streaming decode matmul equals F.linear (its reference), and is batch-invariant."""

import pytest
import torch
import torch.nn.functional as F

from mambakit import decode_linear


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("b, o, i", [(1, 3072, 768), (2, 80, 1536), (4, 130, 33), (1, 1, 1), (8, 200, 96),
                                     (7, 131, 50), (32, 66, 17)])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_f_linear(dtype, atol, b, o, i, threads):
    torch.manual_seed(0)
    x, w, bias = torch.randn(b, i).to(dtype), torch.randn(o, i).to(dtype), torch.randn(o).to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert decode_linear.applies(x, w) == (b <= decode_linear._max_batch(dtype))
        for bb in (None, bias):
            got, want = decode_linear.linear(x, w, bb), F.linear(x, w, bb)
            assert got.dtype == want.dtype and got.shape == want.shape
            torch.testing.assert_close(got.float(), want.float(), atol=atol * i**0.5, rtol=atol)
    finally:
        torch.set_num_threads(before)


def test_rows_do_not_depend_on_the_batch():
    torch.manual_seed(1)
    x, w = torch.randn(4, 96), torch.randn(200, 96)
    together = decode_linear.linear(x, w)
    for r in range(4):
        assert torch.equal(decode_linear.linear(x[r:r + 1], w)[0], together[r])


def test_falls_back_to_f_linear():
    x, w = torch.randn(64, 8), torch.randn(5, 8)
    assert not decode_linear.applies(x, w)  # a large batch
    assert not decode_linear.applies(torch.randn(8, 8, dtype=torch.bfloat16), w.bfloat16())
    assert not decode_linear.applies(torch.randn(1, 8, dtype=torch.float64), w.double())
    xg = torch.randn(1, 8, requires_grad=True)
    assert not decode_linear.applies(xg, w)  # autograd goes through F.linear
    decode_linear.linear(xg, w).sum().backward()
    assert xg.grad is not None
