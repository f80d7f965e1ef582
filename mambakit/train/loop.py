"""The trainer: data → optimizer steps → evaluation → checkpoints, on one process or many (torchrun).

    mambakit train [--config=FILE.toml] [--key=value ...]          # one process
    torchrun --nproc_per_node=N -m mambakit train [...]            # DDP (gloo on CPU, nccl on GPU)

One optimizer step consumes `batch_size` windows of seq_len + 1 tokens, drawn from (seed, step) alone and
split as (accumulation step, rank, micro-batch): N ranks with the same batch_size see the same global batch
as one process, and a resumed run draws exactly the batches the uninterrupted one would have. Parallelism
(DDP, or FSDP's fully_shard) is applied to the model from outside (distributed.py); the model code stays
single-device.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .._io import atomic_write, clean_stale
from ..config import MambaConfig
from ..data.text import TokenArray, TokenWindows
from ..model import MambaLM
from .checkpoint import (CONFIG_FILE, TRAINER_STATE, CheckpointCorruptError, check_optimizer_state,
                         latest_checkpoint, read_trainer_state, save_checkpoint, verify_checkpoint)
from .config import TrainConfig, resume_differences
from .data import prepare_data
from .distributed import Dist, full_state, load_full_state, parallelize, setup_processes, sharded, whole_model
from .report import METRICS_FILE, MetricsLog, Progress, check_log, hms, plot_losses
from .schedule import lr_at

LN2 = math.log(2)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient; the last good checkpoint is left as it was."""


# ---------------------------------------------------------------------------------------------- model
def build_model(cfg: TrainConfig, vocab_size: int) -> MambaLM:
    overrides = {k: getattr(cfg, k) for k in ("d_model", "n_layer", "d_state") if getattr(cfg, k)}
    return MambaLM(MambaConfig.from_preset(cfg.model, vocab_size=vocab_size, **overrides))


def param_groups(model: MambaLM, weight_decay: float) -> list[dict]:
    """AdamW groups with the official no-weight-decay set: parameters flagged `_no_weight_decay` (A_log, D)
    and every 1-D parameter (norm weights, biases) get no decay; matrices (and the embedding) do."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if getattr(p, "_no_weight_decay", False) or p.dim() < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _autocast(cfg: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def next_token_loss(model: torch.nn.Module, batch: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """batch (b, l + 1): the model reads batch[:, :-1] and predicts batch[:, 1:] (l targets per row)."""
    logits = model(batch[:, :-1]).logits  # (b, l, V)
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction=reduction)


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(model, windows: TokenWindows, val: TokenArray, cfg: TrainConfig, d: Dist, max_windows: int) -> dict:
    """Validation loss over fixed non-overlapping windows (the same ones at every evaluation), in nats per
    token, per character and per byte, plus bits per character / byte. Ranks split the windows."""
    model.eval()
    starts = windows.eval_starts(max_windows)
    per_rank = -(-len(starts) // d.world)
    padded = np.resize(starts, per_rank * d.world)  # every rank runs as many forwards (FSDP needs it)
    weight = (np.arange(len(padded)) < len(starts)).astype(np.float64)
    mine, w_mine = padded[d.rank::d.world], weight[d.rank::d.world]
    bs = cfg.micro_batch_size or max(1, cfg.batch_size // d.world)
    total = torch.zeros(2, dtype=torch.float64, device=d.device)  # (nats, tokens)
    for i in range(0, len(mine), bs):
        batch = windows.batch(mine[i:i + bs]).to(d.device)
        with _autocast(cfg, d.device):
            nll = next_token_loss(model, batch, reduction="none").view(batch.shape[0], -1).sum(1).double()
        w = torch.as_tensor(w_mine[i:i + bs], device=d.device)
        total += torch.stack([(nll * w).sum(), (w * windows.seq_len).sum()])
    nats, tokens = d.sum(total).tolist()
    model.train()
    loss = nats / tokens
    chars_per_token, bytes_per_token = val.n_chars / len(val), val.n_bytes / len(val)
    return {"val_loss": loss, "val_nats_per_char": loss / chars_per_token, "val_bpc": loss / chars_per_token / LN2,
            "val_bpb": loss / bytes_per_token / LN2, "val_tokens": int(tokens)}


def sample(model: MambaLM, tokenizer, prompt: str, n: int, seed: int, temperature: float = 0.8) -> str:
    """A short continuation of `prompt` (mambakit.generate with its own seeded generator, so the training
    RNG stream is untouched)."""
    from ..engine import release
    from ..generate import generate

    out = generate(model, [prompt or tokenizer.decode([tokenizer.eos_token_id or 0], skip_special_tokens=False)],
                   n, temperature=temperature, seed=seed, tokenizer=tokenizer)
    release(model)  # training resumes: the decode path's packed weight copy would only hold memory
    model.train()
    return prompt + out.texts[0]


# ------------------------------------------------------------------------------------------- resuming
# MambaConfig fields that decide the shapes of the weights (and so of the optimizer's moments)
# (config.json stores the padded vocabulary: the tokenizer's own size is compared as TrainConfig.tokenizer)
_SHAPE_FIELDS = ("layer", "d_model", "n_layer", "d_state", "d_conv", "expand", "dt_rank", "d_inner",
                 "padded_vocab_size", "conv_bias", "bias", "rms_norm", "tie_embeddings",
                 "headdim", "ngroups", "d_ssm", "D_has_hdim", "rmsnorm")  # the last five: Mamba-2's


def _check_resume_config(resume_dir: Path, manifest: dict, cfg: TrainConfig, main: bool) -> None:
    """Refuses a resume that changes a setting the checkpoint fixes (its data, vocabulary, seed, ...), naming
    each; prints the settings that do change (they act from the resumed step on)."""
    if CONFIG_FILE not in manifest["files"]:
        return  # the model's size is still compared (_check_resume_model)
    f = resume_dir / CONFIG_FILE
    try:
        saved = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointCorruptError(f"{f} does not parse ({e}): this checkpoint cannot be resumed from") from None
    if not isinstance(saved, dict):
        raise CheckpointCorruptError(f"{f} holds a {type(saved).__name__}, not a table of TrainConfig fields")
    fixed, changed = resume_differences(saved, cfg)
    if fixed:
        raise ValueError(f"--resume: {resume_dir} was trained with other settings, which a resumed run cannot change "
                         f"(checkpoint → requested): {'; '.join(fixed)}. Pass the checkpoint's values (see {f}), or "
                         f"start a new run in another --out_dir")
    if changed and main:
        print(f"resuming with changed settings (checkpoint → requested): {'; '.join(changed)}", flush=True)


def _check_resume_model(resume_dir: Path, raw: MambaLM, cfg: TrainConfig) -> None:
    """Refuses, before any weight is loaded, a checkpoint whose model has other shapes than the requested one."""
    from ..checkpoint import load_config

    saved, _ = load_config(resume_dir)
    diffs = [f"{k}: {getattr(saved, k)!r} → {getattr(raw.config, k)!r}" for k in _SHAPE_FIELDS
             if getattr(saved, k) != getattr(raw.config, k)]
    if diffs:
        raise ValueError(f"--resume: {resume_dir} holds a model of another size than the requested one (model="
                         f"{cfg.model!r}, d_model={cfg.d_model}, n_layer={cfg.n_layer}, d_state={cfg.d_state}; 0 = the "
                         f"preset's), checkpoint → requested: {'; '.join(diffs)}. Pass the checkpoint's sizes, or "
                         f"start a new run in another --out_dir")


def _check_resume_schedule(resume_dir: Path, state: dict, cfg: TrainConfig) -> None:
    """Refuses a resume that could not train as asked: a checkpoint past max_steps, or a spent time budget while
    max_steps asks for more steps (the loop would end at once)."""
    step, elapsed = state["step"], state["elapsed_s"]
    if step > cfg.max_steps:
        raise ValueError(f"--resume: {resume_dir} is at step {step}, past max_steps={cfg.max_steps}: pass "
                         f"--max_steps of at least {step}")
    budget_s = cfg.time_budget_min * 60
    if budget_s and elapsed >= budget_s and step < cfg.max_steps:
        raise ValueError(f"--resume: the run's time budget of {cfg.time_budget_min:g} min is spent ({hms(elapsed)} "
                         f"elapsed at step {step}), so it cannot train on toward max_steps={cfg.max_steps}: pass a "
                         f"larger --time_budget_min, or --time_budget_min=0 to train to --max_steps")


# ------------------------------------------------------------------------------------------ the loop
def train(cfg: TrainConfig, on_step: Callable[[int, MambaLM], None] | None = None) -> dict:
    """Runs (or resumes) a training run; returns the final metrics. on_step(step, model) is called after
    every optimizer step (and after that step's checkpoint, if any): a hook for tests and experiments."""
    check_log(cfg.log)  # a missing TensorBoard fails before any work
    d = setup_processes(cfg)
    out_dir = Path(cfg.out_dir).expanduser()
    ckpt_root = out_dir / "checkpoints"
    resume_dir = state = None
    if cfg.resume:
        resume_dir = latest_checkpoint(ckpt_root)
        if resume_dir is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {ckpt_root} to resume from")
        manifest = verify_checkpoint(resume_dir)
        _check_resume_config(resume_dir, manifest, cfg, d.main)
        state = read_trainer_state(resume_dir, manifest)
        _check_resume_schedule(resume_dir, state, cfg)
    elif d.main and latest_checkpoint(ckpt_root) is not None:
        raise ValueError(f"{out_dir} already holds checkpoints of a run: pass --resume to continue it, or choose "
                         f"another --out_dir (or delete {ckpt_root})")
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        # what a killed save left behind (temporary files and directories); no other process writes here yet
        for directory in (out_dir, ckpt_root):
            clean_stale(directory)
    d.barrier()
    data = prepare_data(cfg, d, out_dir, resume_dir)
    tok = data.tokenizer
    train_w, val_w = TokenWindows(data.train.tokens, cfg.seq_len), TokenWindows(data.val.tokens, cfg.seq_len)

    torch.manual_seed(cfg.seed)
    raw = build_model(cfg, tok.vocab_size)
    model = parallelize(raw, cfg, d)
    optimizer = torch.optim.AdamW(param_groups(raw, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  foreach=not sharded(cfg, d) or None)
    micro = cfg.micro_batch_size or cfg.batch_size // d.world
    if cfg.batch_size % (micro * d.world):
        raise ValueError(f"batch_size ({cfg.batch_size}) must be a multiple of micro_batch_size × ranks "
                         f"({micro} × {d.world})")
    accum = cfg.batch_size // (micro * d.world)

    config_json = json.dumps(cfg.to_dict(), indent=1) + "\n"
    step, elapsed, total_steps = 0, 0.0, cfg.max_steps
    if resume_dir is not None:
        _check_resume_model(resume_dir, raw, cfg)
        model_sd = MambaLM.from_pretrained(resume_dir).state_dict()
        check_optimizer_state(state["optimizer"], [g["params"] for g in optimizer.param_groups], resume_dir)
        try:
            load_full_state(raw, optimizer, model_sd, state["optimizer"], cfg, d)
            torch.set_rng_state(state["rng"]["torch"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointCorruptError(f"{resume_dir / TRAINER_STATE}: the optimizer or RNG state does not load "
                                         f"({type(e).__name__}: {e})") from None
        # load_state_dict restored the saved groups' settings: the requested ones act from here on
        for group, decay in zip(optimizer.param_groups, (cfg.weight_decay, 0.0)):
            group["betas"], group["weight_decay"] = (cfg.beta1, cfg.beta2), decay
        step, elapsed = state["step"], state["elapsed_s"]
        if cfg.time_budget_min:
            # the schedule was fitted to the budget: keep it while it runs on; one that has ended (the budget
            # was raised) starts again from the run's mean rate so far, refitted as the run goes
            saved_total = state["schedule"]["total_steps"]
            guess = step + int((cfg.time_budget_min * 60 - elapsed) / max(elapsed / max(step, 1), 1e-9))
            total_steps = min(cfg.max_steps, saved_total if saved_total > step else max(step + 1, guess))
        if d.main:
            print(f"resumed from {resume_dir} at step {step}", flush=True)
            if step >= total_steps:
                print(f"step {step} is max_steps: nothing left to train, the final evaluation only (pass a larger "
                      f"--max_steps to train on)", flush=True)
    if d.main:
        print(f"model: {raw.config.d_model}×{raw.config.n_layer} ({cfg.model} preset), {raw.num_parameters():,} "
              f"parameters | data: {len(data.train):,} train / {len(data.val):,} val tokens ({tok!r}) | "
              f"{d.world} process(es), {torch.get_num_threads()} threads each, {cfg.precision}", flush=True)
        atomic_write(out_dir / CONFIG_FILE, config_json)

    metrics_path = out_dir / METRICS_FILE
    metrics = MetricsLog(out_dir, tensorboard=cfg.log == "tensorboard",
                         resume_step=step if resume_dir is not None else None) if d.main else None

    def log(record: dict) -> None:
        if metrics is not None:
            metrics.write(record)

    def checkpoint(at_step: int) -> None:
        model_sd, optim_sd = full_state(raw, optimizer, cfg, d)
        if not d.main:
            d.barrier()
            return
        copy = whole_model(raw, model_sd, cfg, d)
        state = {"step": at_step, "elapsed_s": elapsed, "optimizer": optim_sd,
                 "schedule": {"total_steps": total_steps, "warmup_steps": cfg.warmup_steps, "lr": cfg.lr},
                 "rng": {"torch": torch.get_rng_state()}, "data": {"seed": cfg.seed, "next_step": at_step}}

        copy.tokenizer = tok  # saved with the model as one unit: a save never leaves weights without their tokenizer

        def write(tmp: Path) -> None:
            copy.save_pretrained(tmp)
            torch.save(state, tmp / TRAINER_STATE)
            (tmp / CONFIG_FILE).write_text(config_json)

        save_checkpoint(ckpt_root, at_step, write, cfg.keep_checkpoints)
        copy.save_pretrained(out_dir)  # the run directory itself loads: `mambakit generate --model <out_dir>`
        d.barrier()

    progress = Progress(total_steps, cfg.progress and d.main, initial=step)
    # Samples come from rank 0's copy; a sharded (FSDP) model has no whole copy to decode with.
    can_sample = cfg.sample_tokens > 0 and d.main and not sharded(cfg, d)
    budget_s = cfg.time_budget_min * 60
    # With a time budget the cosine schedule is fitted to the time left: first from 10 steps of this process,
    # then again at every log from the mean rate since (evaluations and checkpoints included), so a run on a
    # machine that slows down or speeds up still reaches the end of its schedule on time.
    fit_from, t_fit0, fitted = (step + 3 if budget_s else None), None, False
    window_loss, window_tokens, window_t0, window_steps = 0.0, 0, time.perf_counter(), 0
    last_saved = step if resume_dir is not None else -1
    model.train()
    train_s = 0.0  # time spent in training steps only (for tokens/s)
    first_step = step
    elapsed0, t_run0 = elapsed, time.perf_counter()  # elapsed: wall time of the run, over all resumptions
    while step < total_steps and not (budget_s and elapsed >= budget_s):
        t_step0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg, total_steps)
        starts = train_w.random_starts(cfg.seed, step, cfg.batch_size).reshape(accum, d.world, micro)
        loss_sum = torch.zeros((), device=d.device)
        for k in range(accum):
            batch = train_w.batch(starts[k, d.rank]).to(d.device)
            sync = k == accum - 1 or not hasattr(model, "no_sync")
            with (contextlib.nullcontext() if sync else model.no_sync()), _autocast(cfg, d.device):
                loss = next_token_loss(model, batch)
            (loss / accum).backward()
            loss_sum += loss.detach() / accum
        loss_val = float(d.mean(loss_sum))
        grad_norm = float(torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip or float("inf")))
        if not (math.isfinite(loss_val) and math.isfinite(grad_norm)):
            good = latest_checkpoint(ckpt_root)
            what = f"loss {loss_val}" if not math.isfinite(loss_val) else f"gradient norm {grad_norm}"
            progress.close()
            if metrics is not None:
                metrics.close()
            raise NonFiniteLossError(
                f"non-finite {what} at step {step + 1}: training stopped. Nothing was saved after the bad step; the "
                f"last good checkpoint is {good or '(none yet)'}. Try a lower --lr, --precision=fp32 or a "
                f"smaller --grad_clip, and resume or restart from there")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        now = time.perf_counter()
        if step > first_step + 1:  # the first step of a process compiles kernels: not a rate
            train_s += now - t_step0
        elapsed = elapsed0 + now - t_run0
        window_loss += loss_val
        window_steps += 1
        window_tokens += cfg.batch_size * cfg.seq_len

        if step == fit_from:
            t_fit0 = now
        if t_fit0 is not None and (step == fit_from + 10 or (fitted and step % cfg.log_every == 0)):
            per_step = (now - t_fit0) / (step - fit_from)
            fit = min(cfg.max_steps, max(step + 1, step + int((budget_s - elapsed) / per_step)))
            # every rank takes the same schedule; float64: float32 would round step counts above 2^24
            total_steps = min(cfg.max_steps, int(d.mean(torch.tensor(float(fit), dtype=torch.float64))))
            progress.total = total_steps
            if d.main and not fitted:
                progress.print(f"time budget {cfg.time_budget_min:g} min: {per_step * 1000:.0f} ms/step -> about "
                               f"{total_steps} steps (re-fitted as the run goes)")
            fitted = True

        if step % cfg.log_every == 0 or step == total_steps:
            dt = now - window_t0
            tok_s = window_tokens / dt
            log({"step": step, "loss": window_loss / window_steps, "lr": optimizer.param_groups[0]["lr"],
                 "grad_norm": grad_norm, "tokens_per_s": tok_s, "elapsed_s": elapsed})
            progress.update(step, window_loss / window_steps, tok_s)
            window_loss, window_tokens, window_t0, window_steps = 0.0, 0, now, 0

        if step % cfg.eval_every == 0 and step < total_steps:
            t0 = time.perf_counter()
            ev = evaluate(model, val_w, data.val, cfg, d, cfg.eval_windows)
            text = sample(raw, tok, cfg.sample_prompt, cfg.sample_tokens, cfg.seed) if can_sample else ""
            log({"step": step, **ev, "sample": text})
            if d.main:
                progress.print(f"step {step}: val loss {ev['val_loss']:.4f} nats/token, {ev['val_bpc']:.3f} bits/char"
                               + (f"\n--- sample ---\n{text}\n--------------" if text else ""))
            window_t0 += time.perf_counter() - t0  # tokens/s counts training steps only
        if step % cfg.ckpt_every == 0:
            t0 = time.perf_counter()
            checkpoint(step)
            last_saved = step
            window_t0 += time.perf_counter() - t0
        if on_step is not None:
            on_step(step, raw)

    progress.close()
    if last_saved != step:
        checkpoint(step)
    ev = evaluate(model, val_w, data.val, cfg, d, 0)  # the whole held-out set
    text = sample(raw, tok, cfg.sample_prompt, cfg.sample_tokens, cfg.seed) if can_sample else ""
    tok_s = cfg.batch_size * cfg.seq_len * max(0, step - first_step - 1) / max(train_s, 1e-9)
    final = {"step": step, **ev, "final": True, "elapsed_s": elapsed, "tokens_per_s_mean": tok_s}
    log({**final, "sample": text})
    if metrics is not None:
        metrics.close()
    if d.main:
        print(f"done: {step} steps in {hms(elapsed)} ({tok_s:,.0f} tokens/s)\n"
              f"validation ({ev['val_tokens']:,} held-out tokens): loss {ev['val_loss']:.4f} nats/token, "
              f"{ev['val_nats_per_char']:.4f} nats/char, {ev['val_bpc']:.4f} bits/char, {ev['val_bpb']:.4f} bits/byte"
              + (f"\n--- sample ---\n{text}\n--------------" if text else "")
              + f"\ncheckpoint: {out_dir} (mambakit generate --model {out_dir})", flush=True)
        if cfg.plot:
            plot_losses(metrics_path, out_dir / "loss.png")
    d.barrier()  # no rank leaves (and tears down the process group) while another still works
    return final
