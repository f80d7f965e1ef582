"""TrainConfig: one typed dataclass for a training run (model preset + data + optimisation + bookkeeping).

Sources, later ones winning: the defaults below, a TOML or JSON file (`--config=FILE`), then `--key=value`
overrides on the command line. Unknown keys and values of the wrong type are rejected with a message that
names the key (and, for typos, the closest known key).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import PRESETS

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli is the same parser (tomllib is its copy in 3.11's stdlib)
    import tomli as tomllib


@dataclass
class TrainConfig:
    # ---- model: a preset of MambaConfig; vocab_size always comes from the tokenizer
    model: str = "mini"
    d_model: int = 0  # 0: the preset's
    n_layer: int = 0  # 0: the preset's
    d_state: int = 0  # 0: the preset's
    # ---- data
    data: str = "shakespeare"  # "shakespeare" (the embedded corpus) or comma-separated files / directories
    val_docs: list[str] = field(default_factory=list)  # held-out documents; [] = the default plays / val_fraction
    val_fraction: float = 0.05  # documents held out when val_docs is empty (non-Shakespeare corpora)
    tokenizer: str = "byte"  # "byte", "bpe" (trained on the training split) or a tokenizer.json / directory
    bpe_vocab_size: int = 4096
    cache_dir: str = "~/.cache/mambakit/tokens"
    # ---- optimisation
    seq_len: int = 256
    batch_size: int = 16  # sequences per optimizer step, over all ranks and accumulation steps
    micro_batch_size: int = 0  # sequences per forward on one rank; 0 = batch_size / world size (no accumulation)
    max_steps: int = 2000
    time_budget_min: float = 0.0  # > 0: fit the run (cosine schedule included) into this many minutes
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1  # not on A_log, D, norms and biases (official no-weight-decay set)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    precision: str = "fp32"  # "fp32" or "bf16" (autocast; master weights stay float32)
    # ---- evaluation and logging
    eval_every: int = 250
    eval_windows: int = 64  # validation windows per periodic evaluation (the final one uses all)
    sample_tokens: int = 200  # length of the sample printed at each evaluation; 0 = none
    sample_prompt: str = "\n"  # the sample continues this text
    log_every: int = 10
    progress: bool = True  # the progress bar (rank 0, to stderr, only when it is a terminal); `--quiet`: false
    log: str = "jsonl"  # metrics.jsonl is always written; "tensorboard": also TensorBoard events in out_dir/tensorboard
    plot: bool = True  # loss-curve PNG at the end (needs matplotlib)
    # ---- checkpoints and runs
    out_dir: str = "runs/default"
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = False  # continue from the newest checkpoint in out_dir/checkpoints
    seed: int = 0
    threads: int = 0  # torch / kernel threads per process; 0 = the cores divided among local ranks
    distributed: str = "ddp"  # under torchrun: "ddp" (replicated) or "fsdp" (torch's fully_shard)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), _field_types()[f.name]))
        if self.model not in PRESETS:
            raise ValueError(f"TrainConfig.model: unknown preset {self.model!r}; presets: {', '.join(PRESETS)}")
        _positive(self, "seq_len", "batch_size", "max_steps", "bpe_vocab_size", "eval_every", "eval_windows",
                  "log_every", "ckpt_every", "keep_checkpoints")
        _non_negative(self, "d_model", "n_layer", "d_state", "micro_batch_size", "warmup_steps", "weight_decay",
                      "grad_clip", "time_budget_min", "sample_tokens", "threads", "seed")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        for name, lo, hi in (("min_lr_ratio", 0, 1), ("beta1", 0, 0.999999), ("beta2", 0, 0.999999)):
            if not lo <= getattr(self, name) <= hi:
                raise ValueError(f"TrainConfig.{name} must be in [{lo}, {hi:g}], got {getattr(self, name)}")
        if not 0 < self.val_fraction <= 0.5:  # 0 would still hold out one document (split_documents)
            raise ValueError(f"TrainConfig.val_fraction must be in (0, 0.5], got {self.val_fraction}")
        # torch.manual_seed overflows past 64 bits deep inside torch; a million torch threads crashed the
        # process (SIGSEGV, measured), 4096 ran
        for name, hi in (("seed", 2**63 - 1), ("threads", 4096)):
            if getattr(self, name) > hi:
                raise ValueError(f"TrainConfig.{name} must be <= {hi}, got {getattr(self, name)}")
        _choice(self, "precision", ("fp32", "bf16"))
        _choice(self, "distributed", ("ddp", "fsdp"))
        _choice(self, "log", ("jsonl", "tensorboard"))
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise ValueError(f"TrainConfig.batch_size ({self.batch_size}) must be a multiple of "
                             f"micro_batch_size ({self.micro_batch_size})")
        _refuse_inert(self)

    # ------------------------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        known = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"{source}: unknown key {key!r}{hint}; keys: {', '.join(known)}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(read_config_file(path), source=str(path))

    def replace(self, **overrides: Any) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **overrides})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The key/value table of a .toml or .json file (a TOML file may also nest it under [train])."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {str(p)!r} does not exist")
    try:
        if p.suffix == ".toml":
            values = tomllib.loads(p.read_text(encoding="utf-8"))
            values = values.get("train", values) if set(values) <= {"train"} else values
        elif p.suffix == ".json":
            values = json.loads(p.read_text(encoding="utf-8"))
        else:
            raise ValueError(f"config file {p} must end in .toml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"config file {p} does not parse: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {p} must hold a table of key = value pairs")
    return values


def config_from_args(config_file: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """The run's TrainConfig: the defaults, then the file (if any), then the command line's overrides."""
    values = read_config_file(config_file) if config_file else {}
    base = TrainConfig.from_dict(values, source=config_file or "config")
    return TrainConfig.from_dict({**base.to_dict(), **overrides}, source="command line")


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """["--lr=1e-3", "--resume", "--val_docs=a,b"] → {"lr": "1e-3", "resume": True, "val_docs": "a,b"}:
    values stay strings here; TrainConfig converts them by the field's type (and rejects what does not fit)."""
    out: dict[str, Any] = {}
    for a in args:
        if not a.startswith("--") or len(a) < 3:
            raise ValueError(f"override {a!r} must look like --key=value")
        key, eq, value = a[2:].partition("=")
        out[key.replace("-", "_")] = value if eq else True
    return out


# ------------------------------------------------------------------------------------------ resuming
# What a resumed run may change: schedule length, optimisation settings (they act from the resumed step on:
# loop.py applies them to the restored optimizer), bookkeeping. The model's size (model, d_model, n_layer,
# d_state) is compared as the resolved MambaConfig instead (loop.py), so that d_model=0 and the preset's own
# value count as equal. Every other field fixes the vocabulary or the data: resume_differences refuses it.
RESUMABLE = ("max_steps", "time_budget_min", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2",
             "log", "grad_clip", "precision", "micro_batch_size", "eval_every", "eval_windows", "sample_tokens",
             "sample_prompt", "log_every", "progress", "plot", "out_dir", "ckpt_every", "keep_checkpoints", "resume",
             "threads", "distributed", "cache_dir")
MODEL_SIZE = ("model", "d_model", "n_layer", "d_state")


def resume_differences(saved: dict[str, Any], cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """(fixed, changed): "key: saved → requested" for the fields that differ between a checkpoint's saved
    TrainConfig (a dict, as train_config.json holds it) and `cfg`; `fixed` lists those a resumed run cannot
    change. Fields the saved dict lacks are not compared; the model size is left to the MambaConfig check."""
    fixed, changed = [], []
    types = _field_types()
    for f in dataclasses.fields(TrainConfig):
        if f.name not in saved or f.name in MODEL_SIZE:
            continue
        new = getattr(cfg, f.name)
        try:
            old = _coerce(f.name, saved[f.name], types[f.name])
        except TypeError:
            old = saved[f.name]
        if old != new:
            (changed if f.name in RESUMABLE else fixed).append(f"{f.name}: {old!r} → {new!r}")
    return fixed, changed


# --------------------------------------------------------------------------------------------- checking
def _refuse_inert(cfg: TrainConfig) -> None:
    """ValueError for a field set away from its default where this configuration never reads it (the
    option would be accepted and ignored)."""
    defaults = TrainConfig.__dataclass_fields__
    inert = []
    if cfg.tokenizer != "bpe" and cfg.bpe_vocab_size != defaults["bpe_vocab_size"].default:
        inert.append(f"bpe_vocab_size only applies to tokenizer='bpe' (tokenizer is {cfg.tokenizer!r})")
    if (cfg.val_docs or cfg.data == "shakespeare") and cfg.val_fraction != defaults["val_fraction"].default:
        inert.append("val_fraction only applies when no val_docs are named (data='shakespeare' holds out its "
                     "default plays)")
    if cfg.sample_tokens == 0 and cfg.sample_prompt != defaults["sample_prompt"].default:
        inert.append("sample_prompt only applies with sample_tokens > 0")
    if inert:
        raise ValueError("TrainConfig: " + "; ".join(inert))


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _coerce(name: str, value: Any, typ: Any) -> Any:
    """value as `typ`, accepting the strings of the command line; anything else raises a TypeError."""
    def bad() -> TypeError:
        want = {int: "an int", float: "a number", bool: "true or false", str: "a string"}.get(typ, "a list of strings")
        return TypeError(f"TrainConfig.{name} must be {want}, got {value!r}")

    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise bad()
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise bad()
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        if isinstance(value, str):
            try:
                v = float(value)
                if math.isfinite(v):
                    return v
            except ValueError:
                pass
        raise bad()
    if typ is str:
        if isinstance(value, str):
            return value
        raise bad()
    # list[str]
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise bad()


def _positive(cfg: TrainConfig, *names: str) -> None:
    for n in names:
        if not getattr(cfg, n) > 0:
            raise ValueError(f"TrainConfig.{n} must be > 0, got {getattr(cfg, n)}")


def _non_negative(cfg: TrainConfig, *names: str) -> None:
    for n in names:
        if getattr(cfg, n) < 0:
            raise ValueError(f"TrainConfig.{n} must be >= 0, got {getattr(cfg, n)}")


def _choice(cfg: TrainConfig, name: str, choices: tuple[str, ...]) -> None:
    if getattr(cfg, name) not in choices:
        raise ValueError(f"TrainConfig.{name} must be one of {choices}, got {getattr(cfg, name)!r}")
