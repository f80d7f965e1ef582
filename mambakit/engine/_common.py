"""What a fused decoder does besides its kernel: hold its model weakly, say which models and batches it takes.

`Mamba2Decoder` (mamba2.py) is built on `Decoder`; `fused.FusedDecoder` keeps its own copy of the same code for
now (another change owns fused.py), and can take it over by subclassing with its `unsupported` and state views.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from ..model import MambaLM, MambaState


class Decoder:
    """The model held weakly (a cache of decoders keyed by model frees them with it), the per-model check cached,
    the per-batch checks. A subclass gives `unsupported(model)` (why its kernel cannot run a model, or None),
    `max_batch` (rows by weight dtype), `state_views(state, b)` (the states as its kernel reads them, or None
    for a layout it cannot read) and `release()`."""

    max_batch: dict = {}

    @staticmethod
    def unsupported(model) -> str | None:
        raise NotImplementedError

    @staticmethod
    def state_views(state: MambaState, b: int):
        raise NotImplementedError

    def __init__(self, model: MambaLM):
        why = self.unsupported(model)
        if why is not None:
            raise ValueError(f"{type(self).__name__}: the fused decode step does not cover this model: {why}")
        self._model = weakref.ref(model)
        self._checked = None  # (key, reason): `unsupported` for the model as it was at key

    @property
    def model(self) -> MambaLM:
        model = self._model()
        if model is None:
            raise RuntimeError(f"{type(self).__name__}: its model has been freed")
        return model

    def supports(self, input_ids: Tensor, state: MambaState) -> str | None:
        """Why `step` cannot take this batch (None when it can). The per-model part is cached under a key that
        changes when the weights are replaced or converted (walking every parameter each step would cost a
        noticeable part of a step: docs/engine.md)."""
        model = self.model
        w, layers = model.lm_head.weight, model.backbone.layers
        key = (id(w), w.dtype, w.device, id(layers[0].mixer.in_proj.weight), id(layers[-1].mixer.out_proj.weight))
        if self._checked is None or self._checked[0] != key:
            self._checked = (key, self.unsupported(model))
        if self._checked[1] is not None:
            return self._checked[1]
        b = input_ids.shape[0] if isinstance(input_ids, Tensor) and input_ids.dim() == 1 else 0
        limit = self.max_batch[w.dtype]
        if b > limit:
            return f"batch above {limit} rows, the fused limit for {str(w.dtype)[6:]} (torch's GEMMs are faster beyond)"
        if not isinstance(state, MambaState):
            return "state is not a MambaState"
        if state.ssm.dtype != torch.float32 or state.conv.dtype != w.dtype:
            return f"state dtypes conv {state.conv.dtype}, ssm {state.ssm.dtype} (want {w.dtype}, float32)"
        if state.conv.device.type != "cpu" or state.ssm.device.type != "cpu":
            return "state not on the CPU"
        if self.state_views(state, b) is None:
            return "state layout: neither contiguous nor the first rows of a contiguous pool"
        return None
