"""Causal depthwise conv1d: the reference (F.conv1d), the fused CPU kernel, and the decoding step."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def causal_conv1d_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
    activation: str | None = None,
):
    """Reference: x (b, l, d), weight (d, w), bias (d,), initial_state (b, d, w−1). y (b, l, d) in x's dtype;
    final_state (b, d, w−1) in x's dtype: the last w−1 inputs of [initial_state, x]."""
    b, l, d = x.shape
    w = weight.shape[1]
    acc = _acc_dtype(x)
    init = initial_state if initial_state is not None else x.new_zeros(b, d, w - 1)
    xp = torch.cat([init.to(acc), x.to(acc).transpose(1, 2)], dim=-1)  # (b, d, w−1+l)
    y = F.conv1d(xp, weight.to(acc).unsqueeze(1), None if bias is None else bias.to(acc), groups=d)  # (b, d, l)
    if activation in ("silu", "swish"):
        y = F.silu(y)
    y = y.transpose(1, 2).to(x.dtype)  # (b, l, d)
    if not return_final_state:
        return y
    final = xp[..., xp.shape[-1] - (w - 1) :].to(x.dtype)  # (b, d, w−1)
    return y, final


def causal_conv1d_update_ref(
    conv_state: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None
) -> Tensor:
    """One step: conv_state (b, d, w−1) holds the previous inputs and is shifted in place; x, y: (b, d)."""
    acc = _acc_dtype(x)
    window = torch.cat([conv_state.to(acc), x.to(acc).unsqueeze(-1)], dim=-1)  # (b, d, w)
    y = (window * weight.to(acc)).sum(-1)
    if bias is not None:
        y = y + bias.to(acc)
    if activation in ("silu", "swish"):
        y = F.silu(y)
    conv_state.copy_(window[..., 1:])
    return y.to(x.dtype)


# TEMPORARY until the fused kernel lands.
causal_conv1d_cpu = causal_conv1d_ref
