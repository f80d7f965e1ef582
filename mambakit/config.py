"""MambaConfig: every size and init constant of a Mamba language model in one typed dataclass.

Field names follow the official package (state-spaces/mamba: `MambaConfig` plus the mixer kwargs of
`ssm_cfg`, flattened), so an official config.json maps onto it one to one. `layer` picks the mixer as the
official `ssm_cfg["layer"]` does: "Mamba" (Mamba-1, the paper's selective SSM) or "Mamba2" (SSD, Dao & Gu 2024);
each mixer reads its own fields (listed below) and a field of the other mixer left at its default is ignored.
`mixer_rms_eps` set (not None) makes the Mamba-1 mixer FalconMamba's (transformers `FalconMambaForCausalLM`):
weightless RMS norms of Δ's low-rank input, B and C inside the mixer.
Hybrids, as the official MixerModel builds them: `attn_layer_idx` makes those layers causal multi-head attention
(`attn_cfg`: the official MHA's arguments, resolved into `attn`, an AttnSettings) and `d_intermediate > 0` adds a
gated MLP after every layer's mixer (mambakit/attention.py, mambakit/mlp.py).
Derived sizes (d_inner, the resolved dt_rank, the padded vocabulary; Mamba-2's d_ssm and nheads) are computed in
__post_init__; every field is validated there and a bad value raises a ValueError / TypeError that names the
field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


MIXERS = ("Mamba", "Mamba2")
_INF = float("inf")
# Mamba-2's own fields and their defaults (official Mamba2.__init__): a Mamba-1 config must leave them there
_MAMBA2_DEFAULTS: dict[str, Any] = dict(headdim=64, ngroups=1, d_ssm=None, A_init_range=(1.0, 16.0),
                                        D_has_hdim=False, rmsnorm=True, norm_before_gate=False,
                                        dt_limit=(0.0, _INF), chunk_size=256, conv_init=None)


@dataclass
class MambaConfig:
    # ---- sizes (paper Section 3.4: D = d_model, E = expand, N = d_state)
    d_model: int
    n_layer: int
    vocab_size: int  # the tokenizer's size; the embedding is padded up to padded_vocab_size
    layer: str = "Mamba"  # the mixer: "Mamba" (Mamba-1; "Mamba1" is read as it) or "Mamba2"
    d_state: int | None = None  # None: the mixer's official default, 16 (Mamba) or 128 (Mamba2)
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"  # "auto" = ceil(d_model / 16); resolved to an int in __post_init__
    # ---- Δ initialisation (paper Section 3.6; official mamba_simple.py)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init: str = "random"  # dt_proj.weight ~ U(−s, s) ("random") or = s ("constant"), s = dt_scale / sqrt(dt_rank)
    dt_scale: float = 1.0
    dt_init_floor: float = 1e-4
    # ---- layers
    conv_bias: bool = True
    bias: bool = False  # bias of in_proj and out_proj
    rms_norm: bool = True  # RMSNorm (all released checkpoints) or LayerNorm
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    # ---- initialisation of the rest (official mixer_seq_simple.py `_init_weights`)
    initializer_range: float = 0.02  # std of the embedding
    rescale_prenorm_residual: bool = True  # out_proj.weight /= sqrt(n_layer) (GPT-2 scheme)
    # ---- FalconMamba (transformers FalconMambaConfig.mixer_rms_eps; Mamba-1 only). None: plain Mamba-1. A number:
    # Δ's low-rank input (R), B and C (N each) are each divided by their RMS (no weight) with this epsilon, in
    # float32, right after x_proj and before dt_proj (transformers' placement; see docs/models.md).
    mixer_rms_eps: float | None = None
    # ---- hybrids (official MambaConfig): attention layers at these indices, an MLP of this width after every mixer
    d_intermediate: int = 0  # 0: no MLP; else the GatedMLP's hidden width (rounded up to a multiple of 128)
    attn_layer_idx: list[int] = field(default_factory=list)
    attn_cfg: dict[str, Any] = field(default_factory=dict)  # the official MHA's keyword arguments (see AttnSettings)
    # ---- Mamba-2 only (official modules/mamba2.py; P = headdim, G = ngroups, H = nheads = d_ssm / P).
    # dt_rank, dt_init and dt_scale are Mamba-1's (Mamba-2 has no dt_proj); dt_min, dt_max, dt_init_floor are shared.
    headdim: int = 64  # P: channels per head; every head has one decay rate A_h and one Δ per token
    ngroups: int = 1  # G: groups of heads sharing B and C (the paper's multi-value pattern)
    d_ssm: int | None = None  # channels through the SSM (None: all d_inner); the rest form a gated MLP branch
    A_init_range: tuple[float, float] = (1.0, 16.0)  # A_h = −U(lo, hi) at init
    D_has_hdim: bool = False  # D per channel (d_ssm,) instead of per head (nheads,)
    rmsnorm: bool = True  # the gated RMSNorm before out_proj (else y · silu(z))
    norm_before_gate: bool = False  # RMSNorm(y)·silu(z) instead of RMSNorm(y·silu(z))
    dt_limit: tuple[float, float] = (0.0, _INF)  # Δ clamped to [lo, hi] (the default clamps nothing)
    chunk_size: int = 256  # the SSD block length (speed only: results do not depend on it beyond rounding)
    conv_init: float | None = None  # conv1d.weight ~ U(±conv_init) (None: PyTorch's default init)
    # ---- derived in __post_init__
    d_inner: int = field(init=False)
    padded_vocab_size: int = field(init=False)
    nheads: int = field(init=False)  # Mamba-2: d_ssm // headdim (0 for Mamba-1)
    attn: "AttnSettings | None" = field(init=False)  # attn_cfg resolved (None without attention layers)

    def __post_init__(self) -> None:
        if self.layer == "Mamba1":
            self.layer = "Mamba"  # the official name of the same mixer
        if self.layer not in MIXERS:
            raise ValueError(f"MambaConfig.layer must be one of {MIXERS}, got {self.layer!r}")
        if self.d_state is None:
            self.d_state = 128 if self.layer == "Mamba2" else 16
        _check_int(self, "d_model", 1)
        _check_int(self, "n_layer", 1)
        _check_int(self, "vocab_size", 1)
        _check_int(self, "d_state", 1)
        _check_int(self, "d_conv", 1)
        _check_int(self, "expand", 1)
        _check_int(self, "pad_vocab_size_multiple", 1)
        if self.dt_rank == "auto":
            self.dt_rank = math.ceil(self.d_model / 16)
        elif isinstance(self.dt_rank, str):
            raise ValueError(f"MambaConfig.dt_rank must be 'auto' or a positive int, got {self.dt_rank!r}")
        _check_int(self, "dt_rank", 1)
        for name in ("dt_min", "dt_max", "dt_scale", "norm_eps", "initializer_range"):
            _check_float(self, name, positive=True)
        _check_float(self, "dt_init_floor", positive=False)
        if not self.dt_min <= self.dt_max:
            raise ValueError(f"MambaConfig.dt_min ({self.dt_min}) must be <= dt_max ({self.dt_max})")
        if self.dt_init not in ("random", "constant"):
            raise ValueError(f"MambaConfig.dt_init must be 'random' or 'constant', got {self.dt_init!r}")
        for name in ("conv_bias", "bias", "rms_norm", "residual_in_fp32", "tie_embeddings",
                     "rescale_prenorm_residual"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"MambaConfig.{name} must be a bool, got {getattr(self, name)!r}")
        self.d_inner = self.expand * self.d_model
        m = self.pad_vocab_size_multiple
        self.padded_vocab_size = -(-self.vocab_size // m) * m  # round up, as the official model does
        if self.mixer_rms_eps is not None:
            if self.layer != "Mamba":
                raise ValueError(f"MambaConfig.mixer_rms_eps is FalconMamba's (a Mamba-1 mixer) field, but layer = "
                                 f"{self.layer!r}; leave it None")
            _check_float(self, "mixer_rms_eps", positive=True)
        self._check_mamba2_fields()
        self._check_hybrid_fields()

    def _check_hybrid_fields(self) -> None:
        _check_int(self, "d_intermediate", 0)
        idx = self.attn_layer_idx
        if not isinstance(idx, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in idx):
            raise TypeError(f"MambaConfig.attn_layer_idx must be a list of layer indices (ints), got {idx!r}")
        if any(not 0 <= i < self.n_layer for i in idx) or len(set(idx)) != len(idx):
            raise ValueError(f"MambaConfig.attn_layer_idx must hold distinct layer indices in [0, n_layer = "
                             f"{self.n_layer}), got {list(idx)}")
        self.attn_layer_idx = list(idx)
        self.attn_cfg = dict(self.attn_cfg) if isinstance(self.attn_cfg, dict) else self.attn_cfg  # own copy
        if not isinstance(self.attn_cfg, dict):
            raise TypeError(f"MambaConfig.attn_cfg must be a dict (the official MHA's arguments), got {self.attn_cfg!r}")
        self.attn = AttnSettings.resolve(self.attn_cfg, self.d_model) if idx else None

    @property
    def n_mamba_layers(self) -> int:
        """Layers with a Mamba (or Mamba-2) mixer: those not in attn_layer_idx."""
        return self.n_layer - len(self.attn_layer_idx)

    def _check_mamba2_fields(self) -> None:
        """Mamba-2's fields: validated and resolved for a Mamba2 config; left at their defaults by a Mamba one."""
        self.A_init_range = _pair(self, "A_init_range")
        self.dt_limit = _pair(self, "dt_limit")
        if self.layer != "Mamba2":
            set_ = sorted(k for k, v in _MAMBA2_DEFAULTS.items() if getattr(self, k) != v)
            if set_:
                raise ValueError(f"MambaConfig.{set_[0]} is a Mamba-2 field, but layer = {self.layer!r} (Mamba-1) "
                                 f"does not use it; set layer='Mamba2' or leave {', '.join(set_)} at the default")
            self.nheads = 0
            return
        _check_int(self, "headdim", 1)
        _check_int(self, "ngroups", 1)
        _check_int(self, "chunk_size", 1)
        if self.d_ssm is None:
            self.d_ssm = self.d_inner
        _check_int(self, "d_ssm", 1)
        if self.d_ssm > self.d_inner:
            raise ValueError(f"MambaConfig.d_ssm ({self.d_ssm}) must be <= d_inner = expand·d_model ({self.d_inner})")
        if self.d_ssm % self.headdim:
            raise ValueError(f"MambaConfig.headdim ({self.headdim}) must divide d_ssm ({self.d_ssm}; = expand·d_model "
                             "unless given): the SSM channels split into heads of headdim channels")
        self.nheads = self.d_ssm // self.headdim
        if self.nheads % self.ngroups:
            raise ValueError(f"MambaConfig.ngroups ({self.ngroups}) must divide the number of heads nheads = "
                             f"d_ssm / headdim = {self.nheads}: each group's B and C serve nheads / ngroups heads")
        for name in ("D_has_hdim", "rmsnorm", "norm_before_gate"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"MambaConfig.{name} must be a bool, got {getattr(self, name)!r}")
        lo, hi = self.A_init_range
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise ValueError(f"MambaConfig.A_init_range must be (lo, hi) with 0 < lo <= hi < inf, got {(lo, hi)}")
        lo, hi = self.dt_limit
        if not (0 <= lo <= hi):
            raise ValueError(f"MambaConfig.dt_limit must be (lo, hi) with 0 <= lo <= hi (hi may be inf), got {(lo, hi)}")
        if self.conv_init is not None:
            _check_float(self, "conv_init", positive=True)

    # ------------------------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "MambaConfig":
        """A named size (see PRESETS), with any field overridden: `MambaConfig.from_preset("130m", n_layer=2)`."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MambaConfig":
        """Builds a config from a dict of field values; unknown keys raise (they are usually typos)."""
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown MambaConfig field(s) {unknown}; fields: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The init fields (derived sizes left out), JSON-serialisable (dt_limit's inf as JSON's Infinity);
        from_dict(to_dict()) == self."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        d["attn_layer_idx"], d["attn_cfg"] = list(self.attn_layer_idx), dict(self.attn_cfg)
        return d


@dataclass(frozen=True)
class AttnSettings:
    """The official MHA's arguments (mamba_ssm/modules/mha.py), with its defaults resolved: H = num_heads query
    heads, H_kv = num_heads_kv key/value heads (GQA: H_kv divides H), head_dim hd (default d_model / H),
    mlp_dim (rounded up to a multiple of 256, as the official class does), rotary on the first rotary_emb_dim
    dims of q and k (GPT-NeoX halves unless interleaved), an optional depthwise causal conv of width d_conv over
    [q | k | v] (no activation), softmax_scale (None: 1/sqrt(hd))."""

    num_heads: int
    num_heads_kv: int
    head_dim: int
    mlp_dim: int = 0
    qkv_proj_bias: bool = True
    out_proj_bias: bool = True
    softmax_scale: float | None = None
    causal: bool = True
    d_conv: int = 0
    rotary_emb_dim: int = 0
    rotary_emb_base: float = 10000.0
    rotary_emb_interleaved: bool = False

    @property
    def qkv_dim(self) -> int:
        return self.head_dim * (self.num_heads + 2 * self.num_heads_kv)

    @classmethod
    def resolve(cls, cfg: dict[str, Any], d_model: int) -> "AttnSettings":
        """attn_cfg → AttnSettings; ValueError / TypeError naming attn_cfg's key for anything off."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"MambaConfig.attn_cfg has keys the official MHA does not take: {unknown}; keys: "
                             f"{sorted(known)}")
        if "num_heads" not in cfg:
            raise ValueError("MambaConfig.attn_cfg must give num_heads (the official MHA has no default)")
        v = dict(cfg)

        def integer(name: str, lo: int) -> int:
            x = v[name]
            if isinstance(x, bool) or not isinstance(x, int) or x < lo:
                raise ValueError(f"MambaConfig.attn_cfg.{name} must be an int >= {lo}, got {x!r}")
            return x

        def flag(name: str) -> bool:
            if not isinstance(v[name], bool):
                raise TypeError(f"MambaConfig.attn_cfg.{name} must be a bool, got {v[name]!r}")
            return v[name]

        h = integer("num_heads", 1)
        v.setdefault("num_heads_kv", None)
        v["num_heads_kv"] = h if v["num_heads_kv"] is None else integer("num_heads_kv", 1)
        if h % v["num_heads_kv"]:
            raise ValueError(f"MambaConfig.attn_cfg.num_heads_kv ({v['num_heads_kv']}) must divide num_heads ({h})")
        if v.get("head_dim") is None:
            if d_model % h:
                raise ValueError(f"MambaConfig.attn_cfg: without head_dim, num_heads ({h}) must divide d_model "
                                 f"({d_model})")
            v["head_dim"] = d_model // h
        integer("head_dim", 1)
        for name, lo in (("mlp_dim", 0), ("d_conv", 0), ("rotary_emb_dim", 0)):
            if name in v:
                integer(name, lo)
        v["mlp_dim"] = -(-v.get("mlp_dim", 0) // 256) * 256
        for name in ("qkv_proj_bias", "out_proj_bias", "causal", "rotary_emb_interleaved"):
            if name in v:
                flag(name)
        if not v.get("causal", False):
            raise ValueError("MambaConfig.attn_cfg.causal must be true: a language model's attention is causal (the "
                             "official MHA defaults to false, so a hybrid's config sets it)")
        rd = v.get("rotary_emb_dim", 0)
        if rd % 2 or rd > v["head_dim"]:
            raise ValueError(f"MambaConfig.attn_cfg.rotary_emb_dim ({rd}) must be even and <= head_dim "
                             f"({v['head_dim']})")
        for name in ("softmax_scale", "rotary_emb_base"):
            x = v.get(name)
            if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x)
                                  or x <= 0):
                raise ValueError(f"MambaConfig.attn_cfg.{name} must be a positive number, got {x!r}")
            if x is not None:
                v[name] = float(x)
        if v.get("rotary_emb_base") is None:
            v.pop("rotary_emb_base", None)
        return cls(**v)


def _check_int(cfg: MambaConfig, name: str, minimum: int) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"MambaConfig.{name} must be an int, got {v!r} ({type(v).__name__})")
    if v < minimum:
        raise ValueError(f"MambaConfig.{name} must be >= {minimum}, got {v}")


def _pair(cfg: MambaConfig, name: str) -> tuple[float, float]:
    """A (lo, hi) pair of numbers (a JSON list too) as a tuple of floats; NaN refused (inf allowed)."""
    v = getattr(cfg, name)
    ok = isinstance(v, (tuple, list)) and len(v) == 2 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and x == x for x in v)
    if not ok:
        raise TypeError(f"MambaConfig.{name} must be a pair of numbers (lo, hi), got {v!r}")
    return float(v[0]), float(v[1])


def _check_float(cfg: MambaConfig, name: str, positive: bool) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise TypeError(f"MambaConfig.{name} must be a finite number, got {v!r}")
    if (v <= 0) if positive else (v < 0):
        raise ValueError(f"MambaConfig.{name} must be {'> 0' if positive else '>= 0'}, got {v}")
    setattr(cfg, name, float(v))


# The released checkpoints (state-spaces/mamba-*, GPT-NeoX tokenizer of 50277 tokens, padded to 50280; the
# state-spaces/mamba2-* configs pad to a multiple of 16, 50288, and set only ssm_cfg.layer, so every other
# mixer field is the official default) and small byte-level sizes for experiments and tests (vocab 258:
# mambakit.tokenizer.ByteTokenizer's 256 bytes + eos + pad; Mamba-2 head sizes chosen for >= 4 heads).
PRESETS: dict[str, dict[str, Any]] = {
    "130m": dict(d_model=768, n_layer=24, vocab_size=50277),
    "370m": dict(d_model=1024, n_layer=48, vocab_size=50277),
    "790m": dict(d_model=1536, n_layer=48, vocab_size=50277),
    "1.4b": dict(d_model=2048, n_layer=48, vocab_size=50277),
    "2.8b": dict(d_model=2560, n_layer=64, vocab_size=50277),
    "tiny": dict(d_model=64, n_layer=2, vocab_size=258),
    "mini": dict(d_model=128, n_layer=4, vocab_size=258),
    "small": dict(d_model=256, n_layer=8, vocab_size=258),
    "mamba2-130m": dict(layer="Mamba2", d_model=768, n_layer=24, vocab_size=50277, pad_vocab_size_multiple=16),
    "mamba2-370m": dict(layer="Mamba2", d_model=1024, n_layer=48, vocab_size=50277, pad_vocab_size_multiple=16),
    "mamba2-780m": dict(layer="Mamba2", d_model=1536, n_layer=48, vocab_size=50277, pad_vocab_size_multiple=16),
    "mamba2-1.3b": dict(layer="Mamba2", d_model=2048, n_layer=48, vocab_size=50277, pad_vocab_size_multiple=16),
    "mamba2-2.7b": dict(layer="Mamba2", d_model=2560, n_layer=64, vocab_size=50277, pad_vocab_size_multiple=16),
    # state-spaces/mamba2attn-2.7b (the Mamba-2 paper's hybrid: 58 Mamba-2 layers, 6 attention layers; config as
    # its released config.json gives it)
    "mamba2attn-2.7b": dict(layer="Mamba2", d_model=2560, n_layer=64, vocab_size=50277, pad_vocab_size_multiple=16,
                            attn_layer_idx=[9, 18, 27, 36, 45, 56],
                            attn_cfg=dict(causal=True, d_conv=4, head_dim=128, num_heads=30, out_proj_bias=False,
                                          qkv_proj_bias=False, rotary_emb_dim=64)),
    # a small byte-level hybrid for experiments and tests: attention at layers 1 and 3 of 4, MLPs of width 128
    "mamba2attn-tiny": dict(layer="Mamba2", d_model=64, n_layer=4, vocab_size=258, headdim=32, d_intermediate=128,
                            attn_layer_idx=[1, 3], attn_cfg=dict(num_heads=4, causal=True, d_conv=4,
                                                                 rotary_emb_dim=16)),
    # tiiuae/falcon-mamba-7b (its config.json: hidden 4096, intermediate 8192, 64 layers, vocab 65024, untied;
    # its "expand": 16 contradicts intermediate_size and is overridden by it, as transformers does)
    "falcon-mamba-7b": dict(d_model=4096, n_layer=64, vocab_size=65024, mixer_rms_eps=1e-6, tie_embeddings=False),
    "falcon-mamba-tiny": dict(d_model=64, n_layer=2, vocab_size=258, mixer_rms_eps=1e-6),
    "mamba2-tiny": dict(layer="Mamba2", d_model=64, n_layer=2, vocab_size=258, headdim=32),
    "mamba2-mini": dict(layer="Mamba2", d_model=128, n_layer=4, vocab_size=258, headdim=64),
    "mamba2-small": dict(layer="Mamba2", d_model=256, n_layer=8, vocab_size=258, headdim=64),
}
