"""mambakit: Mamba (selective state space models) in PyTorch, exact and fast on CPU.

Importing the package changes nothing in the process (no environment variables, no thread settings, no
memory moved); the public names below are loaded on first use.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# public name → the module that defines it
_PUBLIC = {
    "ops": None,
    "MambaConfig": "config", "PRESETS": "config",
    "MambaLM": "model", "Mamba": "model", "MambaOutput": "model", "MambaState": "model",
    "generate": "generate", "GenerationOutput": "generate",
    "ByteTokenizer": "tokenizer", "HFTokenizer": "tokenizer", "load_tokenizer": "tokenizer", "train_bpe": "tokenizer",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'mambakit' has no attribute {name!r}")
    module = _PUBLIC[name]
    value = importlib.import_module(f"{__name__}.{name}") if module is None else getattr(
        importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The import system binds every imported submodule as an attribute of its package. `generate` is both a
    submodule and the function users import from here: the function wins (as an eager `from .generate import
    generate` would make it)."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _PUBLIC.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
