"""Datasets for training: text corpora (text.py); the other modalities of design.md join here."""

from .text import (
    SHAKESPEARE_VAL_PLAYS,
    TokenArray,
    TokenWindows,
    read_corpus,
    shakespeare_plays,
    split_documents,
    tokenize_cached,
)

__all__ = [
    "SHAKESPEARE_VAL_PLAYS",
    "TokenArray",
    "TokenWindows",
    "read_corpus",
    "shakespeare_plays",
    "split_documents",
    "tokenize_cached",
]
