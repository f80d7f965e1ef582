"""Processes under torchrun: joining the process group, wrapping the model (DDP or FSDP's fully_shard), and
whole (gathered) model / optimizer states for checkpoints. The model code itself stays single-device."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..checkpoint import build_model
from ..model import MambaLM
from .config import TrainConfig


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            x = x.clone()
            dist.all_reduce(x)
            x /= self.world
        return x

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            x = x.clone()
            dist.all_reduce(x)
        return x


def setup_processes(cfg: TrainConfig) -> Dist:
    """Joins the torchrun process group when launched by torchrun (WORLD_SIZE > 1); sets the thread count."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // local_world))
    if world == 1:
        return Dist()
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def teardown_processes() -> None:
    """Leaves the process group, if one was joined (the command does, once training ends or fails)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def sharded(cfg: TrainConfig, d: Dist) -> bool:
    """Whether the model is split across ranks (FSDP): no rank then holds a whole copy."""
    return d.world > 1 and cfg.distributed == "fsdp"


def parallelize(model: MambaLM, cfg: TrainConfig, d: Dist) -> torch.nn.Module:
    """The model as the training step calls it: itself, DDP-wrapped, or sharded with fully_shard."""
    model.to(d.device)
    if d.world == 1:
        return model
    if cfg.distributed == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16: FSDP gathers bf16 copies of the float32 shards and reduces gradients in float32.
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cfg.precision == "bf16" else None,
                                  reduce_dtype=torch.float32)
        for layer in model.backbone.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def full_state(raw: MambaLM, optimizer, cfg: TrainConfig, d: Dist) -> tuple[dict, dict]:
    """(model state dict, optimizer state dict), full and on CPU (collective under FSDP)."""
    if sharded(cfg, d):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(raw, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in raw.state_dict().items()}, optimizer.state_dict()


def load_full_state(raw: MambaLM, optimizer, model_sd: dict, optim_sd: dict, cfg: TrainConfig, d: Dist) -> None:
    """Loads full states (as full_state gives them) into the model and optimizer, each rank its shard."""
    if sharded(cfg, d):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(raw, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True))
        return
    raw.load_state_dict(model_sd)
    optimizer.load_state_dict(optim_sd)


def whole_model(raw: MambaLM, model_sd: dict, cfg: TrainConfig, d: Dist) -> MambaLM:
    """A model that save_pretrained can write: `raw` itself, or under FSDP a plain CPU MambaLM holding the
    gathered model_sd."""
    if not sharded(cfg, d):
        return raw
    return build_model(MambaLM, raw.config, model_sd, "the gathered training state")
