"""A Transformer language model: the attention baseline of the paper's comparisons.

The paper compares Mamba against two Transformer recipes (Section 4.2): the GPT-3 architecture (learned
absolute positions, GELU MLP, LayerNorm) and "Transformer++" (rotary positions, SwiGLU MLP, RMSNorm, no
biases, the LLaMA/PaLM recipe). Both are one `TransformerConfig` here (`positions`, `mlp`, `norm`). Sizes
match the Mamba presets in parameters: a Transformer layer (attention 4D² + MLP 8D²) costs about as much as
two Mamba blocks (≈ 6D² each), so "125m" is 12 × 768 against Mamba-130m's 24 × 768 (paper Table 12).

Glossary (paper letters → names here):
    b   batch size          l   sequence length (new tokens in this call)
    D   d_model             H   n_head            d_h  head_dim = D / H
    F   d_ff (MLP width)    V   padded_vocab_size  T   positions in the KV cache (filled + new)

Pieces, smallest first: rotary tables → CausalSelfAttention → MLP → Block → TransformerLM, with a
preallocated `KVCache` for decoding (the attention analogue of `MambaState`: it grows with the sequence,
which is what the throughput and length-scaling experiments measure).

Conventions shared with `mambakit.MambaLM`: logits cover the padded vocabulary, `labels` give next-token
targets (logits[:, :-1] predict labels[:, 1:], −100 ignored), `num_last_tokens` keeps the last positions'
logits, `step(ids, cache)` decodes one token for a batch and updates the cache in place.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..model import LayerNorm, RMSNorm, check_lm_inputs, next_token_cross_entropy


# ------------------------------------------------------------------------------------------------ config
@dataclass
class TransformerConfig:
    d_model: int
    n_layer: int
    n_head: int
    vocab_size: int
    max_seq_len: int = 2048  # the training length; absolute positions cannot go past it, rotary ones can
    positions: str = "rotary"  # "rotary" (RoPE, Transformer++) or "absolute" (learned, GPT-3)
    mlp: str = "swiglu"  # "swiglu" (Transformer++), "gelu" (GPT-3) or "none" (attention only)
    d_ff: int | None = None  # None: 4·D for GELU, 8/3·D rounded up to a multiple of 64 for SwiGLU (same params)
    norm: str = "rmsnorm"  # "rmsnorm" or "layernorm"
    norm_eps: float = 1e-5
    bias: bool = False  # biases of the linear layers (GPT-3 has them, Transformer++ not)
    dropout: float = 0.0  # on attention weights and on each residual branch (training only)
    rotary_base: float = 10000.0
    tie_embeddings: bool = True
    pad_vocab_size_multiple: int = 8
    initializer_range: float = 0.02  # GPT-2: every weight ~ N(0, 0.02), residual projections / sqrt(2·n_layer)
    # ---- derived in __post_init__
    head_dim: int = field(init=False)
    padded_vocab_size: int = field(init=False)

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layer", "n_head", "vocab_size", "max_seq_len", "pad_vocab_size_multiple"):
            _check_int(self, name, 1)
        if self.d_ff is not None and self.mlp != "none":
            _check_int(self, "d_ff", 1)
        if self.positions not in ("rotary", "absolute"):
            raise ValueError(f"TransformerConfig.positions must be 'rotary' or 'absolute', got {self.positions!r}")
        if self.mlp not in ("swiglu", "gelu", "none"):
            raise ValueError(f"TransformerConfig.mlp must be 'swiglu', 'gelu' or 'none', got {self.mlp!r}")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"TransformerConfig.norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}")
        for name in ("bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"TransformerConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("norm_eps", "rotary_base", "initializer_range"):
            _check_float(self, name)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"TransformerConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if self.d_model % self.n_head:
            raise ValueError(f"TransformerConfig.d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        self.head_dim = self.d_model // self.n_head
        if self.positions == "rotary" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got d_model/n_head = {self.head_dim}")
        if self.mlp == "none" and self.d_ff not in (None, 0):
            raise ValueError(f"TransformerConfig.d_ff must be None or 0 with mlp='none' (no MLP), got {self.d_ff!r}")
        if self.mlp == "none":  # attention-only blocks (the paper's 2-layer MHA baselines of Table 2: 137K
            self.d_ff = 0      # parameters at D = 128 are 2 × 4D² of attention and the embeddings, no MLP)
        elif self.d_ff is None:
            # SwiGLU has three matrices instead of two: width 8/3·D keeps the MLP at 8D² parameters
            self.d_ff = 4 * self.d_model if self.mlp == "gelu" else -(-8 * self.d_model // 3 // 64) * 64
        m = self.pad_vocab_size_multiple
        self.padded_vocab_size = -(-self.vocab_size // m) * m

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "TransformerConfig":
        """A named size (see PRESETS) with any field overridden: `from_preset("125m", positions="absolute")`."""
        if name not in PRESETS:
            raise ValueError(f"unknown Transformer preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TransformerConfig":
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TransformerConfig field(s) {unknown}; fields: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}


def _check_int(cfg, name: str, minimum: int) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"TransformerConfig.{name} must be an int, got {v!r} ({type(v).__name__})")
    if v < minimum:
        raise ValueError(f"TransformerConfig.{name} must be >= {minimum}, got {v}")


def _check_float(cfg, name: str) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"TransformerConfig.{name} must be a finite number > 0, got {v!r}")
    setattr(cfg, name, float(v))


# Same parameter budgets as the Mamba presets (paper Table 12: the GPT-3 sizes, n_layer halved against
# Mamba's). Released sizes use the GPT-NeoX vocabulary; the small ones are byte-level (256) like Mamba's.
PRESETS: dict[str, dict[str, Any]] = {
    "125m": dict(d_model=768, n_layer=12, n_head=12, vocab_size=50277),  # vs Mamba 130m (24 × 768)
    "350m": dict(d_model=1024, n_layer=24, n_head=16, vocab_size=50277),  # vs Mamba 370m (48 × 1024)
    "760m": dict(d_model=1536, n_layer=24, n_head=16, vocab_size=50277),  # vs Mamba 790m (48 × 1536)
    "1.3b": dict(d_model=2048, n_layer=24, n_head=32, vocab_size=50277),  # vs Mamba 1.4b (48 × 2048)
    "tiny": dict(d_model=64, n_layer=1, n_head=2, vocab_size=256),  # vs Mamba tiny (2 × 64)
    "mini": dict(d_model=128, n_layer=2, n_head=4, vocab_size=256),  # vs Mamba mini (4 × 128)
    "small": dict(d_model=256, n_layer=4, n_head=8, vocab_size=256),  # vs Mamba small (8 × 256)
}


# ------------------------------------------------------------------------------------------------ cache
@dataclass
class KVCache:
    """Keys and values of every layer for the positions seen so far, preallocated to `capacity` positions.

    k, v: (n_layer, b, H, capacity, d_h) in the model's dtype; positions [0, length) are filled. Calls with
    a cache write their new positions in place and advance `length` (so a decoder never re-allocates)."""

    k: Tensor
    v: Tensor
    length: int = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


@dataclass
class TransformerOutput:
    logits: Tensor  # (b, l, V), or (b, num_last_tokens, V)
    loss: Optional[Tensor] = None  # mean next-token cross-entropy, float32
    cache: Optional[KVCache] = None


# ------------------------------------------------------------------------------------------- rotary
def rotary_tables(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos, sin (l, d_h) in float32 for integer positions (l,): RoPE (Su et al. 2021), "rotate half" layout,
    frequency base^(−2i/d_h) for pair i. Computed from the positions, so any length works (extrapolation)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (l, d_h / 2)
    angles = torch.cat([angles, angles], dim=-1)  # (l, d_h): pair i is (i, i + d_h/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (b, H, l, d_h) rotated by the position angles; in float32, returned in x's dtype."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


# -------------------------------------------------------------------------------------------- layers
class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through `F.scaled_dot_product_attention` (fused kernels when
    available), reading and writing a KV cache when one is given."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        c = config
        self.config = c
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model, bias=c.bias)
        self.out_proj = nn.Linear(c.d_model, c.d_model, bias=c.bias)
        self.out_proj._residual = True  # scaled at init (GPT-2)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, k_cache: Tensor | None = None,
                v_cache: Tensor | None = None, start: int = 0) -> Tensor:
        """x (b, l, D) at positions [start, start + l) → (b, l, D). k_cache, v_cache (b, H, capacity, d_h):
        the new keys and values are written at [start, start + l) and attention reads [0, start + l)."""
        c = self.config
        b, l, _ = x.shape
        # 1. project and split heads: (b, l, 3D) → 3 × (b, H, l, d_h)
        q, k, v = self.qkv(x).view(b, l, 3, c.n_head, c.head_dim).permute(2, 0, 3, 1, 4)
        # 2. rotary positions rotate queries and keys (never values)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        # 3. keys and values of the whole prefix, from the cache
        end = start + l
        if k_cache is not None:
            k_cache[:, :, start:end] = k
            v_cache[:, :, start:end] = v
            k, v = k_cache[:, :, :end], v_cache[:, :, :end]  # (b, H, T, d_h), T = end
        # 4. causal attention: query i (position start + i) sees keys 0 … start + i
        p = c.dropout if self.training else 0.0
        if start == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=l > 1)
        elif l == 1:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # the newest token sees everything
        else:
            # a chunk after a prefix: is_causal would align the mask top-left, so build it bottom-right
            allowed = torch.arange(end, device=x.device)[None, :] <= torch.arange(start, end, device=x.device)[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)  # allowed: (l, T)
        # 5. merge heads (b, H, l, d_h) → (b, l, D) and project
        return self.out_proj(y.transpose(1, 2).reshape(b, l, c.d_model))


class MLP(nn.Module):
    """GELU: W2 · gelu(W1 x). SwiGLU (Shazeer 2020): W2 · (silu(W1 x) ⊙ W3 x)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        c = config
        self.gated = c.mlp == "swiglu"
        self.up = nn.Linear(c.d_model, (2 if self.gated else 1) * c.d_ff, bias=c.bias)  # W1 (and W3 stacked)
        self.down = nn.Linear(c.d_ff, c.d_model, bias=c.bias)
        self.down._residual = True

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(x)  # (b, l, F) or (b, l, 2F)
        if self.gated:
            g, h = h.chunk(2, dim=-1)
            h = F.silu(g) * h
        else:
            h = F.gelu(h)
        return self.down(h)


class Block(nn.Module):
    """Pre-norm residual block: r ← r + Attn(Norm(r)); r ← r + MLP(Norm(r)) (no MLP when config.mlp = "none")."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        norm = RMSNorm if config.norm == "rmsnorm" else LayerNorm
        self.norm1 = norm(config.d_model, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        has_mlp = config.mlp != "none"
        self.norm2 = norm(config.d_model, eps=config.norm_eps) if has_mlp else None
        self.mlp = MLP(config) if has_mlp else None
        self.drop = nn.Dropout(config.dropout)

    def forward(self, r: Tensor, rope, k_cache=None, v_cache=None, start: int = 0) -> Tensor:
        r = r + self.drop(self.attn(self.norm1(r), rope, k_cache, v_cache, start))
        return r if self.mlp is None else r + self.drop(self.mlp(self.norm2(r)))


# ------------------------------------------------------------------------------------------- the LM
class TransformerLM(nn.Module):
    """Token embedding (+ learned positions) → n_layer pre-norm blocks → final norm → lm_head (tied)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"TransformerLM needs a TransformerConfig, got {type(config).__name__}")
        c = config
        self.config = c
        self.embedding = nn.Embedding(c.padded_vocab_size, c.d_model)
        self.pos_embedding = nn.Embedding(c.max_seq_len, c.d_model) if c.positions == "absolute" else None
        self.drop = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        norm = RMSNorm if c.norm == "rmsnorm" else LayerNorm
        self.norm_f = norm(c.d_model, eps=c.norm_eps)
        self.lm_head = nn.Linear(c.d_model, c.padded_vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2's init (Radford et al. 2019, §2.3): weights and embeddings ~ N(0, 0.02), biases 0, and the
        projections that write into the residual stream scaled by 1/sqrt(2·n_layer), one factor per residual
        branch (two per block), so the stream's variance does not grow with depth."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                scale = 1 / math.sqrt(2 * self.config.n_layer) if getattr(m, "_residual", False) else 1.0
                nn.init.normal_(m.weight, std=std * scale)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, input_ids: Tensor, labels: Tensor | None = None, cache: KVCache | None = None,
                return_cache: bool = False, num_last_tokens: int = 0) -> TransformerOutput:
        """input_ids (b, l) int in [0, vocab_size); labels (b, l) as for MambaLM (targets labels[:, 1:] for
        logits[:, :-1], −100 ignored). With `cache` (from `allocate_cache` or a previous `.cache`) the ids
        continue the cached prefix: their keys and values are written into the cache IN PLACE and its length
        advances. With return_cache and no cache, a cache of capacity max(l, max_seq_len) is allocated and
        returned filled with this call's positions. num_last_tokens > 0 keeps only the last logits."""
        self._check_inputs(input_ids, labels, cache, num_last_tokens)
        if return_cache and cache is None:
            cache = self.allocate_cache(input_ids.shape[0], max(input_ids.shape[1], self.config.max_seq_len))
        h = self._backbone(input_ids, cache)  # (b, l, D)
        if num_last_tokens > 0:
            h = h[:, -num_last_tokens:]
        logits = self.lm_head(h)  # (b, l, V)
        loss = None if labels is None else next_token_cross_entropy(logits, labels)
        return TransformerOutput(logits=logits, loss=loss, cache=cache)

    def _backbone(self, input_ids: Tensor, cache: KVCache | None) -> Tensor:
        """ids (b, l) at positions [start, start + l), start = the cache's length → final-normed (b, l, D)."""
        c = self.config
        l = input_ids.shape[1]
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + l, device=input_ids.device)  # (l,)
        h = self.embedding(input_ids)  # (b, l, D)
        rope = None
        if c.positions == "absolute":
            h = h + self.pos_embedding(positions)
        else:
            rope = rotary_tables(positions, c.head_dim, c.rotary_base)
        h = self.drop(h)
        for i, layer in enumerate(self.layers):
            kc, vc = (cache.k[i], cache.v[i]) if cache is not None else (None, None)
            h = layer(h, rope, kc, vc, start)
        if cache is not None:
            cache.length = start + l
        return self.norm_f(h)

    @torch.no_grad()
    def step(self, input_ids: Tensor, cache: KVCache) -> Tensor:
        """One decoding step for a batch: input_ids (b,) → logits (b, V); the cache gains one position
        (in place). Ids are not range-checked here (a decoder produces them)."""
        if not isinstance(cache, KVCache):
            raise TypeError(f"step needs a KVCache (from allocate_cache or forward(..., return_cache=True)), "
                            f"got {type(cache).__name__}")
        if input_ids.dim() != 1 or input_ids.shape[0] != cache.batch_size:
            raise ValueError(f"step takes input_ids of shape (batch,) = ({cache.batch_size},) matching the "
                             f"cache, got {tuple(input_ids.shape)}")
        self._check_room(cache, 1)
        return self.lm_head(self._backbone(input_ids[:, None], cache))[:, 0]  # (b, V)

    def allocate_cache(self, batch_size: int, capacity: int | None = None) -> KVCache:
        """An empty cache for `capacity` positions (default max_seq_len) on the model's device and dtype.
        Its size, 2 · n_layer · b · capacity · D elements, is what attention keeps per generated sequence."""
        c = self.config
        capacity = c.max_seq_len if capacity is None else capacity
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        if c.positions == "absolute" and capacity > c.max_seq_len:
            raise ValueError(f"capacity {capacity} exceeds max_seq_len {c.max_seq_len}: absolute positions "
                             f"have no embedding past it")
        w = self.embedding.weight
        shape = (c.n_layer, batch_size, c.n_head, capacity, c.head_dim)
        return KVCache(torch.zeros(shape, device=w.device, dtype=w.dtype), torch.zeros(shape, device=w.device,
                                                                                         dtype=w.dtype))

    def num_parameters(self) -> int:
        """Unique parameters (the tied head counted once)."""
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------------------------------ checks
    def _check_room(self, cache: KVCache, l: int) -> None:
        end = cache.length + l
        if self.config.positions == "absolute" and end > self.config.max_seq_len:
            raise ValueError(f"sequence of {end} positions exceeds max_seq_len {self.config.max_seq_len}: "
                             f"absolute position embeddings end there (rotary positions can run past it)")
        if end > cache.capacity:
            raise ValueError(f"the KV cache holds {cache.capacity} positions, {cache.length} filled; {l} more do "
                             f"not fit (allocate_cache(batch_size, capacity) with a larger capacity)")

    def _check_inputs(self, input_ids, labels, cache, num_last_tokens) -> None:
        c = self.config
        check_lm_inputs(input_ids, labels, num_last_tokens, c.vocab_size, c.padded_vocab_size)
        l = input_ids.shape[1]
        if cache is None:
            if c.positions == "absolute" and l > c.max_seq_len:
                raise ValueError(f"sequence length {l} exceeds max_seq_len {c.max_seq_len}: absolute position "
                                 f"embeddings end there (rotary positions can run past it)")
            return
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache (allocate_cache or a previous .cache), got "
                            f"{type(cache).__name__}")
        want = (c.n_layer, input_ids.shape[0], c.n_head)
        if tuple(cache.k.shape[:3]) != want or cache.k.shape[4] != c.head_dim or cache.v.shape != cache.k.shape:
            raise ValueError(f"cache does not fit this model and batch: k {tuple(cache.k.shape)}, v "
                             f"{tuple(cache.v.shape)}, want (n_layer, b, H) = {want} and head_dim {c.head_dim}")
        self._check_room(cache, l)
