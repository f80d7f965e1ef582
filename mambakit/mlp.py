"""GatedMLP: the MLP that the official hybrid puts after every mixer when d_intermediate > 0.

Official mamba_ssm/modules/mlp.py (the "Mamba-2 + MLP" and "Mamba-2-Attention" models of the Mamba-2 paper):
fc1: D → 2·F, split [value | gate]; out = fc2(value · SiLU(gate)), F = d_intermediate rounded up to a multiple
of 128; no biases. Parameter names are the official ones (`mlp.fc1.weight`, `mlp.fc2.weight`), so a block's
state_dict is the official layout.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

MULTIPLE_OF = 128  # the official GatedMLP's default: hidden widths are rounded up to it


def mlp_width(d_intermediate: int) -> int:
    """The hidden width F of a GatedMLP asked for d_intermediate (rounded up, as the official class does)."""
    return -(-d_intermediate // MULTIPLE_OF) * MULTIPLE_OF


class GatedMLP(nn.Module):
    """x (…, D) → fc2(v · SiLU(g)) (…, D), where [v | g] = fc1(x), each (…, F)."""

    def __init__(self, d_model: int, d_intermediate: int):
        super().__init__()
        width = mlp_width(d_intermediate)
        self.fc1 = nn.Linear(d_model, 2 * width, bias=False)
        self.fc2 = nn.Linear(width, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        v, g = self.fc1(x).chunk(2, dim=-1)  # (…, F) each: the value half first
        return self.fc2(v * F.silu(g))
