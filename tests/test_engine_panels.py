"""The packed-panel decode matmul equals F.linear (its reference twin), is batch-invariant, and packs exactly."""

import pytest
import torch
import torch.nn.functional as F

from mambakit.engine import panels as decode_panels


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
@pytest.mark.parametrize("b, o, i", [(1, 3072, 768), (2, 80, 1536), (8, 130, 33), (1, 1, 1), (9, 64, 96),
                                     (7, 31, 50), (17, 66, 17), (16, 32, 8)])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_f_linear(dtype, atol, b, o, i, threads):
    torch.manual_seed(0)
    x, w = torch.randn(b, i), torch.randn(o, i).to(dtype)
    [packed] = decode_panels.pack([w])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = decode_panels.linear(x, packed, o)
    finally:
        torch.set_num_threads(before)
    want = F.linear(x.double(), w.double())  # the weights widen exactly: only the float32 sums round
    assert got.dtype == torch.float32 and got.shape == (b, o) and got.is_contiguous()
    torch.testing.assert_close(got.double(), want, atol=atol * i**0.5, rtol=atol)


def test_rows_do_not_depend_on_the_batch():
    """One chain of multiply-adds per output, in the same order for every batch size: bit-identical rows."""
    torch.manual_seed(1)
    x, w = torch.randn(19, 96), torch.randn(200, 96)
    [packed] = decode_panels.pack([w])
    together = decode_panels.linear(x, packed, 200)
    for r in (0, 7, 8, 16, 18):
        assert torch.equal(decode_panels.linear(x[r:r + 1], packed, 200)[0], together[r])
        assert torch.equal(decode_panels.linear(x[: r + 1], packed, 200)[r], together[r])


def test_pack_layout_and_padding():
    """P[g, j, k] = W[32g + k, j]; rows past o are zero; several weights share one buffer in order."""
    w1, w2 = torch.randn(40, 3), torch.randn(32, 5).bfloat16()
    [p1] = decode_panels.pack([w1])
    assert p1.shape == (2, 3, 32)
    assert torch.equal(torch.from_numpy(p1[1, :, :8]).t(), w1[32:])
    assert not p1[1, :, 8:].any()
    [p2] = decode_panels.pack([w2])
    assert torch.equal(torch.from_numpy(p2[0]).view(torch.bfloat16).t(), w2)
    a, b = decode_panels.pack([w1, torch.randn(7, 3)])
    assert a.ctypes.data + a.nbytes == b.ctypes.data  # one stream: b follows a
    with pytest.raises(ValueError, match="dtype"):
        decode_panels.pack([w1, w2])
    with pytest.raises(ValueError, match="does not match"):
        decode_panels.linear(torch.randn(2, 4), p1, 40)
    with pytest.raises(ValueError, match="outside"):
        decode_panels.linear(torch.randn(2, 3), p1, 65)
