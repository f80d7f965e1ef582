"""Checkpoint directories ⇄ MambaLM: the official layout, the transformers layout, safe reads, atomic writes.

Two layouts are read (detected from config.json) and written:

- "official" (state-spaces/mamba `MambaLMHeadModel.save_pretrained`): config.json with d_model, n_layer,
  vocab_size (unpadded), ssm_cfg (the mixer kwargs; ssm_cfg.layer "Mamba1" (the default) or "Mamba2"), rms_norm,
  residual_in_fp32, pad_vocab_size_multiple, tie_embeddings, and pytorch_model.bin. Keys are exactly MambaLM's:
  `backbone.embedding.weight`, `backbone.layers.{i}.…`.
- "hf" (transformers `MambaForCausalLM`, model_type "mamba", `Mamba2ForCausalLM`, model_type "mamba2", or
  `FalconMambaForCausalLM`, model_type "falcon_mamba", Mamba-1 with its mixer norms, config.mixer_rms_eps):
  config.json with hidden_size, state_size, conv_kernel, expand, … (vocab_size already padded), and
  model.safetensors (or pytorch_model.bin, or shards with an index json). One key differs:
  `backbone.embeddings.weight` (Mamba-2's gated norm is `mixer.norm.weight` in both).

Mamba-1, FalconMamba and Mamba-2 are implemented (FalconMamba has no official layout: saving it as "official" is
refused). Official hybrids (attention layers at attn_layer_idx with attn_cfg, MLP blocks with d_intermediate > 0;
Mamba-1 or Mamba-2 mixers) are read and written in the official layout only (transformers has no class for them).
Other families and mixers are refused by name from config.json, before any weight is read: transformers
model_type "jamba", "zamba", "bamba", …; official configs with ssm_cfg.layer "Mamba3". An unknown
model_type, or a config without one that is not the official layout, is refused too: the family is never guessed.
A config field that would change the computation in a way mambakit cannot follow is refused by name (see
config_from_hf_mamba2); writing a model that transformers cannot express (e.g. Mamba-2 with D per channel) in
the "hf" layout is refused, naming the field.

Reading refuses, with one CheckpointError (a ValueError) naming the file and the problem, whatever it can tell
is wrong: a config.json that is not a JSON object (or nested past reason, or has duplicate keys, or is a
directory), fields of the wrong type; a safetensors header that does not parse or whose offsets, shapes and
dtypes do not add up, a truncated file or one with trailing bytes; a pickle with anything but a flat
{str: tensor} dict; weights that are not floating point (integer, bool, float8: quantized or damaged files),
non-finite values, missing, unexpected or misshapen keys, one tensor under both the official and the
transformers spelling, a tied head that differs from the embedding; a shard index naming files outside the
directory, shards holding keys the index does not list under them; a tokenizer file that does not parse.

Decisions:
- Non-finite weights (NaN, ±inf) are refused, not warned about: one NaN in any weight makes every logit NaN (or
  breaks sampling through the tied head's padded rows), so such a model cannot be used at all. The message
  names the tensor and the count. save_pretrained refuses to write such a model for the same reason.
- Integrity: safetensors files that mambakit writes carry a CRC-32 of every tensor in their header metadata
  (`mambakit.crc32`, ignored by other readers); a flipped byte or swapped names inside such a file are
  refused. A file without it (written by another tool, or a pickle, which has no room for it) is checked
  for structure only: two tensors of the same shape swapped there are indistinguishable from another model.
- Ownership: tensors are read into memory the model owns (no memory map; pickles are copied out of their
  storages), so overwriting or truncating a file after loading changes nothing and cannot SIGBUS a server.

Safety: pickles are read only with `torch.load(weights_only=True)`; nothing from a checkpoint is executed.

Writes: save_pretrained manages config.json, the weight files (and indexes and index-listed shards of an
earlier sharded save) and the tokenizer files; it replaces that set as one unit through
mambakit._io.replace_files (new files beside, a journal as the commit point, then renames), so an interrupted
save leaves the old or the new checkpoint, whole, and files of an earlier save that the new one does not have
(another layout's weights, a tokenizer the model no longer has) are removed. Other files of the directory
(a training run's checkpoints/, metrics.jsonl) are never touched.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._io import JournalError, read_files, replace_files
from .config import MambaConfig
from .tokenizer import TOKENIZER_FILES, load_tokenizer_files, tokenizer_files


LAYOUTS = ("hf", "official")
CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_NAME = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS_NAME, SAFETENSORS_INDEX, PICKLE_NAME, PICKLE_INDEX)  # in order of preference
# transformers' shard names; only files of this form that an index lists are removed by a later save
_SHARD_NAME = re.compile(r"(?:model|pytorch_model)-\d+-of-\d+\.(?:safetensors|bin)")

HF_EMBEDDING, OFFICIAL_EMBEDDING = "backbone.embeddings.weight", "backbone.embedding.weight"
CRC_KEY = "mambakit.crc32"  # safetensors metadata: JSON {tensor name: CRC-32 of its bytes}

_MAX_JSON_BYTES = 64 << 20  # config.json and indexes are KBs to a few MBs; this only guards memory
_MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own limit
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_ST_FLOAT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_ST_QUANT = {"I8": torch.int8, "U8": torch.uint8}  # allowed for `*.qweight` tensors only
_ST_OTHER = ("BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F8_E4M3", "F8_E5M2", "F8_E8M0",
             "F4", "F6_E2M3", "F6_E3M2", "C64")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing or corrupt files, a config or keys that do not fit."""


# ----------------------------------------------------------------------------------------------- configs
# transformers model types and architectures of families that mambakit does not implement (yet)
_OTHER_FAMILIES = {
    "jamba": "Jamba (an attention/Mamba hybrid)",
    "zamba": "Zamba (a Mamba/attention hybrid)", "zamba2": "Zamba2 (a Mamba-2/attention hybrid)",
    "bamba": "Bamba (a Mamba-2/attention hybrid)", "nemotron_h": "Nemotron-H (a Mamba-2/attention hybrid)",
    "falcon_h1": "Falcon-H1 (a Mamba-2/attention hybrid)", "granitemoehybrid": "Granite 4 (a Mamba-2 hybrid)",
    "plamo2": "PLaMo 2 (a Mamba-2 hybrid)",
}
_OTHER_ARCHITECTURES = {
    "JambaForCausalLM": "jamba",
    "ZambaForCausalLM": "zamba", "Zamba2ForCausalLM": "zamba2", "BambaForCausalLM": "bamba",
    "NemotronHForCausalLM": "nemotron_h", "FalconH1ForCausalLM": "falcon_h1",
    "GraniteMoeHybridForCausalLM": "granitemoehybrid", "Plamo2ForCausalLM": "plamo2",
}
# architectures mambakit loads → the transformers model_type they belong to (None: the official class)
_MAMBA_ARCHITECTURES = {"MambaForCausalLM": "mamba", "Mamba2ForCausalLM": "mamba2",
                        "FalconMambaForCausalLM": "falcon_mamba", "MambaLMHeadModel": None}
_HF_MODEL_TYPES = ("mamba", "mamba2", "falcon_mamba")
# fields that only another family's transformers config has: a "mamba"/"mamba2" config with them is something else
# (mixer_rms_eps is FalconMamba's own: allowed in a "falcon_mamba" config only)
_OTHER_FIELDS = {"mixer_rms_eps": "FalconMamba", "attn_layer_indices": "a hybrid", "attn_layer_period": "a hybrid",
                 "hybrid_override_pattern": "a hybrid"}
_MAMBA2_ONLY_FIELDS = ("num_heads", "head_dim", "n_groups", "chunk_size", "time_step_limit")
# every field of the official MambaConfig dataclass (which itself refuses others)
_OFFICIAL_FIELDS = {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx", "attn_cfg",
                    "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings"}
_NOT_YET = "is not supported yet: mambakit implements Mamba-1, FalconMamba and Mamba-2 language models"


def _family_error(source: str, what: str) -> CheckpointError:
    return CheckpointError(f"{source}: {what} {_NOT_YET}")


def detect_layout(config: dict[str, Any], source: str = CONFIG_NAME) -> str:
    """"official" or "hf" (Mamba-1 or Mamba-2, told apart by config_from_official / the model_type); a
    CheckpointError naming the family for anything else."""
    model_type = config.get("model_type")
    if "model_type" in config and not isinstance(model_type, str):
        raise CheckpointError(f"{source}: model_type must be a string, got {model_type!r}")
    if model_type is not None and model_type not in _HF_MODEL_TYPES:
        if model_type in _OTHER_FAMILIES:
            raise _family_error(source, f"{_OTHER_FAMILIES[model_type]} (model_type {model_type!r})")
        raise CheckpointError(
            f"{source}: unknown model_type {model_type!r}; mambakit reads Mamba-1, FalconMamba and Mamba-2 "
            "checkpoints: transformers' model_type 'mamba', 'falcon_mamba' or 'mamba2', or the official layout "
            "(d_model, n_layer, ssm_cfg)")
    archs = config.get("architectures")
    if archs is not None:
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise CheckpointError(f"{source}: architectures must be a list of strings, got {archs!r}")
        for a in archs:
            if a in _OTHER_ARCHITECTURES:
                raise _family_error(source, f"{_OTHER_FAMILIES[_OTHER_ARCHITECTURES[a]]} (architectures {a!r})")
            if a not in _MAMBA_ARCHITECTURES:
                raise CheckpointError(f"{source}: architectures names {a!r}; mambakit loads Mamba-1, FalconMamba and "
                                      f"Mamba-2 language models ({', '.join(_MAMBA_ARCHITECTURES)})")
            owner = _MAMBA_ARCHITECTURES[a]
            if model_type is not None and owner is not None and owner != model_type:
                raise CheckpointError(f"{source}: architectures names {a!r} (model_type {owner!r}) but model_type is "
                                      f"{model_type!r}; which model is it?")
    if "d_model" in config:
        if "hidden_size" in config or model_type is not None:
            raise CheckpointError(f"{source} mixes the official layout (d_model) with transformers' fields "
                                  "(hidden_size, model_type): it is neither")
        return "official"
    if model_type in _HF_MODEL_TYPES:
        others = sorted(k for k in config if k in _OTHER_FIELDS
                        and not (k == "mixer_rms_eps" and model_type == "falcon_mamba"))
        if others:
            raise _family_error(source, f"a config with {', '.join(others)} ({_OTHER_FIELDS[others[0]]}'s)")
        if model_type in ("mamba", "falcon_mamba"):
            mamba2 = sorted(k for k in config if k in _MAMBA2_ONLY_FIELDS)
            if mamba2:
                raise CheckpointError(f"{source}: a model_type {model_type!r} (Mamba-1) config with "
                                      f"{', '.join(mamba2)}, Mamba-2's fields: it contradicts itself (a Mamba-2 "
                                      "config says 'mamba2')")
        return "hf"
    if "hidden_size" in config:
        raise CheckpointError(f"{source} has hidden_size but no model_type: mambakit does not guess the family "
                              "(a transformers Mamba config says model_type 'mamba')")
    raise CheckpointError(
        f"{source} is neither the official layout (d_model, n_layer, …) nor transformers' MambaConfig "
        f"(model_type 'mamba', hidden_size, state_size, …); its keys: {_names(sorted(config), 20)}"
    )


def config_from_official(d: dict[str, Any], source: str = CONFIG_NAME) -> MambaConfig:
    """state-spaces/mamba MambaConfig (+ its ssm_cfg, the Mamba mixer kwargs) → MambaConfig."""
    unknown = sorted(set(d) - _OFFICIAL_FIELDS)
    if unknown:
        raise CheckpointError(f"{source}: keys the official MambaConfig does not have: {_names(unknown)}")
    ssm = d.get("ssm_cfg") or {}
    if not isinstance(ssm, dict):
        raise CheckpointError(f"{source}: ssm_cfg must be an object, got {type(ssm).__name__}")
    ssm = dict(ssm)
    layer = ssm.pop("layer", "Mamba1")
    if layer == "Mamba3":
        raise _family_error(source, "the Mamba-3 mixer (ssm_cfg.layer = 'Mamba3')")
    if layer not in ("Mamba1", "Mamba2"):
        raise CheckpointError(f"{source}: unknown mixer ssm_cfg.layer = {layer!r}; mambakit implements 'Mamba1' "
                              "and 'Mamba2'")
    attn = d.get("attn_layer_idx") or []
    if not isinstance(attn, list):
        raise CheckpointError(f"{source}: attn_layer_idx must be a list, got {attn!r}")
    attn_cfg = d.get("attn_cfg") or {}
    if not isinstance(attn_cfg, dict):
        raise CheckpointError(f"{source}: attn_cfg must be an object, got {type(attn_cfg).__name__}")
    d_int = d.get("d_intermediate", 0)
    if isinstance(d_int, bool) or not isinstance(d_int, int) or d_int < 0:
        raise CheckpointError(f"{source}: d_intermediate must be an int >= 0, got {d_int!r}")
    keys = _OFFICIAL_MAMBA2_KEYS if layer == "Mamba2" else _OFFICIAL_MAMBA_KEYS
    ignored = {"use_mem_eff_path", "sequence_parallel"} if layer == "Mamba2" else {"use_fast_path"}  # kernel choices
    unknown = sorted(set(ssm) - set(keys) - ignored - {"activation"})
    if unknown:
        raise CheckpointError(f"{source}: ssm_cfg has keys mambakit does not support for the {layer} mixer: {unknown}")
    if layer == "Mamba2" and ssm.get("activation", "silu") not in ("silu", "swish"):
        raise CheckpointError(f"{source}: ssm_cfg.activation = {ssm['activation']!r}: mambakit's Mamba2 uses SiLU")
    if layer == "Mamba1" and "activation" in ssm:
        raise CheckpointError(f"{source}: ssm_cfg has keys mambakit does not support for the Mamba1 mixer: "
                              "['activation']")
    values = {k: ssm[k] for k in keys if k in ssm}
    values["layer"] = "Mamba2" if layer == "Mamba2" else "Mamba"
    if attn:  # a hybrid: attention layers (attn_cfg is read only then, as the official create_block does)
        values.update(attn_layer_idx=attn, attn_cfg=attn_cfg)
    for k in ("d_model", "n_layer", "vocab_size", "d_intermediate", "rms_norm", "residual_in_fp32",
              "pad_vocab_size_multiple", "tie_embeddings"):
        if k in d:
            values[k] = d[k]
    return MambaConfig.from_dict(values)


_OFFICIAL_MAMBA_KEYS = ("d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init", "dt_scale",
                        "dt_init_floor", "conv_bias", "bias")
# the official Mamba2 constructor's arguments (modules/mamba2.py) that a config may carry
_OFFICIAL_MAMBA2_KEYS = ("d_state", "d_conv", "conv_init", "expand", "headdim", "d_ssm", "ngroups", "A_init_range",
                         "D_has_hdim", "rmsnorm", "norm_before_gate", "dt_min", "dt_max", "dt_init_floor", "dt_limit",
                         "bias", "conv_bias", "chunk_size")


def config_to_official(c: MambaConfig) -> dict[str, Any]:
    if c.mixer_rms_eps is not None:
        raise CheckpointError("FalconMamba (mixer_rms_eps set) has no official layout: state-spaces/mamba's "
                              "MambaLMHeadModel has no config field for its mixer norms; save it with layout='hf' "
                              "(transformers' FalconMambaForCausalLM)")
    if c.norm_eps != 1e-5:
        import warnings

        warnings.warn(f"the official layout has no norm epsilon field: norm_eps={c.norm_eps} is saved as 1e-5")
    if c.layer == "Mamba2":
        ssm_cfg = {"layer": "Mamba2", **{k: getattr(c, k) for k in _OFFICIAL_MAMBA2_KEYS}}
        ssm_cfg["A_init_range"], ssm_cfg["dt_limit"] = list(c.A_init_range), list(c.dt_limit)
        if c.d_ssm == c.d_inner:
            ssm_cfg["d_ssm"] = None  # the official "all of d_inner"
        if c.dt_limit == (0.0, float("inf")):
            del ssm_cfg["dt_limit"]  # the official default: its (0, inf) tuple skips the clamp, a JSON list would not
    else:
        ssm_cfg = {k: getattr(c, k) for k in _OFFICIAL_MAMBA_KEYS}
    return dict(d_model=c.d_model, d_intermediate=c.d_intermediate, n_layer=c.n_layer, vocab_size=c.vocab_size,
                ssm_cfg=ssm_cfg, attn_layer_idx=list(c.attn_layer_idx),
                attn_cfg=dict(c.attn_cfg) if c.attn_layer_idx else {}, rms_norm=c.rms_norm, residual_in_fp32=c.residual_in_fp32,
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


def config_from_hf(d: dict[str, Any], source: str = CONFIG_NAME) -> MambaConfig:
    """transformers MambaConfig, FalconMambaConfig (or Mamba2Config), by model_type → MambaConfig. Its
    vocab_size is already the padded one, so no padding. An intermediate_size in the config is the mixer's width,
    as transformers reads it (it wins over expand·hidden_size: falcon-mamba-7b says expand 16 and means 2)."""
    if d.get("model_type") == "mamba2":
        return config_from_hf_mamba2(d, source)
    act = d.get("hidden_act", "silu")
    if not isinstance(act, str) or act not in ("silu", "swish"):
        raise CheckpointError(f"{source}: hidden_act={act!r}: the Mamba block uses SiLU only")
    merged = {**_HF_DEFAULTS, **d}
    values = {ours: merged[theirs] for theirs, ours in _HF_FIELDS.items() if theirs in merged}
    values.update(vocab_size=merged["vocab_size"], pad_vocab_size_multiple=1)
    if d.get("model_type") == "falcon_mamba":
        values["mixer_rms_eps"] = merged.get("mixer_rms_eps", 1e-6)  # transformers' default
    width, hidden = merged.get("intermediate_size"), merged["hidden_size"]
    if width is not None:
        if (isinstance(width, bool) or not isinstance(width, int) or isinstance(hidden, bool)
                or not isinstance(hidden, int) or hidden < 1 or width < 1 or width % hidden):
            raise CheckpointError(f"{source}: intermediate_size = {width!r} must be a positive multiple of "
                                  f"hidden_size = {hidden!r} (mambakit's width is expand·d_model)")
        values["expand"] = width // hidden
    return MambaConfig.from_dict(values)


# transformers Mamba2Config field ↔ MambaConfig field
_HF2_FIELDS = {
    "hidden_size": "d_model", "num_hidden_layers": "n_layer", "state_size": "d_state", "conv_kernel": "d_conv",
    "expand": "expand", "head_dim": "headdim", "n_groups": "ngroups", "chunk_size": "chunk_size",
    "time_step_limit": "dt_limit", "time_step_min": "dt_min", "time_step_max": "dt_max",
    "time_step_floor": "dt_init_floor", "use_conv_bias": "conv_bias", "use_bias": "bias",
    "layer_norm_epsilon": "norm_eps", "residual_in_fp32": "residual_in_fp32",
    "tie_word_embeddings": "tie_embeddings", "initializer_range": "initializer_range",
}
# transformers 5.x Mamba2Config defaults (Mamba-Codestral-7B's sizes) for fields a config.json may leave out
_HF2_DEFAULTS = {"num_heads": 128, "head_dim": 64, "vocab_size": 32768, "hidden_size": 4096, "state_size": 128,
                 "num_hidden_layers": 64, "layer_norm_epsilon": 1e-5, "expand": 2, "conv_kernel": 4, "n_groups": 8,
                 "use_bias": False, "use_conv_bias": True, "residual_in_fp32": True, "time_step_min": 0.001,
                 "time_step_max": 0.1, "time_step_floor": 1e-4, "time_step_limit": [0.0, float("inf")],
                 "chunk_size": 256, "tie_word_embeddings": False, "initializer_range": 0.1}
# Read and not used, as transformers does: time_step_rank (Mamba-1's), rescale_prenorm_residual (init only),
# use_cache, the token ids, and fields of older transformers versions that 5.x ignores (its Mamba2 always computes
# a gated RMSNorm, gate before norm, of width expand·hidden_size): rms_norm, norm_before_gate, intermediate_size,
# time_step_init_scheme, time_step_scale.


def _hf_float(v: Any) -> Any:
    """A number as transformers writes it: plain, Infinity (parsed by json), or {"__float__": "Infinity"}."""
    if isinstance(v, dict) and set(v) == {"__float__"} and isinstance(v["__float__"], str):
        try:
            return float(v["__float__"])
        except ValueError:
            return v
    return v


def config_from_hf_mamba2(d: dict[str, Any], source: str = CONFIG_NAME) -> MambaConfig:
    """transformers Mamba2Config → MambaConfig (layer "Mamba2"); num_heads must be hidden_size·expand / head_dim,
    as transformers checks."""
    act = d.get("hidden_act", "silu")
    if not isinstance(act, str) or act not in ("silu", "swish"):
        raise CheckpointError(f"{source}: hidden_act={act!r}: the Mamba-2 block uses SiLU only")
    merged = {**_HF2_DEFAULTS, **d}
    limit = merged["time_step_limit"]
    if isinstance(limit, (list, tuple)):
        merged["time_step_limit"] = [_hf_float(v) for v in limit]
    values = {ours: merged[theirs] for theirs, ours in _HF2_FIELDS.items()}
    values.update(layer="Mamba2", vocab_size=merged["vocab_size"], pad_vocab_size_multiple=1)
    config = MambaConfig.from_dict(values)
    heads = merged["num_heads"]
    if heads != config.nheads:
        raise CheckpointError(f"{source}: num_heads = {heads!r}, but hidden_size·expand / head_dim = "
                              f"{config.d_inner} / {config.headdim} = {config.nheads}")
    return config


def config_to_hf(c: MambaConfig, dtype: torch.dtype) -> dict[str, Any]:
    if c.attn_layer_idx or c.d_intermediate:
        raise CheckpointError("transformers has no class for the official hybrid (attention layers or MLPs, "
                              "attn_layer_idx / d_intermediate); save this model with layout='official'")
    if not c.rms_norm:
        raise CheckpointError(
            "transformers' Mamba has RMSNorm only; save a rms_norm=False model with layout='official'"
        )
    if c.layer == "Mamba2":
        return config_to_hf_mamba2(c, dtype)
    d = {theirs: getattr(c, ours) for theirs, ours in _HF_FIELDS.items()}
    # rescale_prenorm_residual is an init-time flag, but transformers 5.x re-applies it to out_proj after
    # loading (dividing trained weights by sqrt(n_layer) again), so a checkpoint must say false.
    d.update(architectures=["MambaForCausalLM"], model_type="mamba", vocab_size=c.padded_vocab_size,
             hidden_act="silu", rescale_prenorm_residual=False,
             dtype=str(dtype).removeprefix("torch."))
    if c.mixer_rms_eps is not None:  # FalconMamba: the same keys, its own class and the norms' epsilon
        d.update(architectures=["FalconMambaForCausalLM"], model_type="falcon_mamba", mixer_rms_eps=c.mixer_rms_eps)
    return d


def config_to_hf_mamba2(c: MambaConfig, dtype: torch.dtype) -> dict[str, Any]:
    """MambaConfig (layer "Mamba2") → transformers Mamba2Config, refusing (naming the field) what transformers'
    Mamba2 cannot compute: it always has the gated norm, gate before norm, D per head and no MLP branch."""
    cannot = [f"{name}={getattr(c, name)!r}" for name, ok in (
        ("rmsnorm", c.rmsnorm), ("norm_before_gate", not c.norm_before_gate), ("D_has_hdim", not c.D_has_hdim),
        ("d_ssm", c.d_ssm == c.d_inner)) if not ok]
    if cannot:
        raise CheckpointError(f"transformers' Mamba2 cannot express {', '.join(cannot)}; save this model with "
                              "layout='official'")
    d = {theirs: getattr(c, ours) for theirs, ours in _HF2_FIELDS.items()}
    d["time_step_limit"] = list(c.dt_limit)  # written [lo, Infinity], as transformers writes it
    # rescale_prenorm_residual false: transformers would re-apply it to loaded weights (see config_to_hf).
    # No token ids: transformers' defaults (Codestral's, eos 2) would stop its generate at an arbitrary token.
    d.update(architectures=["Mamba2ForCausalLM"], model_type="mamba2", vocab_size=c.padded_vocab_size,
             num_heads=c.nheads, hidden_act="silu", rescale_prenorm_residual=False, pad_token_id=None,
             bos_token_id=None, eos_token_id=None, dtype=str(dtype).removeprefix("torch."))
    return d


# ------------------------------------------------------------------------------------------- reading files
def _open_regular(path: Path, shown: Path, max_bytes: int | None = None):
    """An unbuffered binary file object of a regular file, and its size; a CheckpointError for a directory,
    a FIFO or device (opened non-blocking, so a FIFO cannot hang the load), a dangling link, a huge file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except IsADirectoryError:
        raise CheckpointError(f"{shown} is a directory, not a file") from None
    except OSError as e:
        raise CheckpointError(f"{shown} cannot be opened: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "a special file (FIFO, device or socket)"
        raise CheckpointError(f"{shown} is {what}, not a file")
    if max_bytes is not None and st.st_size > max_bytes:
        os.close(fd)
        raise CheckpointError(f"{shown} is {st.st_size} bytes, far more than such a file holds (at most {max_bytes})")
    return os.fdopen(fd, "rb", buffering=0), st.st_size


def _read_exactly(f, buf, shown: Path) -> None:
    view, got = memoryview(buf).cast("B"), 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise CheckpointError(f"{shown} is truncated: it ended while being read (was it changed meanwhile?)")
        got += n


def _read_n(f, n: int, shown: Path) -> bytes:
    buf = bytearray(n)
    _read_exactly(f, buf, shown)
    return bytes(buf)


def _no_duplicates(what: str):
    def hook(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise CheckpointError(f"{what} has the key {k!r} twice (which one is meant?)")
            seen.add(k)
        return dict(pairs)
    return hook


def _reject_constant(c: str):
    raise ValueError(f"{c} is not valid JSON")


def _parse_json(data: bytes, what: str, constants: bool = True) -> Any:
    """constants: accept NaN and Infinity, as Python and transformers write them (Mamba-2 configs have
    time_step_limit = [0, Infinity]); MambaConfig refuses non-finite values where it reads them."""
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates(what),
                          parse_constant=None if constants else _reject_constant)
    except UnicodeDecodeError:
        raise CheckpointError(f"{what} is not UTF-8 text (corrupted?)") from None
    except RecursionError:
        raise CheckpointError(f"{what} is nested too deeply to be a real one") from None
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{what} is not valid JSON (truncated or corrupted?): {e}") from None


def _read_json(path: Path, shown: Path | None = None) -> dict[str, Any]:
    shown = shown or path
    f, size = _open_regular(path, shown, _MAX_JSON_BYTES)
    with f:
        data = _read_n(f, size, shown)
    parsed = _parse_json(data, str(shown))
    if not isinstance(parsed, dict):
        raise CheckpointError(f"{shown} must hold a JSON object, got {type(parsed).__name__}")
    return parsed


def _crc32(name: str, t: Tensor) -> int:
    # seeded with the name: a consistent rename of two tensors in the header (their checksums too) is still seen
    seed = zlib.crc32(name.encode("utf-8"))
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), seed) if t.numel() else seed


def _read_safetensors(path: Path, shown: Path) -> dict[str, Tensor]:
    """A safetensors file parsed and checked here (not by the safetensors package, whose errors name neither the
    file nor the problem) and read into tensors the caller owns: no memory map."""
    if sys.byteorder != "little":  # pragma: no cover - the raw bytes below are little-endian
        raise CheckpointError(f"{shown}: reading safetensors on a big-endian machine is not supported")
    f, size = _open_regular(path, shown)
    with f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{shown} is truncated ({size} bytes, not even a safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{shown} is truncated or not a safetensors file (header of {n} bytes, "
                                  f"file {size})")
        if n > _MAX_HEADER_BYTES:
            raise CheckpointError(f"{shown} is corrupted: its header claims {n} bytes (safetensors allows 100 MB)")
        what = f"{shown} is corrupted: its safetensors header"
        header = _parse_json(_read_n(f, n, shown), what, constants=False)
        if not isinstance(header, dict):
            raise CheckpointError(f"{what} is not a JSON object")
        meta = header.pop("__metadata__", None)
        if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
            raise CheckpointError(f"{what} has __metadata__ that is not an object of strings")
        spans = []
        for name, e in header.items():
            spans.append((*_check_entry(name, e, what, shown), name))
        spans.sort()
        pos = 0
        for begin, end, dtype, shape, name in spans:
            if begin != pos:
                raise CheckpointError(f"{what} places tensor {name!r} at byte {begin}, where "
                                      f"{'the previous tensor still is' if begin < pos else 'a gap begins'} "
                                      f"(expected {pos})")
            pos = end
        data_bytes = size - 8 - n
        if pos > data_bytes:
            raise CheckpointError(f"{shown} is truncated: the header lists {8 + n + pos} bytes, the file has {size}")
        if pos < data_bytes:
            raise CheckpointError(f"{shown} is corrupted: {data_bytes - pos} bytes follow the last tensor")
        crcs = _read_crcs(meta, header, what)
        sd = {}
        for begin, end, dtype, shape, name in spans:
            t = torch.empty(shape, dtype=dtype)
            if t.numel():
                _read_exactly(f, t.reshape(-1).view(torch.uint8).numpy(), shown)
            if crcs is not None and _crc32(name, t) != crcs[name]:
                raise CheckpointError(
                    f"{shown} is corrupted: tensor {name!r} does not match the checksum mambakit saved with it "
                    "(bytes changed, or names swapped, after it was written)")
            sd[name] = t
    return sd


def _check_entry(name: str, e: Any, what: str, shown: Path) -> tuple[int, int, torch.dtype, list[int]]:
    if not name:
        raise CheckpointError(f"{what} has a tensor with an empty name")
    # other fields are ignored, as the safetensors package does (a later format version may add some)
    if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
        raise CheckpointError(f"{what} entry {name!r} lacks dtype, shape or data_offsets: {str(e)[:200]}")
    dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    if dtype in _ST_QUANT and name.endswith(".qweight"):  # a quantized checkpoint's int weights (quantize.py)
        dtype_t = _ST_QUANT[dtype]
    elif dtype not in _ST_FLOAT:
        if dtype in _ST_OTHER:
            raise CheckpointError(
                f"{shown}: tensor {name!r} has dtype {dtype}; Mamba weights are floating point (F32, F16, BF16 "
                "or F64): integer, bool and float8 tensors mean a quantized or damaged checkpoint")
        raise CheckpointError(f"{what} gives tensor {name!r} an unknown dtype {str(dtype)[:40]!r}")

    def ints(v, length=None):
        return (isinstance(v, list) and (length is None or len(v) == length)
                and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 48 for x in v))

    if not ints(shape) or len(shape) > 8:
        raise CheckpointError(f"{what} gives tensor {name!r} an invalid shape {str(shape)[:100]}")
    if not ints(offsets, 2) or offsets[0] > offsets[1]:
        raise CheckpointError(f"{what} gives tensor {name!r} invalid data_offsets {str(offsets)[:100]}")
    numel = 1
    for s in shape:
        numel *= s
    dtype_t = _ST_FLOAT.get(dtype) or _ST_QUANT[dtype]
    nbytes = numel * dtype_t.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise CheckpointError(f"{what} gives tensor {name!r} {offsets[1] - offsets[0]} bytes, but {dtype} "
                              f"{tuple(shape)} needs {nbytes}")
    return offsets[0], offsets[1], dtype_t, shape


def _read_crcs(meta: dict | None, header: dict, what: str) -> dict[str, int] | None:
    if not meta or CRC_KEY not in meta:
        return None  # not written by mambakit: structure checks only
    try:
        crcs = json.loads(meta[CRC_KEY])
        ok = isinstance(crcs, dict) and all(isinstance(v, int) for v in crcs.values())
    except (ValueError, RecursionError):
        ok = False
    if not ok:
        raise CheckpointError(f"{what} has a damaged {CRC_KEY} entry")
    if set(crcs) != set(header):
        changed = sorted(set(crcs) ^ set(header))
        raise CheckpointError(f"{what} names tensors other than those mambakit saved (renamed after writing?): "
                              f"{_names(changed)}")
    return crcs


def _verify_zip(f, shown: Path) -> None:
    """torch.save's zip stores a CRC-32 of every record, which torch.load does not check: a flipped weight byte
    would load silently. Checked here (a record whose CRC is 0 was saved with torch's CRCs turned off: skipped);
    the legacy non-zip format has none."""
    f.seek(0)
    if not zipfile.is_zipfile(f):
        f.seek(0)
        return
    try:
        with zipfile.ZipFile(f) as z:
            for info in z.infolist():
                if info.CRC == 0 and info.file_size:
                    continue
                with z.open(info) as member:  # zipfile raises BadZipFile at the end of a record whose CRC differs
                    while member.read(1 << 24):
                        pass
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, NotImplementedError) as e:
        raise CheckpointError(f"{shown} is corrupted: {str(e)[:200]} (a byte changed since torch.save wrote it)") \
            from None
    f.seek(0)


def _read_pickle(path: Path, shown: Path) -> dict[str, Tensor]:
    f, _ = _open_regular(path, shown)  # refuses directories and FIFOs before torch.load sees them
    with f:
        _verify_zip(f, shown)
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True)
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except BaseException as e:  # torch raises RuntimeError, UnpicklingError, EOFError, …; never let them out
            msg = (str(e).splitlines() or [type(e).__name__])[0][:300]
            if "weights_only" in str(e) or "Unsupported global" in str(e):
                raise CheckpointError(f"{shown} holds objects other than tensors; refusing to unpickle it: {msg}") \
                    from None
            raise CheckpointError(f"{shown} is truncated or corrupted and cannot be read: {msg}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{shown} does not hold a dict of tensors (a state_dict) but a {type(sd).__name__}")
    bad = [k for k in sd if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"{shown} has keys that are not strings: {_names([repr(k) for k in bad])}")
    for k, v in sd.items():
        if not isinstance(v, Tensor):
            raise CheckpointError(f"{shown}: {k!r} holds a value of type {type(v).__name__}, not a tensor")
        if v.layout != torch.strided or v.is_quantized:
            raise CheckpointError(f"{shown}: tensor {k!r} is {'quantized' if v.is_quantized else v.layout}; "
                                  "Mamba weights are dense floating-point tensors")
        if v.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(
                f"{shown}: tensor {k!r} has dtype {str(v.dtype).removeprefix('torch.')}; Mamba weights are floating "
                "point (float32, float16, bfloat16 or float64): integer, bool and float8 tensors mean a quantized "
                "or damaged checkpoint")
    # Copies that own their memory: no tensor is a view into a storage another key (or a larger blob) shares.
    # Popped one by one, so that each original is freed as soon as its copy exists.
    sd = dict(sd)
    return {k: sd.pop(k).clone(memory_format=torch.contiguous_format) for k in list(sd)}


def _check_finite(sd: dict[str, Tensor], shown: Path) -> None:
    for k, t in sd.items():
        # one float64 sum per tensor finds any NaN/inf (finite float32 values cannot overflow it); count on failure
        if t.numel() and not torch.isfinite(t.sum(dtype=torch.float64)):
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise CheckpointError(
                    f"{shown}: tensor {k!r} holds {bad} non-finite values (NaN or inf) of {t.numel()}; a model with "
                    "them gives NaN outputs. The checkpoint is damaged or was saved after training diverged")


def _read_weights(path: Path, shown: Path) -> dict[str, Tensor]:
    """One weight file → {key: tensor} on CPU, owned, floating point, finite. shown: the path errors name (the
    file may be read from the temporary name of an interrupted save)."""
    if shown.name.endswith(".safetensors"):
        sd = _read_safetensors(path, shown)
    else:
        sd = _read_pickle(path, shown)
    _check_finite(sd, shown)
    return sd


def _plain_name(name: Any, index: Path) -> str:
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name or os.path.isabs(name)):
        raise CheckpointError(f"{index} lists the shard {name!r}, which is not a file in the checkpoint directory; "
                              "refusing to read files outside it")
    return name


def _read_state_dict(view, directory: Path, on_read=None) -> dict[str, Tensor]:
    """The checkpoint's tensors, from its one weight file or the shards its index lists; on_read(path), if given,
    is called after each file is read (a progress bar's hook)."""
    done = on_read or (lambda path: None)
    for name in WEIGHT_FILES:
        path = view.path(name)
        if path is None:
            continue
        shown = directory / name
        if not name.endswith(".index.json"):
            sd = _read_weights(path, shown)
            done(path)
            return sd
        index = _read_json(path, shown)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{shown} has no 'weight_map' object (or an empty one)")
        suffix = ".safetensors" if name == SAFETENSORS_INDEX else ".bin"
        for shard in weight_map.values():
            if not _plain_name(shard, shown).endswith(suffix):
                raise CheckpointError(f"{shown} lists the shard {shard!r}; its shards are {suffix} files")
        sd: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = view.path(shard)
            if shard_path is None:
                raise CheckpointError(f"shard {shard} listed in {shown} is missing")
            part = _read_weights(shard_path, directory / shard)
            done(shard_path)
            for k in part:
                if k in sd:
                    raise CheckpointError(f"{k} is in two shards of {shown}; which one is meant?")
                if weight_map.get(k) != shard:
                    where = f"under {weight_map[k]}" if k in weight_map else "at all"
                    raise CheckpointError(f"shard {shard} holds {k}, which {shown} does not list {where}")
            sd.update(part)
        missing = sorted(set(weight_map) - set(sd))
        if missing:
            raise CheckpointError(f"keys listed in {shown} are not in any shard: {_names(missing)}")
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
        if p.name in WEIGHT_FILES + (CONFIG_NAME,):
            return p.parent
        raise CheckpointError(f"{p} is a file, not a checkpoint directory (one with {CONFIG_NAME} and weights)")
    s = str(path)
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", s):
        raise FileNotFoundError(
            f"{s!r} is not a local directory. It looks like a Hugging Face Hub id: load it with "
            f"MambaLM.from_pretrained({s!r}) or fetch it with mambakit.hub.resolve({s!r}) (the `hub` extra), "
            "then pass the directory here"
        )
    raise FileNotFoundError(f"checkpoint directory {s!r} does not exist")


def _load_config(view, directory: Path) -> tuple[MambaConfig, str]:
    shown = directory / CONFIG_NAME
    path = view.path(CONFIG_NAME)
    if path is None:
        raise CheckpointError(f"{directory} has no {CONFIG_NAME}")
    raw = _read_json(path, shown)
    layout = detect_layout(raw, str(shown))
    try:
        config = config_from_official(raw, str(shown)) if layout == "official" else config_from_hf(raw, str(shown))
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{shown} ({layout} layout): {e}") from None
    return config, layout


def load_config(path) -> tuple[MambaConfig, str]:
    """(config, layout) of a checkpoint directory."""
    directory = _resolve_directory(path)
    try:
        with read_files(directory) as view:
            return _load_config(view, directory)
    except JournalError as e:
        raise CheckpointError(str(e)) from None


def to_mambakit_keys(sd: dict[str, Tensor], config: MambaConfig, source: str = "the checkpoint") -> dict[str, Tensor]:
    """Either layout's state dict → MambaLM's keys (the official names); drops a tied lm_head copy."""
    sd = dict(sd)
    if HF_EMBEDDING in sd:
        if OFFICIAL_EMBEDDING in sd:
            raise CheckpointError(f"{source} holds the embedding twice, as {HF_EMBEDDING} (transformers) and "
                                  f"{OFFICIAL_EMBEDDING} (official); which one is meant?")
        sd[OFFICIAL_EMBEDDING] = sd.pop(HF_EMBEDDING)
    if config.tie_embeddings and "lm_head.weight" in sd and OFFICIAL_EMBEDDING in sd:
        head, emb = sd.pop("lm_head.weight"), sd[OFFICIAL_EMBEDDING]
        # compared in float64 when the dtypes differ: a float32 head equals its embedding stored as float64
        same = head.shape == emb.shape and (torch.equal(head, emb) if head.dtype == emb.dtype
                                            else torch.equal(head.double(), emb.double()))
        if not same:
            raise CheckpointError(f"{source}: its config ties the embeddings, but lm_head.weight differs from the "
                                  "embedding; the config or the weights are not this model's")
    return sd


def check_state_dict(sd: dict[str, Tensor], model: "torch.nn.Module", source: str) -> None:
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


_LAYER_KEY = re.compile(r"backbone\.layers\.(\d+)\.")


def _check_sizes(sd: dict[str, Tensor], config: MambaConfig, source: str) -> None:
    # Before building the model: a config claiming 10^9 layers would spend minutes creating modules, one with
    # d_model 10^12 overflows even on the meta device. The layer count and the embedding tell both early.
    layers = {int(m.group(1)) for k in sd if (m := _LAYER_KEY.match(k))}
    if len(layers) != config.n_layer or (layers and max(layers) != config.n_layer - 1):
        held = f"layers {min(layers)}…{max(layers)} ({len(layers)} of them)" if layers else "no layers"
        raise CheckpointError(f"{source} does not fit its config.json: n_layer = {config.n_layer}, the weights hold "
                              f"{held}")
    emb = sd.get(OFFICIAL_EMBEDDING)
    want = (config.padded_vocab_size, config.d_model)
    if emb is not None and tuple(emb.shape) != want:
        raise CheckpointError(f"{source} does not fit its config.json: the embedding is {tuple(emb.shape)}, the "
                              f"config says (padded vocabulary, d_model) = {want}")


def build_model(cls, config: MambaConfig, sd: dict[str, Tensor], source: str) -> "torch.nn.Module":
    """cls(config) holding the state dict `sd` (either layout's keys; a tied head's copy is dropped), checked
    against the model's keys and shapes (CheckpointError naming `source`), without initialising parameters that
    are replaced anyway."""
    sd = to_mambakit_keys(sd, config, source)
    _check_sizes(sd, config, source)
    try:
        with torch.device("meta"):  # no init work: every parameter is replaced by a loaded tensor
            model = cls(config)
    except RuntimeError as e:  # sizes that overflow even without memory (the embedding was missing to tell)
        raise CheckpointError(f"{source}: its config.json describes a model that cannot be built: "
                              f"{str(e).splitlines()[0][:200]}") from None
    check_state_dict(sd, model, source)
    model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()
    for m in model.modules():
        if hasattr(m, "mark_parameters"):
            m.mark_parameters()  # assign=True made new Parameter objects: restore their flags
        if hasattr(m, "init_buffers"):
            m.init_buffers()  # unsaved buffers (attention's rotary frequencies) are still on the meta device
    return model


def _load_tokenizer(view, directory: Path):
    try:
        return load_tokenizer_files(*(view.path(n) for n in TOKENIZER_FILES))
    except (ValueError, OSError) as e:
        msg = str(e)
        for n in TOKENIZER_FILES:  # name the file as it is called, not the temporary of an interrupted save
            p = view.path(n)
            if p is not None:
                msg = msg.replace(str(p), str(directory / n))
        raise CheckpointError(f"the tokenizer saved with {directory} cannot be read: {msg}") from None


def load_pretrained(cls, path, dtype: torch.dtype | None = torch.float32, device=None, on_read=None) -> "torch.nn.Module":
    """Builds the model (an instance of cls, MambaLM or a subclass) of a checkpoint directory (either layout) and
    loads its weights, cast to `dtype` (None: the checkpoint's own dtype, that of its embedding); A_log and D
    stay float32 either way. on_read(path): called after each weight file is read."""
    if dtype is not None and dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be None or one of {[str(d) for d in _FLOAT_DTYPES]}, got {dtype!r}")
    directory = _resolve_directory(path)
    try:
        # one consistent set of files: no save replaces them while they are read (see mambakit._io.read_files)
        with read_files(directory) as view:
            config, layout = _load_config(view, directory)  # a family mambakit lacks is refused before any weight
            source = f"{directory} ({layout} layout)"
            quantization = _read_json(view.path(CONFIG_NAME), directory / CONFIG_NAME).get("quantization")
            sd = _read_state_dict(view, directory, on_read)
            tokenizer = _load_tokenizer(view, directory)
    except JournalError as e:
        raise CheckpointError(str(e)) from None
    if quantization is not None:  # int weights + scales: built by mambakit/quantize.py, which logs what it loaded
        from .quantize import build_quantized

        try:
            model = build_quantized(cls, config, sd, quantization, source, dtype)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        model.tokenizer = tokenizer
        return model.to(device=device or "cpu")
    model = build_model(cls, config, sd, source)
    model.tokenizer = tokenizer  # a tokenizer.json (or mambakit's byte tokenizer) saved alongside
    return model.to(device=device or "cpu", dtype=dtype or model.backbone.embedding.weight.dtype)


# ------------------------------------------------------------------------------------------------ writing
def _old_shards(directory: Path) -> set[str]:
    """Shard files that an earlier sharded save's indexes list (only names of transformers' shard form)."""
    found = set()
    for index in (SAFETENSORS_INDEX, PICKLE_INDEX):
        try:
            weight_map = _read_json(directory / index).get("weight_map")
        except CheckpointError:
            continue
        if isinstance(weight_map, dict):
            found |= {v for v in weight_map.values() if isinstance(v, str) and _SHARD_NAME.fullmatch(v)}
    return found


def _torch_save(obj, path: Path) -> None:
    # through a file object: torch.save names the zip's root folder after a path's stem, here a temporary name
    with open(path, "wb") as f:
        torch.save(obj, f)


def save_pretrained(model: "torch.nn.Module", path, layout: str | None = None) -> None:
    """config.json + weights for `layout` ("hf": model.safetensors; "official": pytorch_model.bin; None: "hf",
    or "official" for a hybrid, which transformers has no class for), plus the tokenizer files of
    `model.tokenizer`, replacing the checkpoint files of an earlier save as one unit (see the module docstring);
    other files in the directory are kept."""
    if layout is None:
        layout = "official" if (model.config.attn_layer_idx or model.config.d_intermediate) else "hf"
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    directory = Path(path).expanduser()
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"save_pretrained: {directory} exists and is not a directory")
    c = model.config
    quantization = getattr(model, "quantization", None)  # mambakit/quantize.py's models: int weights + scales
    if quantization is not None and layout != "hf":
        raise ValueError("save_pretrained: a quantized model is saved in the hf layout only (layout='hf')")
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for k, t in sd.items():
        if not torch.isfinite(t.sum(dtype=torch.float64)) and not torch.isfinite(t).all():
            raise ValueError(f"save_pretrained: parameter {k} holds NaN or inf values; refusing to write a "
                             "checkpoint that could not be loaded again")
    dtype = model.backbone.norm_f.weight.dtype if quantization else model.backbone.embedding.weight.dtype
    if layout == "hf":
        if c.tie_embeddings:  # the tie is in the config (safetensors refuses shared tensors)
            for k in ("lm_head.qweight", "lm_head.scales") if quantization else ("lm_head.weight",):
                sd.pop(k)
        if not quantization:
            sd[HF_EMBEDDING] = sd.pop(OFFICIAL_EMBEDDING)
        from safetensors.torch import save_file

        metadata = {"format": "pt", CRC_KEY: json.dumps({k: _crc32(k, t) for k, t in sorted(sd.items())})}
        files = {SAFETENSORS_NAME: lambda tmp: save_file(sd, tmp, metadata=metadata)}
        config = config_to_hf(c, dtype)
        if quantization:
            config["quantization"] = dict(quantization)
    else:
        if c.tie_embeddings:
            sd["lm_head.weight"] = sd[OFFICIAL_EMBEDDING]  # the official file stores the tied head too (shared)
        files = {PICKLE_NAME: lambda tmp: _torch_save(sd, tmp)}
        config = config_to_official(c)
    files[CONFIG_NAME] = json.dumps(config, indent=2) + "\n"
    if getattr(model, "tokenizer", None) is not None:
        tok = tokenizer_files(model.tokenizer)  # from_pretrained picks it up again
        clash = sorted(set(tok) & (set(WEIGHT_FILES) | {CONFIG_NAME}))
        if clash:
            raise ValueError(f"save_pretrained: the tokenizer writes {clash}, a checkpoint file of the same name")
        files.update(tok)
    managed = {CONFIG_NAME, *WEIGHT_FILES, *TOKENIZER_FILES} | _old_shards(directory)
    replace_files(directory, files, remove=managed - set(files))


def convert(cls, src, dst, layout: str = "hf", dtype: torch.dtype | None = None,
            progress: bool | None = None) -> tuple[str, "torch.nn.Module"]:
    """Reads a checkpoint in either layout as a cls (MambaLM) and writes it in `layout`; returns (source layout,
    model). dtype None keeps the checkpoint's dtype (that of its embedding). progress: a tqdm bar over the bytes
    read (a weight file or shard at a time) and written; None shows it only on a terminal, False never."""
    from tqdm.auto import tqdm

    _, src_layout = load_config(src)
    directory = _resolve_directory(src)
    weights = [f for f in directory.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file()]
    with tqdm(total=sum(f.stat().st_size for f in weights), unit="B", unit_scale=True, desc="convert",
              disable=None if progress is None else not progress) as bar:
        bar.set_postfix_str("reading")
        model = load_pretrained(cls, src, dtype=dtype, on_read=lambda path: bar.update(path.stat().st_size))
        out_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        bar.total = bar.n + out_bytes  # what is left: the weights in the new layout and dtype
        bar.set_postfix_str("writing")
        bar.refresh()
        save_pretrained(model, dst, layout=layout)
        bar.update(out_bytes)
    return src_layout, model
