"""Heads on a Mamba backbone for tasks other than next-token prediction.

    SequenceClassifier(config, num_classes, pooling="last")     Backbone → pool over l → Linear → logits (b, C)
    SequenceClassifier.from_lm(lm, num_classes)                 the same on a (pre)trained MambaLM's backbone

Pooling (paper §4.3.3, App E.3.4): a causal model has seen the whole sequence only at its last position, so
the paper's Great-Apes head reads the LAST hidden state ("last"); "mean" averages every position (what
bidirectional encoders do; for a causal model it mixes in states that saw little of the input). Rows of
different lengths are right-padded and given `lengths`: "last" then reads position lengths − 1 and "mean"
averages the first `lengths` positions, so padding never changes a row's logits (causality: positions before
the padding never see it).

Inputs are token ids (b, l) or, for continuous inputs (spectrogram frames, …), `inputs_embeds` (b, l, D)
passed to the backbone in place of the embedding (Backbone.forward supports both).

`standardize(batches)` fixes a per-feature mean and scale of the pooled features (from a few training
batches) that the head subtracts and divides by. A pretrained LM's pooled states share a large common part and
differ between classes by a few hundredths (measured on the DNA LMs: std across windows 0.013 against a mean
magnitude of 0.95), so an unnormalised linear head needs weights of order 1/0.01 and many steps to get there;
standardised, a short fine-tuning run can use them. The default (no call) is the identity.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import MambaConfig
from .model import Backbone, MambaLM

POOLINGS = ("last", "mean")


@dataclass
class ClassifierOutput:
    logits: Tensor  # (b, num_classes), float32
    loss: Optional[Tensor] = None  # mean cross-entropy when labels are given
    pooled: Optional[Tensor] = None  # (b, D) the pooled features the linear head read


class SequenceClassifier(nn.Module):
    """Backbone (embedding → Mamba blocks → final norm) → pooling over the sequence → dropout → Linear.
    mixer_cls: None for config.layer's mixer (Mamba or Mamba2), or a subclass of it (e.g. the S4D baseline)."""

    def __init__(self, config: MambaConfig, num_classes: int, pooling: str = "last", dropout: float = 0.0,
                 mixer_cls: type[nn.Module] | None = None, backbone: Backbone | None = None):
        super().__init__()
        if not isinstance(config, MambaConfig):
            raise TypeError(f"SequenceClassifier needs a MambaConfig, got {type(config).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.config, self.num_classes, self.pooling = config, num_classes, pooling
        if backbone is None:
            # a fresh backbone with the official init (MambaLM.reset_parameters does the backbone's part)
            backbone = MambaLM(config, mixer_cls).backbone
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("feature_mean", torch.zeros(config.d_model))
        self.register_buffer("feature_scale", torch.ones(config.d_model))
        self.head = nn.Linear(config.d_model, num_classes)
        nn.init.zeros_(self.head.bias)
        nn.init.normal_(self.head.weight, std=config.initializer_range)

    @classmethod
    def from_lm(cls, lm: MambaLM, num_classes: int, pooling: str = "last", dropout: float = 0.0,
                copy_weights: bool = True) -> "SequenceClassifier":
        """A classifier on `lm`'s backbone (fine-tuning a pretrained model, paper App E.3.4). With
        copy_weights (default) the backbone is deep-copied, so fine-tuning leaves `lm` as it was."""
        if not isinstance(lm, MambaLM):
            raise TypeError(f"from_lm needs a MambaLM, got {type(lm).__name__}")
        backbone = copy.deepcopy(lm.backbone) if copy_weights else lm.backbone
        return cls(lm.config, num_classes, pooling, dropout, backbone=backbone)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: Tensor | None = None, labels: Tensor | None = None, lengths: Tensor | None = None,
                inputs_embeds: Tensor | None = None) -> ClassifierOutput:
        """input_ids (b, l) or inputs_embeds (b, l, D); labels (b,) in [0, num_classes); lengths (b,) in
        [1, l] for right-padded rows (default: every row is l long)."""
        x = input_ids if input_ids is not None else inputs_embeds
        self._check(input_ids, inputs_embeds, labels, lengths)
        b, l = x.shape[:2]
        h, _ = self.backbone(input_ids, inputs_embeds=inputs_embeds)  # (b, l, D)
        if lengths is None:
            lengths = torch.full((b,), l, dtype=torch.long, device=h.device)
        lengths = lengths.to(device=h.device, dtype=torch.long)
        if self.pooling == "last":
            pooled = h[torch.arange(b, device=h.device), lengths - 1]  # (b, D)
        else:
            mask = (torch.arange(l, device=h.device)[None, :] < lengths[:, None]).to(h.dtype)  # (b, l)
            pooled = (h * mask[..., None]).sum(1) / lengths[:, None].to(h.dtype)  # (b, D)
        feats = (pooled - self.feature_mean.to(pooled.dtype)) / self.feature_scale.to(pooled.dtype)
        logits = self.head(self.dropout(feats)).float()  # (b, C)
        loss = F.cross_entropy(logits, labels.to(logits.device)) if labels is not None else None
        return ClassifierOutput(logits=logits, loss=loss, pooled=pooled)

    @torch.no_grad()
    def standardize(self, batches, eps: float = 1e-4) -> None:
        """Sets feature_mean / feature_scale to the mean and standard deviation of the pooled features over
        `batches`: an iterable of input_ids tensors (b, l), or of dicts of forward's keyword arguments."""
        was_training = self.training
        self.eval()
        self.feature_mean.zero_()
        self.feature_scale.fill_(1.0)
        pooled = []
        for batch in batches:
            kwargs = batch if isinstance(batch, dict) else {"input_ids": batch}
            pooled.append(self(**kwargs).pooled.float())
        pooled = torch.cat(pooled)  # (n, D)
        if len(pooled) < 2:
            raise ValueError(f"standardize needs at least 2 sequences, got {len(pooled)}")
        self.feature_mean.copy_(pooled.mean(0))
        self.feature_scale.copy_(pooled.std(0).clamp_min(eps))
        self.train(was_training)

    def _check(self, input_ids, inputs_embeds, labels, lengths) -> None:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("SequenceClassifier takes exactly one of input_ids (b, l) and inputs_embeds (b, l, D)")
        if input_ids is not None:
            if not isinstance(input_ids, Tensor) or input_ids.dtype.is_floating_point or input_ids.dim() != 2:
                raise ValueError(f"input_ids must be an integer tensor (batch, length), got "
                                 f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                                 f"{tuple(getattr(input_ids, 'shape', ()))}")
            if input_ids.numel() == 0:
                raise ValueError(f"input_ids must hold at least one token per row, got {tuple(input_ids.shape)}")
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"input_ids contains token id {lo if lo < 0 else hi}, outside the vocabulary "
                                 f"[0, {self.config.vocab_size})")
            b, l = input_ids.shape
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.d_model:
                raise ValueError(f"inputs_embeds must be (batch, length, d_model={self.config.d_model}), got "
                                 f"{tuple(inputs_embeds.shape)}")
            if not bool(torch.isfinite(inputs_embeds).all()):
                raise ValueError("inputs_embeds contains NaN or infinite values")
            b, l = inputs_embeds.shape[:2]
            if b == 0 or l == 0:
                raise ValueError(f"inputs_embeds must hold at least one position per row, got "
                                 f"{tuple(inputs_embeds.shape)}")
        if labels is not None:
            if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or tuple(labels.shape) != (b,):
                raise ValueError(f"labels must be an integer tensor of shape ({b},), got "
                                 f"{tuple(getattr(labels, 'shape', ()))}")
            if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
                raise ValueError(f"labels must be in [0, {self.num_classes}), got values in "
                                 f"[{int(labels.min())}, {int(labels.max())}]")
        if lengths is not None:
            if not isinstance(lengths, Tensor) or lengths.dtype.is_floating_point or tuple(lengths.shape) != (b,):
                raise ValueError(f"lengths must be an integer tensor of shape ({b},)")
            if int(lengths.min()) < 1 or int(lengths.max()) > l:
                raise ValueError(f"lengths must be in [1, {l}] (the padded length), got "
                                 f"[{int(lengths.min())}, {int(lengths.max())}]")
