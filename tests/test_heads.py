"""mambakit.heads.SequenceClassifier: pooling, padding invariance, from_lm weight sharing, bad input, learning."""

import pytest
import torch

from mambakit.config import MambaConfig
from mambakit.heads import SequenceClassifier
from mambakit.model import MambaLM


def cfg():
    return MambaConfig(d_model=16, n_layer=2, vocab_size=8)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_padding_does_not_change_logits(pooling):
    torch.manual_seed(0)
    m = SequenceClassifier(cfg(), 3, pooling=pooling).eval()
    x = torch.randint(0, 4, (1, 12))
    alone = m(x).logits
    padded = torch.cat([x, torch.full((1, 5), 6)], 1)
    both = m(torch.cat([padded, torch.randint(0, 4, (1, 17))]), lengths=torch.tensor([12, 17])).logits
    torch.testing.assert_close(both[0], alone[0], rtol=1e-5, atol=1e-5)


def test_last_pooling_reads_the_last_hidden_state():
    torch.manual_seed(0)
    m = SequenceClassifier(cfg(), 4).eval()
    x = torch.randint(0, 4, (2, 9))
    h, _ = m.backbone(x)
    torch.testing.assert_close(m(x).logits, m.head(h[:, -1]).float())


def test_from_lm_copies_backbone_and_inputs_embeds():
    torch.manual_seed(0)
    lm = MambaLM(cfg())
    clf = SequenceClassifier.from_lm(lm, 2, pooling="mean")
    x = torch.randint(0, 4, (2, 7))
    torch.testing.assert_close(clf.backbone(x)[0], lm.backbone(x)[0])
    with torch.no_grad():
        clf.backbone.embedding.weight.add_(1.0)
    assert not torch.equal(clf.backbone.embedding.weight, lm.backbone.embedding.weight)  # lm untouched
    emb = torch.randn(2, 5, 16)
    assert clf(inputs_embeds=emb).logits.shape == (2, 2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_ids=torch.tensor([[0, 9]])), "outside the vocabulary"),
    (dict(input_ids=torch.tensor([[0, 1]]), labels=torch.tensor([3])), r"labels must be in \[0, 3\)"),
    (dict(input_ids=torch.tensor([[0, 1]]), lengths=torch.tensor([3])), r"lengths must be in \[1, 2\]"),
    (dict(input_ids=torch.zeros(2, dtype=torch.long)), "integer tensor"),
    (dict(inputs_embeds=torch.randn(1, 3, 5)), "d_model=16"),
    (dict(inputs_embeds=torch.full((1, 3, 16), float("nan"))), "NaN"),
    (dict(), "exactly one of"),
])
def test_bad_input(kwargs, match):
    m = SequenceClassifier(cfg(), 3)
    with pytest.raises(ValueError, match=match):
        m(**kwargs)


def test_bad_construction():
    with pytest.raises(ValueError, match="pooling"):
        SequenceClassifier(cfg(), 3, pooling="max")
    with pytest.raises(ValueError, match="num_classes"):
        SequenceClassifier(cfg(), 1)


def test_learns_a_token_count_task():
    """Class = whether the sequence holds more 0s than 1s: a few dozen steps reach high accuracy."""
    torch.manual_seed(0)
    m = SequenceClassifier(cfg(), 2, pooling="mean")
    opt = torch.optim.AdamW(m.parameters(), lr=2e-2)
    for _ in range(40):
        x = torch.randint(0, 2, (16, 16))
        y = ((x == 0).sum(1) > 8).long()
        loss = m(x, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.randint(0, 2, (256, 16))
    y = ((x == 0).sum(1) > 8).long()
    acc = (m(x).logits.argmax(1) == y).float().mean().item()
    assert acc > 0.85, acc


def test_standardize_whitens_pooled_features():
    torch.manual_seed(0)
    m = SequenceClassifier(cfg(), 3, pooling="mean")
    batches = [torch.randint(0, 4, (8, 10)) for _ in range(3)]
    before = m(batches[0]).logits
    m.standardize(batches)
    pooled = torch.cat([m(b).pooled for b in batches])
    z = (pooled - m.feature_mean) / m.feature_scale
    torch.testing.assert_close(z.mean(0), torch.zeros(16), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(16), atol=1e-3, rtol=0)
    assert not torch.allclose(m(batches[0]).logits, before)
    assert m.training  # the mode is restored
    with pytest.raises(ValueError, match="at least 2"):
        m.standardize([torch.randint(0, 4, (1, 10))])


def test_classifier_on_a_mamba2_backbone():
    """A head on a Mamba-2 config gets the Mamba-2 mixer (mixer_cls defaults to the config's)."""
    from mambakit.mamba2 import Mamba2

    config = MambaConfig.from_preset("mamba2-tiny", vocab_size=16)
    clf = SequenceClassifier(config, num_classes=3)
    assert all(isinstance(layer.mixer, Mamba2) for layer in clf.backbone.layers)
    logits = clf(torch.randint(0, 16, (2, 9))).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
