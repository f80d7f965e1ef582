"""S4D: the diagonal linear time-invariant (LTI) state space model (Gu, Gupta, Goel & Ré 2022, "On the
Parameterization and Initialization of Diagonal State Space Models"), the non-selective baseline of the Mamba
paper (Table 1: "S4" rows; Section 3.6).

Per channel h (H channels) and mode n (M modes), with Δ_h = exp(log_dt_h) learned per channel:

    continuous:    h'(t) = A h(t) + B x(t),   y(t) = Re(C h(t)) + D x(t)
    ZOH:           Ā = exp(ΔA),   B̄ = (exp(ΔA) − 1) / A · B                 (Mamba paper eq. 4, S4D §3)
    recurrent:     h_t = Ā h_{t−1} + B̄ x_t,   y_t = c · Re(C h_t) + D x_t
    convolution:   y = K * x + D x,   K_k = c · Re(Σ_n C_n B̄_n Ā_n^k)        (a Vandermonde product)

A, B, C do not depend on the input (that is what "LTI" means, and what Mamba's selection changes), so the
whole sequence is one long convolution: training computes K once and convolves with FFTs in O(l log l);
decoding runs the recurrence one token at a time. Both are tested equal to `s4d_recurrence_ref`.

Initialisations (S4D paper §4; Mamba paper §3.6):
    "lin"  (S4D-Lin):  N/2 complex modes, A_n = −1/2 + iπn; only one of each conjugate pair is kept, and
                       c = 2 restores the pair's sum (2·Re). Used for the "S4 (complex)" rows.
    "real" (S4D-Real): N real modes, A_n = −(n + 1) (the diagonal of HiPPO-LegS); c = 1.
B is fixed to 1 and folded into C, as in the S4D paper's minimal implementation (B·C is all the kernel
sees, so a learnable B adds no expressivity). C ~ N(0, 1) (complex normal for "lin"), log Δ ~ U(log dt_min,
log dt_max), Re(A) stored as log(−Re(A)) so that it stays negative.

The state h is (b, H, N) float32 as `MambaState` requires: for "real", the N modes; for "lin", the N/2
complex modes packed as [real parts | imaginary parts].

Two ways to use it:
    `S4DMixer`-style: `MambaS4D` (S4D-Lin) / `MambaS4DReal` (S4D-Real) are the Mamba block of Figure 3
        with S6 replaced by S4D — in_proj, conv, SiLU gate, out_proj unchanged: the "Mamba | S4" row of
        Table 1. `MambaLM(config, mixer_cls=MambaS4D)`.
    Stand-alone: `S4DLayer` (norm-free S4D → GELU → Linear, no gate: the "No gate | S4" row) and `S4DLM`
        (embedding → n_layer × (RMSNorm → S4DLayer, residual) → norm → head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..config import MambaConfig
from ..model import Mamba, RMSNorm

__all__ = [
    "S4DKernel",
    "s4d_conv",
    "s4d_recurrence_ref",
    "s4d_step",
    "MambaS4D",
    "MambaS4DReal",
    "S4DLayer",
    "S4DLM",
    "S4DOutput",
]

S4D_INITS = ("lin", "real")


# ------------------------------------------------------------------------------------- the SSM parameters
class S4DKernel(nn.Module):
    """The parameters of H independent diagonal SSMs with N state dimensions each, and their ZOH
    discretisation. `discretize()` → (ΔA, B̄, C) per (channel, mode), complex for "lin"; Ā = exp(ΔA).
    """

    def __init__(self, d: int, d_state: int, init: str = "lin", dt_min: float = 1e-3, dt_max: float = 1e-1):
        super().__init__()
        if init not in S4D_INITS:
            raise ValueError(f"S4D init must be one of {S4D_INITS}, got {init!r}")
        if init == "lin" and d_state % 2:
            raise ValueError(f"S4D-Lin keeps d_state / 2 complex modes: d_state must be even, got {d_state}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"S4D needs 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.d, self.d_state, self.init = d, d_state, init
        self.dt_min, self.dt_max = dt_min, dt_max
        self.complex = init == "lin"
        m = d_state // 2 if self.complex else d_state  # modes per channel
        self.log_dt = nn.Parameter(torch.empty(d, dtype=torch.float32))
        self.log_A_real = nn.Parameter(torch.empty(d, m, dtype=torch.float32))  # Re(A) = −exp(log_A_real)
        if self.complex:
            self.A_imag = nn.Parameter(torch.empty(d, m, dtype=torch.float32))
            self.C = nn.Parameter(torch.empty(d, m, 2, dtype=torch.float32))  # view_as_complex → (d, m)
        else:
            self.C = nn.Parameter(torch.empty(d, m, dtype=torch.float32))
        for p in self.parameters():
            p._no_weight_decay = True  # the S4 recipe: no weight decay on the SSM parameters (s4 README)
        self.reset_parameters()

    @property
    def n_modes(self) -> int:
        return self.log_A_real.shape[1]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        d, m = self.log_A_real.shape
        dev = self.log_dt.device
        log_dt = torch.rand(d, device=dev) * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min)
        self.log_dt.copy_(log_dt)
        n = torch.arange(m, dtype=torch.float32, device=dev).expand(d, m)
        if self.complex:
            self.log_A_real.fill_(math.log(0.5))  # S4D-Lin: Re(A) = −1/2
            self.A_imag.copy_(math.pi * n)  # Im(A) = πn
            self.C.normal_(0.0, math.sqrt(0.5))  # complex normal, E|C|² = 1
        else:
            self.log_A_real.copy_(torch.log(n + 1))  # S4D-Real: A = −(n + 1)
            self.C.normal_(0.0, 1.0)

    def A(self) -> Tensor:
        """(H, M): complex64 for "lin", float32 for "real"."""
        re = -torch.exp(self.log_A_real.float())
        return torch.complex(re, self.A_imag.float()) if self.complex else re

    def C_(self) -> Tensor:
        return torch.view_as_complex(self.C.float()) if self.complex else self.C.float()

    def discretize(self) -> tuple[Tensor, Tensor, Tensor]:
        """ZOH (Mamba paper eq. 4): ΔA, and B̄ = (exp(ΔA) − 1)/A (B = 1), both (H, M); and C (H, M).
        Ā = exp(ΔA) is left to the caller, which often needs its powers Ā^k = exp(kΔA) instead."""
        A = self.A()
        dtA = torch.exp(self.log_dt.float())[:, None] * A  # (H, M)
        dB = torch.expm1(dtA) / A if not self.complex else (torch.exp(dtA) - 1) / A  # no complex expm1 kernel
        return dtA, dB, self.C_()

    @property
    def scale(self) -> float:
        """c in y = c·Re(C h): 2 for the kept half of the conjugate pairs, 1 for real modes."""
        return 2.0 if self.complex else 1.0

    def kernel(self, l: int) -> Tensor:
        """K (H, l) float32: K_k = c · Re(Σ_n C_n B̄_n Ā_n^k), through the Vandermonde matrix Ā_n^k."""
        dtA, dB, C = self.discretize()
        k = torch.arange(l, device=dtA.device, dtype=torch.float32)
        vander = torch.exp(dtA[..., None] * k)  # (H, M, l): Ā^k, computed as exp(kΔA), no repeated products
        K = torch.einsum("hm,hml->hl", C * dB, vander)
        return self.scale * (K.real if self.complex else K)

    # -------------------------------------------------------------------------------- state packing
    def pack(self, h: Tensor) -> Tensor:
        """Internal state (b, H, M) (complex for "lin") → (b, H, N) float32."""
        return torch.cat([h.real, h.imag], dim=-1).float() if self.complex else h.float()

    def unpack(self, s: Tensor) -> Tensor:
        """(b, H, N) float32 → internal state (b, H, M)."""
        if self.complex:
            m = self.n_modes
            return torch.complex(s[..., :m].float(), s[..., m:].float())
        return s.float()


# -------------------------------------------------------------------------------- the two computing modes
def s4d_conv(x: Tensor, kernel: S4DKernel, D: Tensor | None = None, state: Tensor | None = None
             ) -> tuple[Tensor, Tensor]:
    """The convolution mode: x (b, l, H) → y (b, l, H) float32 and the final state (b, H, N) float32.

    y = K * x (via FFT of length 2l, so the circular convolution is a linear one) + D·x, plus the response to
    an initial (packed) state: c·Re(C Ā^{t+1} h0). The final state h_l = Ā^l h0 + Σ_k Ā^{l−1−k} B̄ x_k is
    the same Vandermonde product read backwards, so a sequence can be fed in chunks."""
    b, l, H = x.shape
    if H != kernel.d:
        raise ValueError(f"S4D input has {H} channels, the kernel has {kernel.d}: x must be (b, l, {kernel.d})")
    xf = x.float().transpose(1, 2)  # (b, H, l)
    dtA, dB, C = kernel.discretize()  # (H, M)
    t = torch.arange(l + 1, device=x.device, dtype=torch.float32)
    vander = torch.exp(dtA[..., None] * t)  # (H, M, l + 1): Ā^0 … Ā^l
    K = torch.einsum("hm,hml->hl", C * dB, vander[..., :l])  # (H, l)
    K = kernel.scale * (K.real if kernel.complex else K)
    n_fft = 2 * l
    y = torch.fft.irfft(torch.fft.rfft(xf, n=n_fft) * torch.fft.rfft(K, n=n_fft), n=n_fft)[..., :l]  # (b, H, l)
    # final state: Σ_k Ā^{l−1−k} B̄ x_k — x against the reversed Vandermonde rows
    xc = xf.to(dtA.dtype)
    h = torch.einsum("bhl,hml->bhm", xc, vander[..., :l].flip(-1)) * dB  # (b, H, M)
    if state is not None:
        h0 = kernel.unpack(state)  # (b, H, M)
        resp = torch.einsum("bhm,hml->bhl", C * h0, vander[..., 1:])  # c·Re(C Ā^{t+1} h0), t = 0..l−1
        y = y + kernel.scale * (resp.real if kernel.complex else resp)
        h = h + vander[..., l] * h0
    if D is not None:
        y = y + D.float()[:, None] * xf
    return y.transpose(1, 2), kernel.pack(h)  # (b, l, H), (b, H, N)


@torch.no_grad()
def s4d_step(x: Tensor, kernel: S4DKernel, state: Tensor, D: Tensor | None = None,
             discretized: Optional[tuple[Tensor, Tensor, Tensor]] = None) -> Tensor:
    """The recurrent mode, one token: x (b, H) → y (b, H) float32; `state` (b, H, N) float32 updated IN PLACE.
    `discretized` = kernel.discretize(), to compute it once per decoding run."""
    dtA, dB, C = discretized if discretized is not None else kernel.discretize()
    h = kernel.unpack(state)  # (b, H, M)
    xf = x.float()
    h = torch.exp(dtA) * h + dB * xf[..., None]  # h_t = Ā h_{t−1} + B̄ x_t
    y = (C * h).sum(-1)
    y = kernel.scale * (y.real if kernel.complex else y)
    if D is not None:
        y = y + D.float() * xf
    state.copy_(kernel.pack(h))
    return y


def s4d_recurrence_ref(x: Tensor, kernel: S4DKernel, D: Tensor | None = None, state: Tensor | None = None,
                       dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """The specification: the recurrence h_t = Ā h_{t−1} + B̄ x_t, y_t = c·Re(C h_t) + D x_t, one step at a
    time in `dtype` (float64 by default). Same signature and results as `s4d_conv`; for tests."""
    b, l, H = x.shape
    cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
    dtA, dB, C = (t.to(cdt if kernel.complex else dtype) for t in kernel.discretize())
    dA = torch.exp(dtA)
    h = kernel.unpack(state).to(dA.dtype) if state is not None else torch.zeros(b, H, kernel.n_modes, dtype=dA.dtype)
    xs = x.to(dtype)
    ys = []
    for t in range(l):
        h = dA * h + dB * xs[:, t, :, None]  # (b, H, M)
        y = (C * h).sum(-1)
        ys.append(kernel.scale * (y.real if kernel.complex else y))
    y = torch.stack(ys, dim=1) if l else xs.new_zeros(b, 0, H)  # (b, l, H)
    if D is not None:
        y = y + D.to(dtype) * xs
    packed = torch.cat([h.real, h.imag], -1) if kernel.complex else h
    return y, packed


# ------------------------------------------------------------------ S4D inside the Mamba block (Table 1)
class MambaS4D(Mamba):
    """The Mamba block (Figure 3) with its selective S6 replaced by the LTI S4D (S4D-Lin init): the
    "Mamba | S4" row of Table 1. in_proj, the causal conv, the SiLU(z) gate, D and out_proj are Mamba's;
    Δ, A, B, C no longer depend on the input, so x_proj / dt_proj / A_log are dropped."""

    s4d_init = "lin"

    def __init__(self, config: MambaConfig):
        super().__init__(config)
        del self.x_proj, self.dt_proj, self.A_log  # the selection mechanism: not part of an LTI SSM
        c = config
        self.s4d = S4DKernel(c.d_inner, c.d_state, self.s4d_init, dt_min=c.dt_min, dt_max=c.dt_max)

    def mark_parameters(self) -> None:
        self.D._no_weight_decay = True

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        self.D.fill_(1.0)
        if "s4d" in self._modules:  # Mamba.__init__ calls this before the kernel exists
            self.s4d.reset_parameters()

    def _apply(self, fn, recurse=True):
        # the SSM parameters stay float32 under model.to(bfloat16), as Mamba keeps A_log and D
        nn.Module._apply(self, fn, recurse)
        for p in [self.D, *self.s4d.parameters()]:
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
        return self

    def ssm(self, x: Tensor, z: Tensor, ssm_state: Tensor | None) -> tuple[Tensor, Tensor]:
        """x, z (b, l, E·D) → (S4D(x) + D·x)·SiLU(z) (b, l, E·D), final state (b, E·D, N) float32."""
        with torch.autocast(x.device.type, enabled=False):
            y, state = s4d_conv(x, self.s4d, self.D, ssm_state)
            y = y * F.silu(z.float())
        return y.to(x.dtype), state

    def ssm_step(self, x: Tensor, z: Tensor, ssm_state: Tensor) -> Tensor:
        y = s4d_step(x, self.s4d, ssm_state, self.D) * F.silu(z.float())
        return y.to(x.dtype)


class MambaS4DReal(MambaS4D):
    """`MambaS4D` with the S4D-Real init (the "S4 (real)" rows of the paper's Table 6)."""

    s4d_init = "real"


# ------------------------------------------------------------------------ S4D alone (no gate, Table 1)
class S4DLayer(nn.Module):
    """The S4D layer without a gate (the "No gate | S4" row of Table 1): u (b, l, D) → Linear(GELU(S4D(u) +
    D·u)) (b, l, D). The S4D paper's layer ends in a GLU; a GLU is a gate, so the gate-free row uses GELU
    followed by the position-wise output projection."""

    def __init__(self, d_model: int, d_state: int, init: str = "lin", dt_min: float = 1e-3, dt_max: float = 1e-1):
        super().__init__()
        self.s4d = S4DKernel(d_model, d_state, init, dt_min, dt_max)
        self.D = nn.Parameter(torch.randn(d_model))  # the skip term, N(0, 1) as in the S4D code
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, u: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """u (b, l, D), state (b, D, N) or None → (out (b, l, D), final state (b, D, N) float32)."""
        y, state = s4d_conv(u, self.s4d, self.D, state)
        return self.out_proj(F.gelu(y).to(u.dtype)), state

    @torch.no_grad()
    def step(self, u: Tensor, state: Tensor) -> Tensor:
        """u (b, D) → (b, D); state (b, D, N) updated in place."""
        y = s4d_step(u, self.s4d, state, self.D)
        return self.out_proj(F.gelu(y).to(u.dtype))


@dataclass
class S4DOutput:
    logits: Tensor  # (b, l, V)
    loss: Optional[Tensor] = None  # next-token cross-entropy (labels as in MambaLM), float32
    state: Optional[Tensor] = None  # (n_layer, b, D, N) float32


class S4DLM(nn.Module):
    """Embedding → n_layer × (RMSNorm → S4DLayer, residual) → RMSNorm → tied head: a language model whose
    only sequence mixing is the LTI S4D. Sizes come from a MambaConfig (d_model, n_layer, vocab_size,
    d_state, dt_min, dt_max), so it sits next to a MambaLM of the same config."""

    def __init__(self, config: MambaConfig, init: str = "lin"):
        super().__init__()
        c = self.config = config
        self.embedding = nn.Embedding(c.padded_vocab_size, c.d_model)
        self.norms = nn.ModuleList(RMSNorm(c.d_model, c.norm_eps) for _ in range(c.n_layer))
        self.layers = nn.ModuleList(S4DLayer(c.d_model, c.d_state, init, c.dt_min, c.dt_max) for _ in range(c.n_layer))
        self.norm_f = RMSNorm(c.d_model, c.norm_eps)
        self.lm_head = nn.Linear(c.d_model, c.padded_vocab_size, bias=False)
        self.lm_head.weight = self.embedding.weight
        nn.init.normal_(self.embedding.weight, std=c.initializer_range)

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, state: Tensor | None = None,
                return_state: bool = False) -> S4DOutput:
        """input_ids (b, l) → logits (b, l, V); labels as MambaLM (labels[:, 1:] for logits[:, :-1], −100
        ignored); `state` (n_layer, b, D, N) from a previous call continues the sequence."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size:
            raise ValueError(f"input_ids must be in [0, {self.config.vocab_size})")
        r = self.embedding(input_ids)  # (b, l, D)
        states = []
        for i, (norm, layer) in enumerate(zip(self.norms, self.layers)):
            out, s = layer(norm(r), None if state is None else state[i])
            r = r + out
            states.append(s)
        logits = self.lm_head(self.norm_f(r))  # (b, l, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return S4DOutput(logits, loss, torch.stack(states) if return_state else None)

    def allocate_state(self, batch_size: int) -> Tensor:
        c = self.config
        return torch.zeros(c.n_layer, batch_size, c.d_model, c.d_state, device=self.embedding.weight.device)

    @torch.no_grad()
    def step(self, input_ids: Tensor, state: Tensor) -> Tensor:
        """One decoding step: input_ids (b,) → logits (b, V); state (n_layer, b, D, N) updated in place."""
        r = self.embedding(input_ids)  # (b, D)
        for i, (norm, layer) in enumerate(zip(self.norms, self.layers)):
            r = r + layer.step(norm(r), state[i])
        return self.lm_head(self.norm_f(r))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
