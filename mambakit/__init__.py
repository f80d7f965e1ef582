"""mambakit: Mamba (selective state space models) in PyTorch, exact and fast on CPU."""

from . import ops
from .config import PRESETS, MambaConfig
from .generate import GenerationOutput, generate
from .model import Mamba, MambaLM, MambaOutput, MambaState
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, train_bpe

__version__ = "0.1.0"
__all__ = ["ops", "MambaConfig", "PRESETS", "MambaLM", "Mamba", "MambaOutput", "MambaState",
           "generate", "GenerationOutput", "ByteTokenizer", "HFTokenizer", "load_tokenizer", "train_bpe"]
