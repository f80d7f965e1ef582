"""The fast CPU inference path, applied to a model from outside (as gpt-fast applies compile and quantization):
the model (mambakit.model) is pure torch + ops and knows nothing of this package.

    from mambakit.engine import FusedDecoder, step_function, release, use_huge_pages
    decoder = FusedDecoder(model)          # the fused decode step of Mamba-1 models (fused.py); packs a copy of
                                           # the weights; Mamba2Decoder (mamba2.py) is the same for Mamba-2 models
    logits = decoder.step(ids, state)      # (b, V); the state is updated in place, as by MambaLM.step
    step = step_function(model)            # what generate and the server call: the fused step where it applies,
                                           # MambaLM.step elsewhere, saying once in the log which and why
    release(model)                         # frees the packed copy step_function made for model
    use_huge_pages(model)                  # opt-in: the model's parameters into 2 MiB pages (hugepages.py)

Pieces: fused.py (one compiled call a step for all layers of a Mamba-1 model), mamba2.py (the same for Mamba-2
models), panels.py (weights packed in 32-row panels and the
kernel that streams them), hugepages.py (2 MiB pages for weight streaming). How a step runs, and the measurements
behind its choices: docs/engine.md.
"""

from __future__ import annotations

import logging
import weakref
from typing import Callable

from torch import Tensor

from ..model import MambaLM, MambaState
from . import fused, mamba2
from .fused import MAX_BATCH, FusedDecoder
from .hugepages import use_huge_pages
from .mamba2 import Mamba2Decoder

__all__ = ["FusedDecoder", "MAX_BATCH", "Mamba2Decoder", "StepFunction", "decoder_for", "release", "step_function",
           "unsupported", "use_huge_pages"]

log = logging.getLogger("mambakit.engine")
StepFunction = Callable[[Tensor, MambaState], Tensor]

# One decoder (and so one packed copy of the weights) per model, shared by generate calls and servers; the
# entry goes with the model (the decoder holds it weakly), or earlier with `release`.
_DECODERS: "weakref.WeakKeyDictionary[MambaLM, FusedDecoder | Mamba2Decoder]" = weakref.WeakKeyDictionary()
_SAID: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        log.info(message)


def _family(model):
    """The engine module for the model's mixer: mamba2 for Mamba-2 models, fused for the others."""
    config = getattr(model, "config", None)
    return mamba2 if getattr(config, "layer", "Mamba") == "Mamba2" else fused


def unsupported(model) -> str | None:
    """Why no fused decode step covers this model (None when one does): Mamba-1 models through
    `FusedDecoder`, Mamba-2 models through `Mamba2Decoder`; not hybrids (attention layers or MLPs), nor
    quantized Mamba-2 models yet (mambakit/quantize.py)."""
    config = getattr(model, "config", None)
    if getattr(config, "attn_layer_idx", None) or getattr(config, "d_intermediate", 0):
        return "a hybrid (attention layers or MLPs); the fused steps cover stacks of Mamba mixers only"
    return _family(model).unsupported(model)


def decoder_for(model: MambaLM) -> "FusedDecoder | Mamba2Decoder":
    """The model's shared fused decoder (FusedDecoder, or Mamba2Decoder for a Mamba-2 model), made on first use
    (ValueError when the model is not covered)."""
    decoder = _DECODERS.get(model)
    if decoder is None:
        cls = Mamba2Decoder if _family(model) is mamba2 else FusedDecoder
        decoder = _DECODERS[model] = cls(model)
    return decoder


def release(model: MambaLM) -> None:
    """Frees the packed weights of the model's shared decoder (for a model that goes back to training after
    decoding, where the copy would go stale and only hold memory). The next fused step packs them again."""
    decoder = _DECODERS.pop(model, None)
    if decoder is not None:
        decoder.release()


def step_function(model: MambaLM, fused: bool | None = None) -> StepFunction:
    """A decode step for `model`: step(input_ids (b,), state) → logits (b, V), state updated in place.

    fused None: the fused step (FusedDecoder, or Mamba2Decoder for Mamba-2 models) for every batch it supports and MambaLM.step for the others, each
    choice logged once with its reason (logger "mambakit.engine"); True: the fused step or a ValueError saying
    why not; False: MambaLM.step (the reference)."""
    if not isinstance(model, MambaLM):
        raise TypeError(f"step_function needs a MambaLM, got {type(model).__name__}")
    if fused is not None and not isinstance(fused, bool):
        raise TypeError(f"fused must be None, True or False, got {fused!r}")
    if fused is False:
        return model.step
    why = unsupported(model)
    if why is not None:
        if fused:
            raise ValueError(f"fused=True: the fused decode step does not cover this model: {why}")
        _say_once(f"decode: MambaLM.step (the fused step does not cover this model: {why})")
        return model.step
    decoder = decoder_for(model)

    def step(input_ids: Tensor, state: MambaState) -> Tensor:
        reason = decoder.supports(input_ids, state)
        if reason is None:
            _say_once(f"decode: the fused CPU step (mambakit.engine.{type(decoder).__name__})")
            step.last = "fused"
            return decoder.step(input_ids, state)
        if fused:
            raise ValueError(f"fused=True: the fused decode step cannot take this batch: {reason}")
        _say_once(f"decode: MambaLM.step for this batch ({reason})")
        step.last = "reference"
        return model.step(input_ids, state)

    step.decoder = decoder  # for tests and benchmarks: which decoder this step uses
    step.last = None  # which path the last call took: "fused" or "reference" (the server counts them)
    return step
