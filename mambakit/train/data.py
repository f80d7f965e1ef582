"""The trainer's data: corpus → train/val split by document → tokenizer → cached token arrays."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.text import (SHAKESPEARE_VAL_PLAYS, TokenArray, read_corpus, shakespeare_plays, split_documents,
                         tokenize_cached)
from .config import TrainConfig
from .distributed import Dist


@dataclass
class Data:
    tokenizer: object
    train: TokenArray
    val: TokenArray


def make_tokenizer(cfg: TrainConfig, train_docs: dict[str, str], resume_dir: Path | None):
    """The run's tokenizer: bytes, a BPE trained on the training split (or, when resuming, the BPE the run
    was trained with), or a tokenizer.json."""
    from ..tokenizer import ByteTokenizer, load_tokenizer, train_bpe

    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "bpe":
        return load_tokenizer(resume_dir) if resume_dir is not None else train_bpe(list(train_docs.values()),
                                                                                  cfg.bpe_vocab_size)
    return load_tokenizer(cfg.tokenizer)


def prepare_data(cfg: TrainConfig, d: Dist, out_dir: Path, resume_dir: Path | None) -> Data:
    """The train and validation token arrays and their tokenizer. Rank 0 goes first (it trains a BPE and
    fills the token cache); the other ranks then load its tokenizer and read the cache."""
    from ..tokenizer import load_tokenizer

    if cfg.data == "shakespeare":
        docs, val_names = shakespeare_plays(), cfg.val_docs or list(SHAKESPEARE_VAL_PLAYS)
    else:
        docs, val_names = read_corpus([p for p in cfg.data.split(",") if p]), cfg.val_docs
    train_docs, val_docs = split_documents(docs, val_names, cfg.val_fraction)
    bpe_dir = out_dir / "tokenizer"
    if d.main:
        tok = make_tokenizer(cfg, train_docs, resume_dir)
        if cfg.tokenizer == "bpe":
            tok.save(bpe_dir)
    d.barrier()
    if not d.main:
        tok = load_tokenizer(bpe_dir) if cfg.tokenizer == "bpe" else make_tokenizer(cfg, train_docs, resume_dir)
    for turn in (True, False):  # rank 0 tokenizes (or reads the cache) first, then the others read the cache
        if turn == d.main:
            data = Data(tok, tokenize_cached(train_docs, tok, cfg.cache_dir),
                        tokenize_cached(val_docs, tok, cfg.cache_dir))
        d.barrier()
    return data
