"""Weight-only quantization (issue 27): int8 per output channel, int4 in groups along the input; the format, the
plain-PyTorch reference, and quantized checkpoints.

    from mambakit.quantize import quantize
    quantize(model, bits=8)                 # in place: in_proj, out_proj and the head/embedding hold int weights
    quantize(model, bits=4, group_size=32)  # int4, one scale per 32 inputs of an output row
    model.save_pretrained("out/")           # config.json with a "quantization" entry + model.safetensors
    MambaLM.from_pretrained("out/")         # loads it back quantized (checkpoint.py hands such configs here)
    mambakit quantize SRC DST --bits 4      # the same from the command line (mambakit/cli/quantize.py)

A quantized checkpoint is the transformers layout: config.json with a "quantization" entry ({bits, group_size,
format, modules}); model.safetensors holding `<module>.qweight` (int8, or uint8 nibbles) and `<module>.scales`
(float32) under mambakit's names (e.g. backbone.layers.0.mixer.in_proj.qweight, backbone.embedding.qweight;
a tied head is stored once, as the embedding) beside the float tensors.

Why weight-only: a decode step streams every weight once per token, so its time is the weight bytes over the
memory bandwidth; int8 halves the bytes of bfloat16 and int4 quarters them (docs/engine.md). Activations, the
state and every sum stay in floating point.

The format. W (o, i) → q, s with W ≈ q · s:
- bits 8: q int8 (o, i) in [−127, 127], s float32 (o,): s = max |W[r]| / 127 per output row (symmetric, no
  zero point; −128 is unused so that q and −q are both representable).
- bits 4: q in [−7, 7] stored as q + 8 in 4 bits, two a byte (uint8 (o, i/2): low nibble column 2c, high
  nibble column 2c + 1), s float32 (o, i/G): s = max |W[r, G·k : G·(k + 1)]| / 7 per group of G inputs.
A row or group of zeros gets s = 1 (q = 0): no division by zero, and dequantises to exact zeros.

What is quantized: each Mamba/Mamba-2 mixer's in_proj and out_proj, and the LM head with the embedding (tied:
one copy of q and s serves both). These are ≈ 96% of a decode step's weight bytes at the 130m shape. x_proj
and dt_proj (≈ 4%) stay: they feed Δ, which enters the state update through exp(ΔA), and a 48-wide dt_proj
does not split into groups of 32 or 64. A_log, D, norms, the conv and biases stay too (small, precision-critical).

The reference twin: `QuantizedLinear.forward` = F.linear with the dequantised weight (int4: q · s in float32, then
the compute dtype; int8: F.linear(x, q) times the row scales, the same product summed in another order);
`QuantizedEmbedding` = the looked-up rows dequantised. The engine's kernels (engine/qpanels.py) are
tested against it; the parallel forward (prefill, training-free eval) runs it as is.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger("mambakit.quantize")

BITS = (8, 4)
DEFAULT_GROUP_SIZE = 32  # int4; measured against 64 and 128 (docs/engine.md, benchmarks/quantized.py)
CONFIG_KEY = "quantization"
FORMAT = "mambakit-symmetric-v1"
_QMAX = {8: 127, 4: 7}


def _check_spec(bits: Any, group_size: Any, who: str = "quantize") -> tuple[int, int | None]:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"{who}: bits must be 8 or 4, got {bits!r}")
    if bits == 8:
        if group_size is not None:
            raise ValueError(f"{who}: group_size applies to bits=4 only (int8 has one scale per output row), "
                             f"got group_size={group_size!r}")
        return 8, None
    if group_size is None:
        group_size = DEFAULT_GROUP_SIZE
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"{who}: group_size must be an even integer ≥ 2, got {group_size!r}")
    return 4, group_size


def quantize_weight(w: Tensor, bits: int = 8, group_size: int | None = None) -> tuple[Tensor, Tensor]:
    """W (o, i) floating point → (q, s) in the format above: int8 (o, i) and float32 (o,) for bits 8; uint8
    (o, i/2) nibbles and float32 (o, i/G) for bits 4."""
    bits, group_size = _check_spec(bits, group_size)
    if not (isinstance(w, Tensor) and w.dim() == 2 and w.is_floating_point()):
        raise ValueError(f"quantize_weight: w must be a 2-D floating-point tensor, got "
                         f"{type(w).__name__ if not isinstance(w, Tensor) else f'{w.dtype} {tuple(w.shape)}'}")
    w = w.detach().float()
    o, i = w.shape
    if not torch.isfinite(w).all():
        raise ValueError("quantize_weight: w holds NaN or inf values")
    qmax = _QMAX[bits]
    if bits == 8:
        amax = w.abs().amax(dim=1)  # (o,)
        s = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
        q = torch.round(w / s[:, None]).clamp_(-qmax, qmax).to(torch.int8)
        return q.contiguous(), s.contiguous()
    if i % group_size:
        raise ValueError(f"quantize_weight: group_size={group_size} does not divide the {i} input columns")
    wg = w.view(o, i // group_size, group_size)  # (o, groups, G)
    amax = wg.abs().amax(dim=2)  # (o, groups)
    s = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = torch.round(wg / s[:, :, None]).clamp_(-qmax, qmax).view(o, i).to(torch.int16) + 8  # (o, i) in 1 … 15
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)  # (o, i/2): column 2c low, 2c + 1 high
    return packed.contiguous(), s.contiguous()


def unpack_int4(q: Tensor) -> Tensor:
    """uint8 (o, i/2) nibbles → int8 (o, i) values in [−7, 7] (well, [−8, 7] as stored)."""
    lo = (q & 0x0F).to(torch.int8) - 8
    hi = (q >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).view(q.shape[0], 2 * q.shape[1])  # (o, i/2, 2) → (o, i)


def dequantize(q: Tensor, s: Tensor, bits: int, group_size: int | None = None) -> Tensor:
    """(q, s) → W float32 (o, i): q · s, exactly (an int of ≤ 8 bits times a float32 rounds once)."""
    if bits == 8:
        return q.float() * s[:, None]
    v = unpack_int4(q).float()  # (o, i)
    o, i = v.shape
    return (v.view(o, i // group_size, group_size) * s[:, :, None]).view(o, i)


class _Quantized(nn.Module):
    """The int weight q and float32 scales s as buffers (saved in the state dict as `qweight`, `scales`), with
    the compute dtype the module's forward returns. `.to(dtype)` changes the compute dtype and never the scales
    (they stay float32) or q."""

    def __init__(self, out_features: int, in_features: int, bits: int, group_size: int | None, dtype, device=None):
        super().__init__()
        self.bits, self.group_size = _check_spec(bits, group_size, type(self).__name__)
        self.out_features, self.in_features = out_features, in_features
        if bits == 4 and in_features % self.group_size:
            raise ValueError(f"{type(self).__name__}: group_size={self.group_size} does not divide in_features="
                             f"{in_features}")
        qshape = (out_features, in_features) if bits == 8 else (out_features, in_features // 2)
        sshape = (out_features,) if bits == 8 else (out_features, in_features // self.group_size)
        self.register_buffer("qweight", torch.zeros(qshape, dtype=torch.int8 if bits == 8 else torch.uint8,
                                                    device=device))
        self.register_buffer("scales", torch.ones(sshape, dtype=torch.float32, device=device))
        self.dtype = dtype

    def set_quantized(self, q: Tensor, s: Tensor) -> None:
        self.qweight, self.scales = q, s

    def _apply(self, fn, recurse=True):
        # nn.Module.to casts floating buffers: note the dtype it asks for as the compute dtype, keep s float32
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.scales.device))
        scales = self.scales
        super()._apply(fn, recurse)
        if probe.is_floating_point():
            self.dtype = probe.dtype
        self.scales = scales.to(self.scales.device)
        return self

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def weight(self) -> Tensor:
        """A dequantised copy of the weight (o, i) in the compute dtype (made on each access: the kernels and the
        forward never call it; for code that reads `.weight` of a linear layer)."""
        return self.dequantized()

    def dequantized(self, dtype=None) -> Tensor:
        return dequantize(self.qweight, self.scales, self.bits, self.group_size).to(dtype or self.dtype)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"{self.in_features}, {self.out_features}, bits={self.bits}{g}, dtype={self.dtype}"


class QuantizedLinear(_Quantized):
    """nn.Linear with an int8/int4 weight: forward = F.linear(x, dequantised weight, bias) in x's dtype (the
    reference twin of the engine's quantized kernels). The bias stays a float parameter."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int = 8, group_size: int | None = None,
                 dtype=torch.float32, device=None):
        super().__init__(out_features, in_features, bits, group_size, dtype, device)
        self.register_parameter("bias", nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
                                if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None) -> "QuantizedLinear":
        w = linear.weight
        m = cls(w.shape[1], w.shape[0], linear.bias is not None, bits, group_size, w.dtype, w.device)
        m.set_quantized(*quantize_weight(w, m.bits, m.group_size))
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.bits == 8:
            # W = diag(s) q: y = (x qᵀ) · s, the row scales applied to the output (as the decode kernel does). q
            # converts exactly to bf16 / fp32, so this is one pass over q and torch's GEMM, not a float32 copy of
            # W per call (which cost prefill a third of its speed: docs/engine.md)
            y = F.linear(x, self.qweight.to(x.dtype))
            y = (y.float() * self.scales).to(x.dtype)
            return y if bias is None else y + bias
        w = self.dequantized(x.dtype)  # (o, i)
        return F.linear(x, w, bias)


class QuantizedEmbedding(_Quantized):
    """nn.Embedding with an int8/int4 table: forward = the looked-up rows dequantised, in the compute dtype."""

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int, group_size: int | None) -> "QuantizedEmbedding":
        w = emb.weight
        m = cls(w.shape[0], w.shape[1], bits, group_size, w.dtype, w.device)
        m.set_quantized(*quantize_weight(w, m.bits, m.group_size))
        return m

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        q, s = self.qweight[flat], self.scales[flat]  # (n, i or i/2), (n,) or (n, groups)
        return dequantize(q, s, self.bits, self.group_size).to(self.dtype).view(*ids.shape, self.in_features)


def quantized_names(model: nn.Module) -> list[str]:
    """The names (as in named_modules) of the linear layers `quantize` replaces: every mixer's in_proj and
    out_proj, then lm_head and the embedding."""
    names = [n for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, QuantizedLinear)) and n.rsplit(".", 1)[-1] in ("in_proj", "out_proj")
             and ".mixer." in n]
    return names + ["lm_head", "backbone.embedding"]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def quantize(model, bits: int = 8, group_size: int | None = None):
    """Quantizes `model` (a MambaLM) in place, from outside: in_proj, out_proj, the head and embedding become
    QuantizedLinear/QuantizedEmbedding holding int weights + scales; everything else is untouched. Returns the
    model; `model.quantization` records the spec (what save_pretrained writes into config.json)."""
    # duck-typed (a MambaLM has both): the model's files never import this one, nor this one the model's
    if not (isinstance(model, nn.Module) and hasattr(model, "backbone") and hasattr(model, "lm_head")
            and hasattr(model, "config")):
        raise TypeError(f"quantize: model must be a MambaLM, got {type(model).__name__}")
    if getattr(model, "quantization", None) is not None:
        raise ValueError(f"quantize: the model is quantized already ({model.quantization})")
    bits, group_size = _check_spec(bits, group_size)
    names = quantized_names(model)
    for n in names:  # refuse before changing anything
        w = model.get_submodule(n).weight
        if bits == 4 and w.shape[1] % group_size:
            raise ValueError(f"quantize: group_size={group_size} does not divide {n}'s {w.shape[1]} input columns")
    with torch.no_grad():
        for n in names[:-2]:
            _set(model, n, QuantizedLinear.from_linear(model.get_submodule(n), bits, group_size))
        emb = QuantizedEmbedding.from_embedding(model.backbone.embedding, bits, group_size)
        model.backbone.embedding = emb
        if model.config.tie_embeddings:
            head = QuantizedLinear(emb.in_features, emb.out_features, False, bits, group_size, emb.dtype, emb.device)
            head.set_quantized(emb.qweight, emb.scales)  # one copy serves both
        else:
            head = QuantizedLinear.from_linear(model.lm_head, bits, group_size)
        model.lm_head = head
    model.quantization = spec(bits, group_size)
    return model


def spec(bits: int, group_size: int | None) -> dict[str, Any]:
    """The config.json entry of a quantized checkpoint."""
    return {"bits": bits, "group_size": group_size, "format": FORMAT,
            "modules": ["mixer.in_proj", "mixer.out_proj", "lm_head", "embedding"]}


def is_quantized(model) -> bool:
    return getattr(model, "quantization", None) is not None


def _structure(model, bits: int, group_size: int | None) -> None:
    """Replaces the quantized modules of a freshly built (meta) model by empty quantized ones of their shapes."""
    for n in quantized_names(model)[:-2]:
        lin = model.get_submodule(n)
        _set(model, n, QuantizedLinear(lin.in_features, lin.out_features, lin.bias is not None, bits, group_size,
                                       lin.weight.dtype, device=lin.weight.device))
    e = model.backbone.embedding.weight
    model.backbone.embedding = QuantizedEmbedding(e.shape[0], e.shape[1], bits, group_size, e.dtype, e.device)
    h = model.lm_head.weight
    model.lm_head = QuantizedLinear(h.shape[1], h.shape[0], False, bits, group_size, h.dtype, h.device)
    model.quantization = spec(bits, group_size)


def read_spec(entry: Any, source: str) -> tuple[int, int | None]:
    """(bits, group_size) of a config.json "quantization" entry; ValueError naming `source` when malformed."""
    if not isinstance(entry, dict) or entry.get("format") != FORMAT:
        raise ValueError(f"{source}: its config's {CONFIG_KEY!r} entry is not mambakit's format {FORMAT!r}: "
                         f"{str(entry)[:200]}")
    try:
        return _check_spec(entry.get("bits"), entry.get("group_size"), f"{source} ({CONFIG_KEY})")
    except ValueError as e:
        raise ValueError(str(e)) from None


def build_quantized(cls, config, sd: dict[str, Tensor], entry: Any, source: str, dtype=None):
    """A quantized model of class cls from a checkpoint's state dict (official key names) and its config's
    "quantization" entry; the float tensors are cast to dtype (None: keep), q and s are kept as stored.
    ValueError naming `source` for a state dict that does not fit (checkpoint.py raises it as CheckpointError)."""
    bits, group_size = read_spec(entry, source)
    CheckpointError = ValueError
    if config.tie_embeddings:
        for k in ("qweight", "scales"):
            sd.pop(f"lm_head.{k}", None)
    for k, t in sd.items():
        want = torch.int8 if bits == 8 else torch.uint8
        if k.endswith(".qweight") and t.dtype != want:
            raise CheckpointError(f"{source}: {k} is {t.dtype}, the {bits}-bit format stores {want}")
        if k.endswith(".scales") and t.dtype != torch.float32:
            raise CheckpointError(f"{source}: {k} is {t.dtype}, scales are float32")
        if not k.endswith((".qweight", ".scales")) and not t.is_floating_point():
            raise CheckpointError(f"{source}: {k} is {t.dtype}; only .qweight tensors hold integers")
    with torch.device("meta"):
        model = cls(config)
    _structure(model, bits, group_size)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()
            if not (config.tie_embeddings and k.startswith("lm_head."))}
    problems = [f"missing keys: {', '.join(sorted(set(want) - set(sd))[:8])}" if set(want) - set(sd) else "",
                f"unexpected keys: {', '.join(sorted(set(sd) - set(want))[:8])}" if set(sd) - set(want) else "",
                "shape mismatches: " + ", ".join(f"{k} {tuple(sd[k].shape)} vs {want[k]}" for k in sorted(set(want) & set(sd))
                                                 if tuple(sd[k].shape) != want[k])]
    problems = [p for p in problems if p and p != "shape mismatches: "]
    if problems:
        raise CheckpointError(f"{source} does not fit its config.json: " + "; ".join(problems))
    model.load_state_dict(sd, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.set_quantized(model.backbone.embedding.qweight, model.backbone.embedding.scales)
    for m in model.modules():
        if hasattr(m, "mark_parameters"):
            m.mark_parameters()
    model = model.to(dtype=dtype or model.backbone.norm_f.weight.dtype)
    log.info("loaded %s: %d-bit weights%s (%s), other tensors %s", source, bits,
             f" in groups of {group_size}" if bits == 4 else " per output channel",
             ", ".join(model.quantization["modules"]), str(model.backbone.norm_f.weight.dtype)[6:])
    return model

