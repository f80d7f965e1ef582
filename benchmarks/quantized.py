"""Quantized CPU inference (issue 27): decode at batch 1 and 8 and prefill at l = 1024, mambakit bfloat16 vs int8
vs int4 (mambakit/quantize.py, the fused decode step on engine/qpanels.py), with llama.cpp F32 / BF16 / Q8_0 /
Q4_0 on the same random weights (the 130m shape, seed 0) in the same run.

    python benchmarks/quantized.py --llama ../llama.cpp          # or LLAMA_CPP_DIR=...; without it, mambakit only
    python benchmarks/quantized.py --quick                      # a tiny model, mambakit only: checks it runs
    python benchmarks/quantized.py --prepare --llama ...        # only write the GGUF files and warm the kernels

mambakit columns: decode tok/s = batch / median fused step time (rounds interleaved: bf16, int8, int4, bf16, …;
the best of the rounds' medians); prefill tok/s = 1024 / median time of model(ids, num_last_tokens=1) (logits of
the last position, as llama.cpp's pp test), the quantized models running their reference forward
(dequantise, then bf16 GEMMs). llama.cpp: `llama-bench -p 1024 -n 128 -t 2` (tg128 for batch 1, pp1024) and
`llama-batched-bench -npp 128 -ntg 128 -npl 8 -t 2` (S_TG for batch 8). Its Mamba GGUFs come from a transformers-
layout save of the same model (conv1d weights squeezed to 2-D, which this commit's ggml_ssm_conv wants) through
its convert_hf_to_gguf.py; Q4_0 through a copy of it with a q4_0 output type added (convert_hf_to_gguf_q4.py, see
BENCHMARKS.md; llama-quantize refuses dt_proj's 48 columns); the converter needs sentencepiece, looked for in
WORK/pydeps too (`pip install --target WORK/pydeps sentencepiece`). Time it with the CPU to itself (nothing else running):
llama.cpp's threads spin at barriers and slow down 5-10x next to any other process.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the mambakit command sets it (mambakit/cli), before torch

import torch  # noqa: E402

from mambakit import MambaConfig, MambaLM  # noqa: E402
from mambakit.engine import FusedDecoder  # noqa: E402
from mambakit.quantize import quantize  # noqa: E402

GGUF_TYPES = ("f32", "bf16", "q8_0", "q4_0")


def median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def build_models(shape: str, group_size: int):
    torch.manual_seed(0)
    config = MambaConfig.from_preset(shape) if shape != "tiny" else MambaConfig(d_model=64, n_layer=2, vocab_size=256)
    f32 = MambaLM(config).eval()
    models = {"bf16": copy.deepcopy(f32).to(torch.bfloat16),
              "int8": quantize(copy.deepcopy(f32), 8).to(torch.bfloat16),
              "int4": quantize(copy.deepcopy(f32), 4, group_size).to(torch.bfloat16)}
    return f32, models


@torch.no_grad()
def mambakit_decode(models, b: int, repeats: int, rounds: int) -> dict[str, float]:
    decoders = {k: FusedDecoder(m) for k, m in models.items()}
    states = {k: m.allocate_state(b) for k, m in models.items()}
    ids = torch.randint(0, 50, (b,))
    best = {k: float("inf") for k in models}
    for _ in range(rounds):
        for k in models:
            fn = lambda: decoders[k].step(ids, states[k])  # noqa: E731
            for _ in range(3):
                fn()
            best[k] = min(best[k], median_s(fn, repeats))
    for d in decoders.values():
        d.release()
    return {k: b / t for k, t in best.items()}


@torch.no_grad()
def mambakit_prefill(models, length: int, repeats: int) -> dict[str, float]:
    ids = torch.randint(0, 50, (1, length))
    best = {k: float("inf") for k in models}
    for _ in range(2):
        for k, m in models.items():
            m(ids, num_last_tokens=1)
            best[k] = min(best[k], median_s(lambda: m(ids, num_last_tokens=1), repeats))  # noqa: B023
    return {k: length / t for k, t in best.items()}


# ---------------------------------------------------------------------------------------------- llama.cpp
def write_ggufs(f32: MambaLM, llama: Path, work: Path) -> dict[str, Path]:
    """The model as GGUF files of each type in `work` (reused when present)."""
    from safetensors.torch import load_file, save_file

    hf = work / "hf"
    out = {t: work / f"m-{t}.gguf" for t in GGUF_TYPES}
    if all(p.exists() for p in out.values()):
        return out
    f32.save_pretrained(hf)  # transformers layout
    sd = load_file(hf / "model.safetensors")
    sd = {k: (v.squeeze(1).contiguous() if k.endswith("conv1d.weight") else v) for k, v in sd.items()}
    save_file(sd, hf / "model.safetensors", metadata={"format": "pt"})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(llama / "gguf-py"), str(work / "pydeps"),
                                                        os.environ.get("PYTHONPATH", "")]))
    for t, path in out.items():
        if path.exists():
            continue
        script = "convert_hf_to_gguf_q4.py" if t == "q4_0" else "convert_hf_to_gguf.py"
        subprocess.run([sys.executable, str(llama / script), str(hf), "--outtype", t, "--outfile", str(path)],
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def llama_bench(llama: Path, ggufs: dict[str, Path], length: int) -> dict[str, dict[str, float]]:
    """{type: {"tg": tok/s, "pp": tok/s}} from llama-bench's JSON."""
    cmd = [str(llama / "build/bin/llama-bench"), "-m", ",".join(str(p) for p in ggufs.values()), "-t", "2",
           "-p", str(length), "-n", "128", "-r", "3", "-o", "json"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rows = json.loads(res.stdout)
    by_path = {str(p): t for t, p in ggufs.items()}
    out: dict[str, dict[str, float]] = {t: {} for t in ggufs}
    for r in rows:
        t = by_path[r["model_filename"]]
        out[t]["pp" if r["n_prompt"] > 0 else "tg"] = r["avg_ts"]
    return out


def llama_batched(llama: Path, gguf: Path, b: int) -> float | str:
    """Aggregate decode tok/s (S_TG) with b sequences of prompt 128 + 128 new, or why there is none."""
    cmd = [str(llama / "build/bin/llama-batched-bench"), "-m", str(gguf), "-t", "2", "-tb", "2", "-c", "8192",
           "-b", "2048", "-ub", "512", "-npp", "128", "-ntg", "128", "-npl", str(b)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return f"crashes (exit {res.returncode})"
    for line in res.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 10 and re.fullmatch(r"\d+", cells[0]) and cells[2] == str(b):
            return float(cells[7])  # | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    return "no result parsed"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="130m")
    p.add_argument("--llama", default=os.environ.get("LLAMA_CPP_DIR"), help="llama.cpp tree with build/bin")
    p.add_argument("--work", default="/tmp/mambakit-quant-bench", help="where the GGUF files go")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prepare", action="store_true", help="write the GGUFs and compile the kernels, time nothing")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.shape, args.length, args.repeats, args.rounds, args.llama = "tiny", 64, 3, 1, None
    torch.set_num_threads(args.threads)
    f32, models = build_models(args.shape, args.group_size)
    llama = Path(args.llama) if args.llama else None
    if llama is not None and not (llama / "build/bin/llama-bench").exists():
        print(f"# llama.cpp: no build/bin/llama-bench under {llama}; its columns are left out")
        llama = None
    elif llama is None:
        print("# llama.cpp: not given (--llama DIR or LLAMA_CPP_DIR); its columns are left out")
    ggufs = write_ggufs(f32, llama, Path(args.work)) if llama is not None else None
    del f32
    batches = [int(b) for b in args.batch.split(",")]
    if args.prepare:
        for b in batches:
            mambakit_decode(models, b, 1, 1)
        print("prepared: GGUF files written, kernels compiled")
        return
    print(f"# shape {args.shape}, {args.threads} threads, int4 group size {args.group_size}; tokens/s (higher is "
          "better); ratios against mambakit bf16 of the same run")
    # llama.cpp first, before this process has started any compute threads (its own spin at barriers, and
    # anything else awake on the two vCPUs slows it down several times)
    lb = llama_bench(llama, ggufs, args.length) if llama is not None else None
    lbb = {t: {b: llama_batched(llama, g, b) for b in batches if b > 1} for t, g in ggufs.items()} if llama else None
    dec = {b: mambakit_decode(models, b, args.repeats, args.rounds) for b in batches}
    pre = mambakit_prefill(models, args.length, max(3, args.repeats // 5))

    def f(v):
        return f"{v:,.1f}" if isinstance(v, float) else v

    cols = ["mambakit bf16", "mambakit int8", "mambakit int4", "int8 / bf16", "int4 / bf16"]
    if llama is not None:
        cols += [f"llama.cpp {t.upper()}" for t in GGUF_TYPES]
    print("| tokens/s | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    rows = [(f"decode b{b}", dec[b]) for b in batches] + [(f"prefill l={args.length}", pre)]
    for name, r in rows:
        cells = [f(r["bf16"]), f(r["int8"]), f(r["int4"]), f"{r['int8'] / r['bf16']:.2f}×",
                 f"{r['int4'] / r['bf16']:.2f}×"]
        if llama is not None:
            for t in GGUF_TYPES:
                if name == "decode b1":
                    cells.append(f(lb[t].get("tg", "—")))
                elif name.startswith("prefill"):
                    cells.append(f(lb[t].get("pp", "—")))
                else:
                    cells.append(f(lbb[t][int(name[8:])]))
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
