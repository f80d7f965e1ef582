"""Baselines the paper compares Mamba against, as reusable library code.

- `mambakit.baselines.transformer`: a pre-norm Transformer language model (absolute or rotary positions,
  GELU or SwiGLU MLP, KV-cache decoding) with sizes matching the Mamba presets.
- `mambakit.baselines.s4d`: the diagonal LTI SSM (S4D), stand-alone or inside the Mamba block.

Import the submodule you need; this package imports nothing itself.
"""
