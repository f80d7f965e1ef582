"""The GPU backend ("triton"): Triton kernels for the scan (scan.py), the causal conv (conv.py) and both
decoding steps (step.py), with the helpers they share (common.py).

Triton is optional: mambakit.ops imports these modules on the first call with backend "triton". The entry
points trust their arguments: only mambakit.ops calls them, after checking.
"""
