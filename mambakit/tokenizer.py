"""Tokenizers: a built-in byte-level one, and any `tokenizer.json` through the `tokenizers` library.

    ByteTokenizer()                  ids 0..255 are the UTF-8 bytes; 256 = <|endoftext|> (eos), 257 = <|padding|>
    HFTokenizer("tokenizer.json")    e.g. the GPT-NeoX-20B tokenizer of the official Mamba checkpoints
    load_tokenizer(dir_or_file)      reads back what `tok.save(dir)` wrote (or any tokenizer.json)
    train_bpe(texts, vocab_size)     a byte-level BPE trained with `tokenizers`' trainer → HFTokenizer

Both classes share one small interface: `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`,
`eos_token_id`, `pad_token_id`, `save(dir)`. `DecodeStream` turns a growing list of ids into text pieces
for streaming (it holds back bytes of a character that is not complete yet).

Files in a directory: `tokenizer.json` (the `tokenizers` format, what transformers also reads) and/or
`mambakit_tokenizer.json` (which tokenizer this is, and its eos token when that is not a standard name).
`save(dir)` replaces both as one unit (mambakit._io.replace_files): a ByteTokenizer saved over a BPE leaves
no stale tokenizer.json behind. A file that is not what it should be (not JSON, a directory, an unknown type)
is refused with a ValueError naming it.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from ._io import Data, replace_files

TOKENIZER_JSON = "tokenizer.json"
MAMBAKIT_JSON = "mambakit_tokenizer.json"
TOKENIZER_FILES = (TOKENIZER_JSON, MAMBAKIT_JSON)  # what a saved tokenizer may consist of
_MAX_JSON_BYTES = 256 << 20  # larger than any real tokenizer.json (GPT-NeoX's: 2 MB); guards memory

# Names that mark the end of a document in common tokenizer.json files, in order of preference.
_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>", "[SEP]")
_PAD_NAMES = ("<|padding|>", "<pad>", "[PAD]", "<|pad|>")


def _check_ids(ids, vocab_size: int) -> list[int]:
    """ids as a list of ints in [0, vocab_size), or a clear error."""
    if hasattr(ids, "tolist"):  # a tensor or an array
        ids = ids.tolist()
    ids = list(ids)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"token ids must be ints, got {i!r} ({type(i).__name__})")
        if not 0 <= i < vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {vocab_size})")
    return ids


def _check_text(text) -> str:
    if not isinstance(text, str):
        raise TypeError(f"encode takes a str, got {type(text).__name__}")
    return text


# --------------------------------------------------------------------------------------------- byte-level
class ByteTokenizer:
    """UTF-8 bytes as tokens: id b (0..255) is the byte b; 256 is <|endoftext|> (eos, also the document
    separator / bos), 257 is <|padding|>. Any text encodes, nothing is unknown; vocab_size = 258."""

    eos_token = "<|endoftext|>"
    pad_token = "<|padding|>"
    eos_token_id = 256
    bos_token_id = 256  # one separator token between documents, as GPT-NeoX does
    pad_token_id = 257

    @property
    def vocab_size(self) -> int:
        return 258

    def encode(self, text: str) -> list[int]:
        return list(_check_text(text).encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Bytes → text; an incomplete or invalid UTF-8 sequence becomes U+FFFD. Special ids are dropped
        (or written as their names with skip_special_tokens=False)."""
        out, run = [], bytearray()
        for i in _check_ids(ids, self.vocab_size):
            if i < 256:
                run.append(i)
                continue
            if not skip_special_tokens:
                out.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
                out.append(self.eos_token if i == self.eos_token_id else self.pad_token)
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def files(self) -> dict[str, Data]:
        """What save writes: {file name: contents}."""
        return {MAMBAKIT_JSON: _json_text({"type": "byte", "version": 1})}

    def save(self, directory) -> None:
        save_tokenizer(self, directory)

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=258, eos=256, pad=257)"


# -------------------------------------------------------------------------------------- tokenizer.json
class HFTokenizer:
    """A `tokenizers.Tokenizer` read from a tokenizer.json (e.g. GPT-NeoX-20B's, vocab 50277).

    eos_token: the name of the end-of-document token; by default the first of the usual names
    (<|endoftext|>, </s>, <eos>, …) that the vocabulary has. encode applies the file's own post-processor
    (a bos token, if the file says so), as the model was trained."""

    def __init__(self, path_or_tokenizer, eos_token: str | None = None, pad_token: str | None = None):
        tokenizers = _import_tokenizers()
        if isinstance(path_or_tokenizer, tokenizers.Tokenizer):
            self._tok = path_or_tokenizer
        else:
            path = Path(path_or_tokenizer)
            if path.is_dir():
                path = path / TOKENIZER_JSON
            if not path.exists():
                raise FileNotFoundError(f"no tokenizer file at {path}")
            text = _read_text(path)
            try:
                self._tok = tokenizers.Tokenizer.from_str(text)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # a plain Exception on a malformed file; a Rust panic is a BaseException
                raise ValueError(f"{path} is not a valid tokenizer.json: {_first_line(e)}") from None
        self.eos_token = self._find_token(eos_token, _EOS_NAMES, "eos_token")
        self.pad_token = self._find_token(pad_token, _PAD_NAMES, "pad_token")

    def _find_token(self, name: str | None, defaults: tuple[str, ...], what: str) -> str | None:
        if name is not None:
            if self._tok.token_to_id(name) is None:
                raise ValueError(f"{what} {name!r} is not in this tokenizer's vocabulary")
            return name
        return next((t for t in defaults if self._tok.token_to_id(t) is not None), None)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self._tok.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self._tok.token_to_id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added (special) tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self):
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(_check_text(text)).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(_check_ids(ids, self.vocab_size), skip_special_tokens=skip_special_tokens)

    def files(self) -> dict[str, Data]:
        """What save writes: {file name: contents}."""
        return {TOKENIZER_JSON: self._tok.to_str(),
                MAMBAKIT_JSON: _json_text({"type": "tokenizer.json", "version": 1, "eos_token": self.eos_token,
                                           "pad_token": self.pad_token})}

    def save(self, directory) -> None:
        save_tokenizer(self, directory)

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r} ({self.eos_token_id}))"


# ---------------------------------------------------------------------------------------------- loading
def load_tokenizer(path) -> ByteTokenizer | HFTokenizer:
    """A tokenizer from a directory (what `save` wrote, or a bare tokenizer.json) or a tokenizer.json file."""
    p = Path(path)
    if p.is_file():
        return HFTokenizer(p)
    if not p.is_dir():
        raise FileNotFoundError(f"no tokenizer at {p} (want a directory or a tokenizer.json file)")
    tok = load_tokenizer_files(*(p / n if os.path.lexists(p / n) else None for n in TOKENIZER_FILES))
    if tok is None:
        raise FileNotFoundError(f"{p} has no {TOKENIZER_JSON} or {MAMBAKIT_JSON}")
    return tok


def load_tokenizer_files(tokenizer_json: Path | None, mambakit_json: Path | None) -> ByteTokenizer | HFTokenizer | None:
    """The tokenizer made of these two files (either may be None: absent); None if both are. For readers that
    find the files elsewhere than under their names (mambakit.checkpoint reads through a save journal)."""
    if tokenizer_json is None and mambakit_json is None:
        return None
    meta = _read_json(mambakit_json) if mambakit_json is not None else {}
    kind, version = meta.get("type"), meta.get("version", 1)
    if mambakit_json is not None:
        if kind not in ("byte", "tokenizer.json"):
            raise ValueError(f"{mambakit_json} names tokenizer type {kind!r}; known: 'byte', 'tokenizer.json'")
        if version != 1:
            raise ValueError(f"{mambakit_json} has version {version!r}; this mambakit reads version 1")
        for key in ("eos_token", "pad_token"):
            if meta.get(key) is not None and not isinstance(meta[key], str):
                raise ValueError(f"{mambakit_json}: {key} must be a string or null, got {meta[key]!r}")
    if kind == "byte":
        return ByteTokenizer()
    if tokenizer_json is None:
        raise ValueError(f"{mambakit_json} names tokenizer type {kind!r} but {TOKENIZER_JSON} is missing")
    _check_regular(tokenizer_json)  # HFTokenizer would look inside a directory of that name
    return HFTokenizer(tokenizer_json, eos_token=meta.get("eos_token"), pad_token=meta.get("pad_token"))


def find_tokenizer(directory) -> ByteTokenizer | HFTokenizer | None:
    """The tokenizer saved next to a checkpoint, or None when there is none. A tokenizer file that is there
    but unreadable is an error, never silently None."""
    d = Path(directory)
    if not d.is_dir():
        return None
    return load_tokenizer_files(*(d / n if os.path.lexists(d / n) else None for n in TOKENIZER_FILES))


def tokenizer_files(tokenizer) -> dict[str, Data]:
    """{file name: contents} of what `tokenizer` saves: its files() where it has one, else what its save(dir)
    writes into a scratch directory (a tokenizer class of the user's own)."""
    if hasattr(tokenizer, "files"):
        return dict(tokenizer.files())
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save(d)
        found = {}
        for f in sorted(Path(d).iterdir()):
            if not f.is_file():
                raise ValueError(f"{type(tokenizer).__name__}.save writes {f.name}, which is not a file; "
                                 "mambakit can only save tokenizers made of files in one directory")
            found[f.name] = f.read_bytes()
        return found


def save_tokenizer(tokenizer, directory) -> None:
    """Writes the tokenizer's files into `directory` as one unit, removing the other tokenizer file of an
    earlier save (a stale tokenizer.json would otherwise be read with the new mambakit_tokenizer.json)."""
    files = tokenizer_files(tokenizer)
    replace_files(directory, files, remove=[n for n in TOKENIZER_FILES if n not in files])


# --------------------------------------------------------------------------------------------- training
def train_bpe(
    texts_or_files: Iterable[str | os.PathLike] | str | os.PathLike,
    vocab_size: int,
    special_tokens: Sequence[str] = ("<|endoftext|>", "<|padding|>"),
    min_frequency: int = 2,
    show_progress: bool = False,
) -> HFTokenizer:
    """Trains a byte-level BPE (GPT-2 / GPT-NeoX style: every byte is in the base vocabulary, so any text
    encodes). Items that are `str` are texts; `pathlib.Path` (os.PathLike) items are files read as UTF-8.
    special_tokens get the first ids (0, 1, …); the first is the eos token."""
    tokenizers = _import_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if isinstance(texts_or_files, (str, os.PathLike)):
        texts_or_files = [texts_or_files]
    items = list(texts_or_files)
    if not items:
        raise ValueError("train_bpe needs at least one text or file")
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 byte symbols
    if not isinstance(vocab_size, int) or vocab_size < len(alphabet) + len(special_tokens):
        raise ValueError(f"vocab_size must be an int >= {len(alphabet) + len(special_tokens)} "
                         f"(256 bytes + {len(special_tokens)} special tokens), got {vocab_size!r}")
    for it in items:
        if isinstance(it, os.PathLike) and not Path(it).is_file():
            raise FileNotFoundError(f"no training file at {it}")
        if not isinstance(it, (str, os.PathLike)):
            raise TypeError(f"train_bpe takes texts (str) or files (pathlib.Path), got {type(it).__name__}")

    def chunks():
        for it in items:
            if isinstance(it, os.PathLike):
                with open(it, encoding="utf-8") as f:
                    yield from f  # line by line: the pre-tokenizer never merges across lines' ends anyway
            else:
                yield it

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
                                  special_tokens=list(special_tokens), initial_alphabet=alphabet)
    tok.train_from_iterator(chunks(), trainer=trainer)
    eos = special_tokens[0] if special_tokens else None
    pad = next((t for t in special_tokens if t in _PAD_NAMES), None)
    return HFTokenizer(tok, eos_token=eos, pad_token=pad)


# ------------------------------------------------------------------------------------------- streaming
class DecodeStream:
    """Ids in, new text out: `push(id)` returns the text that id completes ("" while a multi-byte
    character or a merge is still incomplete). Decoding a short window of recent ids keeps it O(1) per
    token and gives the same text as decoding everything at once."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start: ids before it are already printed and need no context
        self._read = 0  # ids before this are printed

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        text = self.tokenizer.decode(self.ids[self._prefix:])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""  # an incomplete character: wait for its next bytes
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(before):]

    def flush(self) -> str:
        """Whatever is still held back (e.g. a truncated character, as U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        text = self.tokenizer.decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return text[len(before):]


# ------------------------------------------------------------------------------------------------ files
def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError("reading a tokenizer.json needs the `tokenizers` package: pip install tokenizers") from e
    return tokenizers


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:300]


def _check_regular(path: Path) -> None:
    """A ValueError naming the file unless it is a regular file of a plausible size: a directory, a FIFO (which
    would block a reader), a dangling link, a huge file."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "a special file"
        raise ValueError(f"{path} is {what}, not a tokenizer file")
    if st.st_size > _MAX_JSON_BYTES:
        raise ValueError(f"{path} is {st.st_size} bytes, more than any tokenizer file ({_MAX_JSON_BYTES})")


def _read_text(path: Path) -> str:
    _check_regular(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text (a corrupted file?)") from None
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(_read_text(path))
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path} is not valid JSON: {_first_line(e)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _json_text(obj: dict) -> str:
    return json.dumps(obj, indent=2) + "\n"
