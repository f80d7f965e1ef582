"""Causal multi-head attention, the mixer of the official hybrid's attention layers, and its KV cache.

The official MHA (mamba_ssm/modules/mha.py) as `MambaConfig.attn_layer_idx` / `attn_cfg` place it, parameter
for parameter (`mixer.in_proj`, `mixer.conv1d`, `mixer.out_proj`; the rotary frequencies are a non-persistent
buffer, not saved, as there):

    [q | k | v | m] = in_proj(u)          q: H heads, k and v: H_kv heads of hd dims, m: mlp_dim (often 0)
    [q | k | v] = conv1d([q | k | v])     depthwise causal conv of width d_conv (d_conv > 0), no activation
    q, k = rotary(q, k)                   on the first rotary_emb_dim dims, at each token's position
    c = softmax(q kᵀ · scale + causal mask) v      (GQA: query head i reads kv head i // (H / H_kv))
    out = out_proj([c | m_up · SiLU(m_gate)])

Glossary: b batch, l new tokens, T cached + new positions, D d_model, H / H_kv heads, hd head_dim, C the qkv
width hd·(H + 2·H_kv), W d_conv, L_a the number of attention layers.

Decoding state (`AttentionState`): unlike a Mamba layer's fixed state, each attention layer keeps the keys and
values of every position so far, kv (L_a, b, T_cap, 2, H_kv, hd) in the model's dtype, which grows (capacity
doubled when full): 2·H_kv·hd·bytes per token, layer and sequence. `lengths` (b,) counts each row's positions,
so rows of different lengths share one batch: a row's new token sits at its own position (its rotary angle) and
attends to its own positions only (a mask), and rows never interact. Two deliberate departures from the official
decode path: the conv state keeps the pre-conv inputs (the official prefill stores
post-conv values, so decoding after a prompt diverges when d_conv > 0), and a one-token query attends to every
cached key (the official SDPA fallback's top-left causal mask lets it see key 0 only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .config import AttnSettings, MambaConfig


# ------------------------------------------------------------------------------------------------- state
@dataclass
class AttentionState:
    """The KV caches of a model's attention layers for b rows (see the module docstring).

    kv      (L_a, b, T_cap, 2, H_kv, hd), the model's dtype: keys and values at positions < lengths[row];
    conv    (L_a, b, C, W − 1) the last W − 1 pre-conv inputs, or None (d_conv = 0);
    lengths (b,) int64: positions cached in each row (the next token's position)."""

    kv: Tensor
    conv: Tensor | None
    lengths: Tensor

    @classmethod
    def zeros(cls, config: MambaConfig, batch_size: int, device=None, dtype=torch.float32,
              capacity: int = 0) -> "AttentionState":
        a, n = config.attn, len(config.attn_layer_idx)
        kv = torch.zeros(n, batch_size, capacity, 2, a.num_heads_kv, a.head_dim, device=device, dtype=dtype)
        conv = None if a.d_conv == 0 else torch.zeros(n, batch_size, a.qkv_dim, a.d_conv - 1, device=device,
                                                      dtype=dtype)
        return cls(kv, conv, torch.zeros(batch_size, dtype=torch.long, device=device))

    @property
    def capacity(self) -> int:
        return self.kv.shape[2]

    def reserve(self, positions: int) -> None:
        """Makes room for `positions` positions a row (the capacity at least doubles, so n tokens decoded one
        at a time cost O(n) copying in all); the cached values are kept."""
        if positions <= self.capacity:
            return
        cap = max(positions, 2 * self.capacity, 16)
        kv = self.kv.new_zeros(*self.kv.shape[:2], cap, *self.kv.shape[3:])
        kv[:, :, :self.capacity] = self.kv
        self.kv = kv

    def clone(self) -> "AttentionState":
        return AttentionState(self.kv.clone(), None if self.conv is None else self.conv.clone(), self.lengths.clone())

    def rows(self, index: Tensor) -> "AttentionState":
        """A new state of the rows `index` (their positions only: capacity = their longest length)."""
        cap = int(self.lengths[index].max()) if index.numel() else 0
        return AttentionState(self.kv[:, index, :cap].clone(), None if self.conv is None else self.conv[:, index].clone(),
                              self.lengths[index].clone())

    def set_rows_(self, index: Tensor, src: "AttentionState") -> None:
        """Rows `index` of this state become src's rows (in order), growing the capacity if needed."""
        self.reserve(src.capacity)
        self.kv[:, index] = 0
        self.kv[:, index, :src.capacity] = src.kv.to(self.kv.dtype)
        if self.conv is not None:
            self.conv[:, index] = src.conv.to(self.conv.dtype)
        self.lengths[index] = src.lengths

    def nbytes(self) -> int:
        """Bytes held (the capacity, not only the positions in use)."""
        return sum(t.numel() * t.element_size() for t in (self.kv, self.conv, self.lengths) if t is not None)


def kv_bytes_per_token(config: MambaConfig, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the KV caches grow by per token of one sequence: L_a · 2 · H_kv · hd · element size."""
    if config.attn is None:
        return 0
    a = config.attn
    return len(config.attn_layer_idx) * 2 * a.num_heads_kv * a.head_dim * torch.empty(0, dtype=dtype).element_size()


# ------------------------------------------------------------------------------------------------ rotary
def apply_rotary(x: Tensor, positions: Tensor, inv_freq: Tensor, interleaved: bool) -> Tensor:
    """Rotates the first 2·len(inv_freq) dims of x (b, l, heads, hd) by angles positions (b, l) · inv_freq, in
    float32, returned in x's dtype. Pairs: (i, i + rd/2) (GPT-NeoX, the official default) or (2i, 2i + 1)."""
    rd = 2 * inv_freq.shape[0]
    angles = positions.float()[..., None] * inv_freq  # (b, l, rd/2)
    cos, sin = torch.cos(angles)[:, :, None], torch.sin(angles)[:, :, None]  # (b, l, 1, rd/2)
    xr = x[..., :rd].float()
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]  # (b, l, heads, rd/2) each
        rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    else:
        x1, x2 = xr.chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([rotated.to(x.dtype), x[..., rd:]], dim=-1)


# ------------------------------------------------------------------------------------------------- mixer
class MHA(nn.Module):
    """The official MHA mixer (causal), as `MambaConfig.attn` describes it; see the module docstring."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        a: AttnSettings = config.attn
        self.config, self.settings = config, a
        self.in_proj = nn.Linear(config.d_model, a.qkv_dim + a.mlp_dim, bias=a.qkv_proj_bias)
        if a.d_conv > 0:  # only its (C, 1, W) weight and bias are used, through ops.causal_conv1d
            self.conv1d = nn.Conv1d(a.qkv_dim, a.qkv_dim, a.d_conv, groups=a.qkv_dim, padding=a.d_conv - 1)
        self.out_proj = nn.Linear(a.num_heads * a.head_dim + a.mlp_dim // 2, config.d_model, bias=a.out_proj_bias)
        self.register_buffer("inv_freq", self._inv_freq(None), persistent=False)

    def _inv_freq(self, device) -> Tensor:
        """base^(−2i/rd), i < rd/2, in float32 (the official RotaryEmbedding's); a buffer not saved, as there."""
        a = self.settings
        rd = a.rotary_emb_dim
        return 1.0 / a.rotary_emb_base ** (torch.arange(0, rd, 2, dtype=torch.float32, device=device) / max(rd, 1))

    def init_buffers(self) -> None:
        """Recomputes the rotary frequencies on the weights' device: a model built on the meta device and given
        loaded weights (checkpoint.build_model) has no values for this unsaved buffer otherwise."""
        self.inv_freq = self._inv_freq(self.in_proj.weight.device)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) must leave the rotary frequencies in float32 (angles of long positions need them)
        keep = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = keep.to(device=self.inv_freq.device)
        return self

    def forward(self, u: Tensor, kv: Tensor | None = None, conv_state: Tensor | None = None,
                lengths: Tensor | None = None) -> Tensor:
        """u (b, l, D) → (b, l, D). Without a cache (kv None): the l tokens alone, positions 0 … l − 1. With one:
        kv (b, T_cap, 2, H_kv, hd), conv_state (b, C, W − 1) or None and lengths (b,) (positions cached a row) are
        this layer's part of an AttentionState; the l new tokens of row r take positions lengths[r] …, their keys
        and values are written into kv IN PLACE (T_cap ≥ lengths.max() + l: the caller reserves), conv_state is
        updated in place, and lengths is left to the caller (shared by every attention layer)."""
        a = self.settings
        b, l, _ = u.shape
        qkv, m = self.in_proj(u).split([a.qkv_dim, a.mlp_dim], dim=-1)  # (b, l, C), (b, l, mlp_dim)
        if a.d_conv > 0:
            weight = self.conv1d.weight[:, 0]  # (C, W)
            with torch.autocast(u.device.type, enabled=False):
                if conv_state is not None and l == 1:
                    qkv = ops.causal_conv1d_update(conv_state, qkv[:, 0], weight, self.conv1d.bias, None)[:, None]
                else:
                    qkv, final = ops.causal_conv1d(qkv, weight, self.conv1d.bias, conv_state, return_final_state=True)
                    if conv_state is not None:
                        conv_state.copy_(final)
            qkv = qkv.to(u.dtype)
        q, k, v = qkv.split([a.num_heads * a.head_dim, a.num_heads_kv * a.head_dim, a.num_heads_kv * a.head_dim], -1)
        q = q.unflatten(-1, (a.num_heads, a.head_dim))  # (b, l, H, hd)
        k, v = (t.unflatten(-1, (a.num_heads_kv, a.head_dim)) for t in (k, v))  # (b, l, H_kv, hd) each
        offset = torch.zeros(b, dtype=torch.long, device=u.device) if lengths is None else lengths
        positions = offset[:, None] + torch.arange(l, device=u.device)  # (b, l): each row's own positions
        if a.rotary_emb_dim > 0:
            q = apply_rotary(q, positions, self.inv_freq, a.rotary_emb_interleaved)
            k = apply_rotary(k, positions, self.inv_freq, a.rotary_emb_interleaved)
        if kv is None:
            ctx = _attention(q, k, v, None, a.softmax_scale)
        else:
            rows = torch.arange(b, device=u.device)[:, None]  # (b, 1)
            kv[rows, positions] = torch.stack([k, v], dim=2).to(kv.dtype)  # (b, l, 2, H_kv, hd) at each row's positions
            T = int(positions.max()) + 1
            keys, values = kv[:, :T].unbind(2)  # (b, T, H_kv, hd) each
            # query t of row r sees the row's positions ≤ its own: its cache and the new tokens up to itself
            mask = torch.arange(T, device=u.device) <= positions[:, :, None]  # (b, l, T)
            ctx = _attention(q, keys.to(q.dtype), values.to(q.dtype), mask, a.softmax_scale)
        ctx = ctx.flatten(-2)  # (b, l, H·hd)
        if a.mlp_dim > 0:
            up, gate = m.chunk(2, dim=-1)
            ctx = torch.cat([ctx, up * F.silu(gate)], dim=-1)
        return self.out_proj(ctx)


def _attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None) -> Tensor:
    """Causal softmax attention: q (b, l, H, hd), k and v (b, T, H_kv, hd) → (b, l, H, hd). mask (b, l, T)
    (True: attend), or None for the plain causal mask (T = l)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (b, heads, len, hd)
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)
