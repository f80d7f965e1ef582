"""mambakit: Mamba (selective state space models) in PyTorch, exact and fast on CPU."""

import os

# torch and numba's kernels share one OpenMP runtime. Its default wait policy keeps idle threads spinning
# after each parallel region; when the cores are shared (other processes, DDP ranks, CI) a spinning thread
# starves the thread a region waits for, and steps slow down 10× and more (measured on a 2-core machine).
# Passive waiting costs nothing measurable on an idle machine. It only takes effect if mambakit is imported
# before torch (as the `mambakit` command does); a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import ops  # noqa: E402
from .config import PRESETS, MambaConfig  # noqa: E402
from .generate import GenerationOutput, generate  # noqa: E402
from .model import Mamba, MambaLM, MambaOutput, MambaState  # noqa: E402
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, train_bpe  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ops", "MambaConfig", "PRESETS", "MambaLM", "Mamba", "MambaOutput", "MambaState",
           "generate", "GenerationOutput", "ByteTokenizer", "HFTokenizer", "load_tokenizer", "train_bpe"]
