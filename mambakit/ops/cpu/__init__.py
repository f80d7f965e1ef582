"""The CPU backend ("cpu"): numba kernels for the scan and its decoding step (scan.py) and the causal conv and
its decoding step (conv.py).

primitives.py (vectorisable math, bfloat16 bits, LLVM IR emitters, kernel options and threads) and tasks.py
(phases of tasks inside one parallel region) are shared with the fused decode engine (mambakit/engine).
mambakit.ops imports the kernel modules on the first CPU call, so `import mambakit.ops` compiles nothing; the
entry points trust their arguments: only mambakit.ops calls them, after checking.
"""
