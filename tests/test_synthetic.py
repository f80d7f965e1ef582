"""The synthetic task generators (mambakit/data/synthetic.py): layout invariants, determinism, bad input."""

import pytest
import torch

from mambakit.data.synthetic import IGNORE_INDEX, induction_heads, scored_accuracy, selective_copying


def test_selective_copying_layout():
    g = torch.Generator().manual_seed(0)
    inputs, targets = selective_copying(32, seq_len=100, n_memorize=16, vocab_size=16, generator=g)
    assert inputs.shape == targets.shape == (32, 100) and inputs.dtype == torch.long
    head, markers = inputs[:, :84], inputs[:, 84:]
    assert bool((markers == 15).all())  # 16 markers at the end
    assert bool((head != 15).all())
    data_mask = head != 0
    assert bool((data_mask.sum(1) == 16).all())  # exactly 16 data tokens, the rest noise
    for row in range(32):
        data = head[row][data_mask[row]]  # in order of position
        assert bool(((data >= 1) & (data <= 14)).all())
        assert torch.equal(targets[row, 84:], data)  # the j-th marker asks for the j-th data token
    assert bool((targets[:, :84] == IGNORE_INDEX).all())
    # the spacing is random: the data positions differ between rows
    assert len({tuple(torch.nonzero(r).flatten().tolist()) for r in data_mask}) > 1


def test_selective_copying_full_setting_and_determinism():
    a = selective_copying(2, seq_len=4096, generator=torch.Generator().manual_seed(3))
    b = selective_copying(2, seq_len=4096, generator=torch.Generator().manual_seed(3))
    assert a[0].shape == (2, 4096)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = selective_copying(2, seq_len=4096, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(a[0], c[0])


def test_induction_heads_layout():
    g = torch.Generator().manual_seed(0)
    inputs, targets = induction_heads(64, seq_len=40, vocab_size=16, generator=g)
    assert inputs.shape == targets.shape == (64, 40)
    assert bool((inputs[:, -1] == 15).all())  # the query
    assert bool(((inputs >= 0) & (inputs <= 15)).all())
    assert bool(((inputs == 15).sum(1) == 2).all())  # the special token once before the query
    for row in range(64):
        p = int(torch.nonzero(inputs[row, :-1] == 15)[0])
        assert p <= 37
        assert int(inputs[row, p + 1]) == int(targets[row, -1])  # the answer follows the first special
    assert bool((targets[:, :-1] == IGNORE_INDEX).all())
    assert bool(((targets[:, -1] >= 0) & (targets[:, -1] <= 14)).all())
    # the pair's position covers the whole range (not a fixed offset)
    pos = (inputs[:, :-1] == 15).float().argmax(1)
    assert pos.unique().numel() > 10


def test_scored_accuracy_counts_scored_positions_only():
    targets = torch.tensor([[IGNORE_INDEX, 2, 3]])
    logits = torch.zeros(1, 3, 8)
    logits[0, 0, 5] = logits[0, 1, 2] = logits[0, 2, 1] = 1.0
    assert scored_accuracy(logits, targets) == (1, 2)
    logits[0, 2, 7] = 9.0  # a padded-vocabulary entry is ignored with vocab_size
    logits[0, 2, 3] = 2.0
    assert scored_accuracy(logits, targets, vocab_size=4) == (2, 2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="seq_len"):
        selective_copying(2, seq_len=20, n_memorize=16)
    with pytest.raises(ValueError, match="batch_size"):
        induction_heads(0)
    with pytest.raises(ValueError, match="vocab_size"):
        induction_heads(2, vocab_size=2)
