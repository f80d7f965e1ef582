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
