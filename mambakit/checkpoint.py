"""Checkpoint directories ⇄ MambaLM: the official layout, the transformers layout, safe reads, atomic writes.

Two layouts are read (detected from config.json) and written:

- "official" (state-spaces/mamba `MambaLMHeadModel.save_pretrained`): config.json with d_model, n_layer,
  vocab_size (unpadded), ssm_cfg, rms_norm, residual_in_fp32, pad_vocab_size_multiple, tie_embeddings,
  and pytorch_model.bin. Keys are exactly MambaLM's: `backbone.embedding.weight`, `backbone.layers.{i}.…`.
- "hf" (transformers `MambaForCausalLM`): config.json with hidden_size, state_size, time_step_rank,
  conv_kernel, expand, … (vocab_size already padded), and model.safetensors (or pytorch_model.bin, or
  shards with an index json). One key differs: `backbone.embeddings.weight`.

Safety: pickles are read only with `torch.load(weights_only=True)`; nothing from a checkpoint is executed.
Writes go to a temporary file, are fsynced, then renamed, so an interrupted save leaves no file that loads.
"""

from __future__ import annotations

import json
import re
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._io import atomic_write
from .config import MambaConfig
from .tokenizer import find_tokenizer

if TYPE_CHECKING:  # the model is built through the class its caller passes: this file never imports model.py
    from .model import MambaLM

LAYOUTS = ("hf", "official")
CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_NAME = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS_NAME, SAFETENSORS_INDEX, PICKLE_NAME, PICKLE_INDEX)  # in order of preference

HF_EMBEDDING, OFFICIAL_EMBEDDING = "backbone.embeddings.weight", "backbone.embedding.weight"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing or corrupt files, a config or keys that do not fit."""


# ----------------------------------------------------------------------------------------------- configs
def detect_layout(config: dict[str, Any]) -> str:
    if "d_model" in config:
        return "official"
    if "hidden_size" in config or config.get("model_type") == "mamba":
        return "hf"
    raise CheckpointError(
        "config.json is neither the official layout (d_model, n_layer, …) nor transformers' MambaConfig "
        f"(hidden_size, state_size, …); its keys: {sorted(config)}"
    )


def config_from_official(d: dict[str, Any]) -> MambaConfig:
    """state-spaces/mamba MambaConfig (+ its ssm_cfg, the Mamba mixer kwargs) → MambaConfig."""
    ssm = dict(d.get("ssm_cfg") or {})
    layer = ssm.pop("layer", "Mamba1")
    if layer != "Mamba1":
        raise CheckpointError(f"ssm_cfg.layer = {layer!r}: only Mamba-1 checkpoints are supported")
    if d.get("d_intermediate", 0) or d.get("attn_layer_idx"):
        raise CheckpointError("hybrid checkpoints (d_intermediate > 0 or attention layers) are not supported")
    keys = ("d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor",
            "conv_bias", "bias")
    unknown = sorted(set(ssm) - set(keys) - {"use_fast_path"})
    if unknown:
        raise CheckpointError(f"ssm_cfg has keys mambakit does not support: {unknown}")
    values = {k: ssm[k] for k in keys if k in ssm}
    for k in ("d_model", "n_layer", "vocab_size", "rms_norm", "residual_in_fp32", "pad_vocab_size_multiple",
              "tie_embeddings"):
        if k in d:
            values[k] = d[k]
    return MambaConfig.from_dict(values)


def config_to_official(c: MambaConfig) -> dict[str, Any]:
    if c.norm_eps != 1e-5:
        warnings.warn(f"the official layout has no norm epsilon field: norm_eps={c.norm_eps} is saved as 1e-5")
    ssm_cfg = {k: getattr(c, k) for k in ("d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init",
                                          "dt_scale", "dt_init_floor", "conv_bias", "bias")}
    return dict(d_model=c.d_model, d_intermediate=0, n_layer=c.n_layer, vocab_size=c.vocab_size, ssm_cfg=ssm_cfg,
                attn_layer_idx=[], attn_cfg={}, rms_norm=c.rms_norm, residual_in_fp32=c.residual_in_fp32,
                fused_add_norm=True, pad_vocab_size_multiple=c.pad_vocab_size_multiple,
                tie_embeddings=c.tie_embeddings)


# transformers MambaConfig field ↔ MambaConfig field
_HF_FIELDS = {
    "hidden_size": "d_model", "num_hidden_layers": "n_layer", "state_size": "d_state", "conv_kernel": "d_conv",
    "expand": "expand", "time_step_rank": "dt_rank", "time_step_min": "dt_min", "time_step_max": "dt_max",
    "time_step_init_scheme": "dt_init", "time_step_scale": "dt_scale", "time_step_floor": "dt_init_floor",
    "use_conv_bias": "conv_bias", "use_bias": "bias", "layer_norm_epsilon": "norm_eps",
    "residual_in_fp32": "residual_in_fp32", "tie_word_embeddings": "tie_embeddings",
    "initializer_range": "initializer_range",
}
# transformers' own defaults for fields a config.json may leave out
_HF_DEFAULTS = {"state_size": 16, "conv_kernel": 4, "expand": 2, "time_step_rank": "auto", "use_conv_bias": True,
                "use_bias": False, "layer_norm_epsilon": 1e-5, "residual_in_fp32": True, "tie_word_embeddings": True,
                "vocab_size": 50280, "hidden_size": 768, "num_hidden_layers": 32}


def config_from_hf(d: dict[str, Any]) -> MambaConfig:
    """transformers MambaConfig → MambaConfig. Its vocab_size is already the padded one, so no padding."""
    if d.get("hidden_act", "silu") not in ("silu", "swish"):
        raise CheckpointError(f"hidden_act={d['hidden_act']!r}: the Mamba block uses SiLU only")
    merged = {**_HF_DEFAULTS, **d}
    values = {ours: merged[theirs] for theirs, ours in _HF_FIELDS.items() if theirs in merged}
    values.update(vocab_size=merged["vocab_size"], pad_vocab_size_multiple=1)
    return MambaConfig.from_dict(values)


def config_to_hf(c: MambaConfig, dtype: torch.dtype) -> dict[str, Any]:
    if not c.rms_norm:
        raise CheckpointError(
            "transformers' Mamba has RMSNorm only; save a rms_norm=False model with layout='official'"
        )
    d = {theirs: getattr(c, ours) for theirs, ours in _HF_FIELDS.items()}
    # rescale_prenorm_residual is an init-time flag, but transformers 5.x re-applies it to out_proj after
    # loading (dividing trained weights by sqrt(n_layer) again), so a checkpoint must say false.
    d.update(architectures=["MambaForCausalLM"], model_type="mamba", vocab_size=c.padded_vocab_size,
             hidden_act="silu", rescale_prenorm_residual=False, dtype=str(dtype).removeprefix("torch."))
    return d


# ------------------------------------------------------------------------------------------------ reading
def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON (truncated or corrupted?): {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _check_safetensors_size(path: Path) -> None:
    """safetensors files state their size in the header: a shorter file was cut off while writing or copying."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated ({size} bytes, not even a safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path} is truncated or not a safetensors file (header of {n} bytes, file {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} is corrupted: its safetensors header is not valid JSON") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated: the header lists {8 + n + end} bytes, the file has {size}")


def _read_weights(path: Path) -> dict[str, Tensor]:
    """One weight file → {key: tensor} on CPU. Pickles only through torch.load(weights_only=True)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        _check_safetensors_size(path)
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error type
            raise CheckpointError(f"{path} is corrupted and cannot be read: {e}") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(f"{path} holds objects other than tensors; refusing to unpickle it: {msg}") from None
        raise CheckpointError(f"{path} is truncated or corrupted and cannot be read: {msg}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors (a state_dict)")
    return sd


def _read_state_dict(directory: Path) -> dict[str, Tensor]:
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.exists():
            continue
        if not name.endswith(".index.json"):
            return _read_weights(path)
        index = _read_json(path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{path} has no 'weight_map' object")
        sd: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).exists():
                raise CheckpointError(f"shard {shard} listed in {path} is missing")
            sd.update(_read_weights(directory / shard))
        missing = sorted(set(weight_map) - set(sd))
        if missing:
            raise CheckpointError(f"keys listed in {path} are not in any shard: {_names(missing)}")
        return sd
    raise CheckpointError(f"{directory} has no weights: expected one of {', '.join(WEIGHT_FILES)}")


def _names(keys: list[str], limit: int = 8) -> str:
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _resolve_directory(path) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        return p.parent if p.name in WEIGHT_FILES + (CONFIG_NAME,) else p
    s = str(path)
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", s):
        raise FileNotFoundError(
            f"{s!r} is not a local directory. It looks like a Hugging Face Hub id; mambakit does not download. "
            f"Fetch it first (on a machine with network access), then pass the directory:\n"
            f"    hf download {s} --local-dir ./{s.split('/')[-1]}\n"
            f"or in Python: huggingface_hub.snapshot_download({s!r}, local_dir='./{s.split('/')[-1]}')"
        )
    raise FileNotFoundError(f"checkpoint directory {s!r} does not exist")


def load_config(path) -> tuple[MambaConfig, str]:
    """(config, layout) of a checkpoint directory."""
    directory = _resolve_directory(path)
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.exists():
        raise CheckpointError(f"{directory} has no {CONFIG_NAME}")
    raw = _read_json(cfg_path)
    layout = detect_layout(raw)
    try:
        config = config_from_official(raw) if layout == "official" else config_from_hf(raw)
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{cfg_path} ({layout} layout): {e}") from None
    return config, layout


def to_mambakit_keys(sd: dict[str, Tensor], config: MambaConfig) -> dict[str, Tensor]:
    """Either layout's state dict → MambaLM's keys (the official names); drops a tied lm_head copy."""
    sd = dict(sd)
    if HF_EMBEDDING in sd:
        sd[OFFICIAL_EMBEDDING] = sd.pop(HF_EMBEDDING)
    if config.tie_embeddings and "lm_head.weight" in sd and OFFICIAL_EMBEDDING in sd:
        head = sd.pop("lm_head.weight")
        if head.shape != sd[OFFICIAL_EMBEDDING].shape or not torch.equal(head, sd[OFFICIAL_EMBEDDING]):
            warnings.warn("lm_head.weight differs from the embedding although embeddings are tied; using the embedding")
    return sd


def check_state_dict(sd: dict[str, Tensor], model: "MambaLM", source: str) -> None:
    """Raises CheckpointError naming every missing key, unexpected key and shape mismatch."""
    want = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        want.pop("lm_head.weight", None)
    problems = []
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(want[k])}"
                  for k in sorted(set(want) & set(sd)) if tuple(sd[k].shape) != tuple(want[k])]
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_names(mismatched)}")
    if problems:
        raise CheckpointError(f"{source} does not fit its config.json: " + "; ".join(problems))


def build_model(cls, config: MambaConfig, sd: dict[str, Tensor], source: str) -> "MambaLM":
    """cls(config) holding the state dict `sd` (either layout's keys; a tied head's copy is dropped), checked
    against the model's keys and shapes (CheckpointError naming `source`), without initialising parameters that
    are replaced anyway."""
    sd = to_mambakit_keys(sd, config)
    with torch.device("meta"):  # no init work: every parameter is replaced by a loaded tensor
        model = cls(config)
    check_state_dict(sd, model, source)
    model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()
    for m in model.modules():
        if hasattr(m, "mark_parameters"):
            m.mark_parameters()  # assign=True made new Parameter objects: restore their flags
    return model


def load_pretrained(cls, path, dtype: torch.dtype | None = torch.float32, device=None) -> "MambaLM":
    """Builds the model (an instance of cls, MambaLM or a subclass) of a checkpoint directory (either layout) and
    loads its weights, cast to `dtype` (None: the checkpoint's own dtype, that of its embedding); A_log and D
    stay float32 either way."""
    directory = _resolve_directory(path)
    config, layout = load_config(directory)
    model = build_model(cls, config, _read_state_dict(directory), f"{directory} ({layout} layout)")
    model.tokenizer = find_tokenizer(directory)  # a tokenizer.json (or mambakit's byte tokenizer) saved alongside
    return model.to(device=device or "cpu", dtype=dtype or model.backbone.embedding.weight.dtype)


# ------------------------------------------------------------------------------------------------ writing
def save_pretrained(model: "MambaLM", path, layout: str = "hf") -> None:
    """config.json + weights for `layout` ("hf": model.safetensors; "official": pytorch_model.bin).
    Weights are written first and config.json last, each atomically; weight files of the other layout
    left in the directory are removed so that the loader cannot pick a stale one."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    directory = Path(path).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    c = model.config
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    dtype = model.backbone.embedding.weight.dtype
    if layout == "hf":
        if c.tie_embeddings:
            sd.pop("lm_head.weight")  # the tie is in the config (safetensors refuses shared tensors)
        sd[HF_EMBEDDING] = sd.pop(OFFICIAL_EMBEDDING)
        from safetensors.torch import save_file

        weights_name, config = SAFETENSORS_NAME, config_to_hf(c, dtype)
        atomic_write(directory / weights_name, lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    else:
        if c.tie_embeddings:
            sd["lm_head.weight"] = sd[OFFICIAL_EMBEDDING]  # the official file stores the tied head too (shared)
        weights_name, config = PICKLE_NAME, config_to_official(c)
        atomic_write(directory / weights_name, lambda tmp: torch.save(sd, tmp))
    if getattr(model, "tokenizer", None) is not None:
        model.tokenizer.save(directory)  # from_pretrained picks it up again
    text = json.dumps(config, indent=2) + "\n"
    atomic_write(directory / CONFIG_NAME, text)
    for stale in WEIGHT_FILES:
        if stale != weights_name:
            (directory / stale).unlink(missing_ok=True)


def convert(cls, src, dst, layout: str = "hf", dtype: torch.dtype | None = None) -> tuple[str, "MambaLM"]:
    """Reads a checkpoint in either layout as a cls (MambaLM) and writes it in `layout`; returns (source layout,
    model). dtype None keeps the checkpoint's dtype (that of its embedding)."""
    _, src_layout = load_config(src)
    model = load_pretrained(cls, src, dtype=dtype)
    save_pretrained(model, dst, layout=layout)
    return src_layout, model
