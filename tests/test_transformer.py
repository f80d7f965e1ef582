"""The Transformer baseline: KV-cache decoding equals the full forward, loss equals a manual CE, positions
behave (absolute stop at max_seq_len, rotary run past it), presets match the Mamba sizes, bad input fails."""

import math

import pytest
import torch
import torch.nn.functional as F

from mambakit import MambaConfig, MambaLM
from mambakit.baselines.transformer import KVCache, TransformerConfig, TransformerLM, apply_rotary, rotary_tables

VARIANTS = [(p, m, n) for p in ("rotary", "absolute") for m in ("swiglu", "gelu") for n in ("rmsnorm", "layernorm")]


def _model(positions="rotary", mlp="swiglu", norm="rmsnorm", seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"d_model": 32, "n_layer": 2, "n_head": 4, "vocab_size": 50, "max_seq_len": 40, **kw}
    return TransformerLM(TransformerConfig(positions=positions, mlp=mlp, norm=norm, bias=norm == "layernorm", **kw))


@pytest.mark.parametrize("positions,mlp,norm", VARIANTS)
def test_cached_decoding_equals_full_forward(positions, mlp, norm):
    model = _model(positions, mlp, norm).eval()
    ids = torch.randint(0, 50, (3, 30))
    with torch.no_grad():
        full = model(ids).logits  # (3, 30, V)
        cache = model.allocate_cache(3, 40)
        # a prefill, a chunk continuing it (bottom-right causal mask), then one token at a time
        parts = [model(ids[:, :9], cache=cache).logits, model(ids[:, 9:16], cache=cache).logits]
        parts += [model.step(ids[:, t], cache)[:, None] for t in range(16, 30)]
    assert cache.length == 30
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=2e-5, rtol=1e-4)


def test_return_cache_then_step_and_dropout_off_in_eval():
    model = _model(dropout=0.3).eval()
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        out = model(ids[:, :8], return_cache=True)
        assert isinstance(out.cache, KVCache) and out.cache.length == 8 and out.cache.capacity == 40
        step_logits = model.step(ids[:, 8], out.cache)
        full = model(ids[:, :9]).logits[:, -1]
    torch.testing.assert_close(step_logits, full, atol=2e-5, rtol=1e-4)
    model.train()  # dropout now changes the output
    assert not torch.equal(model(ids).logits, model(ids).logits)


def test_batch_rows_are_independent():
    model = _model().eval()
    ids = torch.randint(0, 50, (4, 16))
    with torch.no_grad():
        together = model(ids).logits
        alone = torch.cat([model(ids[i:i + 1]).logits for i in range(4)])
    torch.testing.assert_close(together, alone, atol=2e-5, rtol=1e-4)


def test_causality():
    model = _model().eval()
    ids = torch.randint(0, 50, (1, 20))
    changed = ids.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 50
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_loss_is_next_token_cross_entropy_with_ignore_index():
    model = _model()
    ids = torch.randint(0, 50, (2, 10))
    labels = ids.clone()
    labels[0, 3] = -100
    out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    target = labels[:, 1:].reshape(-1)
    keep = target != -100
    manual = -F.log_softmax(logits[keep], -1).gather(1, target[keep, None]).mean()
    torch.testing.assert_close(out.loss, manual)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert abs(_model()(ids, labels=ids).loss.item() - math.log(56)) < 0.3  # near uniform at init (V = 56)


def test_absolute_positions_stop_at_max_seq_len_rotary_runs_past():
    ids = torch.randint(0, 50, (1, 41))
    with pytest.raises(ValueError, match="exceeds max_seq_len 40"):
        _model("absolute")(ids)
    absolute = _model("absolute").eval()
    cache = absolute.allocate_cache(1, 40)
    with torch.no_grad():
        absolute(ids[:, :40], cache=cache)
        with pytest.raises(ValueError, match="exceeds max_seq_len"):
            absolute.step(ids[:, 40], cache)
    with pytest.raises(ValueError, match="absolute positions"):
        absolute.allocate_cache(1, 41)
    rotary = _model("rotary").eval()
    with torch.no_grad():
        long = rotary(torch.randint(0, 50, (1, 100))).logits  # 2.5× the training length: extrapolation allowed
        assert long.shape == (1, 100, 56) and torch.isfinite(long).all()
        cache = rotary.allocate_cache(1, 3)
        rotary(ids[:, :3], cache=cache)
        with pytest.raises(ValueError, match="KV cache holds 3 positions"):
            rotary.step(ids[:, 3], cache)


def test_rotary_is_relative():
    # <R_m q, R_n k> depends only on m − n
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        cq, sq = rotary_tables(torch.tensor([m]), 16, 10000.0)
        ck, sk = rotary_tables(torch.tensor([n]), 16, 10000.0)
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    torch.testing.assert_close(score(5, 2), score(105, 102), atol=1e-4, rtol=1e-4)


def test_presets_match_mamba_parameter_budget():
    for t, m in [("tiny", "tiny"), ("mini", "mini"), ("small", "small")]:
        nt = TransformerLM(TransformerConfig.from_preset(t)).num_parameters()
        nm = MambaLM(MambaConfig.from_preset(m)).num_parameters()
        assert 0.8 < nt / nm < 1.2, (t, nt, nm)
    c = TransformerConfig.from_preset("125m")
    assert (c.n_layer, c.d_model, c.d_ff, c.padded_vocab_size) == (12, 768, 2048, 50280)
    assert TransformerConfig.from_preset("125m", mlp="gelu").d_ff == 3072
    assert TransformerConfig.from_dict(c.to_dict()) == c


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(d_model=256, n_layer=8, n_head=4, vocab_size=256))
    assert abs(model.layers[0].attn.qkv.weight.std().item() - 0.02) < 0.002
    assert abs(model.layers[0].mlp.down.weight.std().item() - 0.02 / 4) < 0.0005  # 1/sqrt(2·8)
    assert model.lm_head.weight is model.embedding.weight


def test_bad_config_and_input():
    with pytest.raises(ValueError, match="divisible by n_head"):
        TransformerConfig(d_model=30, n_layer=1, n_head=4, vocab_size=10)
    with pytest.raises(ValueError, match="positions"):
        TransformerConfig(d_model=32, n_layer=1, n_head=4, vocab_size=10, positions="alibi")
    with pytest.raises(ValueError, match="mlp"):
        TransformerConfig(d_model=32, n_layer=1, n_head=4, vocab_size=10, mlp="relu")
    with pytest.raises(TypeError, match="n_layer"):
        TransformerConfig(d_model=32, n_layer=1.5, n_head=4, vocab_size=10)
    with pytest.raises(ValueError, match="unknown TransformerConfig field"):
        TransformerConfig.from_preset("tiny", n_heads=2)
    with pytest.raises(ValueError, match="unknown Transformer preset"):
        TransformerConfig.from_preset("7b")
    model = _model()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, 50]]))
    with pytest.raises(ValueError, match="input_ids\\[None\\]"):
        model(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="shape of input_ids"):
        model(torch.zeros(1, 3, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="cache does not fit"):
        model(torch.zeros(2, 3, dtype=torch.long), cache=model.allocate_cache(1))
    with pytest.raises(ValueError, match="matching the cache"):
        model.step(torch.zeros(2, dtype=torch.long), model.allocate_cache(1))
    with pytest.raises(TypeError, match="TransformerConfig"):
        TransformerLM(MambaConfig.from_preset("tiny"))


def test_bfloat16_cached_decoding_runs():
    model = _model().eval().to(torch.bfloat16)
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        full = model(ids).logits.float()
        cache = model.allocate_cache(2, 10)
        model(ids[:, :6], cache=cache)
        last = torch.stack([model.step(ids[:, t], cache) for t in range(6, 10)], 1).float()
    assert cache.k.dtype == torch.bfloat16
    torch.testing.assert_close(last, full[:, 6:], atol=0.1, rtol=0.05)


# ------------------------------------------------------------------ experiments 3 and 4, tiny versions
def _bench(name):
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return importlib.import_module(name)


def test_throughput_quick(tmp_path):
    pytest.importorskip("matplotlib")
    vs = _bench("vs_transformer")
    assert vs.main(["--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    results = __import__("json").loads((tmp_path / "results.json").read_text())
    cells = results["cells"]
    assert [(c["model"], c["batch"]) for c in cells] == [("mamba", 1), ("transformer", 1), ("mamba", 2),
                                                         ("transformer", 2)]
    for c in cells:
        assert c["tokens_per_s"] > 0 and c["decode_steps"] == 7 and c["peak_gib"] > 0
    assert results["ratio_end_to_end"] > 0
    assert (tmp_path / "throughput.png").stat().st_size > 10_000


def test_throughput_memory_estimate_orders_the_models():
    vs = _bench("vs_transformer")
    # 130m shape, prompt 2048 + 128, float32: the KV cache (2 · 12 · 2176 · 768 floats = 153 MiB a sequence)
    # limits the Transformer to about a hundred sequences in 24 GiB; Mamba's state is 2.7 MiB a sequence
    est = vs.estimate_bytes("transformer", "130m", "gpt3", 1, 2048, 128, 4)
    assert est["per_seq"] == 2 * 12 * 2176 * 768 * 4
    assert vs.estimate_bytes("mamba", "130m", "gpt3", 1, 2048, 128, 4)["per_seq"] == 24 * 1536 * 19 * 4
    fits = {k: vs.largest_batch_within(k, "130m", "gpt3", 2048, 128, 4, 24 * 2**30) for k in ("mamba", "transformer")}
    assert fits["transformer"] == 128 and fits["mamba"] >= 1024


def test_length_scaling_quick(tmp_path):
    pytest.importorskip("matplotlib")
    ls = _bench("length_scaling")
    assert ls.main(["--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    results = __import__("json").loads((tmp_path / "results.json").read_text())
    assert {(c["series"], c["length"]) for c in results["cells"]} == {
        (s, 2**e) for s in ("mamba", "mamba-chunked", "transformer") for e in (8, 9, 10)}
    assert all(c["seconds"] > 0 and c["peak_gib"] > 0 for c in results["cells"])
    assert (tmp_path / "length_scaling.png").stat().st_size > 10_000


def test_length_scaling_slope():
    ls = _bench("length_scaling")
    rows = [dict(length=2**e, seconds=3.0 * 4**e) for e in range(10, 16)]
    assert ls.fit_slope(rows, "seconds") == pytest.approx(2.0)


def test_throughput_transformer_loop_is_greedy_decoding(monkeypatch):
    # the benchmark's prefill in row groups (views into the batch cache) + steps gives the tokens of greedy
    # decoding by full forwards
    vs = _bench("vs_transformer")
    model = _model(max_seq_len=64).eval()
    prompts = torch.randint(0, 50, (3, 12)).tolist()
    fed = []
    step = model.step
    monkeypatch.setattr(model, "step", lambda ids, cache: (fed.append(ids.clone()), step(ids, cache))[1])
    monkeypatch.setattr(vs, "TOKENS_PER_CALL", 24)  # 2 rows per prefill call: groups {0, 1}, {2}
    vs.run_transformer(model, prompts, 6)
    got = torch.stack(fed, 1)  # (3, 5): the first 5 generated tokens
    ids = torch.tensor(prompts)
    with torch.no_grad():
        for _ in range(5):
            ids = torch.cat([ids, model(ids).logits[:, -1, :50].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, ids[:, 12:])


def test_attention_only_blocks():
    """mlp="none": the paper's attention-only MHA baselines (Table 2: 137K parameters at D = 128, 2 layers)."""
    cfg = TransformerConfig(d_model=128, n_layer=2, n_head=8, vocab_size=16, max_seq_len=256, positions="rotary",
                            mlp="none", norm="layernorm", bias=True)
    model = TransformerLM(cfg)
    assert cfg.d_ff == 0 and all(block.mlp is None for block in model.layers)
    n = sum(p.numel() for p in model.parameters())
    assert n == 2 * (4 * 128 * 128 + 4 * 128 + 2 * 128) + 16 * 128 + 2 * 128  # attention + LN per layer, embedding, norm_f
    ids = torch.randint(0, 16, (2, 12))
    model(ids, labels=ids).loss.backward()  # trains
    assert all(p.grad is not None for p in model.parameters())
    assert TransformerConfig(**{k: getattr(cfg, k) for k in ("d_model", "n_layer", "n_head", "vocab_size")},
                             mlp="none", d_ff=0).d_ff == 0  # a saved config with d_ff 0 loads again
    with pytest.raises(ValueError, match="d_ff"):
        TransformerConfig(d_model=32, n_layer=1, n_head=4, vocab_size=10, mlp="none", d_ff=64)
