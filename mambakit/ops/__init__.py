"""The public ops of mambakit: the selective scan, the causal depthwise conv, and their single-step updates.

Each op validates its arguments once (types, shapes, dtypes, devices, memory layout, finiteness of A) with
messages that name the argument and the expected shape, then dispatches to a backend (the table _IMPLEMENTATIONS):

- "reference": the specification in plain PyTorch (reference.py); any device, any float dtype.
- "cpu": fused numba kernels (cpu/) for CPU tensors in float16 / bfloat16 / float32 / float64.
- "triton": Triton kernels (triton/) for CUDA tensors in float16 / bfloat16 / float32 (CPU tensors too under
  Triton's interpreter, TRITON_INTERPRET=1: how the tests run them).
- None: "cpu" for CPU tensors; for CUDA tensors "triton" when Triton is installed (float64 goes to
  "reference", which computes in float64), else "reference" with a one-time warning. The choice is logged
  once per op at debug level.

The ops here are the only callers of the backends: the kernels index memory by the shapes they are given and
check nothing themselves, so every argument goes through the checks below first. Every backend's function
takes the reference twin's arguments, all of them, in its order.

Layouts are time-major: activations (b, l, d), B and C (b, l, n), states (b, d, n), conv states (b, d, w − 1).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os

import torch
from torch import Tensor

from .reference import (  # noqa: F401  (public: the specification, importable as mambakit.ops.*_ref)
    causal_conv1d_ref,
    causal_conv1d_update_ref,
    selective_scan_ref,
    selective_state_update_ref,
)

__all__ = [
    "selective_scan",
    "causal_conv1d",
    "selective_state_update",
    "causal_conv1d_update",
    "BACKENDS",
]

logger = logging.getLogger(__name__)

BACKENDS = ("reference", "cpu", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_logged: set[tuple[str, str]] = set()

# The dispatch: op → backend → (module, function), the module relative to this package. Every function takes
# the reference twin's arguments, all of them, in its order. Kernel modules are imported at their first call:
# numba loads (or compiles) its kernels then, and Triton is optional.
_IMPLEMENTATIONS = {
    "selective_scan": {
        "reference": (".reference", "selective_scan_ref"),
        "cpu": (".cpu.scan", "selective_scan_cpu"),
        "triton": (".triton.scan", "selective_scan_triton"),
    },
    "selective_state_update": {
        "reference": (".reference", "selective_state_update_ref"),
        "cpu": (".cpu.scan", "selective_state_update_cpu"),
        "triton": (".triton.step", "selective_state_update_triton"),
    },
    "causal_conv1d": {
        "reference": (".reference", "causal_conv1d_ref"),
        "cpu": (".cpu.conv", "causal_conv1d_cpu"),
        "triton": (".triton.conv", "causal_conv1d_triton"),
    },
    "causal_conv1d_update": {
        "reference": (".reference", "causal_conv1d_update_ref"),
        "cpu": (".cpu.conv", "causal_conv1d_update_cpu"),
        "triton": (".triton.step", "causal_conv1d_update_triton"),
    },
}


# --------------------------------------------------------------------------------------------- validation
def _check_tensor(name: str, x, shape: tuple, names: str, device: torch.device | None = None) -> None:
    """x must be a dense floating tensor of `shape` (ints; None matches anything) on `device`. Strides are free:
    every backend copies what it cannot read in place."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {names}, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != len(shape) or any(s is not None and s != xs for s, xs in zip(shape, x.shape)):
        want = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {names} = {want}, got {tuple(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device} but u is on {device}; all inputs must share one device")


def _check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state, step: bool) -> tuple[int, ...]:
    """Validates the scan's arguments; returns (b, l, d, n) (l = 1 for a single step). A's finiteness is
    checked by the scan only: a decoding step is called once per layer and token, and its A is the scan's."""
    if step:
        _check_tensor("u", u, (None, None), "(b, d)")
        b, d = u.shape
        l = 1
        act, bn = (b, d), (b, None)
        act_names, bn_names = "(b, d)", "(b, n)"
    else:
        _check_tensor("u", u, (None, None, None), "(b, l, d)")
        b, l, d = u.shape
        act, bn = (b, l, d), (b, l, None)
        act_names, bn_names = "(b, l, d)", "(b, l, n)"
    dev = u.device
    _check_tensor("A", A, (d, None), "(d, n)", dev)
    n = A.shape[1]
    if n < 1:
        raise ValueError("A must have at least one state dimension: shape (d, n) with n >= 1")
    _check_tensor("delta", delta, act, act_names, dev)
    _check_tensor("B", B, bn[:-1] + (n,), bn_names, dev)
    _check_tensor("C", C, bn[:-1] + (n,), bn_names, dev)
    if D is not None:
        _check_tensor("D", D, (d,), "(d,)", dev)
    if z is not None:
        _check_tensor("z", z, act, act_names, dev)
    if delta_bias is not None:
        _check_tensor("delta_bias", delta_bias, (d,), "(d,)", dev)
    if initial_state is not None:
        _check_tensor("initial_state", initial_state, (b, d, n), "(b, d, n)", dev)
    if not step and not bool(torch.isfinite(A).all()):
        raise ValueError("A contains NaN or inf; A = -exp(A_log) must be finite")
    return b, l, d, n


def _check_conv_args(x, weight, bias, state, step: bool) -> tuple[int, int, int, int]:
    """Validates the conv's arguments; returns (b, l, d, w)."""
    if step:
        _check_tensor("x", x, (None, None), "(b, d)")
        (b, d), l = x.shape, 1
    else:
        _check_tensor("x", x, (None, None, None), "(b, l, d)")
        b, l, d = x.shape
    _check_tensor("weight", weight, (d, None), "(d, w)", x.device)
    w = weight.shape[1]
    if w < 1:
        raise ValueError("weight must have a kernel width w >= 1: shape (d, w)")
    if bias is not None:
        _check_tensor("bias", bias, (d,), "(d,)", x.device)
    if state is not None:
        _check_tensor("conv_state" if step else "initial_state", state, (b, d, w - 1), "(b, d, w-1)", x.device)
    return b, l, d, w


def _check_activation(activation) -> None:
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _check_triton(x: Tensor) -> None:
    """backend='triton' can run on x: Triton installed, CUDA tensors (or the interpreter), no float64."""
    if not _triton_available():
        raise ImportError("backend='triton' needs Triton: pip install mambakit[triton]")
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' needs CUDA tensors, got tensors on {x.device} "
            "(CPU tensors run only under Triton's interpreter, TRITON_INTERPRET=1)"
        )
    if x.dtype == torch.float64:
        raise ValueError("backend='triton' computes in float32: use float16, bfloat16 or float32 inputs "
                         "(backend='reference' computes float64 in float64)")


def _implementation(op: str, backend: str | None, x: Tensor):
    """The function that runs `op` on this call's backend (see _resolve_backend)."""
    module, name = _IMPLEMENTATIONS[op][_resolve_backend(op, backend, x)]
    return getattr(importlib.import_module(module, __name__), name)


def _resolve_backend(op: str, backend: str | None, x: Tensor) -> str:
    """The backend for this call: the explicit one (checked it can run) or the default for x's device."""
    if backend is None:
        if x.device.type == "cpu":
            chosen = "cpu"
        elif x.device.type == "cuda" and x.dtype != torch.float64 and _triton_available():
            chosen = "triton"
        else:
            chosen = "reference"
            if x.device.type == "cuda" and x.dtype != torch.float64 and ("no-triton", "") not in _logged:
                _logged.add(("no-triton", ""))
                logger.warning(
                    "mambakit.ops: Triton is not installed, so CUDA tensors use the slow reference ops "
                    "(sequential over time); pip install mambakit[triton] for the fused GPU kernels"
                )
    elif backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    else:
        chosen = backend
        if chosen == "cpu" and x.device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {x.device}")
        if chosen == "triton":
            _check_triton(x)
    if (op, chosen) not in _logged:
        _logged.add((op, chosen))
        logger.debug("mambakit.ops.%s: using the %r backend (for %s tensors)", op, chosen, x.device.type)
    return chosen


def _no_autocast(x: Tensor):
    """The ops choose their own precision (float32 accumulation whatever the inputs): autocast, which would
    run the reference's einsum and conv in bfloat16, is turned off inside them."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------ the ops
def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
    backend: str | None = None,
):
    """The selective scan of Mamba (paper Section 3.2, Algorithm 2).

    Δ = softplus(delta + delta_bias) (if delta_softplus) else delta + delta_bias;
    h_t = exp(Δ_t·A) ⊙ h_{t−1} + Δ_t·B_t·u_t; y_t = C_t·h_t + D·u_t; y ← y·silu(z) if z is given.

    Shapes: u, delta, z, y: (b, l, d); A: (d, n); B, C: (b, l, n); D, delta_bias: (d,);
    initial_state, final_state: (b, d, n). Returns y (in u's dtype), or (y, final_state) with
    return_final_state (final_state in float32, float64 for float64 inputs). Gradients flow to every
    tensor input, initial_state included, and from final_state.
    """
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state, step=False)
    with _no_autocast(u):
        run = _implementation("selective_scan", backend, u)
        return run(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), initial_state, bool(return_final_state))


def selective_state_update(
    state: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    backend: str | None = None,
) -> Tensor:
    """One decoding step of the selective scan: updates `state` (b, d, n) in place and returns y (b, d).

    u, delta, z: (b, d); A: (d, n); B, C: (b, n); D, delta_bias: (d,). Stepping l times from a state equals
    `selective_scan` over those l steps with that state as initial_state. For decoding: the in-place update
    is not differentiable (use `selective_scan` with initial_state to train through states).
    """
    b, _, d, n = _check_scan_args(u, delta, A, B, C, D, z, delta_bias, None, step=True)
    _check_tensor("state", state, (b, d, n), "(b, d, n)", u.device)
    with _no_autocast(u):
        run = _implementation("selective_state_update", backend, u)
        return run(state, u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
    activation: str | None = None,
    backend: str | None = None,
):
    """Depthwise causal conv over time: y_t = bias + Σ_k weight[:, k]·x_{t−w+1+k}, with the w−1 inputs
    before t = 0 taken from initial_state (zeros if None); then SiLU if activation == "silu".

    x, y: (b, l, d); weight: (d, w); bias: (d,); initial_state, final_state: (b, d, w − 1) (the last w − 1
    inputs, for the next call). Returns y, or (y, final_state) with return_final_state.
    """
    _check_conv_args(x, weight, bias, initial_state, step=False)
    _check_activation(activation)
    with _no_autocast(x):
        run = _implementation("causal_conv1d", backend, x)
        return run(x, weight, bias, initial_state, bool(return_final_state), activation)


def causal_conv1d_update(
    conv_state: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    backend: str | None = None,
) -> Tensor:
    """One decoding step of the causal conv: x (b, d) is the new input, conv_state (b, d, w − 1) holds the
    previous w − 1 inputs and is shifted in place (not differentiable, like selective_state_update).
    Returns y (b, d)."""
    _check_conv_args(x, weight, bias, conv_state, step=True)
    _check_activation(activation)
    with _no_autocast(x):
        run = _implementation("causal_conv1d_update", backend, x)
        return run(conv_state, x, weight, bias, activation)


# ------------------------------------------------------------------------------------ SSD (Mamba-2)
# Kept in one section so that Mamba-1 edits above and this one merge apart. Layouts: x, z (b, l, h, p);
# dt (b, l, h); A (h,); B, C (b, l, g, n) with g dividing h; states (b, h, p, n). The chunked torch path runs
# on any device, so a default call on a GPU without Triton takes it rather than the sequential twin.
import operator  # noqa: E402

from .reference import seq_idx_from_cu_seqlens, ssd_ref, ssd_state_update_ref  # noqa: E402, F401  (public twins)

__all__ += ["ssd", "ssd_state_update"]

_IMPLEMENTATIONS["ssd"] = {
    "reference": (".reference", "ssd_ref"),
    "cpu": (".cpu.ssd", "ssd_cpu"),
    "triton": (".triton.ssd", "ssd_triton"),
}
_IMPLEMENTATIONS["ssd_state_update"] = {
    "reference": (".reference", "ssd_state_update_ref"),
    "cpu": (".cpu.ssd", "ssd_state_update_cpu"),
    "triton": (".triton.ssd", "ssd_state_update_triton"),
}


def _ssd_implementation(op: str, backend: str | None, x: Tensor):
    """The function for an SSD op. Default: "triton" for CUDA tensors when Triton is installed (not float64),
    else "cpu" (the chunked torch path, which runs on every device). "triton" when asked for is checked as the
    Mamba-1 ops check it (CUDA tensors, or CPU ones under TRITON_INTERPRET=1)."""
    if backend is None:
        cuda_triton = x.device.type == "cuda" and x.dtype != torch.float64 and _triton_available()
        chosen = "triton" if cuda_triton else "cpu"
    elif backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    elif backend == "triton":
        _check_triton(x)
        chosen = backend
    else:
        chosen = backend
        if chosen == "cpu" and x.device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {x.device} (backend=None runs the "
                             "same chunked torch path on any device)")
    if (op, chosen) not in _logged:
        _logged.add((op, chosen))
        logger.debug("mambakit.ops.%s: using the %r backend (for %s tensors)", op, chosen, x.device.type)
    module, name = _IMPLEMENTATIONS[op][chosen]
    return getattr(importlib.import_module(module, __name__), name)


def _check_dt_limit(dt_limit) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in dt_limit)
    except (TypeError, ValueError):
        raise TypeError(f"dt_limit must be a pair of numbers (lo, hi), got {dt_limit!r}") from None
    if not lo <= hi or lo != lo:
        raise ValueError(f"dt_limit must be (lo, hi) with lo <= hi, got {dt_limit!r}")
    return lo, hi


def _check_ssd_args(x, dt, A, B, C, D, z, dt_bias, step: bool) -> tuple[int, ...]:
    """Validates what both SSD ops share; returns (b, l, h, p, g, n) (l = 1 for a single step)."""
    if step:
        _check_tensor("x", x, (None, None, None), "(b, h, p)")
        (b, h, p), l = x.shape, 1
        lead, lead_names = (b,), "b, "
    else:
        _check_tensor("x", x, (None, None, None, None), "(b, l, h, p)")
        b, l, h, p = x.shape
        lead, lead_names = (b, l), "b, l, "
        if l < 1:
            raise ValueError("x must have at least one time step: shape (b, l, h, p) with l >= 1")
    dev = x.device
    _check_tensor("dt", dt, lead + (h,), f"({lead_names}h)", dev)
    _check_tensor("A", A, (h,), "(h,)", dev)
    _check_tensor("B", B, lead + (None, None), f"({lead_names}g, n)", dev)
    g, n = B.shape[-2], B.shape[-1]
    if g < 1 or n < 1:
        raise ValueError(f"B must have g >= 1 groups and n >= 1 state dimensions, got shape {tuple(B.shape)}")
    if h % g:
        raise ValueError(f"the number of heads h = {h} (x) must be a multiple of the groups g = {g} (B, C): "
                         "each group's B and C serve h // g heads")
    _check_tensor("C", C, lead + (g, n), f"({lead_names}g, n)", dev)
    if D is not None:
        if not isinstance(D, Tensor) or D.dim() != 2:
            _check_tensor("D", D, (h,), "(h,) or (h, p)", dev)
        else:
            _check_tensor("D", D, (h, p), "(h,) or (h, p)", dev)
    if z is not None:
        _check_tensor("z", z, tuple(x.shape), "like x: " + ("(b, h, p)" if step else "(b, l, h, p)"), dev)
    if dt_bias is not None:
        _check_tensor("dt_bias", dt_bias, (h,), "(h,)", dev)
    return b, l, h, p, g, n


def _check_A_nonpositive(A: Tensor) -> None:
    # The chunked path's decays exp(Δ·A·t) must not grow (they are ≤ 1 for A ≤ 0, Δ ≥ 0): A = −exp(A_log).
    if not bool(torch.isfinite(A).all()):
        raise ValueError("A contains NaN or inf; A = -exp(A_log) must be finite")
    if bool((A > 0).any()):
        raise ValueError("A must be <= 0 (one decay rate per head, A = -exp(A_log)); got positive entries")


def ssd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int = 256,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    return_final_states: bool = False,
    cu_seqlens: Tensor | None = None,
    return_varlen_states: bool = False,
    backend: str | None = None,
):
    """The SSD scan of Mamba-2 ("Transformers are SSMs", Dao & Gu 2024), with the semantics of the official
    `mamba_chunk_scan_combined`:

    Δ = clamp(softplus(dt + dt_bias), *dt_limit) (softplus only with dt_softplus; no clamp at (0, inf));
    h_t = exp(Δ_t·A)·h_{t−1} + Δ_t·x_t B_tᵀ; y_t = h_t C_t + D ⊙ x_t; y ← y·silu(z) if z is given.

    Shapes: x, z, y: (b, l, h, p); dt: (b, l, h); A: (h,) (≤ 0); B, C: (b, l, g, n), g dividing h, head i using
    group i // (h // g); D: (h,) or (h, p); dt_bias: (h,); initial_states, final states: (b, h, p, n).
    seq_idx (b, l), integers, non-decreasing along l and ≥ 0: packed sequences; the state resets to zero where
    it changes, and initial_states feeds only tokens with seq_idx 0 (as in the official op). chunk_size: the
    chunked path's block length (any positive int; the result does not depend on it beyond rounding); on CPU
    tensors the "cpu" backend blocks by at most `ops.cpu.ssd.CPU_BLOCK` (128) tokens with autograd and
    `CPU_INFERENCE_BLOCK` (64) without, its fastest sizes.

    cu_seqlens (num_seqs + 1,), integers: packed variable-length sequences in one row (b = 1), sequence i being
    tokens cu_seqlens[i] … cu_seqlens[i + 1] − 1: it must start at 0, be non-decreasing (empty sequences are
    allowed) and end at l. It implies seq_idx (the sequence of each token); a seq_idx given with it must agree.

    Returns y (in x's dtype), then (y, final_states) with return_final_states: the state after each row's last
    token (with seq_idx, that of the row's last sequence), float32 (float64 for float64 inputs); with
    return_varlen_states (needs cu_seqlens) the state after each sequence's last token, (num_seqs, h, p, n),
    comes last, as in the official op: (y, varlen_states) or (y, final_states, varlen_states). An empty
    sequence's state is the one it starts from (initial_states for sequence 0, zeros for the others).
    Gradients flow to every floating input, initial_states included, and from the final and varlen states
    (not from varlen states on the Triton backend, whose backward does not take them: as the official op).
    """
    b, l, h, p, g, n = _check_ssd_args(x, dt, A, B, C, D, z, dt_bias, step=False)
    if isinstance(chunk_size, bool) or not hasattr(chunk_size, "__index__") or operator.index(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    chunk_size = operator.index(chunk_size)
    dt_limit = _check_dt_limit(dt_limit)
    if initial_states is not None:
        _check_tensor("initial_states", initial_states, (b, h, p, n), "(b, h, p, n)", x.device)
    if seq_idx is not None:
        if not isinstance(seq_idx, Tensor) or seq_idx.dtype.is_floating_point or seq_idx.dtype.is_complex \
                or seq_idx.dtype == torch.bool:
            raise TypeError(f"seq_idx must be an integer tensor of shape (b, l) = ({b}, {l}), "
                            f"got {getattr(seq_idx, 'dtype', type(seq_idx).__name__)}")
        if tuple(seq_idx.shape) != (b, l):
            raise ValueError(f"seq_idx must have shape (b, l) = ({b}, {l}), got {tuple(seq_idx.shape)}")
        if seq_idx.device != x.device:
            raise ValueError(f"seq_idx is on {seq_idx.device} but x is on {x.device}; all inputs must share one device")
        # The masks compare indices for equality: a sequence must be one contiguous run.
        if bool((seq_idx < 0).any()) or bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
            raise ValueError("seq_idx must be >= 0 and non-decreasing along l (each packed sequence one run)")
    if cu_seqlens is not None:
        derived = _check_cu_seqlens(cu_seqlens, b, l, x.device)
        if seq_idx is not None and not torch.equal(seq_idx.to(torch.int64), derived):
            raise ValueError("seq_idx and cu_seqlens disagree: seq_idx must be the index i of the sequence "
                             "cu_seqlens[i] <= t < cu_seqlens[i + 1] of each token t (or pass only one of them)")
        seq_idx = derived
    elif return_varlen_states:
        raise ValueError("return_varlen_states needs cu_seqlens (the boundaries of the packed sequences)")
    _check_A_nonpositive(A)
    with _no_autocast(x):
        run = _ssd_implementation("ssd", backend, x)
        return run(x, dt, A, B, C, chunk_size, D, z, dt_bias, bool(dt_softplus), dt_limit, initial_states,
                   seq_idx, bool(return_final_states), cu_seqlens, bool(return_varlen_states))


def _check_cu_seqlens(cu_seqlens, b: int, l: int, device: torch.device) -> Tensor:
    """Validates cu_seqlens (the official op's packed-sequence boundaries); returns the seq_idx (1, l) it implies."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex \
            or cu_seqlens.dtype == torch.bool:
        raise TypeError(f"cu_seqlens must be an integer tensor of shape (num_seqs + 1,), "
                        f"got {getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must have shape (num_seqs + 1,) with num_seqs >= 1, got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but x is on {device}; all inputs must share one device")
    if b != 1:
        raise ValueError(f"cu_seqlens packs sequences into one row: x must have batch size 1, got b = {b}")
    cu = cu_seqlens.to(torch.int64)
    if int(cu[0]) != 0 or int(cu[-1]) != l or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at l = {l}, got "
                         f"{cu.tolist() if cu.numel() <= 8 else cu[:4].tolist() + ['…'] + cu[-2:].tolist()}")
    return seq_idx_from_cu_seqlens(cu, l)


def ssd_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    backend: str | None = None,
) -> Tensor:
    """One decoding step of `ssd`: updates `state` (b, h, p, n) in place and returns y (b, h, p).

    x, z: (b, h, p); dt: (b, h); A: (h,); B, C: (b, g, n); D: (h,) or (h, p); dt_bias: (h,). Stepping l tokens
    from a state equals `ssd` over them with that state as initial_states. dt_limit defaults to no clamp,
    as the official and transformers decoding steps apply none (their prefill does): pass the model's
    dt_limit to clamp as `ssd` does. The in-place update is not differentiable (train through `ssd`).
    """
    b, _, h, p, g, n = _check_ssd_args(x, dt, A, B, C, D, z, dt_bias, step=True)
    _check_tensor("state", state, (b, h, p, n), "(b, h, p, n)", x.device)
    dt_limit = _check_dt_limit(dt_limit)
    with _no_autocast(x):
        run = _ssd_implementation("ssd_state_update", backend, x)
        return run(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus), dt_limit)
