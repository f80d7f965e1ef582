"""Training Mamba language models: `mambakit train`, or `train(TrainConfig(...))` from Python.

    loop.py         the training loop (train), with the loss, evaluation and samples it uses
    config.py       TrainConfig: defaults, a TOML/JSON file, then --key=value overrides
    data.py         corpus → train/val split → tokenizer → cached token arrays
    schedule.py     the learning-rate schedule (warmup_cosine; the trainer's lr_at)
    checkpoint.py   checkpoints written whole, verified before resuming
    distributed.py  torchrun processes, DDP / FSDP wrapping, gathered states
    report.py       the progress line and the loss-curve PNG
"""

from .checkpoint import CheckpointCorruptError, latest_checkpoint, save_checkpoint, verify_checkpoint
from .config import TrainConfig, config_from_args, parse_overrides, read_config_file
from .data import prepare_data
from .distributed import Dist
from .loop import NonFiniteLossError, build_model, evaluate, next_token_loss, param_groups, sample, train
from .report import hms, plot_losses
from .schedule import lr_at, warmup_cosine

__all__ = ["train", "TrainConfig", "NonFiniteLossError", "config_from_args", "parse_overrides",
           "read_config_file", "build_model", "param_groups", "next_token_loss", "evaluate", "sample",
           "prepare_data", "Dist", "lr_at", "warmup_cosine", "CheckpointCorruptError", "latest_checkpoint",
           "save_checkpoint", "verify_checkpoint", "hms", "plot_losses"]
