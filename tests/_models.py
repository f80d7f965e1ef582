"""Small models shared by the tests (imported as `_models`: pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch

from mambakit import MambaConfig, MambaLM


def random_model(vocab_size=64, d_model=32, n_layer=2, seed=0, tokenizer=None, **kw) -> MambaLM:
    """A tiny model with every parameter perturbed, so that logits are far from uniform and greedy
    continuations vary (a fresh init gives near-constant outputs)."""
    torch.manual_seed(seed)
    model = MambaLM(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab_size, d_state=8, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if "embedding" in name else 0.1))
    model.tokenizer = tokenizer
    return model
