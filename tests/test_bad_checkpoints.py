"""Corrupted checkpoints, table-driven: every variant of a small saved model either loads equal to what was saved
or is refused with one CheckpointError that names the directory. Nothing crashes, hangs or loads wrong.

The table (CASES) is built from four base directories of one tiny model with a BPE tokenizer: the transformers
layout as mambakit writes it (with per-tensor checksums), the official layout (a pickle), the transformers layout
as another tool writes it (no checksums), and a sharded one with an index. Each case copies a base and damages
it: truncations, garbage, a directory / FIFO / dangling link / nothing where a file should be, byte flips in
headers and data, dtype changes, NaN/inf, swapped, duplicated, missing and extra tensor names, shape edits,
malformed safetensors headers, pickles of the wrong things, configs of other families or of the wrong shape,
shard indexes pointing outside the directory, broken tokenizer files, crafted save journals.

Outcomes: "equal" (loads, same config, weights and tokenizer), "refused" (CheckpointError naming the directory),
"crashed" (any other exception, or a hang), "silent" (loads, but differs). Cases marked `undetectable` are
valid files of another model that no reader can tell apart (a swap of two same-shape tensors in a file without
checksums, a flipped weight byte there, a JSON edit that is still a valid file): they may load differently and
are counted apart. Run as a script for the figures on any mambakit tree (`--isolate`: each case in a forked
child, so that a SIGSEGV/SIGBUS of an older version counts as a crash instead of ending the run):

    PYTHONPATH=<tree> python tests/test_bad_checkpoints.py [--isolate]
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import pickle
import random
import select
import shutil
import signal
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from mambakit import MambaConfig, MambaLM
from mambakit.checkpoint import CheckpointError
from mambakit.tokenizer import train_bpe

SAMPLE = "the quick brown fox, naïve café 🙂"
CASE_TIMEOUT_S = 20  # a load that takes longer is a hang (a FIFO opened blocking, a 10^9-layer model, …)


# ------------------------------------------------------------------------------------------------- bases
def make_model() -> MambaLM:
    """d_model 16 → d_inner 32: D, conv1d.bias and dt_proj.bias share a shape, as do the layers' tensors, so
    that swaps of same-shape tensors are among the cases. Every parameter perturbed: nothing at its init."""
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=270, d_state=4)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    corpus = ["the quick brown fox jumps over the lazy dog. " * 20, "Mamba: linear-time sequence modeling. " * 20]
    model.tokenizer = train_bpe(corpus, vocab_size=270)
    return model


def make_bases(root: Path, model: MambaLM) -> dict[str, Path]:
    bases = {"hf": root / "hf", "official": root / "official", "foreign": root / "foreign",
             "sharded": root / "sharded"}
    model.save_pretrained(bases["hf"], layout="hf")
    model.save_pretrained(bases["official"], layout="official")
    shutil.copytree(bases["hf"], bases["foreign"])  # as transformers or a script would write it: no checksums
    sd = load_file(bases["foreign"] / "model.safetensors")
    save_file(sd, bases["foreign"] / "model.safetensors", metadata={"format": "pt"})
    shutil.copytree(bases["foreign"], bases["sharded"])
    (bases["sharded"] / "model.safetensors").unlink()
    keys = sorted(sd)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, bases["sharded"] / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    _write_json(bases["sharded"] / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    return bases


# ------------------------------------------------------------------------------------------ classification
@contextlib.contextmanager
def _deadline(seconds: float):
    def fire(*_):
        raise TimeoutError(f"no answer after {seconds} s (a hang)")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def expected_config(ref: MambaLM, base: str) -> MambaConfig:
    """The transformers layout stores the padded vocabulary (and no padding multiple)."""
    if base == "official":
        return ref.config
    c = ref.config.to_dict()
    return MambaConfig(**{**c, "vocab_size": ref.config.padded_vocab_size, "pad_vocab_size_multiple": 1})


def same_model(loaded: MambaLM, ref: MambaLM, config: MambaConfig) -> bool:
    if loaded.config != config:
        return False
    a, b = loaded.state_dict(), ref.state_dict()
    if set(a) != set(b) or not all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a):
        return False
    ta, tb = loaded.tokenizer, ref.tokenizer
    if (ta is None) != (tb is None):
        return False
    return ta is None or (type(ta) is type(tb) and ta.encode(SAMPLE) == tb.encode(SAMPLE)
                          and ta.eos_token_id == tb.eos_token_id and ta.pad_token_id == tb.pad_token_id
                          and ta.vocab_size == tb.vocab_size)


def classify(directory: Path, ref: MambaLM, config: MambaConfig) -> tuple[str, str]:
    try:
        with _deadline(CASE_TIMEOUT_S):
            loaded = MambaLM.from_pretrained(directory)
    except CheckpointError as e:
        msg = str(e)
        if str(directory) not in msg:
            return "crashed", f"CheckpointError that names no file: {msg[:200]}"
        if "Traceback" in msg or len(msg) > 2000:
            return "crashed", f"CheckpointError that is not one clear message: {msg[:200]}"
        return "refused", msg.replace(str(directory), "<dir>")[:200]
    except BaseException as e:  # noqa: BLE001 - anything else is a crash by definition
        if isinstance(e, KeyboardInterrupt):
            raise
        if isinstance(e, (ValueError, FileNotFoundError)) and str(directory) in str(e) and "\n" not in str(e):
            # clear, but not the one error type callers catch (older versions): counted apart
            return "refused, not CheckpointError", f"{type(e).__name__}: " + str(e).replace(str(directory), "<dir>")
        return "crashed", f"{type(e).__name__}: {str(e)[:200]}"
    try:
        same = same_model(loaded, ref, config)
    except Exception as e:  # noqa: BLE001 - a loaded model whose tensors cannot even be compared (sparse, …)
        return "silent", f"loaded a model that cannot be compared: {type(e).__name__}"
    return ("equal", "") if same else ("silent", "loaded, but not the saved model")


def classify_isolated(directory: Path, ref: MambaLM, config: MambaConfig) -> tuple[str, str]:
    """classify in a forked child: a signal (SIGSEGV, SIGBUS) or a hang there is a crash, not the end of the run."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            os.write(w, json.dumps(classify(directory, ref, config)).encode())
        finally:
            os._exit(0)
    os.close(w)
    ready, _, _ = select.select([r], [], [], CASE_TIMEOUT_S + 30)  # a child stuck where SIGALRM cannot reach
    if not ready:
        os.kill(pid, signal.SIGKILL)
    with os.fdopen(r, "rb") as f:
        data = f.read() if ready else b""
    _, status = os.waitpid(pid, 0)
    if not ready:
        return "crashed", f"a hang: no answer after {CASE_TIMEOUT_S + 30} s"
    if os.WIFSIGNALED(status):
        return "crashed", f"killed by signal {signal.Signals(os.WTERMSIG(status)).name}"
    return tuple(json.loads(data)) if data else ("crashed", "no answer")


# --------------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    name: str
    base: str
    damage: Callable[[Path], None]
    undetectable: bool = False  # a valid file of another model: may load differently (counted apart)
    json_edit: str | None = None  # a JSON file edited at random: undetectable if it still parses


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2))


def _edit_json(name: str, fn: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        obj = json.loads((d / name).read_text())
        out = fn(obj)
        _write_json(d / name, obj if out is None else out)
    return damage


def _st(path: Path) -> tuple[bytes, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return data[8:8 + n], data[8 + n:]


def _st_put(path: Path, header: bytes, body: bytes, n: int | None = None) -> None:
    path.write_bytes(struct.pack("<Q", len(header) if n is None else n) + header + body)


def _edit_header(fn: Callable[[dict], None], name: str = "model.safetensors") -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        raw, body = _st(d / name)
        header = json.loads(raw)
        fn(header)
        _st_put(d / name, json.dumps(header).encode(), body)
    return damage


def _raw_header(fn: Callable[[bytes], bytes], name: str = "model.safetensors") -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        raw, body = _st(d / name)
        _st_put(d / name, fn(raw), body)
    return damage


def _applied(fn, sd: dict) -> dict:
    """fn edits a copy of sd in place, or returns a new dict."""
    sd = dict(sd)
    out = fn(sd)
    return out if isinstance(out, dict) else sd


def _state_edit(fn: Callable[[dict], dict | None], keep_metadata: bool = True) -> Callable[[Path], None]:
    """Rewrites the weights with fn(state dict) applied, in the file's own format (safetensors keeps its metadata
    unless keep_metadata=False, as a tool that passes it through would)."""
    def damage(d: Path) -> None:
        if (d / "model.safetensors").exists():
            path = d / "model.safetensors"
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = f.metadata() if keep_metadata else {"format": "pt"}
            sd = load_file(path)
            sd = _applied(fn, sd)
            save_file(sd, path, metadata=meta)
        elif (d / "pytorch_model.bin").exists():
            path = d / "pytorch_model.bin"
            sd = dict(torch.load(path, weights_only=True))
            sd = _applied(fn, sd)
            torch.save(sd, path)
        else:  # sharded: edit the first shard that holds a key fn touches (fn sees the whole dict)
            index = json.loads((d / "model.safetensors.index.json").read_text())
            shards = sorted(set(index["weight_map"].values()))
            parts = {s: load_file(d / s) for s in shards}
            merged = {k: v for p in parts.values() for k, v in p.items()}
            new = _applied(fn, merged)
            for s in shards:  # each key stays in its shard; new keys go to the first
                part = {k: v for k, v in new.items() if index["weight_map"].get(k, shards[0]) == s}
                save_file(part, d / s, metadata={"format": "pt"})
            index["weight_map"] = {k: index["weight_map"].get(k, shards[0]) for k in new}
            _write_json(d / "model.safetensors.index.json", index)
    return damage


def _files(base: str) -> list[str]:
    weights = {"hf": ["model.safetensors"], "foreign": ["model.safetensors"], "official": ["pytorch_model.bin"],
               "sharded": ["model.safetensors.index.json", "model-00001-of-00002.safetensors",
                           "model-00002-of-00002.safetensors"]}[base]
    return ["config.json", *weights, "tokenizer.json", "mambakit_tokenizer.json"]


def _truncate(name: str, cut) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: cut(len(data))])
    return damage


def _garbage(name: str, seed: int) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        n = (d / name).stat().st_size
        (d / name).write_bytes(random.Random(seed).randbytes(n))
    return damage


def _replace_by(name: str, kind: str) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        (d / name).unlink()
        if kind == "dir":
            (d / name).mkdir()
            (d / name / "x").write_text("x")
        elif kind == "fifo":
            os.mkfifo(d / name)
        elif kind == "dangling":
            (d / name).symlink_to(d / "does-not-exist")
    return damage


def _flip(name: str, seed: int, region: str) -> Callable[[Path], None]:
    """One byte changed at a random place of `region`: "header" / "data" of a safetensors file, or "any"."""
    def damage(d: Path) -> None:
        data = bytearray((d / name).read_bytes())
        if region == "any":
            lo, hi = 0, len(data)
        else:
            (n,) = struct.unpack("<Q", data[:8])
            lo, hi = (0, 8 + n) if region == "header" else (8 + n, len(data))
        rng = random.Random(seed)
        i = rng.randrange(lo, hi)
        data[i] ^= rng.randrange(1, 256)
        (d / name).write_bytes(bytes(data))
    return damage


L0, L1 = "backbone.layers.0.mixer.", "backbone.layers.1.mixer."


def _swap(a: str, b: str):
    def fn(sd):
        sd[a], sd[b] = sd[b], sd[a]
    return fn


def _key(base: str, name: str) -> str:
    if name == "embedding" and base != "official":
        return "backbone.embeddings.weight"
    return "backbone.embedding.weight" if name == "embedding" else name


def _set_value(key: str, value: float, index: int = 0):
    def fn(sd):
        t = sd[key].clone()
        t.view(-1)[index] = value
        sd[key] = t
    return fn


def build_cases() -> list[Case]:
    cases: list[Case] = []
    add = cases.append
    # ---- whole files: truncated, garbage, not a file, missing
    for base in ("hf", "official", "foreign", "sharded"):
        for name in _files(base):
            for label, cut in (("empty", lambda n: 0), ("1 byte", lambda n: 1), ("8 bytes", lambda n: 8),
                               ("9 bytes", lambda n: 9), ("a third", lambda n: n // 3), ("half", lambda n: n // 2),
                               ("all but 1", lambda n: n - 1)):
                add(Case(f"{name} truncated to {label}", base, _truncate(name, cut)))
            add(Case(f"{name} is garbage", base, _garbage(name, len(cases))))
            add(Case(f"{name} is a directory", base, _replace_by(name, "dir")))
            if hasattr(os, "mkfifo"):  # POSIX
                add(Case(f"{name} is a FIFO", base, _replace_by(name, "fifo")))
            add(Case(f"{name} is a dangling link", base, _replace_by(name, "dangling")))
            if name != "mambakit_tokenizer.json":  # without it, tokenizer.json alone gives the same tokenizer
                add(Case(f"{name} is missing", base, _replace_by(name, "missing")))
            else:
                add(Case(f"{name} is missing (same tokenizer from tokenizer.json alone)", base,
                         _replace_by(name, "missing")))
    # ---- byte flips
    for base in ("hf", "foreign"):
        for seed in range(12):
            add(Case(f"safetensors header byte flip #{seed}", base, _flip("model.safetensors", seed, "header")))
        for seed in range(6):
            add(Case(f"safetensors data byte flip #{seed}", base, _flip("model.safetensors", seed, "data"),
                     undetectable=base == "foreign"))
    for seed in range(16):  # torch.save's zip has a CRC-32 per record
        add(Case(f"pickle byte flip #{seed}", "official", _flip("pytorch_model.bin", seed, "any")))
    for base in ("hf", "official"):
        for name in ("config.json", "mambakit_tokenizer.json", "tokenizer.json"):
            for seed in range(5):
                add(Case(f"{name} byte flip #{seed}", base, _flip(name, 100 + seed, "any"), json_edit=name))
    # ---- tensors: dtypes, non-finite values, names
    for base in ("hf", "official", "foreign", "sharded"):
        emb = _key(base, "embedding")
        for dtype in (torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool, torch.float8_e4m3fn,
                      torch.float8_e5m2):
            for key in (emb, L0 + "A_log"):
                add(Case(f"{key} as {dtype}", base, _state_edit(lambda sd, k=key, t=dtype: sd.__setitem__(
                    k, sd[k].to(t)))))
        if base in ("official", "foreign"):  # float64 holds float32 exactly: loads equal
            add(Case(f"{emb} as float64", base, _state_edit(lambda sd, k=emb: sd.__setitem__(k, sd[k].double()))))
        for value in (float("nan"), float("inf"), float("-inf")):
            for key, index in ((emb, 0), (emb, -1), (L0 + "A_log", 5), (L1 + "D", 0), (L0 + "in_proj.weight", 3),
                               ("backbone.norm_f.weight", 0)):
                add(Case(f"{key}[{index}] = {value}", base, _state_edit(_set_value(key, value, index))))
        same_shape = [(L0 + "in_proj.weight", L1 + "in_proj.weight"), (L0 + "D", L0 + "conv1d.bias"),
                      (L1 + "D", L1 + "dt_proj.bias"), ("backbone.layers.0.norm.weight", "backbone.norm_f.weight")]
        other_shape = [(L0 + "A_log", L0 + "x_proj.weight"), (L0 + "in_proj.weight", L0 + "out_proj.weight"),
                       (emb, L0 + "in_proj.weight")]
        for a, b in same_shape + other_shape:
            # mambakit's checksums see any swap; elsewhere a swap of same-shape tensors is another valid model
            add(Case(f"{a} <-> {b} swapped", base, _state_edit(_swap(a, b)),
                     undetectable=(a, b) in same_shape and base != "hf"))
        if base == "hf":
            for a, b in same_shape:
                add(Case(f"{a} <-> {b} swapped, checksums dropped", base, _state_edit(_swap(a, b), False),
                         undetectable=True))
        other = "backbone.embedding.weight" if base != "official" else "backbone.embeddings.weight"
        add(Case("embedding under both spellings (equal)", base,
                 _state_edit(lambda sd, e=emb, o=other: sd.__setitem__(o, sd[e].clone()))))
        add(Case("embedding under both spellings (different)", base,
                 _state_edit(lambda sd, e=emb, o=other: sd.__setitem__(o, sd[e] + 1))))
        add(Case("an extra tensor", base, _state_edit(lambda sd: sd.__setitem__(L0 + "extra", torch.zeros(3)))))
        add(Case("a missing tensor", base, _state_edit(lambda sd: sd.pop(L1 + "D"))))
        add(Case("in_proj transposed", base,
                 _state_edit(lambda sd: sd.__setitem__(L0 + "in_proj.weight", sd[L0 + "in_proj.weight"].t()
                                                       .contiguous()))))
        add(Case("A_log reshaped", base,
                 _state_edit(lambda sd: sd.__setitem__(L0 + "A_log", sd[L0 + "A_log"].reshape(4, 32).clone()))))
        add(Case("an untied lm_head differing from the tied embedding", base,
                 _state_edit(lambda sd, e=emb: sd.__setitem__("lm_head.weight", sd[e] * 2))))
        add(Case("a third layer", base, _state_edit(lambda sd: sd.update(
            {k.replace("layers.1.", "layers.2."): v.clone() for k, v in sd.items() if "layers.1." in k}))))
    if True:  # the official pickle also has the tied head: a different one is refused above; an equal one loads
        add(Case("official: tied head stored equal", "official", lambda d: None))
    # ---- safetensors headers, written by hand
    for base in ("hf", "foreign"):
        k = L0 + "D"
        add(Case("header: a tensor without dtype", base, _edit_header(lambda h: h[k].pop("dtype"))))
        add(Case("header: an extra field (ignored, as safetensors does)", base,
                 _edit_header(lambda h: h[k].update(extra=1))))
        add(Case("header: unknown dtype", base, _edit_header(lambda h: h[k].update(dtype="F33"))))
        add(Case("header: dtype F32 -> I32", base, _edit_header(lambda h: h[k].update(dtype="I32"))))
        add(Case("header: dtype F32 -> F16 (half the bytes)", base, _edit_header(lambda h: h[k].update(dtype="F16"))))
        add(Case("header: negative offset", base, _edit_header(
            lambda h: h[k].update(data_offsets=[-4, h[k]["data_offsets"][1]]))))
        add(Case("header: offsets reversed", base, _edit_header(
            lambda h: h[k].update(data_offsets=h[k]["data_offsets"][::-1]))))
        add(Case("header: overlapping tensors", base, _edit_header(
            lambda h: h[L1 + "D"].update(data_offsets=h[k]["data_offsets"]))))
        add(Case("header: shape with a float", base, _edit_header(lambda h: h[k].update(shape=[32.0]))))
        add(Case("header: shape with a bool", base, _edit_header(lambda h: h[k].update(shape=[True, 32]))))
        add(Case("header: shape negative", base, _edit_header(lambda h: h[k].update(shape=[-32]))))
        add(Case("header: shape (32,) -> (2, 16)", base, _edit_header(lambda h: h[k].update(shape=[2, 16]))))
        add(Case("header: shape (32,) -> (16,) (fewer bytes)", base, _edit_header(lambda h: h[k].update(shape=[16]))))
        add(Case("header: a list, not an object", base, _raw_header(lambda raw: b"[]" + b" " * (len(raw) - 2))))
        add(Case("header: entry is a string", base, _edit_header(lambda h: h.__setitem__(k, "x"))))
        add(Case("header: metadata not strings", base, _edit_header(lambda h: h.__setitem__("__metadata__",
                                                                                            {"format": 1}))))
        add(Case("header: metadata a list", base, _edit_header(lambda h: h.__setitem__("__metadata__", []))))
        add(Case("header: a name twice", base, _raw_header(
            lambda raw: raw.replace(b'"' + (L1 + "D").encode() + b'"', b'"' + k.encode() + b'"'))))
        add(Case("header: names swapped in place", base, _raw_header(
            lambda raw: raw.replace(L0.encode(), b"\0").replace(L1.encode(), L0.encode()).replace(b"\0", L1.encode())),
            undetectable=base == "foreign"))
        add(Case("header: bad UTF-8", base, _raw_header(lambda raw: raw.replace(b"dtype", b"dt\xffe", 1))))
        add(Case("header: nested 100000 deep", base, _raw_header(lambda raw: b"[" * 100000 + b"]" * 100000)))
        add(Case("header: length 0", base, lambda d: _st_put(d / "model.safetensors", *_st(d / "model.safetensors"),
                                                               n=0)))
        add(Case("header: length 2^63", base, lambda d: _st_put(d / "model.safetensors", *_st(d / "model.safetensors"),
                                                                  n=1 << 63)))
        add(Case("header: length one short", base, lambda d: _st_put(
            d / "model.safetensors", *_st(d / "model.safetensors"), n=len(_st(d / "model.safetensors")[0]) - 1)))
        add(Case("trailing bytes after the data", base,
                 lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes() + b"\0" * 8)))
    add(Case("header: checksum entry damaged", "hf", _edit_header(
        lambda h: h["__metadata__"].update({"mambakit.crc32": "{"}))))
    add(Case("header: checksum of another tensor", "hf", _edit_header(
        lambda h: h["__metadata__"].update({"mambakit.crc32": json.dumps(
            {**json.loads(h["__metadata__"]["mambakit.crc32"]), L0 + "D": 12345})}))))
    # ---- pickles of the wrong things
    def pickle_edit(fn):
        def damage(d: Path) -> None:
            sd = dict(torch.load(d / "pytorch_model.bin", weights_only=True))
            torch.save(fn(sd), d / "pytorch_model.bin")
        return damage

    add(Case("pickle: an int key", "official", pickle_edit(lambda sd: {**sd, 5: torch.zeros(1)})))
    add(Case("pickle: a tuple key", "official", pickle_edit(lambda sd: {**sd, ("a", 1): torch.zeros(1)})))
    add(Case("pickle: only int keys", "official", pickle_edit(lambda sd: dict(enumerate(sd.values())))))
    add(Case("pickle: an int value", "official", pickle_edit(lambda sd: {**sd, L0 + "D": 3})))
    add(Case("pickle: a nested dict value", "official", pickle_edit(lambda sd: {**sd, L0 + "D": {"x": sd[L0 + "D"]}})))
    add(Case("pickle: a list", "official", pickle_edit(lambda sd: list(sd.values()))))
    add(Case("pickle: a tensor", "official", pickle_edit(lambda sd: sd[L0 + "D"])))
    add(Case("pickle: None", "official", pickle_edit(lambda sd: None)))
    add(Case("pickle: wrapped in state_dict", "official", pickle_edit(lambda sd: {"state_dict": sd})))
    add(Case("pickle: a sparse tensor", "official", pickle_edit(lambda sd: {**sd, L0 + "D": sd[L0 + "D"].to_sparse()})))
    add(Case("pickle: a quantized tensor", "official", pickle_edit(
        lambda sd: {**sd, L0 + "D": torch.quantize_per_tensor(sd[L0 + "D"], 0.1, 0, torch.qint8)})))
    add(Case("pickle: complex weights", "official", pickle_edit(lambda sd: {**sd, L0 + "D": sd[L0 + "D"].cfloat()})))

    def views_of_one_storage(sd):
        flat = torch.cat([v.reshape(-1) for v in sd.values()])
        out, pos = {}, 0
        for k, v in sd.items():
            out[k] = flat[pos:pos + v.numel()].view(v.shape)
            pos += v.numel()
        return out

    add(Case("pickle: every tensor a view of one storage", "official", pickle_edit(views_of_one_storage)))
    add(Case("pickle: legacy (non-zip) format", "official", lambda d: torch.save(
        torch.load(d / "pytorch_model.bin", weights_only=True), d / "pytorch_model.bin",
        _use_new_zipfile_serialization=False)))

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    add(Case("pickle: code in it", "official", lambda d: (d / "pytorch_model.bin").write_bytes(
        _torch_bytes({"backbone.embedding.weight": Evil()}))))
    add(Case("pickle: plain pickle of a dict", "official", lambda d: (d / "pytorch_model.bin").write_bytes(
        pickle.dumps({"a": 1}))))
    # ---- config.json
    for base in ("hf", "official"):
        size_key = "hidden_size" if base == "hf" else "d_model"
        layers_key = "num_hidden_layers" if base == "hf" else "n_layer"
        for label, raw in (("a list", "[]"), ("a string", '"mamba"'), ("a number", "1"), ("null", "null"),
                           ("empty", ""), ("nested 100000 deep", "[" * 100000 + "]" * 100000),
                           ("objects nested 100000 deep", '{"a":' * 100000 + "1" + "}" * 100000)):
            add(Case(f"config.json is {label}", base, lambda d, r=raw: (d / "config.json").write_text(r)))
        add(Case("config.json wrapped in an object", base, _edit_json("config.json", lambda c: {"config": c})))
        add(Case("config.json with a key twice", base, lambda d, k=size_key: (d / "config.json").write_text(
            (d / "config.json").read_text().replace("{", f'{{"{k}": 32,', 1))))
        for label, value in (("a string", "16"), ("a float", 16.0), ("a list", [16]), ("an object", {"v": 16}),
                             ("true", True), ("negative", -16), ("0", 0), ("10^12", 10 ** 12), ("NaN", float("nan")),
                             ("null", None)):
            add(Case(f"{size_key} {label}", base, _edit_json("config.json", lambda c, v=value, k=size_key:
                                                              c.__setitem__(k, v))))
        for value in (10 ** 9, 3, 1, 0):
            add(Case(f"{layers_key} = {value}", base, _edit_json("config.json", lambda c, v=value, k=layers_key:
                                                                 c.__setitem__(k, v))))
        add(Case("vocab_size + 9", base, _edit_json("config.json", lambda c: c.__setitem__("vocab_size",
                                                                                          c["vocab_size"] + 9))))
        state = ("state_size", None) if base == "hf" else ("d_state", "ssm_cfg")

        def set_state(c, s=state):
            (c[s[1]] if s[1] else c)[s[0]] = 8

        add(Case("d_state 8", base, _edit_json("config.json", set_state)))
        tie = "tie_word_embeddings" if base == "hf" else "tie_embeddings"
        # the official file stores the tied head: untied, it is a valid model whose head equals the embedding
        add(Case("tie off", base, _edit_json("config.json", lambda c, t=tie: c.__setitem__(t, False)),
                 undetectable=base == "official"))
        add(Case("use_conv_bias off", base, _edit_json("config.json", (lambda c: c.__setitem__(
            "use_conv_bias", False)) if base == "hf" else (lambda c: c["ssm_cfg"].__setitem__("conv_bias", False)))))
        add(Case("rms_norm off (LayerNorm has biases)", base, _edit_json("config.json", lambda c: c.__setitem__(
            "rms_norm", False))) if base == "official" else Case("hidden_act gelu", base, _edit_json(
                "config.json", lambda c: c.__setitem__("hidden_act", "gelu"))))
    # a Mamba-1 checkpoint relabelled FalconMamba is a valid FalconMamba model (same keys): it loads differently
    add(Case("model_type 'falcon_mamba'", "hf", _edit_json("config.json", lambda c: c.__setitem__(
        "model_type", "falcon_mamba")), undetectable=True))
    for mt in ("mamba2", "jamba", "zamba2", "bamba", "nemotron_h", "something_else", 5, None):
        add(Case(f"model_type {mt!r}", "hf", _edit_json("config.json", (lambda c, m=mt: c.__setitem__("model_type", m))
                                                        if mt is not None else (lambda c: c.pop("model_type")))))
    add(Case("architectures FalconMambaForCausalLM", "hf", _edit_json(
        "config.json", lambda c: c.__setitem__("architectures", ["FalconMambaForCausalLM"]))))
    add(Case("architectures LlamaForCausalLM", "hf", _edit_json(
        "config.json", lambda c: c.__setitem__("architectures", ["LlamaForCausalLM"]))))
    add(Case("mamba config with mixer_rms_eps (FalconMamba)", "hf", _edit_json(
        "config.json", lambda c: c.__setitem__("mixer_rms_eps", 1e-6))))
    add(Case("mamba config with num_heads (Mamba-2)", "hf", _edit_json(
        "config.json", lambda c: c.update(num_heads=4, head_dim=8, n_groups=1))))
    add(Case("official and transformers fields at once", "official", _edit_json(
        "config.json", lambda c: c.__setitem__("hidden_size", 16))))
    add(Case("official: ssm_cfg.layer Mamba2", "official", _edit_json(
        "config.json", lambda c: c["ssm_cfg"].__setitem__("layer", "Mamba2"))))
    add(Case("official: ssm_cfg.layer Mamba3", "official", _edit_json(
        "config.json", lambda c: c["ssm_cfg"].__setitem__("layer", "Mamba3"))))
    add(Case("official: attention layers", "official", _edit_json(
        "config.json", lambda c: c.update(attn_layer_idx=[1], attn_cfg={"num_heads": 2}))))
    add(Case("official: MLP blocks", "official", _edit_json("config.json", lambda c: c.__setitem__(
        "d_intermediate", 64))))
    add(Case("official: an unknown field", "official", _edit_json("config.json", lambda c: c.__setitem__(
        "layer_norm_eps", 1e-6))))
    add(Case("official: ssm_cfg a list", "official", _edit_json("config.json", lambda c: c.__setitem__(
        "ssm_cfg", [1, 2]))))
    add(Case("official: ssm_cfg a string", "official", _edit_json("config.json", lambda c: c.__setitem__(
        "ssm_cfg", "abc"))))
    add(Case("official: ssm_cfg.headdim (Mamba-2)", "official", _edit_json("config.json", lambda c: c[
        "ssm_cfg"].__setitem__("headdim", 64))))
    add(Case("config.json 100 MB (sparse)", "hf", lambda d: os.truncate(d / "config.json", 100 << 20)))
    # ---- shard indexes
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"

    def remap(fn):
        return _edit_json("model.safetensors.index.json", lambda idx: fn(idx["weight_map"]) if isinstance(
            idx.get("weight_map"), dict) else None)

    def point_all(target):
        def fn(wm):
            for k, v in wm.items():
                if v == first:
                    wm[k] = target
        return fn

    def outside(absolute: bool):
        """The first shard's tensors, changed, in a file beside the directory; the index points there."""
        def damage(d: Path) -> None:
            target = d.parent / f"{d.name}-outside.safetensors"
            save_file({k: v + 1 for k, v in load_file(d / first).items()}, target)
            remap(point_all(str(target) if absolute else f"../{target.name}"))(d)
        return damage

    add(Case("index points at ../<file> outside", "sharded", outside(False)))
    add(Case("index points at an absolute path outside", "sharded", outside(True)))
    for target in ("sub/" + first, "..", ".", "", "config.json"):
        add(Case(f"index points at {target!r}", "sharded", remap(point_all(target))))
    add(Case("index points at 5", "sharded", remap(point_all(5))))
    add(Case("index: weight_map empty", "sharded", _edit_json("model.safetensors.index.json",
                                                              lambda i: i.__setitem__("weight_map", {}))))
    add(Case("index: weight_map a list", "sharded", _edit_json("model.safetensors.index.json",
                                                               lambda i: i.__setitem__("weight_map", []))))
    add(Case("index: no weight_map", "sharded", _edit_json("model.safetensors.index.json",
                                                           lambda i: i.pop("weight_map"))))
    add(Case("index: a key under the wrong shard", "sharded", remap(
        lambda wm: wm.__setitem__(next(k for k, v in wm.items() if v == first), second))))
    add(Case("index: a key no shard holds", "sharded", remap(lambda wm: wm.__setitem__(L0 + "ghost", first))))
    add(Case("index: a key left out", "sharded", remap(lambda wm: wm.pop(next(iter(wm))))))
    add(Case("index: a .bin shard", "sharded", remap(point_all("pytorch_model-00001-of-00002.bin"))))

    def in_both(d: Path) -> None:
        a, b = load_file(d / first), load_file(d / second)
        k = next(iter(a))
        save_file({**b, k: a[k]}, d / second, metadata={"format": "pt"})

    add(Case("index: a key in both shards", "sharded", in_both))

    def linked_shard(d: Path) -> None:  # the Hugging Face cache links snapshot files to blobs elsewhere: fine
        blob = d.parent / f"{d.name}-blob"
        shutil.move(d / first, blob)
        (d / first).symlink_to(blob)

    add(Case("a shard that is a link to a blob outside (HF cache layout)", "sharded", linked_shard))
    # ---- tokenizer files
    for base in ("hf", "official"):
        mk = "mambakit_tokenizer.json"
        add(Case("tokenizer.json valid JSON, not a tokenizer", base, lambda d: (d / "tokenizer.json").write_text("{}")))
        add(Case("tokenizer.json a JSON list", base, lambda d: (d / "tokenizer.json").write_text("[1, 2]")))
        for label, obj in (("a list", []), ("unknown type", {"type": "sentencepiece", "version": 1}),
                           ("version 2", {"type": "tokenizer.json", "version": 2}),
                           ("eos_token an int", {"type": "tokenizer.json", "version": 1, "eos_token": 5}),
                           ("eos_token not in the vocabulary", {"type": "tokenizer.json", "version": 1,
                                                                "eos_token": "<nope>"}),
                           ("no type", {"version": 1})):
            add(Case(f"{mk} {label}", base, lambda d, o=obj: _write_json(d / mk, o)))
    # ---- save journals (what an interrupted save leaves); mambakit older than journals ignores the file
    journal = ".replace-journal.json"
    add(Case("journal removing a file outside", "hf", lambda d: _write_json(
        d / journal, {"replace": {}, "remove": ["../hf/config.json"]})))
    add(Case("journal damaged", "hf", lambda d: (d / journal).write_text("{")))

    def vanished(d: Path) -> None:
        st = (d / "config.json").stat()
        _write_json(d / journal, {"replace": {"config.json": {"tmp": ".config.json.abcdefgh.tmp",
                                                              "ino": st.st_ino + 1, "bytes": st.st_size}},
                                  "remove": []})

    add(Case("journal naming a vanished new file", "hf", vanished))
    return cases


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------- running
def run_cases(isolate: bool = False, verbose: bool = False) -> tuple[collections.Counter, list]:
    """Runs every case; returns the counts per outcome (undetectable cases as "undetectable: <outcome>") and
    the rows (case, base, outcome, detail)."""
    torch.set_num_threads(1)  # forked children must not inherit a thread pool
    model = make_model()
    counts, rows = collections.Counter(), []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bases = make_bases(root / "bases", model)
        for i, case in enumerate(build_cases()):
            d = root / f"case{i:04d}"
            shutil.copytree(bases[case.base], d)
            try:
                case.damage(d)
            except Exception as e:  # a damage that does not apply to this version's files: a bug in the table
                rows.append((case.name, case.base, "crashed", f"damage failed: {type(e).__name__}: {e}"))
                counts["table error"] += 1
                continue
            outcome, detail = (classify_isolated if isolate else classify)(d, model, expected_config(model, case.base))
            if case.json_edit and outcome == "silent":
                try:  # a JSON file that still parses after the flip is a valid file with another value
                    json.loads((d / case.json_edit).read_text())
                    outcome = "undetectable: loaded different"
                except (ValueError, UnicodeDecodeError):
                    pass
            elif case.undetectable and outcome in ("silent", "equal"):
                outcome = f"undetectable: {'loaded different' if outcome == 'silent' else 'equal'}"
            counts[outcome] += 1
            rows.append((case.name, case.base, outcome, detail))
            if verbose:
                print(f"{outcome:32s} {case.base:9s} {case.name}  {detail}", flush=True)
            shutil.rmtree(d, ignore_errors=True)
    return counts, rows


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch warns about the odd pickles the table makes on purpose
def test_every_corrupted_checkpoint_loads_equal_or_is_refused():
    counts, rows = run_cases()
    total = sum(counts.values())
    print(f"\n{total} corrupted checkpoints: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    bad = [r for r in rows if r[2] in ("crashed", "silent", "refused, not CheckpointError")]
    assert total >= 250
    assert not bad, "\n".join(f"{o}: [{b}] {n}: {d}" for n, b, o, d in bad)
    assert counts["refused"] > 200 and counts["equal"] > 0  # both outcomes exercised, not a table that skips


@pytest.mark.parametrize("label, config, phrase", [
    ("Mamba-3 (official)", {"d_model": 16, "n_layer": 2, "vocab_size": 50, "ssm_cfg": {"layer": "Mamba3"}},
     "Mamba-3 mixer"),
    ("Jamba", {"model_type": "jamba", "hidden_size": 16}, "Jamba"),
    ("unknown family", {"model_type": "rwkv7", "hidden_size": 16}, "unknown model_type 'rwkv7'"),
    ("no model_type", {"hidden_size": 16, "num_hidden_layers": 2, "vocab_size": 50}, "no model_type"),
])
def test_other_families_are_refused_by_name_before_any_weight_is_read(tmp_path, label, config, phrase):
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"not even weights")  # never reached
    with pytest.raises(CheckpointError, match=phrase) as e:
        MambaLM.from_pretrained(tmp_path)
    assert "not supported yet" in str(e.value) or "model_type" in str(e.value)
    assert "model.safetensors" not in str(e.value)


def test_real_mamba2_configs_are_read(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.Mamba2Config(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_heads=4, head_dim=8,
                              n_groups=1, state_size=4).save_pretrained(tmp_path / "mamba2")
    # a config alone (no weights): the family is read (it would be refused before the weights otherwise)
    with pytest.raises(CheckpointError, match="has no weights"):
        MambaLM.from_pretrained(tmp_path / "mamba2")


if __name__ == "__main__":
    counts, rows = run_cases(isolate="--isolate" in sys.argv, verbose="-v" in sys.argv)
    for n, b, o, d in rows:
        if o in ("crashed", "silent") or "undetectable" in o:
            print(f"{o:32s} [{b}] {n}: {d}")
    print(f"{sum(counts.values())} corrupted checkpoints: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
