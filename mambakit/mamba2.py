"""The Mamba-2 mixer (Dao & Gu, 2024, "Transformers are SSMs", Section 7 / Figure 6), parameter for parameter the
official `Mamba2` (state-spaces/mamba modules/mamba2.py) and transformers' `Mamba2Mixer`.

Glossary (besides model.py's b, l, D, E·D, N, W):
    S   d_ssm, the channels through the SSM (= E·D unless given; the other E·D − S form a gated MLP branch)
    h   nheads = S / P          p   headdim P (channels per head)
    g   ngroups G (heads sharing B and C: head i reads group i // (h / g))

Stage by stage: [z, x, B, C, dt] = in_proj(u); (x, B, C) = SiLU(conv1d(x, B, C)) (B and C go through the conv
too, unlike Mamba-1); Δ = softplus(dt + dt_bias) per head; y = SSD(x, Δ, A, B, C) + D·x with one scalar A per head;
out = out_proj(RMSNorm_grouped(y · SiLU(z))). The scan and the conv are the ops of `mambakit.ops`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .config import MambaConfig

_HALF = (torch.float16, torch.bfloat16)


class GatedRMSNorm(nn.Module):
    """RMSNorm of y gated by SiLU(z), per contiguous group of `group_size` channels (official RMSNormGated):
    norm_before_gate False: RMSNorm(y·silu(z))·w; True: RMSNorm(y)·w·silu(z). Computed in float32 (float64 for
    float64 inputs) and returned in y's dtype. The group size is S / G, so that each group's normalisation sees only its own heads."""

    def __init__(self, d: int, group_size: int, eps: float = 1e-5, norm_before_gate: bool = False):
        super().__init__()
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        acc = torch.promote_types(y.dtype, torch.float32)  # float32, or float64 for a float64 model
        y32, gate = y.to(acc), F.silu(z.to(acc))
        if not self.norm_before_gate:
            y32 = y32 * gate
        grouped = y32.unflatten(-1, (-1, self.group_size))  # (…, G, S / G)
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        out = grouped.flatten(-2) * self.weight.to(acc)  # (…, S)
        if self.norm_before_gate:
            out = out * gate
        return out.to(y.dtype)


class Mamba2(nn.Module):
    """The Mamba-2 block: a gated SSD branch. Same calling convention as model.Mamba:
    forward(u (b, l, D), conv_state, ssm_state, return_state) and step(u (b, D), conv_state, ssm_state).

    States: conv (b, S + 2·G·N, W − 1), the last W − 1 inputs of the conv over [x | B | C]; ssm (b, h, p, N) float32.
    """

    def __init__(self, config: MambaConfig):
        super().__init__()
        c = config
        if c.layer != "Mamba2":
            raise ValueError(f"Mamba2 needs a config with layer='Mamba2', got layer={c.layer!r}")
        self.config = c
        E, S, H, G, N = c.d_inner, c.d_ssm, c.nheads, c.ngroups, c.d_state
        self.d_mlp = E - S  # channels of the gated MLP branch (0 in every released model)
        self.conv_dim = S + 2 * G * N  # the conv runs over [x | B | C]
        # in_proj's output, in the official order: [z0 | x0 (the MLP branch) | z | x | B | C | dt]
        self.in_proj = nn.Linear(c.d_model, 2 * E + 2 * G * N + H, bias=c.bias)
        # Depthwise conv; only its (conv_dim, 1, W) weight is used (by ops.causal_conv1d), never this module's forward.
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, c.d_conv, groups=self.conv_dim, padding=c.d_conv - 1,
                                bias=c.conv_bias)
        # dt_bias, A_log and D are kept in float32 whatever the model's dtype (see _apply): exp(Δ·A) is too
        # sensitive for half precision (official README, "Precision").
        self.dt_bias = nn.Parameter(torch.empty(H, dtype=torch.float32))
        self.A_log = nn.Parameter(torch.empty(H, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(S if c.D_has_hdim else H, dtype=torch.float32))
        if c.rmsnorm:
            self.norm = GatedRMSNorm(S, S // G, c.norm_eps, c.norm_before_gate)
        self.out_proj = nn.Linear(E, c.d_model, bias=c.bias)
        self.mark_parameters()
        self.reset_ssm_parameters()

    def mark_parameters(self) -> None:
        """The official flags: no weight decay on dt_bias, A_log and D (read by the trainer)."""
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """The official Mamba2 init: Δ = softplus(dt_bias) log-uniform in [dt_min, dt_max] (floored at dt_init_floor),
        A_h ~ U(A_init_range), D = 1, and the conv weight U(±conv_init) when conv_init is set."""
        c = self.config
        dev = self.A_log.device
        H = c.nheads
        log_dt = torch.rand(H, device=dev) * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min)
        dt = torch.exp(log_dt).clamp(min=c.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)
        lo, hi = c.A_init_range
        self.A_log.copy_(torch.log(torch.empty(H, device=dev).uniform_(lo, hi)))
        self.D.fill_(1.0)
        if c.conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -c.conv_init, c.conv_init)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16/float16) must leave dt_bias, A_log and D in float32 (as model.Mamba does for A_log, D)
        keep = {"dt_bias": self.dt_bias.data, "A_log": self.A_log.data, "D": self.D.data}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            p = getattr(self, name)
            if p.dtype in _HALF:
                p.data = old.to(device=p.device, dtype=torch.float32)
        return self

    def _split(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """in_proj's output (…, 2E + 2GN + h) → z0, x0 (…, E − S), z (…, S), xBC (…, S + 2GN), dt (…, h)."""
        c = self.config
        return torch.split(zxbcdt, [self.d_mlp, self.d_mlp, c.d_ssm, self.conv_dim, c.nheads], dim=-1)

    def _ssm_args(self) -> dict:
        # dt_bias, A_log and D are float32 in every model but a float64 one (see _apply), where they stay float64
        c = self.config
        return dict(D=self.D.view(c.nheads, c.headdim) if c.D_has_hdim else self.D, dt_bias=self.dt_bias,
                    dt_softplus=True, dt_limit=c.dt_limit)

    def _output(self, y: Tensor, z: Tensor, z0: Tensor, x0: Tensor) -> Tensor:
        """y (…, S) → out_proj(gated norm of y, after the MLP branch's silu(z0)·x0 when d_mlp > 0) (…, D)."""
        if self.config.rmsnorm:
            y = self.norm(y, z)
        if self.d_mlp:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)  # (…, E): the MLP part first, as in_proj orders it
        return self.out_proj(y)

    def forward(
        self, u: Tensor, conv_state: Tensor | None = None, ssm_state: Tensor | None = None, return_state: bool = False
    ):
        """u (b, l, D) → out (b, l, D); with return_state also the conv state (b, S + 2GN, W − 1) and the SSM state
        (b, h, p, N) float32 after the last token (conv_state / ssm_state: those before the first one)."""
        c = self.config
        b, l, _ = u.shape
        H, P, G, N = c.nheads, c.headdim, c.ngroups, c.d_state
        # 1. input projection, split in the official order
        z0, x0, z, xBC, dt = self._split(self.in_proj(u))  # xBC: (b, l, S + 2GN); dt: (b, l, h)
        # The ops accumulate in float32 themselves; autocast must not push their internals to bf16.
        with torch.autocast(u.device.type, enabled=False):
            # 2. causal depthwise conv + SiLU over x, B and C together
            xBC, conv_state = ops.causal_conv1d(xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias, conv_state,
                                                return_final_state=True, activation="silu")
            x, B, C = torch.split(xBC, [c.d_ssm, G * N, G * N], dim=-1)
            # 3. SSD: heads of P channels, groups of N-dim B and C; the gate goes to the norm (or to the op)
            y, ssm_state = ops.ssd(
                x.reshape(b, l, H, P), dt, -torch.exp(self.A_log), B.reshape(b, l, G, N),
                C.reshape(b, l, G, N), c.chunk_size, z=None if c.rmsnorm else z.reshape(b, l, H, P),
                initial_states=ssm_state, return_final_states=True, **self._ssm_args())  # y: (b, l, h, p)
        # 4. gated norm and output projection
        out = self._output(y.reshape(b, l, c.d_ssm), z, z0, x0)
        return (out, conv_state, ssm_state) if return_state else out

    @torch.no_grad()
    def step(self, u: Tensor, conv_state: Tensor, ssm_state: Tensor) -> Tensor:
        """One decoding step: u (b, D) → (b, D); conv_state (b, S + 2GN, W − 1) and ssm_state (b, h, p, N) are
        updated IN PLACE. Δ is clamped to dt_limit as in forward (the official and transformers steps skip the
        clamp; with the default (0, inf) there is nothing to clamp), so stepping equals the chunked forward."""
        c = self.config
        b = u.shape[0]
        H, P, G, N = c.nheads, c.headdim, c.ngroups, c.d_state
        z0, x0, z, xBC, dt = self._split(self.in_proj(u))  # xBC: (b, S + 2GN); dt: (b, h)
        # the ops run in float32 internally and turn autocast off themselves
        xBC = ops.causal_conv1d_update(conv_state, xBC, self.conv1d.weight[:, 0], self.conv1d.bias, "silu")
        x, B, C = torch.split(xBC, [c.d_ssm, G * N, G * N], dim=-1)
        y = ops.ssd_state_update(ssm_state, x.reshape(b, H, P), dt, -torch.exp(self.A_log),
                                 B.reshape(b, G, N), C.reshape(b, G, N), z=None if c.rmsnorm else z.reshape(b, H, P),
                                 **self._ssm_args())  # (b, h, p)
        return self._output(y.reshape(b, c.d_ssm), z, z0, x0)
