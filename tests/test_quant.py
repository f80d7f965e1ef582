"""Weight-only quantization (mambakit/quantize.py): the format, the reference twin, quantized checkpoints (save,
load, CLI) and bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _models import random_model

from mambakit import MambaLM
from mambakit.checkpoint import CheckpointError
from mambakit.cli import main
from mambakit.quantize import QuantizedEmbedding, QuantizedLinear, dequantize, quantize, quantize_weight, unpack_int4


@pytest.mark.parametrize("bits,group", [(8, None), (4, 8), (4, 32)])
def test_quantize_weight_round_trip_error(bits, group):
    """q · s is within half a step (s / 2) of W everywhere, q stays in the symmetric range, and a zero row or
    group dequantises to exact zeros."""
    w = torch.randn(40, 64)
    w[3] = 0
    q, s = quantize_weight(w, bits, group)
    back = dequantize(q, s, bits, group)
    step = (s[:, None] if bits == 8 else s.repeat_interleave(group, dim=1)).expand_as(w)
    assert ((back - w).abs() <= step / 2 + 1e-7).all()
    assert torch.equal(back[3], torch.zeros(64))
    vals = q if bits == 8 else unpack_int4(q)
    limit = 127 if bits == 8 else 7
    assert vals.abs().max() == limit and vals.abs().max() <= limit
    if bits == 4:
        assert q.dtype == torch.uint8 and q.shape == (40, 32) and s.shape == (40, 64 // group)


def test_int4_nibble_order():
    w = torch.tensor([[7.0, -7.0, 1.0, 0.0]])
    q, s = quantize_weight(w, 4, 4)
    assert s.item() == 1.0
    assert q.tolist() == [[(7 + 8) | ((-7 + 8) << 4), (1 + 8) | (8 << 4)]]
    assert unpack_int4(q).tolist() == [[7, -7, 1, 0]]


@pytest.mark.parametrize("bits,group", [(8, None), (4, 16)])
def test_quantized_model_is_its_twin(bits, group):
    """quantize() changes only in_proj, out_proj, the head and the embedding, each to dequantise-then-F.linear;
    the model's logits equal a float model holding the dequantised weights (exactly: the same ops)."""
    model = random_model(d_model=32, n_layer=2)
    qm = quantize(copy.deepcopy(model), bits, group)
    deq = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in qm.named_modules():
            if isinstance(m, (QuantizedLinear, QuantizedEmbedding)):
                deq.get_submodule(name).weight.copy_(m.dequantized(torch.float32))
    assert qm.lm_head.qweight is qm.backbone.embedding.qweight  # tied: one copy
    assert type(qm.backbone.layers[0].mixer.x_proj) is torch.nn.Linear  # x_proj, dt_proj stay
    ids = torch.randint(0, 64, (2, 10))
    if bits == 4:
        torch.testing.assert_close(qm(ids).logits, deq(ids).logits, atol=0, rtol=0)  # the same ops
    else:  # (x qᵀ) · s: the same products, summed before the scale: float32 rounding apart
        torch.testing.assert_close(qm(ids).logits, deq(ids).logits, atol=1e-5, rtol=1e-5)
    # the quantization error itself is small against the logits
    err = (qm(ids).logits - model(ids).logits).abs().max() / model(ids).logits.abs().max()
    assert err < (0.02 if bits == 8 else 0.2)


def test_to_dtype_keeps_scales_float32():
    qm = quantize(random_model(), 8).to(torch.bfloat16)
    lin = qm.backbone.layers[0].mixer.in_proj
    assert lin.dtype == torch.bfloat16 and lin.scales.dtype == torch.float32 and lin.qweight.dtype == torch.int8
    assert qm(torch.randint(0, 64, (1, 4))).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("bits,group", [(8, None), (4, 16)])
def test_save_load_round_trip(tmp_path, bits, group, caplog):
    qm = quantize(random_model(), bits, group)
    qm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization"]["bits"] == bits and cfg["quantization"]["group_size"] == group
    with caplog.at_level("INFO", logger="mambakit.quantize"):
        back = MambaLM.from_pretrained(tmp_path)
    assert f"{bits}-bit weights" in caplog.text
    assert back.quantization == qm.quantization
    assert back.lm_head.qweight is back.backbone.embedding.qweight
    for k, v in qm.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    ids = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(back(ids).logits, qm(ids).logits, atol=0, rtol=0)
    bf = MambaLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf.lm_head.dtype == torch.bfloat16 and bf.lm_head.scales.dtype == torch.float32


def test_cli_quantize(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    model = random_model()
    model.save_pretrained(src)
    assert main(["quantize", str(src), str(dst), "--bits", "4", "--group-size", "16"]) == 0
    assert "int4, groups of 16" in capsys.readouterr().out
    back = MambaLM.from_pretrained(dst)
    assert back.quantization["bits"] == 4
    assert main(["quantize", str(dst), str(tmp_path / "again"), "--bits", "8"]) == 1  # quantized already
    assert "quantized already" in capsys.readouterr().err
    assert main(["quantize", str(src), str(tmp_path / "x"), "--bits", "8", "--group-size", "32"]) == 1
    assert "--group-size applies to --bits 4" in capsys.readouterr().err
    assert main(["quantize", str(src), str(src), "--bits", "8"]) == 1
    assert "dst must differ" in capsys.readouterr().err


def test_bad_input():
    model = random_model()
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        quantize(copy.deepcopy(model), bits=3)
    with pytest.raises(ValueError, match="group_size"):
        quantize(copy.deepcopy(model), bits=4, group_size=7)
    with pytest.raises(ValueError, match="group_size=48 does not divide"):
        quantize(copy.deepcopy(model), bits=4, group_size=48)  # d_model 32: refused before any change
    with pytest.raises(TypeError, match="model must be a MambaLM"):
        quantize(torch.nn.Linear(2, 2), bits=8)
    qm = quantize(copy.deepcopy(model), 8)
    with pytest.raises(ValueError, match="quantized already"):
        quantize(qm, 8)
    with pytest.raises(ValueError, match="hf layout only"):
        qm.save_pretrained("/nonexistent/x", layout="official")
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_weight(torch.tensor([[float("nan"), 1.0]]), 8)


def test_damaged_quantized_checkpoints(tmp_path):
    qm = quantize(random_model(), 8)
    qm.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization"]["bits"] = 4  # the int8 tensors no longer fit the spec
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="stores torch.uint8"):
        MambaLM.from_pretrained(tmp_path)
    cfg["quantization"] = {"bits": 8}  # no format tag
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not mambakit's format"):
        MambaLM.from_pretrained(tmp_path)
    del cfg["quantization"]  # a plain config: the int tensors are unexpected keys
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unexpected keys"):
        MambaLM.from_pretrained(tmp_path)


def test_mamba2_model_quantizes_and_decodes_through_the_reference_step():
    from mambakit import MambaConfig
    from mambakit.engine import step_function, unsupported

    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=64, n_layer=2, vocab_size=64, layer="Mamba2", headdim=16, d_state=16)).eval()
    qm = quantize(copy.deepcopy(model), 8)
    assert isinstance(qm.backbone.layers[0].mixer.in_proj, QuantizedLinear)
    ids = torch.randint(0, 64, (2, 6))
    ref = model(ids).logits
    assert ((qm(ids).logits - ref).abs().max() / ref.abs().max()) < 0.02
    assert "quantized Mamba-2" in unsupported(qm)
    step = step_function(qm)
    state = qm.allocate_state(2)
    with torch.no_grad():
        logits = step(ids[:, 0], state)
    assert step == qm.step  # the reference step, chosen once with its reason
    torch.testing.assert_close(logits, qm(ids[:, :1]).logits[:, -1], atol=1e-4, rtol=1e-4)
