"""The Mamba language model (Gu & Dao, 2023, Section 3.4, Figure 3), parameter for parameter the official one.

Glossary (paper letters → names here):
    b   batch size                      l   sequence length
    D   d_model                         E·D d_inner = expand · d_model
    N   d_state                         R   dt_rank (rank of the Δ projection, Section 3.6)
    W   d_conv (kernel width of the causal depthwise conv)
    V   padded_vocab_size

Pieces, smallest first: RMSNorm → Mamba (the mixer block of Figure 3) → ResidualBlock → MambaLM.
The Mamba-2 mixer (mamba2.py) plugs into the same blocks: `config.layer` picks the mixer of every layer.
Hybrids (the official MixerModel's options): the layers in `config.attn_layer_idx` get the attention mixer
(attention.py) instead, and `config.d_intermediate > 0` adds norm2 → GatedMLP (mlp.py) after every mixer.
Parameter names and shapes are those of state-spaces/mamba (`MambaLMHeadModel`), so `state_dict()` is the
official layout. The scan and the conv are the ops of `mambakit.ops`; this file never re-implements them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .attention import MHA, AttentionState
from .config import MambaConfig
from .mamba2 import Mamba2
from .mlp import GatedMLP

_HALF = (torch.float16, torch.bfloat16)
_ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


# ------------------------------------------------------------------------------------------------ inputs
def check_lm_inputs(input_ids, labels, num_last_tokens, vocab_size: int, padded_vocab_size: int) -> None:
    """input_ids: an integer tensor (b, l), b, l ≥ 1, ids in [0, vocab_size); labels: None or integer (b, l) in
    [0, padded_vocab_size) or −100 (ignored); num_last_tokens: an int ≥ 0, and 0 when labels are given."""
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids (b, l), got {type(input_ids).__name__}")
    if input_ids.dtype not in _ID_DTYPES:
        raise TypeError(f"input_ids must hold integer token ids (e.g. torch.long), got dtype {input_ids.dtype}")
    if input_ids.dim() != 2:
        hint = " (use input_ids[None] for a single sequence)" if input_ids.dim() == 1 else ""
        raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}{hint}")
    if input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must hold at least one token per row, got shape {tuple(input_ids.shape)}")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"input_ids contains token id {bad}, outside the vocabulary [0, {vocab_size})")
    if isinstance(num_last_tokens, bool) or not isinstance(num_last_tokens, int) or num_last_tokens < 0:
        raise ValueError(f"num_last_tokens must be an int >= 0, got {num_last_tokens!r}")
    if labels is None:
        return
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError("labels must be an integer tensor of shape (batch, length), like input_ids")
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
    valid = (labels == -100) | ((labels >= 0) & (labels < padded_vocab_size))
    if not bool(valid.all()):
        raise ValueError(f"labels must be in [0, {padded_vocab_size}) or -100 (ignored)")
    if num_last_tokens > 0:
        raise ValueError("num_last_tokens > 0 keeps only some logits; it cannot be combined with labels")


def next_token_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy in float32: position t of logits (b, l, V) predicts labels[:, t + 1];
    labels of −100 are ignored."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


# ------------------------------------------------------------------------------------------------- state
@dataclass
class MambaState:
    """The recurrent state after a prefix, for every layer: enough to continue the sequence.

    Mamba:  conv (n_layer, b, E·D, W − 1): the last W − 1 conv inputs, in the model's dtype;
            ssm  (n_layer, b, E·D, N): the scan state h, in float32.
    Mamba2: conv (n_layer, b, S + 2·G·N, W − 1): the last W − 1 inputs of the conv over [x | B | C];
            ssm  (n_layer, b, h, p, N): one P×N state per head, in float32.
    Rows (dim 1) are sequences in either case: callers index and copy state.conv[:, rows], state.ssm[:, rows].
    Hybrids: conv and ssm stack the Mamba layers only (n_mamba_layers of them, in order), and `attn` holds the
    attention layers' KV caches and per-row lengths (attention.AttentionState; None for a model without
    attention layers): use `rows` / `set_rows_` to move rows of such a state.
    """

    conv: Tensor
    ssm: Tensor
    attn: Optional[AttentionState] = None

    @classmethod
    def zeros(cls, config: MambaConfig, batch_size: int, device=None, dtype=torch.float32) -> "MambaState":
        """The state before the first token (the official model starts from zeros too)."""
        conv_shape, ssm_shape = state_shapes(config, batch_size)
        conv = torch.zeros(conv_shape, device=device, dtype=dtype)
        ssm = torch.zeros(ssm_shape, device=device, dtype=torch.float32)
        attn = None if config.attn is None else AttentionState.zeros(config, batch_size, device, dtype)
        return cls(conv, ssm, attn)

    def rows(self, index: Tensor) -> "MambaState":
        """A new state holding the rows `index` (a 1-d index tensor) of this one."""
        return MambaState(self.conv[:, index].clone(), self.ssm[:, index].clone(),
                          None if self.attn is None else self.attn.rows(index))

    def set_rows_(self, index: Tensor, src: "MambaState") -> None:
        """Rows `index` of this state become the rows of src, in order (in place; KV caches grow as needed)."""
        self.conv[:, index] = src.conv.to(self.conv.dtype)
        self.ssm[:, index] = src.ssm
        if self.attn is not None:
            self.attn.set_rows_(index, src.attn)

    @property
    def batch_size(self) -> int:
        return self.ssm.shape[1]


def state_shapes(config: MambaConfig, batch_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (conv, ssm) shapes of a MambaState of `config`'s mixer for batch_size rows (a hybrid's Mamba layers)."""
    c, b, n = config, batch_size, config.n_mamba_layers
    if c.layer == "Mamba2":
        conv_dim = c.d_ssm + 2 * c.ngroups * c.d_state
        return (n, b, conv_dim, c.d_conv - 1), (n, b, c.nheads, c.headdim, c.d_state)
    return (n, b, c.d_inner, c.d_conv - 1), (n, b, c.d_inner, c.d_state)


@dataclass
class MambaOutput:
    logits: Tensor  # (b, l, V), or (b, num_last_tokens, V)
    loss: Optional[Tensor] = None  # mean next-token cross-entropy, float32
    state: Optional[MambaState] = None


# ------------------------------------------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    """x / rms(x) · weight, computed in float32 and returned in the weight's dtype (as the official kernel)."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(self.weight.dtype)


def weightless_rms_norm(x: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x²) + eps) over the last dim, computed in float32 and returned in x's dtype: FalconMamba's
    norm of Δ's low-rank input, B and C (no weight, no bias; transformers' FalconMambaWeightlessRMSNorm)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """LayerNorm in float32, returned in the weight's dtype (for configs with rms_norm=False)."""

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight.float(), self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(self.weight.dtype)


# ------------------------------------------------------------------------------------------------- mixer
class Mamba(nn.Module):
    """The Mamba block of Figure 3 (Section 3.4): a gated selective-SSM branch.

    x, z = in_proj(u); x = SiLU(conv1d(x)); (δ, B, C) = x_proj(x); Δ = softplus(dt_proj(δ) + bias);
    y = SelectiveScan(x, Δ, A, B, C) + D·x; out = out_proj(y · SiLU(z)).
    FalconMamba (config.mixer_rms_eps set): δ, B and C are each RMS-normed (no weight) first (`split_dbc`).
    """

    def __init__(self, config: MambaConfig):
        super().__init__()
        c = config
        self.config = c
        E, N, R = c.d_inner, c.d_state, c.dt_rank
        self.in_proj = nn.Linear(c.d_model, 2 * E, bias=c.bias)
        # Depthwise conv; only its (E, 1, W) weight is used (by ops.causal_conv1d), never this module's forward.
        self.conv1d = nn.Conv1d(E, E, c.d_conv, groups=E, padding=c.d_conv - 1, bias=c.conv_bias)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)  # its bias is the Δ bias, added inside the scan
        # A and D are kept in float32 whatever the model's dtype (see _apply), as the official code does.
        self.A_log = nn.Parameter(torch.empty(E, N, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(E, dtype=torch.float32))
        self.out_proj = nn.Linear(E, c.d_model, bias=c.bias)
        self.mark_parameters()
        self.reset_ssm_parameters()

    def mark_parameters(self) -> None:
        """The official flags on parameters: no weight decay on A_log and D (read by the trainer), and no
        re-init of the Δ bias by MambaLM.reset_parameters (official README, "Initialization")."""
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.dt_proj.bias._no_reinit = True

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """The SSM-specific init of Section 3.6 (official mamba_simple.py)."""
        c = self.config
        dev = self.A_log.device
        # S4D-Real: A = −(1, 2, …, N) in every channel, stored as A_log = log(1..N).
        A = torch.arange(1, c.d_state + 1, dtype=torch.float32, device=dev).expand(c.d_inner, -1)
        self.A_log.copy_(torch.log(A))
        self.D.fill_(1.0)
        std = c.dt_rank**-0.5 * c.dt_scale
        if c.dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        else:
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        # Δ = softplus(bias) log-uniform in [dt_min, dt_max]: bias = softplus⁻¹(dt) = dt + log(1 − exp(−dt)).
        log_dt = torch.rand(c.d_inner, device=dev) * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min)
        dt = torch.exp(log_dt).clamp(min=c.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16/float16) must leave A_log and D in float32: the recurrence exp(Δ·A) is too
        # sensitive for half precision (paper Section 3.6 / official README "Precision").
        keep = {"A_log": self.A_log.data, "D": self.D.data}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            p = getattr(self, name)
            if p.dtype in _HALF:
                p.data = old.to(device=p.device, dtype=torch.float32)
        return self

    def forward(
        self, u: Tensor, conv_state: Tensor | None = None, ssm_state: Tensor | None = None, return_state: bool = False
    ):
        """u: (b, l, D) → (b, l, D). conv_state (b, E·D, W−1) and ssm_state (b, E·D, N) continue a prefix;
        with return_state, returns (out, new_conv_state, new_ssm_state)."""
        l = u.shape[1]
        if l == 1 and conv_state is not None and ssm_state is not None and not torch.is_grad_enabled():
            # decoding one token: the single-step ops, on copies (this call leaves the given state as is)
            conv_state, ssm_state = conv_state.clone(), ssm_state.clone()
            out = self.step(u[:, 0], conv_state, ssm_state)[:, None]
            return (out, conv_state, ssm_state) if return_state else out
        # 1. input projection, split into the SSM branch x and the gate z
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (b, l, E·D) each
        weight = self.conv1d.weight.squeeze(1)  # (E·D, W)
        # The ops accumulate in float32 themselves; autocast must not push their internals to bf16.
        with torch.autocast(u.device.type, enabled=False):
            # 2. causal depthwise conv + SiLU (the "Conv" and "σ" of Figure 3)
            x, conv_state = ops.causal_conv1d(
                x, weight, self.conv1d.bias, conv_state, return_final_state=True, activation="silu"
            )
        # 3.–4. the SSM with D skip and SiLU(z) gate
        y, ssm_state = self.ssm(x, z, ssm_state)  # y: (b, l, E·D); ssm_state: (b, E·D, N) float32
        # 5. output projection
        out = self.out_proj(y)
        return (out, conv_state, ssm_state) if return_state else out

    def ssm(self, x: Tensor, z: Tensor, ssm_state: Tensor | None) -> tuple[Tensor, Tensor]:
        """The SSM of the block: x, z (b, l, E·D) → y = (SSM(x) + D·x)·SiLU(z) (b, l, E·D) and the final
        state (b, E·D, N) float32. A subclass replaces this (and `ssm_step`) to put another SSM in the same
        block, e.g. the LTI S4D of the paper's Table 1 ("Mamba block with S4")."""
        # 3. the selection mechanism (Section 3.2, Algorithm 2): Δ, B, C are functions of the input
        dt, B, C = self.split_dbc(self.x_proj(x))  # (b, l, R), (b, l, N), (b, l, N)
        delta = F.linear(dt, self.dt_proj.weight)  # (b, l, E·D); the bias goes to the scan as delta_bias
        A = -torch.exp(self.A_log.float())  # (E·D, N)
        with torch.autocast(x.device.type, enabled=False):
            # 4. selective scan with D skip and the SiLU(z) gate, fused in the op
            scan_args = dict(D=self.D.float(), delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
            return ops.selective_scan(
                x, delta, A, B, C, z=z, initial_state=ssm_state, return_final_state=True, **scan_args
            )

    def split_dbc(self, dbc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x_proj's output (…, R + 2N) → Δ's low-rank input (…, R), B (…, N), C (…, N); with
        config.mixer_rms_eps (FalconMamba) each of the three divided by its RMS, before dt_proj."""
        c = self.config
        dt, B, C = torch.split(dbc, [c.dt_rank, c.d_state, c.d_state], dim=-1)
        if c.mixer_rms_eps is not None:
            eps = c.mixer_rms_eps
            dt = weightless_rms_norm(dt, eps)
            # B and C (the last 2N columns) normed in one call, each over its own N
            BC = weightless_rms_norm(dbc[..., c.dt_rank:].unflatten(-1, (2, c.d_state)), eps)  # (…, 2, N)
            B, C = BC.unbind(-2)
        return dt, B, C

    @torch.no_grad()
    def step(self, u: Tensor, conv_state: Tensor, ssm_state: Tensor) -> Tensor:
        """One decoding step (the recurrent mode of Section 3.3): u (b, D) → (b, D).

        conv_state (b, E·D, W−1) and ssm_state (b, E·D, N) are updated IN PLACE, so a decoder allocates its
        state once; the stages are those of forward, with the single-step ops."""
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (b, E·D) each
        # the ops run in float32 internally and turn autocast off themselves
        x = ops.causal_conv1d_update(conv_state, x, self.conv1d.weight[:, 0], self.conv1d.bias, "silu")
        y = self.ssm_step(x, z, ssm_state)  # (b, E·D)
        return self.out_proj(y)

    def ssm_step(self, x: Tensor, z: Tensor, ssm_state: Tensor) -> Tensor:
        """`ssm` for one token: x, z (b, E·D) → y (b, E·D); ssm_state (b, E·D, N) updated in place."""
        dt, B, C = self.split_dbc(self.x_proj(x))  # (b, R), (b, N), (b, N)
        delta = F.linear(dt, self.dt_proj.weight)  # (b, E·D); the bias goes to the update as delta_bias
        A = -torch.exp(self.A_log.float())  # (E·D, N)
        return ops.selective_state_update(ssm_state, x, delta, A, B, C, D=self.D.float(), z=z,
                                          delta_bias=self.dt_proj.bias.float(), delta_softplus=True)


# ---------------------------------------------------------------------------------------- residual block
def mixer_class(config: MambaConfig, mixer_cls: type[nn.Module] | None = None) -> type[nn.Module]:
    """The mixer of every layer: config.layer's (Mamba or Mamba2), or mixer_cls, which must subclass it."""
    default = Mamba2 if config.layer == "Mamba2" else Mamba
    if mixer_cls is None:
        return default
    if not (isinstance(mixer_cls, type) and issubclass(mixer_cls, default)):
        raise TypeError(f"mixer_cls must be {default.__name__} or a subclass for layer={config.layer!r}, got "
                        f"{mixer_cls!r}")
    return mixer_cls


def make_norm(config: MambaConfig) -> nn.Module:
    return RMSNorm(config.d_model, config.norm_eps) if config.rms_norm else LayerNorm(config.d_model,
                                                                                    eps=config.norm_eps)


class ResidualBlock(nn.Module):
    """Pre-norm residual: r ← r + Mamba(Norm(r)); with config.d_intermediate > 0 then r ← r + MLP(Norm2(r)).

    The official Block is written Add → Norm → Mixer (to fuse the add into the norm kernel); that is the
    same computation. With residual_in_fp32 the residual stream r stays float32 in a bf16 model. An attention
    layer (`attention=True`, a hybrid's) has the attention mixer (attention.MHA) in the same place, and
    `attend` instead of `forward`.
    """

    def __init__(self, config: MambaConfig, mixer_cls: type[nn.Module] | None = None, attention: bool = False):
        super().__init__()
        self.is_attention = attention
        self.norm = make_norm(config)
        self.mixer = MHA(config) if attention else mixer_class(config, mixer_cls)(config)
        if config.d_intermediate > 0:
            self.norm2 = make_norm(config)
            self.mlp = GatedMLP(config.d_model, config.d_intermediate)
        else:
            self.mlp = None

    def forward(self, residual: Tensor, conv_state=None, ssm_state=None):
        out, conv_state, ssm_state = self.mixer(self.norm(residual), conv_state, ssm_state, return_state=True)
        return self.add_mlp(residual + out), conv_state, ssm_state

    def attend(self, residual: Tensor, kv=None, conv_state=None, lengths=None) -> Tensor:
        """An attention layer: residual (b, l, D) → (b, l, D); the cache arguments as attention.MHA.forward's."""
        return self.add_mlp(residual + self.mixer(self.norm(residual), kv, conv_state, lengths))

    def add_mlp(self, residual: Tensor) -> Tensor:
        """r + MLP(Norm2(r)) with an MLP (d_intermediate > 0), else r."""
        return residual if self.mlp is None else residual + self.mlp(self.norm2(residual))


class Backbone(nn.Module):
    """Embedding → n_layer residual blocks → final norm (the official `MixerModel`)."""

    def __init__(self, config: MambaConfig, mixer_cls: type[nn.Module] | None = None):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        attn = set(config.attn_layer_idx)
        self.layers = nn.ModuleList(ResidualBlock(config, mixer_cls, attention=i in attn) for i in range(config.n_layer))
        self.norm_f = make_norm(config)

    def forward(
        self, input_ids: Tensor | None = None, state: MambaState | None = None, return_state: bool = False,
        inputs_embeds: Tensor | None = None,
    ) -> tuple[Tensor, MambaState | None]:
        """Token ids (b, l), or inputs_embeds (b, l, D) in place of the embedding → the final-normed hidden
        states (b, l, D) in the model's dtype, and the per-layer state when return_state. Heads other than
        the LM head (classification, regression) read these. Ids are not range-checked here; MambaLM's
        forward checks them."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Backbone.forward takes exactly one of input_ids and inputs_embeds")
        h = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds  # (b, l, D)
        residual = h.float() if self.config.residual_in_fp32 else h
        b, l = h.shape[:2]
        attn = None  # a hybrid's KV caches: a copy of the given ones (left untouched), extended by these l tokens
        if self.config.attn is not None and (state is not None or return_state):
            attn = state.attn.clone() if state is not None else AttentionState.zeros(
                self.config, b, h.device, self.embedding.weight.dtype, capacity=l)
            attn.reserve(int(attn.lengths.max()) + l)
        conv_states, ssm_states = [], []
        j = a = 0  # the next Mamba layer's index in the state; the next attention layer's
        for layer in self.layers:
            if layer.is_attention:
                cache = () if attn is None else (attn.kv[a], None if attn.conv is None else attn.conv[a], attn.lengths)
                residual = layer.attend(residual, *cache)
                a += 1
                continue
            cs, ss = (state.conv[j], state.ssm[j]) if state is not None else (None, None)
            residual, cs, ss = layer(residual, cs, ss)
            conv_states.append(cs)
            ssm_states.append(ss)
            j += 1
        h = self.norm_f(residual)  # (b, l, D), in the model's dtype
        new_state = None
        if return_state:
            if attn is not None:
                attn.lengths += l
            if conv_states:
                new_state = MambaState(torch.stack(conv_states), torch.stack(ssm_states), attn)
            else:  # every layer is attention: empty Mamba states
                empty = MambaState.zeros(self.config, b, h.device, self.embedding.weight.dtype)
                new_state = MambaState(empty.conv, empty.ssm, attn)
        return h, new_state


# ----------------------------------------------------------------------------------------------- the LM
class MambaLM(nn.Module):
    """Mamba language model: embedding → n_layer × (Norm → Mamba, residual) → norm_f → lm_head.

    lm_head is tied to the embedding (tie_embeddings) and the vocabulary is padded to a multiple of
    pad_vocab_size_multiple, as in the official `MambaLMHeadModel`; logits cover the padded vocabulary.
    """

    def __init__(self, config: MambaConfig, mixer_cls: type[nn.Module] | None = None):
        super().__init__()
        if not isinstance(config, MambaConfig):
            raise TypeError(f"MambaLM needs a MambaConfig, got {type(config).__name__}")
        self.config = config
        # mixer_cls None: the config's mixer (config.layer); or a subclass of it with another SSM in the same
        # block (see Mamba.ssm)
        self.backbone = Backbone(config, mixer_class(config, mixer_cls))
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self.tokenizer = None  # set by from_pretrained when the checkpoint has one; used by generate
        self.tie_weights()
        self.reset_parameters()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official `_init_weights` (mixer_seq_simple.py) applied on top of the PyTorch defaults:
        Linear biases zeroed (except the Δ bias), embedding ~ N(0, initializer_range), and out_proj rescaled
        by 1/sqrt(n_layer) (GPT-2's scheme for residual branches; one residual branch per layer). With MLPs
        (d_intermediate > 0) a layer has two branches: out_proj and fc2 rescaled by 1/sqrt(2·n_layer). The
        same for every mixer (Mamba-2's dt_bias is a parameter of its own, not a Linear bias)."""
        c = self.config
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None and not getattr(m.bias, "_no_reinit", False):
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.backbone.embedding.weight, std=c.initializer_range)
        if c.rescale_prenorm_residual:
            branches = 2 if c.d_intermediate > 0 else 1
            for layer in self.backbone.layers:
                for w in [layer.mixer.out_proj.weight] + ([] if layer.mlp is None else [layer.mlp.fc2.weight]):
                    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
                    w /= math.sqrt(branches * c.n_layer)

    # ------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        state: MambaState | None = None,
        return_state: bool = False,
        num_last_tokens: int = 0,
    ) -> MambaOutput:
        """input_ids: (b, l) int64 in [0, vocab_size). labels (b, l): next-token targets are labels[:, 1:]
        for logits[:, :-1] (pass labels = input_ids; −100 is ignored). state continues a previous call's
        `.state` (feeding a sequence in chunks gives the logits of one call); a one-token call with a state
        and autograd off (decoding) takes the single-step ops and leaves the given state untouched.
        num_last_tokens > 0 keeps only the last positions' logits (for generation)."""
        self._check_inputs(input_ids, labels, state, num_last_tokens)
        h, new_state = self.backbone(input_ids, state, return_state)  # (b, l, D)
        if num_last_tokens > 0:
            h = h[:, -num_last_tokens:]
        logits = self.lm_head(h)  # (b, l, V)
        loss = None if labels is None else next_token_cross_entropy(logits, labels)
        return MambaOutput(logits=logits, loss=loss, state=new_state)

    @torch.no_grad()
    def step(self, input_ids: Tensor, state: MambaState) -> Tensor:
        """One decoding step for a batch: input_ids (b,) → logits (b, V), float in the model's dtype.

        `state` (from `allocate_state` or a `forward(..., return_state=True)`) is updated IN PLACE: nothing
        of size proportional to the sequence is kept, and no state is re-allocated per step. This is the
        reference step, plain torch + ops; `mambakit.engine` applies a fused CPU step from outside."""
        self.check_step_inputs(input_ids, state)
        h = self.backbone.embedding(input_ids)  # (b, D)
        residual = h.float() if self.config.residual_in_fp32 else h
        attn = state.attn
        if attn is not None:
            attn.reserve(int(attn.lengths.max()) + 1)  # grows the KV caches (capacity doubled) when full
        j = a = 0  # the next Mamba layer's index in the state; the next attention layer's
        for layer in self.backbone.layers:
            if layer.is_attention:  # the token at each row's own position, its key and value cached in place
                cache = (attn.kv[a], None if attn.conv is None else attn.conv[a], attn.lengths)
                residual = layer.attend(residual[:, None], *cache)[:, 0]
                a += 1
            else:
                residual = residual + layer.mixer.step(layer.norm(residual), state.conv[j], state.ssm[j])
                residual = layer.add_mlp(residual)
                j += 1
        if attn is not None:
            attn.lengths += 1
        return self.lm_head(self.backbone.norm_f(residual))  # (b, V)

    def check_step_inputs(self, input_ids: Tensor, state: MambaState) -> None:
        """What a decode step relies on: input_ids an integer tensor (b,), ids in [0, padded_vocab_size), and
        a MambaState of this model's shapes for b rows (ValueError / TypeError naming what does not fit). The ids'
        range is checked by the embedding itself (IndexError), at no cost here."""
        if not isinstance(input_ids, Tensor) or input_ids.dtype not in _ID_DTYPES:
            raise TypeError(f"step takes input_ids as an integer tensor (batch,), got {type(input_ids).__name__}"
                            + (f" of dtype {input_ids.dtype}" if isinstance(input_ids, Tensor) else ""))
        if not isinstance(state, MambaState):
            raise TypeError(f"state must be a MambaState (from allocate_state or a forward with return_state), got "
                            f"{type(state).__name__}")
        b = state.ssm.shape[1] if state.ssm.dim() == (5 if self.config.layer == "Mamba2" else 4) else -1
        if input_ids.dim() != 1 or input_ids.shape[0] != b:
            raise ValueError(f"step takes input_ids of shape (batch,) = ({b},) matching the state, got "
                             f"{tuple(input_ids.shape)}")
        self._check_state(state, b)

    def allocate_state(self, batch_size: int) -> MambaState:
        """A zero state (the state before any token) on the model's device, conv state in its dtype."""
        w = self.backbone.embedding.weight
        return MambaState.zeros(self.config, batch_size, device=w.device, dtype=w.dtype)

    def _check_inputs(self, input_ids, labels, state, num_last_tokens) -> None:
        c = self.config
        check_lm_inputs(input_ids, labels, num_last_tokens, c.vocab_size, c.padded_vocab_size)
        if state is not None:
            if not isinstance(state, MambaState):
                raise TypeError(
                    f"state must be a MambaState (the .state of a previous call), got {type(state).__name__}"
                )
            self._check_state(state, input_ids.shape[0])

    def _check_state(self, state: MambaState, b: int) -> None:
        """The state's shapes and device against this model, for b rows (the ops check the dtypes they take)."""
        want_conv, want_ssm = state_shapes(self.config, b)
        if tuple(state.conv.shape) != want_conv or tuple(state.ssm.shape) != want_ssm:
            names = "(n_layer, b, h, p, n)" if self.config.layer == "Mamba2" else "(n_layer, b, d_inner, d_state)"
            raise ValueError(
                f"state does not fit this model ({self.config.layer}) and batch: conv {tuple(state.conv.shape)} "
                f"(want {want_conv}), ssm {tuple(state.ssm.shape)} (want {want_ssm} = {names})"
            )
        if not (state.ssm.dtype.is_floating_point and state.conv.dtype.is_floating_point):
            raise ValueError(f"state must hold floating-point tensors, got conv {state.conv.dtype}, ssm {state.ssm.dtype}")
        device = self.backbone.norm_f.weight.device  # not lm_head's: a quantized head (quantize.py) has none
        if state.conv.device != device or state.ssm.device != device:
            raise ValueError(f"state is on {state.ssm.device}/{state.conv.device}, the model on {device}")
        self._check_attention_state(state.attn, b)

    def _check_attention_state(self, attn, b: int) -> None:
        """A hybrid's KV caches (state.attn) against this model: present exactly when it has attention layers."""
        c = self.config
        if c.attn is None:
            if attn is not None:
                raise ValueError("state has KV caches (state.attn) but this model has no attention layers")
            return
        if not isinstance(attn, AttentionState):
            raise ValueError(f"this hybrid model's state needs its attention layers' KV caches: state.attn must be an "
                             f"AttentionState, got {type(attn).__name__}")
        a = c.attn
        want = (len(c.attn_layer_idx), b, attn.capacity, 2, a.num_heads_kv, a.head_dim)
        conv_ok = (attn.conv is None) if a.d_conv == 0 else (
            attn.conv is not None and tuple(attn.conv.shape) == (want[0], b, a.qkv_dim, a.d_conv - 1))
        if tuple(attn.kv.shape) != want or not conv_ok or tuple(attn.lengths.shape) != (b,):
            raise ValueError(f"state.attn does not fit this model and batch: kv {tuple(attn.kv.shape)} (want {want} = "
                             "(attention layers, b, capacity, 2, num_heads_kv, head_dim)), lengths "
                             f"{tuple(attn.lengths.shape)} (want ({b},))")
        if attn.lengths.dtype != torch.long or (b and int(attn.lengths.min()) < 0) or (
                b and int(attn.lengths.max()) > attn.capacity):
            raise ValueError("state.attn.lengths must be int64 counts in [0, capacity]")

    # ---------------------------------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device=None, *, revision: str | None = None,
                        cache_dir=None, local_files_only: bool = False, token=None) -> "MambaLM":
        """Loads a checkpoint directory in the official (state-spaces/mamba) or transformers layout;
        the layout is detected from config.json. A tokenizer saved alongside (tokenizer.json, or
        mambakit's byte tokenizer) becomes `model.tokenizer`. `path` may also be a Hugging Face Hub id
        ("org/name", at `revision`): its files are fetched into the Hub's cache first (mambakit/hub.py, the `hub`
        extra; offline from the cache with local_files_only or HF_HUB_OFFLINE=1). See mambakit/checkpoint.py
        (which builds the model through `cls` and never imports this file)."""
        from .checkpoint import load_pretrained
        from .hub import resolve

        directory = resolve(path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                            token=token)
        return load_pretrained(cls, directory, dtype=dtype, device=device)

    def push_to_hub(self, repo_id: str, token=None, private: bool = False, revision: str | None = None):
        """Saves this model (transformers layout) and uploads its files to the Hub repo `repo_id` as one commit
        (mambakit/hub.py, the `hub` extra)."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, token=token, private=private, revision=revision)

    def save_pretrained(self, path, layout: str | None = None) -> None:
        """Writes config.json + weights atomically: layout "hf" (model.safetensors, transformers'
        MambaForCausalLM) or "official" (pytorch_model.bin, state-spaces/mamba); None: "hf", or "official" for a
        hybrid (transformers has no class for it); plus `self.tokenizer`, if set."""
        from .checkpoint import save_pretrained

        save_pretrained(self, path, layout=layout)

    def num_parameters(self) -> int:
        """Unique parameters (the tied head counted once)."""
        return sum(p.numel() for p in self.parameters())
