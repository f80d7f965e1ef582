"""Weights in 2 MiB pages (mambakit/engine/hugepages.py): values, ties and training unchanged; the memory really is
backed by huge pages where the kernel offers them; switched off cleanly."""

import pytest
import torch

from mambakit import MambaConfig, MambaLM
from mambakit.engine import hugepages
from mambakit.generate import generate


def _model(seed=0):
    torch.manual_seed(seed)
    # 64 × 4 layers, vocab 32000: 8.6 MB of float32 weights, above hugepages.MIN_BYTES
    return MambaLM(MambaConfig(d_model=64, n_layer=4, vocab_size=32000))


@pytest.fixture
def enabled(monkeypatch):
    monkeypatch.delenv("MAMBAKIT_HUGE_PAGES", raising=False)
    ok, why = hugepages.supported()
    if not ok:
        pytest.skip(f"no transparent huge pages here: {why}")


def test_moving_keeps_values_ties_and_training(enabled):
    model, ref = _model(), _model()
    ids = torch.randint(0, 32000, (2, 24))
    moved = hugepages.use_huge_pages(model)
    assert moved >= hugepages.MIN_BYTES
    assert model.lm_head.weight is model.backbone.embedding.weight  # tied weights stay one tensor
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name
        assert p.requires_grad
    assert hugepages.use_huge_pages(model) == 0  # done once per set of parameters
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    # still trainable: the moved parameters are ordinary tensors (not inference tensors), updated in place
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(ids, labels=ids).loss.backward()
    opt.step()
    assert not torch.equal(model.backbone.layers[0].mixer.in_proj.weight, ref.backbone.layers[0].mixer.in_proj.weight)


def test_generate_leaves_the_weights_where_they_are_and_huge_pages_are_opt_in(enabled):
    """generate moves nothing (no side effect on the caller's model); use_huge_pages does, and generation from
    the moved weights is the same."""
    model, ref = _model(), _model()
    ptrs = [p.data_ptr() for p in model.parameters()]
    out = generate(model, [[1, 2, 3]], 8, temperature=0)
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert hugepages.use_huge_pages(model) >= hugepages.MIN_BYTES
    assert torch.equal(out.tokens, generate(model, [[1, 2, 3]], 8, temperature=0).tokens)
    assert torch.equal(out.tokens, generate(ref, [[1, 2, 3]], 8, temperature=0).tokens)
    w = model.lm_head.weight
    assert w.untyped_storage().nbytes() > w.numel() * w.element_size()  # now a slice of the arena
    backed = hugepages.huge_page_bytes(w)
    if backed == 0:
        pytest.skip("the kernel gave no huge page (memory fragmented or THP defrag off); placement only checked")
    assert backed >= hugepages.HUGE_PAGE


@pytest.mark.parametrize("nbytes", [4 * hugepages.HUGE_PAGE, 4 * hugepages.HUGE_PAGE + 1, 12345])
def test_arena_is_aligned_and_advised(enabled, nbytes):
    for _ in range(4):  # mappings start at different offsets from a 2 MiB boundary
        arena = hugepages.huge_page_arena(nbytes)
        assert arena.data_ptr() % hugepages.HUGE_PAGE == 0 and arena.numel() == nbytes
        arena.fill_(1)
        assert int(arena.sum()) == nbytes


def test_off_switch_and_small_models(monkeypatch):
    model = _model()
    before = [p.data_ptr() for p in model.parameters()]
    monkeypatch.setenv("MAMBAKIT_HUGE_PAGES", "0")
    assert hugepages.supported() == (False, "MAMBAKIT_HUGE_PAGES=0")
    assert hugepages.use_huge_pages(model) == 0
    assert [p.data_ptr() for p in model.parameters()] == before
    monkeypatch.delenv("MAMBAKIT_HUGE_PAGES")
    small = MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=64))
    ptrs = [p.data_ptr() for p in small.parameters()]
    assert hugepages.use_huge_pages(small) == 0 and [p.data_ptr() for p in small.parameters()] == ptrs
