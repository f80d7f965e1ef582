"""The forecasting network: per-window normalisation → input projection → Mamba residual blocks → direct head.

Shapes (b windows, L context steps, C series, F covariates, H horizon, Q quantiles, D d_model):

    x (b, L, C) raw values ──RevIN──> z = (x − loc) / scale, loc and scale (b, 1, C) of the context window
    [z, cov] (b, L, C + F) ──in_proj──> (b, L, D)            (a linear projection replaces the token embedding)
    n_layer × ResidualBlock (mambakit.model: r ← r + Mamba(RMSNorm(r)))  (b, L, D)
    RMSNorm, last position ──head──> (b, H, C, Q) normalised corrections
    + base (b, H, C): a simple forecast read off z (last value, or seasonal naive)  (+ skip: a linear map of z, L → H)
    forecasts × scale + loc: back to the data's units

Normalising every window by its own mean and spread (RevIN, Kim et al. 2022) makes the network see every
window on one scale, so a level shift or a growing trend does not move inputs out of the training range; the
head works in that normalised space and its output is mapped back. The head is "direct": all H steps come
from the last hidden state at once (no autoregressive feedback of forecasts, so no error accumulation; the
selective state of Section 3 summarises the context). Quantiles are made non-crossing by construction: the
median is predicted and the other quantiles are reached by adding (subtracting) positive softplus increments.

The network predicts a *correction to a base forecast*, not the forecast itself (`ForecastConfig.base`): the
last value ("last", the naive forecast) or the value one season before each target step ("seasonal", the
seasonal-naive forecast), both read off the normalised context, so they cost nothing and are exact in the data's
units after denormalising. The head starts near zero, so an untrained network already forecasts like the base
and training only has to learn what the base misses (the residual-learning argument of He et al. 2016; the
classical "forecast the seasonal difference" of SARIMA). With a few hundred training windows the deep branch
otherwise has to rediscover persistence and seasonality from scratch, which it does badly on short series
(elec_equip, 120 windows: worse than seasonal naive without a base). base="none" forecasts around the context
mean (plain RevIN).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..config import MambaConfig
from ..model import ResidualBlock, RMSNorm
from .config import ForecastConfig

_MIN_SCALE = 1e-5


def window_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """loc, scale (b, 1, C) of context windows x (b, L, C): mean and standard deviation, the scale floored
    relative to the level so that a constant window does not divide by zero."""
    loc = x.mean(dim=1, keepdim=True)
    scale = x.std(dim=1, keepdim=True, unbiased=False)
    floor = _MIN_SCALE * (loc.abs() + 1.0)
    return loc, torch.maximum(scale, floor)


class MambaForecastNet(nn.Module):
    def __init__(self, config: ForecastConfig, n_channels: int, n_covariates: int = 0):
        super().__init__()
        c = config
        self.config, self.n_channels, self.n_covariates = c, n_channels, n_covariates
        # vocab_size is unused here (no embedding); MambaConfig needs one.
        self.mamba_config = MambaConfig(d_model=c.d_model, n_layer=c.n_layer, vocab_size=1, d_state=c.d_state,
                                        expand=c.expand)
        # channel_independent: the encoder reads one series at a time (C times more, shared-weight samples)
        per_pass = 1 if c.channel_independent else n_channels  # series one encoder pass reads and forecasts
        self.in_proj = nn.Linear(per_pass + n_covariates, c.d_model)
        self.layers = nn.ModuleList(ResidualBlock(self.mamba_config) for _ in range(c.n_layer))
        self.norm_f = RMSNorm(c.d_model, self.mamba_config.norm_eps)
        self.head = nn.Linear(c.d_model, c.horizon * per_pass * c.n_outputs)
        # a linear map from the normalised context to the horizon, per series (shared across series): a linear
        # autoregression the Mamba branch corrects. With a few hundred windows it finds seasonal/trend
        # structure sooner than the deep branch alone (the role of the linear part in DLinear, Zeng et al. 2023).
        self.skip = nn.Linear(c.context, c.horizon) if c.linear_skip else None
        self.base = c.resolved_base(c.season)
        # base="seasonal": target step h copies context position L − m + (h mod m) (the last season, repeated)
        m = c.season
        self.register_buffer("base_index", torch.arange(c.horizon) % m + c.context - m if self.base == "seasonal"
                             else torch.full((c.horizon,), c.context - 1), persistent=False)
        if c.quantiles:
            self.register_buffer("quantile_levels", torch.tensor(c.quantiles, dtype=torch.float32), persistent=False)
        with torch.no_grad():
            # out_proj / sqrt(n_layer), as MambaLM does (GPT-2's scheme for residual branches)
            for layer in self.layers:
                nn.init.kaiming_uniform_(layer.mixer.out_proj.weight, a=math.sqrt(5))
                layer.mixer.out_proj.weight /= math.sqrt(c.n_layer)
            self.head.weight.mul_(0.1)
            self.head.bias.zero_()
            if self.skip is not None:
                self.skip.weight.zero_()
                self.skip.bias.zero_()

    def forward(self, x: Tensor, cov: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x (b, L, C), cov (b, L, F) or None → (normalised forecasts (b, H, C, Q), loc, scale (b, 1, C)).

        The forecasts in the data's units are `out * scale[..., None] + loc[..., None]` (see `denormalise`)."""
        b, L, C = x.shape
        if C != self.n_channels:
            raise ValueError(f"expected {self.n_channels} series, got input of shape {tuple(x.shape)}")
        if self.n_covariates and (cov is None or cov.shape != (b, L, self.n_covariates)):
            raise ValueError(f"expected covariates of shape {(b, L, self.n_covariates)}, got "
                             f"{None if cov is None else tuple(cov.shape)}")
        c = self.config
        loc, scale = window_stats(x)
        z = (x - loc) / scale  # (b, L, C)
        inp = z
        if c.channel_independent:
            inp = z.transpose(1, 2).reshape(b * C, L, 1)  # (b·C, L, 1): one series per row
            if self.n_covariates:
                cov = cov[:, None].expand(b, C, L, self.n_covariates).reshape(b * C, L, self.n_covariates)
        if self.n_covariates:
            inp = torch.cat([inp, cov.to(z.dtype)], dim=-1)  # (b, L, C + F), or (b·C, L, 1 + F)
        h = self.in_proj(inp)  # (b, L, D) or (b·C, L, D)
        for layer in self.layers:
            h, _, _ = layer(h)
        h = self.norm_f(h[:, -1])  # (b, D) or (b·C, D): the state after the whole context
        if c.channel_independent:
            out = self.head(h).view(b, C, c.horizon, c.n_outputs).transpose(1, 2)  # (b·C, H·Q) → (b, H, C, Q)
        else:
            out = self.head(h).view(b, c.horizon, C, c.n_outputs)  # (b, H, C, Q)
        if self.base != "none":
            out = out + z[:, self.base_index][..., None]  # (b, H, C): base forecast, shifts every quantile alike
        if self.skip is not None:
            lin = self.skip(z.transpose(1, 2)).transpose(1, 2)  # (b, C, L) → (b, C, H) → (b, H, C)
            out = out + lin[..., None]  # shifts every quantile alike (added before the monotone map's median)
        if c.quantiles:
            out = self._monotone(out)
        return out, loc, scale

    def _monotone(self, raw: Tensor) -> Tensor:
        """(…, Q) raw outputs → non-decreasing quantiles: median + cumulative positive steps either side."""
        m = self.config.quantiles.index(0.5)
        median = raw[..., m:m + 1]
        up = median + torch.cumsum(F.softplus(raw[..., m + 1:]), dim=-1)
        down = median - torch.cumsum(F.softplus(raw[..., :m].flip(-1)), dim=-1).flip(-1)
        return torch.cat([down, median, up], dim=-1)

    @staticmethod
    def denormalise(out: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
        """(b, H, C, Q) normalised → data units (loc, scale (b, 1, C) broadcast over H and Q)."""
        return out * scale[..., None] + loc[..., None]
