"""MambaConfig: every size and init constant of a Mamba language model in one typed dataclass.

Field names follow the official package (state-spaces/mamba: `MambaConfig` plus the `Mamba` mixer kwargs of
`ssm_cfg`, flattened), so an official config.json maps onto it one to one. Derived sizes (d_inner, the
resolved dt_rank, the padded vocabulary) are computed in __post_init__; every field is validated there and a
bad value raises a ValueError / TypeError that names the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class MambaConfig:
    # ---- sizes (paper Section 3.4: D = d_model, E = expand, N = d_state)
    d_model: int
    n_layer: int
    vocab_size: int  # the tokenizer's size; the embedding is padded up to padded_vocab_size
    d_state: int = 16
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
    # ---- derived in __post_init__
    d_inner: int = field(init=False)
    padded_vocab_size: int = field(init=False)

    def __post_init__(self) -> None:
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
        """The init fields (derived sizes left out), JSON-serialisable; from_dict(to_dict()) == self."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}


def _check_int(cfg: MambaConfig, name: str, minimum: int) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"MambaConfig.{name} must be an int, got {v!r} ({type(v).__name__})")
    if v < minimum:
        raise ValueError(f"MambaConfig.{name} must be >= {minimum}, got {v}")


def _check_float(cfg: MambaConfig, name: str, positive: bool) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise TypeError(f"MambaConfig.{name} must be a finite number, got {v!r}")
    if (v <= 0) if positive else (v < 0):
        raise ValueError(f"MambaConfig.{name} must be {'> 0' if positive else '>= 0'}, got {v}")
    setattr(cfg, name, float(v))


# The released checkpoints (state-spaces/mamba-*, GPT-NeoX tokenizer of 50277 tokens, padded to 50280) and
# small byte-level sizes for experiments and tests (vocab 258: mambakit.tokenizer.ByteTokenizer's 256 bytes + eos + pad).
PRESETS: dict[str, dict[str, Any]] = {
    "130m": dict(d_model=768, n_layer=24, vocab_size=50277),
    "370m": dict(d_model=1024, n_layer=48, vocab_size=50277),
    "790m": dict(d_model=1536, n_layer=48, vocab_size=50277),
    "1.4b": dict(d_model=2048, n_layer=48, vocab_size=50277),
    "2.8b": dict(d_model=2560, n_layer=64, vocab_size=50277),
    "tiny": dict(d_model=64, n_layer=2, vocab_size=258),
    "mini": dict(d_model=128, n_layer=4, vocab_size=258),
    "small": dict(d_model=256, n_layer=8, vocab_size=258),
}
