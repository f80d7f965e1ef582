"""MambaConfig: every size and init constant of a Mamba language model in one typed dataclass.

Field names follow the official package (state-spaces/mamba: `MambaConfig` plus the mixer kwargs of
`ssm_cfg`, flattened), so an official config.json maps onto it one to one. `layer` picks the mixer as the
official `ssm_cfg["layer"]` does: "Mamba" (Mamba-1, the paper's selective SSM) or "Mamba2" (SSD, Dao & Gu 2024);
each mixer reads its own fields (listed below) and a field of the other mixer left at its default is ignored.
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
        self._check_mamba2_fields()

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
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}


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
    "mamba2-tiny": dict(layer="Mamba2", d_model=64, n_layer=2, vocab_size=258, headdim=32),
    "mamba2-mini": dict(layer="Mamba2", d_model=128, n_layer=4, vocab_size=258, headdim=64),
    "mamba2-small": dict(layer="Mamba2", d_model=256, n_layer=8, vocab_size=258, headdim=64),
}
