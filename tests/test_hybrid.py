"""Hybrids (the official MixerModel's attn_layer_idx / attn_cfg / d_intermediate): the attention mixer against a
plain re-derivation, the official parameter names and shapes, the official layout both ways, one call = chunks
with the state carried = steps, mixed-length batches in generate, the KV cache, and what refuses hybrids."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mambakit import MambaConfig, MambaLM, generate
from mambakit.attention import MHA, AttentionState, kv_bytes_per_token
from mambakit.checkpoint import CheckpointError
from mambakit.engine import step_function, unsupported

PROMPTS = [[5, 17, 3, 40, 22, 9, 31], [12], [7, 7, 50, 2], [33, 1, 60, 4, 4, 18, 27, 11, 9, 2, 45]]
ATTN = dict(num_heads=4, num_heads_kv=2, head_dim=16, causal=True, d_conv=4, rotary_emb_dim=8, mlp_dim=40,
            qkv_proj_bias=False, out_proj_bias=False)


def hybrid(layer="Mamba2", seed=0, attn_cfg=None, **kw) -> MambaLM:
    """A small random hybrid: attention at layers 1 and 3 of 5, a gated MLP after every mixer; every parameter
    perturbed so that logits are far from uniform."""
    torch.manual_seed(seed)
    sizes = dict(headdim=16, d_state=16, chunk_size=8) if layer == "Mamba2" else dict(d_state=8)
    config = MambaConfig(**{**dict(d_model=32, n_layer=5, vocab_size=64, layer=layer, attn_layer_idx=[1, 3],
                                   attn_cfg=dict(ATTN if attn_cfg is None else attn_cfg), d_intermediate=48),
                            **sizes, **kw})
    model = MambaLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if "embedding" in name else 0.1))
    return model


# ------------------------------------------------------------------------------- the attention mixer alone
def _rotate(x, positions, rd, base, interleaved):
    """Rotary by complex multiplication (an independent derivation): pair (i, i + rd/2), or (2i, 2i + 1) when
    interleaved, is the complex number re + j·im, multiplied by exp(j · position · base^(−2i/rd))."""
    x = x.double()
    if rd == 0:
        return x
    half = rd // 2
    re, im = (x[..., 0:rd:2], x[..., 1:rd:2]) if interleaved else (x[..., :half], x[..., half:rd])
    freq = base ** (-torch.arange(half, dtype=torch.float64) * 2 / rd)
    z = torch.complex(re, im) * torch.polar(torch.ones_like(freq), positions.double()[..., None, None] * freq)
    out = x.clone()
    if interleaved:
        out[..., 0:rd:2], out[..., 1:rd:2] = z.real, z.imag
    else:
        out[..., :half], out[..., half:rd] = z.real, z.imag
    return out


def naive_mha(m: MHA, u):
    """The official MHA's forward (mamba_ssm/modules/mha.py) re-derived with loops over heads and positions, in
    float64: in_proj → [q | k | v | mlp]; conv (no activation); rotary; softmax(q·k / sqrt(hd)) over keys ≤ t,
    query head i reading kv head i // (H / H_kv); out_proj([context | up·SiLU(gate)])."""
    a = m.settings
    b, l, _ = u.shape
    H, Hk, hd = a.num_heads, a.num_heads_kv, a.head_dim
    y = torch.nn.functional.linear(u.double(), m.in_proj.weight.double(),
                                   None if m.in_proj.bias is None else m.in_proj.bias.double())
    qkv, mlp = y[..., :a.qkv_dim], y[..., a.qkv_dim:]
    if a.d_conv:
        w = m.conv1d.weight.double()[:, 0]  # (C, W)
        padded = torch.nn.functional.pad(qkv, (0, 0, a.d_conv - 1, 0))  # zeros before t = 0
        qkv = sum(padded[:, k:k + l] * w[:, k] for k in range(a.d_conv)) + m.conv1d.bias.double()
    q = qkv[..., :H * hd].reshape(b, l, H, hd)
    k = qkv[..., H * hd:(H + Hk) * hd].reshape(b, l, Hk, hd)
    v = qkv[..., (H + Hk) * hd:].reshape(b, l, Hk, hd)
    pos = torch.arange(l).expand(b, l)
    q = _rotate(q, pos, a.rotary_emb_dim, a.rotary_emb_base, a.rotary_emb_interleaved)
    k = _rotate(k, pos, a.rotary_emb_dim, a.rotary_emb_base, a.rotary_emb_interleaved)
    ctx = torch.zeros(b, l, H, hd, dtype=torch.float64)
    for h in range(H):
        g = h // (H // Hk)
        for t in range(l):
            scores = (k[:, :t + 1, g] * q[:, t:t + 1, h]).sum(-1) / math.sqrt(hd)  # (b, t + 1)
            ctx[:, t, h] = (scores.softmax(-1)[..., None] * v[:, :t + 1, g]).sum(1)
    ctx = ctx.reshape(b, l, H * hd)
    if a.mlp_dim:
        up, gate = mlp[..., :a.mlp_dim // 2], mlp[..., a.mlp_dim // 2:]
        ctx = torch.cat([ctx, up * torch.nn.functional.silu(gate)], -1)
    return torch.nn.functional.linear(ctx, m.out_proj.weight.double(),
                                      None if m.out_proj.bias is None else m.out_proj.bias.double())


@pytest.mark.parametrize("cfg", [
    ATTN,
    dict(num_heads=2, causal=True),  # head_dim = d_model / H, no GQA, rotary, conv or MLP part; biases
    dict(num_heads=4, num_heads_kv=1, head_dim=8, causal=True, rotary_emb_dim=8, rotary_emb_interleaved=True,
         rotary_emb_base=500.0),  # MQA, interleaved rotary over the whole head
])
def test_attention_mixer_equals_a_plain_derivation(cfg):
    model = hybrid(attn_cfg=cfg)
    mixer = model.backbone.layers[1].mixer
    assert isinstance(mixer, MHA)
    u = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(mixer(u).double(), naive_mha(mixer, u), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------- names, shapes, presets
def test_official_parameter_names_and_shapes():
    sd = hybrid().state_dict()
    d, H, Hk, hd, mlp = 32, 4, 2, 16, 256  # mlp_dim 40 rounds up to 256; d_intermediate 48 up to 128
    qkv = hd * (H + 2 * Hk)
    want = {"backbone.layers.1.mixer.in_proj.weight": (qkv + mlp, d),
            "backbone.layers.1.mixer.conv1d.weight": (qkv, 1, 4), "backbone.layers.1.mixer.conv1d.bias": (qkv,),
            "backbone.layers.1.mixer.out_proj.weight": (d, H * hd + mlp // 2),
            "backbone.layers.1.norm.weight": (d,), "backbone.layers.1.norm2.weight": (d,),
            "backbone.layers.0.norm2.weight": (d,), "backbone.layers.0.mlp.fc1.weight": (2 * 128, d),
            "backbone.layers.0.mlp.fc2.weight": (d, 128), "backbone.layers.3.mlp.fc2.weight": (d, 128)}
    for k, shape in want.items():
        assert tuple(sd[k].shape) == shape, k
    layer1 = {k for k in sd if k.startswith("backbone.layers.1.")}
    assert layer1 == set(want) - {k for k in want if not k.startswith("backbone.layers.1.")} | {
        "backbone.layers.1.mlp.fc1.weight", "backbone.layers.1.mlp.fc2.weight"}  # no rotary buffer saved
    assert "backbone.layers.0.mixer.dt_bias" in sd and "backbone.layers.3.mixer.in_proj.weight" in sd


def test_mamba2attn_preset_has_the_released_size():
    """mamba2attn-2.7b: 58 Mamba-2 layers and 6 attention layers; the released checkpoint has 2,697,590,880
    parameters (tied) from the released shapes."""
    with torch.device("meta"):
        model = MambaLM(MambaConfig.from_preset("mamba2attn-2.7b"))
    assert model.num_parameters() == 2_697_590_880
    assert tuple(model.backbone.layers[9].mixer.in_proj.weight.shape) == (11520, 2560)
    assert tuple(model.backbone.layers[9].mixer.out_proj.weight.shape) == (2560, 3840)
    assert kv_bytes_per_token(model.config, torch.float16) == 6 * 2 * 30 * 128 * 2


@pytest.mark.parametrize("edit, phrase", [
    (dict(attn_layer_idx=[5]), "attn_layer_idx"), (dict(attn_layer_idx=[1, 1]), "attn_layer_idx"),
    (dict(attn_cfg=dict(num_heads=4)), "causal"), (dict(attn_cfg=dict(causal=True)), "num_heads"),
    (dict(attn_cfg=dict(num_heads=4, num_heads_kv=3, causal=True)), "num_heads_kv"),
    (dict(attn_cfg=dict(num_heads=3, causal=True)), "divide d_model"),
    (dict(attn_cfg=dict(num_heads=4, causal=True, rotary_emb_dim=10)), "rotary_emb_dim"),
    (dict(attn_cfg=dict(num_heads=4, causal=True, window=8)), "window"),
    (dict(d_intermediate=-1), "d_intermediate"),
])
def test_bad_hybrid_configs_name_the_field(edit, phrase):
    with pytest.raises((ValueError, TypeError), match=phrase):
        MambaConfig(**{**dict(d_model=32, n_layer=5, vocab_size=64, attn_layer_idx=[1],
                              attn_cfg=dict(num_heads=4, causal=True)), **edit})


# --------------------------------------------------------------------- one call = chunks = steps, saved
@pytest.mark.parametrize("layer", ["Mamba2", "Mamba"])
def test_saved_hybrid_gives_the_same_logits_in_one_call_in_chunks_and_step_by_step(tmp_path, layer):
    """The issue's must-show: Mamba-2 (and Mamba-1) mixers with attention at two depths and d_intermediate > 0,
    saved in the official layout, loaded, then one call = chunks with the state carried = one token a step."""
    model = hybrid(layer)
    model.save_pretrained(tmp_path, layout="official")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["attn_layer_idx"] == [1, 3] and cfg["d_intermediate"] == 48 and cfg["attn_cfg"] == ATTN
    assert cfg["ssm_cfg"].get("layer", "Mamba1") == ("Mamba2" if layer == "Mamba2" else "Mamba1")  # the default
    loaded = MambaLM.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    ids = torch.randint(0, 64, (3, 23), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = loaded(ids).logits
        torch.testing.assert_close(full, model(ids).logits, atol=0, rtol=0)
        chunks, state = [], None
        for s, e in ((0, 6), (6, 7), (7, 16), (16, 23)):  # a one-token chunk among them
            out = loaded(ids[:, s:e], state=state, return_state=True)
            chunks.append(out.logits)
            state = out.state
        torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-4, rtol=1e-4)
        assert state.attn.lengths.tolist() == [23] * 3
        state = loaded.allocate_state(3)
        steps = torch.stack([loaded.step(ids[:, t], state) for t in range(23)], 1)
        torch.testing.assert_close(steps, full, atol=1e-4, rtol=1e-4)
        # after a prefix by forward, steps continue it
        pre = loaded(ids[:, :9], return_state=True).state
        rest = torch.stack([loaded.step(ids[:, t], pre) for t in range(9, 23)], 1)
        torch.testing.assert_close(rest, full[:, 9:], atol=1e-4, rtol=1e-4)


def test_forward_leaves_the_given_state_untouched_and_steps_update_it_in_place():
    model = hybrid()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        state = model(ids, return_state=True).state
        kv, lengths = state.attn.kv.clone(), state.attn.lengths.clone()
        model(ids[:, :3], state=state, return_state=True)
        model(ids[:, :1], state=state)
        assert torch.equal(state.attn.kv, kv) and torch.equal(state.attn.lengths, lengths)
        model.step(ids[:, 0], state)
    assert state.attn.lengths.tolist() == [11, 11]


def test_all_attention_and_mlp_only_models():
    """transformerpp-like (every layer attention: no Mamba state) and Mamba + MLP without attention."""
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    for model in (hybrid(attn_layer_idx=[0, 1, 2, 3, 4]), hybrid(attn_layer_idx=[], attn_cfg={})):
        with torch.no_grad():
            full = model(ids).logits
            state = model.allocate_state(2)
            steps = torch.stack([model.step(ids[:, t], state) for t in range(9)], 1)
        torch.testing.assert_close(steps, full, atol=1e-4, rtol=1e-4)
    assert hybrid(attn_layer_idx=[0, 1, 2, 3, 4]).allocate_state(2).ssm.shape[0] == 0


# ---------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("layer", ["Mamba2", "Mamba"])
def test_mixed_length_batch_generation_equals_each_row_alone(layer):
    model = hybrid(layer, seed=1)
    batch = generate(model, PROMPTS, 12, temperature=0)
    for i, p in enumerate(PROMPTS):
        assert batch.sequences[i] == generate(model, [p], 12, temperature=0).sequences[0]
    assert len({tuple(s) for s in batch.sequences}) > 1
    # greedy decoding from the full forward, row by row: the same tokens
    for i, p in enumerate(PROMPTS[:2]):
        seq = list(p)
        with torch.no_grad():
            for _ in range(12):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1, :64].argmax()))
        assert batch.sequences[i] == seq[len(p):]


def test_kv_cache_grows_by_doubling_and_reports_its_memory():
    model = hybrid()
    state = model.allocate_state(2)
    assert state.attn.capacity == 0
    caps = []
    with torch.no_grad():
        for t in range(40):
            model.step(torch.tensor([t % 64, 3]), state)
            caps.append(state.attn.capacity)
    assert sorted(set(caps)) == [16, 32, 64]
    per_token = kv_bytes_per_token(model.config)  # 2 layers · 2 (k, v) · 2 kv heads · 16 dims · 4 bytes
    assert per_token == 2 * 2 * 2 * 16 * 4
    assert state.attn.kv.numel() * 4 == 2 * 64 * per_token


# -------------------------------------------------------------------------------- what refuses hybrids
def test_hf_layout_and_fused_steps_refuse_hybrids(tmp_path, caplog):
    model = hybrid()
    with pytest.raises(CheckpointError, match="layout='official'"):
        model.save_pretrained(tmp_path, layout="hf")
    assert "hybrid" in unsupported(model)
    assert step_function(model) == model.step
    mlp_only = hybrid("Mamba", attn_layer_idx=[], attn_cfg={})
    assert "hybrid" in unsupported(mlp_only)
    from mambakit.engine import FusedDecoder, Mamba2Decoder

    for decoder, mixer in ((FusedDecoder, "Mamba"), (Mamba2Decoder, "Mamba2")):  # built directly, too
        with pytest.raises(ValueError, match="hybrid"):
            decoder(hybrid(mixer, attn_layer_idx=[], attn_cfg={}))
    from mambakit.serve.engine import Engine

    with pytest.raises(ValueError, match="hybrids with attention layers"):
        Engine(model)


def test_backward_reaches_every_parameter():
    model = hybrid().train()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(6))
    model(ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_state_rows_move_with_their_kv_caches():
    model = hybrid()
    with torch.no_grad():
        a = model(torch.tensor([PROMPTS[0]]), return_state=True).state
        b = model(torch.tensor([PROMPTS[1]]), return_state=True).state
        batch = model.allocate_state(2)
        batch.set_rows_(torch.tensor([1]), a)
        batch.set_rows_(torch.tensor([0]), b)
        assert batch.attn.lengths.tolist() == [1, 7]
        one = batch.rows(torch.tensor([1]))
        assert torch.equal(one.attn.kv, a.attn.kv[:, :, :7]) and torch.equal(one.ssm, a.ssm)
        assert isinstance(one.attn, AttentionState)


def test_eval_scores_a_hybrid_as_its_own_log_softmax_sums():
    """mambakit.eval.score (contexts prefilled by length, continuations right-padded from copied states) on a
    hybrid equals the log-softmax sums of one forward over context + continuation."""
    from mambakit.eval import score

    model = hybrid(seed=2)
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(0, 64, (n,), generator=g).tolist()  # noqa: E731
    shared = rand(6)
    reqs = [(shared, rand(1)), (shared, rand(5)), (rand(1), rand(3)), (rand(13), rand(2)), (rand(4), rand(6))]
    for batch_size, chunk in ((16, 2048), (2, 3)):
        for (ctx, cont), (lp, _) in zip(reqs, score(model, reqs, batch_size=batch_size, chunk_tokens=chunk)):
            with torch.no_grad():
                logits = model(torch.tensor([ctx + cont])).logits[0, :, :64].double().log_softmax(-1)
            want = sum(float(logits[len(ctx) - 1 + t, c]) for t, c in enumerate(cont))
            assert lp == pytest.approx(want, abs=1e-3, rel=1e-4)


def test_trainer_trains_and_saves_a_hybrid_preset(tmp_path):
    """`mambakit train --model mamba2attn-tiny`: the loss goes down, samples are generated, and the run directory
    (official layout: transformers has no hybrid class) loads back as the same hybrid."""
    from mambakit.train import TrainConfig, train

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text("the quick brown fox jumps over the lazy dog\n" * (40 + i))
    cfg = TrainConfig(data=str(corpus), model="mamba2attn-tiny", seq_len=32, batch_size=4, max_steps=8,
                      warmup_steps=1, lr=5e-3, eval_every=1000, eval_windows=2, sample_tokens=8, log_every=1,
                      ckpt_every=4, progress=False, plot=False, out_dir=str(tmp_path / "run"),
                      cache_dir=str(tmp_path / "cache"), threads=1)
    train(cfg)
    curve = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    loss = [r["loss"] for r in curve if "loss" in r]
    assert loss[-1] < loss[0]
    assert (tmp_path / "run" / "pytorch_model.bin").exists()
    model = MambaLM.from_pretrained(tmp_path / "run")
    assert model.config.attn_layer_idx == [1, 3] and model.config.d_intermediate == 128
