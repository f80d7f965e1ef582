"""What quantization costs in accuracy (issue 27): perplexity on held-out text of a trained model in float32,
bfloat16, int8 and int4 (mambakit/quantize.py), and how often each agrees with float32 on the next token (top-1).

    python benchmarks/quant_accuracy.py --train-minutes 8            # trains the main job's Shakespeare model
                                                                    # (configs/shakespeare.toml) for 8 minutes first
    python benchmarks/quant_accuracy.py --model runs/shakespeare     # a trained checkpoint directory
    python benchmarks/quant_accuracy.py --quick                      # tiny: a few steps, a short text

Held-out text: the three Shakespeare plays the main job holds out (Julius Caesar, Twelfth Night, The Winter's
Tale), byte-level, the first --tokens of them, scored in windows of --window tokens (each window from a fresh
state; every token of a window scored). All four variants score the same windows through the model's forward
(the quantized ones through their reference twin, dequantise then F.linear; the fused decode kernels agree
with it to float32 rounding, tests/test_quant_kernels.py). Ratios are exp(mean NLL) against float32's.
"""

from __future__ import annotations

import argparse
import copy
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from mambakit import MambaLM
from mambakit.quantize import quantize


def held_out_ids(n: int) -> list[int]:
    from mambakit.data.text import SHAKESPEARE_VAL_PLAYS, shakespeare_plays, split_documents

    _, val = split_documents(shakespeare_plays(), SHAKESPEARE_VAL_PLAYS)
    text = "\n".join(val[k] for k in SHAKESPEARE_VAL_PLAYS)
    return list(text.encode("utf-8"))[:n]


@torch.no_grad()
def score(model, ids: list[int], window: int, batch: int = 8) -> tuple[float, torch.Tensor]:
    """(mean NLL per scored token, the argmax predictions (tokens,)) over windows of `window` tokens."""
    x = torch.tensor(ids[: (len(ids) - 1) // window * window + 1])
    inp, tgt = x[:-1].view(-1, window), x[1:].view(-1, window)  # (windows, window)
    nll, preds = 0.0, []
    for s in range(0, inp.shape[0], batch):
        logits = model(inp[s:s + batch]).logits.float()[..., :model.config.vocab_size]  # (b, window, V)
        nll += F.cross_entropy(logits.flatten(0, 1), tgt[s:s + batch].flatten(), reduction="sum").item()
        preds.append(logits.argmax(-1).flatten())
    return nll / tgt.numel(), torch.cat(preds)


def train(minutes: float, out: Path, steps: int | None) -> None:
    cmd = [sys.executable, "-m", "mambakit", "train", "--config", "configs/shakespeare.toml",
           f"--time_budget_min={minutes}", f"--out_dir={out}", "--quiet"]
    if steps:
        cmd += [f"--max_steps={steps}", "--eval_every=1000000", "--sample_tokens=0"]
    subprocess.run(cmd, check=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a trained checkpoint directory (default: train one)")
    p.add_argument("--train-minutes", type=float, default=8.0)
    p.add_argument("--tokens", type=int, default=65536, help="held-out tokens scored")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = None
    if args.quick:
        args.train_minutes, args.tokens, args.window, steps = 1.0, 2048, 256, 20
    path = args.model
    if path is None:
        path = Path(tempfile.mkdtemp(prefix="quant-acc-")) / "run"
        train(args.train_minutes, path, steps)
    f32 = MambaLM.from_pretrained(path).eval()
    ids = held_out_ids(args.tokens)
    variants = {"float32": f32, "bfloat16": copy.deepcopy(f32).to(torch.bfloat16),
                "int8": quantize(copy.deepcopy(f32), 8), "int4": quantize(copy.deepcopy(f32), 4, args.group_size),
                "int8, bf16 activations": quantize(copy.deepcopy(f32), 8).to(torch.bfloat16),
                "int4, bf16 activations": quantize(copy.deepcopy(f32), 4, args.group_size).to(torch.bfloat16)}
    print(f"# {path}: {f32.num_parameters():,} parameters; {len(ids):,} held-out bytes (Shakespeare, the main "
          f"job's three plays), windows of {args.window}; int4 groups of {args.group_size}")
    print("| weights | nats/token | perplexity | vs float32 | top-1 agreement with float32 |")
    print("|---|---|---|---|---|")
    base_nll, base_pred = score(f32, ids, args.window)
    for name, m in variants.items():
        nll, pred = (base_nll, base_pred) if name == "float32" else score(m, ids, args.window)
        print(f"| {name} | {nll:.4f} | {math.exp(nll):.4f} | {math.exp(nll - base_nll) - 1:+.2%} | "
              f"{(pred == base_pred).float().mean().item():.2%} |", flush=True)


if __name__ == "__main__":
    main()
