"""Experiment 3: generation throughput, Mamba vs a Transformer of the same size (paper §4.5, Fig. 8 right,
App. E.5), both measured in the same run.

The paper's setting: prompt 2048 + 128 generated tokens, batch 1, 2, 4, … 128, throughput = batch · 128 /
time (prefill included), Mamba 1.4B against a GPT-3-architecture Transformer 1.3B on an A100 80GB: Mamba
reaches 4–5× the Transformer's throughput, "because there is no KV cache and the batch can be larger".
Here: the 130m shape (mambakit `MambaConfig.from_preset("130m")`, 24 × 768) against the 125m-shape
Transformer (`TransformerConfig.from_preset("125m")`, 12 × 768, GPT-3 recipe by default: learned absolute
positions, GELU, LayerNorm, biases), random weights, greedy decoding, on this machine's CPU.

- Mamba: `mambakit.generate(model, prompts, 128, temperature=0)` (parallel prefill in calls of ≤ 16384
  tokens, then `MambaLM.step` with its fixed-size state).
- Transformer: the same loop by hand (`generate` is Mamba-specific): prefill in calls of ≤ 16384 tokens
  into a preallocated KV cache of prompt + 128 positions, then `TransformerLM.step` + argmax.

Every (model, batch) cell runs in a fresh subprocess (peak memory is its own), after an in-process warm-up
at the same batch (prompt 64 + 4 tokens: kernel compilation, oneDNN primitives). Columns:
    tok/s         batch · new / (prefill + decode) seconds: the paper's measure
    decode tok/s  batch · decode steps / decode seconds (prefill excluded)
    prefill s     time to the first new token
    peak GiB      high-water RSS of the cell process (weights included)
    est GiB       the analytic estimate of that peak (weights + cache or state + the largest activations)

Which batches run: powers of two up to --max-batch, skipping any whose estimated peak exceeds --mem-cap-gib
(the machine is shared: default 8 GiB) or that would not finish within --time-budget-min (projected from
the previous cells, 2× per doubling; both models are skipped together, so they share the same batches).
"Largest batch in 24 GiB" (--budget-gib) is reported from the estimate for each model, since the paper's
comparison is at the largest batch each model fits.

    python benchmarks/vs_transformer.py                 # prompt 2048 + 128, batch 1 … 32 (≈ 25 min idle)
    python benchmarks/vs_transformer.py --quick         # tiny models, prompt 32 + 8, batch 1, 2 (seconds)
    python benchmarks/vs_transformer.py --max-batch 8 --dtype bfloat16
    python benchmarks/vs_transformer.py --synthetic-prefix --max-batch 64   # decode only, larger batches

--synthetic-prefix skips the prefill: the KV cache (Transformer) or the state (Mamba) is filled with random
values of the size a `--prompt`-token prompt leaves, and `--new` − 1 greedy steps are timed (the same
hand-written step + argmax loop for both models). A decode step's cost depends on those sizes, not on the
values, so this measures the decode side at the batch sizes where the KV cache dominates, without paying
for their prefill (which on a CPU takes minutes per row group). Results: results_decode.json and
throughput_decode.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _rss, when imported as a module (tests)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # mambakit, when run as a script from anywhere
from _rss import reset_peak_rss, rss_kib  # noqa: E402

GIB = 2**30
OUT_DIR = Path(__file__).resolve().parents[1] / "experiments" / "throughput"
SIZES = {  # --size → (Mamba preset, Transformer preset)
    "130m": ("130m", "125m"),
    "tiny": ("tiny", "tiny"),
}
RECIPES = {  # --recipe → Transformer config overrides
    "gpt3": dict(positions="absolute", mlp="gelu", norm="layernorm", bias=True),  # the paper's E.5 baseline
    "plus": dict(positions="rotary", mlp="swiglu", norm="rmsnorm", bias=False),  # Transformer++
}
TOKENS_PER_CALL = 16384  # prefill chunk (rows × prompt), the same cap as mambakit.generate.prefill


# ------------------------------------------------------------------------------------------------ models
def build(kind: str, size: str, recipe: str, prompt: int, new: int, dtype):
    """A randomly initialised model of the given kind; the Transformer's max_seq_len fits prompt + new."""
    import torch

    from mambakit import MambaConfig, MambaLM
    from mambakit.baselines.transformer import TransformerConfig, TransformerLM

    torch.manual_seed(0)
    mamba_preset, transformer_preset = SIZES[size]
    if kind == "mamba":
        model = MambaLM(MambaConfig.from_preset(mamba_preset))
    else:
        cfg = TransformerConfig.from_preset(transformer_preset, max_seq_len=prompt + new, **RECIPES[recipe])
        model = TransformerLM(cfg)
    return model.eval().to(dtype)


def estimate_bytes(kind: str, size: str, recipe: str, batch: int, prompt: int, new: int, elem: int,
                   prefill: bool = True) -> dict:
    """Analytic peak-memory estimate (bytes) of one cell, without building the model.

    weights (for Mamba, twice where the fused decode step keeps its packed copy) + per-sequence memory (KV cache:
    2 · n_layer · (prompt + new) · D elements; Mamba state:
    n_layer · E·D · (N + W − 1) floats) + the largest prefill activations (one call of ≤ 16384 tokens:
    32 · E·D floats per token for a Mamba layer (in_proj 2ED, conv ED, Δ ED, y ED and the fused scan's
    working buffers: measured here, 2.37 − 1.24 GiB over 3 × 2048 tokens between batch 1 and 4), 4D + 2F
    per token for a Transformer layer), + the logits of a decode step and a fixed 0.3 GiB for the
    interpreter, torch and the kernels."""
    from mambakit import MambaConfig
    from mambakit.baselines.transformer import TransformerConfig

    mamba_preset, transformer_preset = SIZES[size]
    rows_per_call = max(1, TOKENS_PER_CALL // prompt)
    tokens = min(batch, rows_per_call) * prompt
    if kind == "mamba":
        c = MambaConfig.from_preset(mamba_preset)
        weights = (c.padded_vocab_size * c.d_model + c.n_layer * (
            2 * c.d_inner * c.d_model + c.d_inner * c.d_conv + c.d_inner * (c.dt_rank + 2 * c.d_state)
            + c.dt_rank * c.d_inner + 2 * c.d_inner * c.d_state + c.d_inner * c.d_model)) * elem
        per_seq = c.n_layer * c.d_inner * (c.d_state + c.d_conv - 1) * 4  # state in float32
        import torch
        from mambakit.engine import MAX_BATCH, panels

        if batch <= MAX_BATCH.get({4: torch.float32, 2: torch.bfloat16}.get(elem), 0):
            # the fused decode step's packed copy of in_proj, dt_proj, out_proj and the head (engine.panels)
            pad = panels.padded
            weights += (pad(c.padded_vocab_size) * c.d_model + c.n_layer * (
                pad(2 * c.d_inner) * c.d_model + pad(c.d_inner) * c.dt_rank + pad(c.d_model) * c.d_inner)) * elem
        act = tokens * 32 * c.d_inner * 4
        vocab = c.padded_vocab_size
    else:
        c = TransformerConfig.from_preset(transformer_preset, max_seq_len=prompt + new, **RECIPES[recipe])
        mlp = (3 if c.mlp == "swiglu" else 2) * c.d_model * c.d_ff
        weights = (c.padded_vocab_size * c.d_model + c.n_layer * (4 * c.d_model**2 + mlp)) * elem
        per_seq = 2 * c.n_layer * (prompt + new) * c.d_model * elem
        act = tokens * (4 * c.d_model + 2 * c.d_ff) * max(elem, 4)
        vocab = c.padded_vocab_size
    act = act if prefill else 0
    logits = batch * vocab * 4 * 2  # a step's logits and their argmax / float copy
    total = int(0.3 * GIB + weights + batch * per_seq + act + logits)
    return dict(total=total, weights=weights, per_seq=per_seq, activations=act)


def largest_batch_within(kind, size, recipe, prompt, new, elem, budget_bytes, limit=2**16, prefill=True) -> int:
    """The largest power-of-two batch whose estimated peak fits budget_bytes (0 if none)."""
    b = 0
    while 2 * max(b, 1) <= limit and estimate_bytes(kind, size, recipe, max(2 * b, 1), prompt, new, elem,
                                                    prefill)["total"] <= budget_bytes:
        b = max(2 * b, 1)
    return b


# ------------------------------------------------------------------------------------------- generation
def run_mamba(model, prompts: list[list[int]], new: int) -> tuple[float, float, int]:
    """(prefill seconds, decode seconds, decode steps) of greedy mambakit.generate."""
    from mambakit import generate

    out = generate(model, prompts, new, temperature=0, eos_token_id=[])
    assert out.tokens.shape[1] == new, "every row must run the full length"
    return out.prefill_seconds, out.decode_seconds, out.decode_steps


def run_transformer(model, prompts: list[list[int]], new: int) -> tuple[float, float, int]:
    """(prefill seconds, decode seconds, decode steps) of greedy KV-cache decoding, the loop of
    mambakit.generate: prefill → argmax → new − 1 steps (the first token comes from the prefill)."""
    import torch

    from mambakit.baselines.transformer import KVCache

    b, l = len(prompts), len(prompts[0])
    ids = torch.tensor(prompts, dtype=torch.long)  # (b, l)
    with torch.inference_mode():
        t0 = time.perf_counter()
        cache = model.allocate_cache(b, l + new)
        logits = None
        per_call = max(1, TOKENS_PER_CALL // l)
        for r in range(0, b, per_call):  # rows r … r + g − 1 write into their slice of the batch cache
            rows = slice(r, r + per_call)
            part = KVCache(cache.k[:, rows], cache.v[:, rows])  # views (n_layer, g, H, T, d_h)
            out = model(ids[rows], cache=part, num_last_tokens=1)
            if logits is None:
                logits = out.logits.new_empty(b, out.logits.shape[-1])
            logits[rows] = out.logits[:, -1]
        cache.length = l
        vocab = model.config.vocab_size
        tokens = logits[:, :vocab].argmax(-1)  # (b,)
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        steps = 0
        for _ in range(new - 1):
            logits = model.step(tokens, cache)
            tokens = logits[:, :vocab].argmax(-1)
            tokens.tolist()  # what generate does per step (the ids leave the tensor world)
            steps += 1
        return prefill_s, time.perf_counter() - t0, steps


def run_decode_only(model, batch: int, prompt: int, new: int) -> tuple[float, float, int]:
    """(0, decode seconds, decode steps): new − 1 greedy steps after a synthetic prefix of `prompt`
    positions (cache or state filled with random values; see --synthetic-prefix)."""
    import torch

    from mambakit import MambaLM

    g = torch.Generator().manual_seed(2)
    vocab = model.config.vocab_size
    with torch.inference_mode():
        if isinstance(model, MambaLM):
            memory = model.allocate_state(batch)  # conv (n_layer, b, E·D, W − 1), ssm (n_layer, b, E·D, N)
            for t in (memory.conv, memory.ssm):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
        else:
            memory = model.allocate_cache(batch, prompt + new)  # k, v (n_layer, b, H, prompt + new, d_h)
            for t in (memory.k, memory.v):
                for layer in t:  # one layer at a time: the random temporary stays small next to the cache
                    layer[:, :, :prompt] = torch.randn(layer[:, :, :prompt].shape, generator=g).to(t.dtype)
            memory.length = prompt
        tokens = torch.randint(0, vocab, (batch,), generator=g)
        t0 = time.perf_counter()
        for _ in range(new - 1):
            tokens = model.step(tokens, memory)[:, :vocab].argmax(-1)
            tokens.tolist()
        return 0.0, time.perf_counter() - t0, new - 1


RUNNERS = {"mamba": run_mamba, "transformer": run_transformer}


# ----------------------------------------------------------------------------------------------- a cell
def cell(kind: str, size: str, recipe: str, batch: int, prompt: int, new: int, dtype_name: str,
         warmup: bool = True) -> dict:
    """One (model, batch) measurement in this process."""
    import torch

    dtype = getattr(torch, dtype_name)
    model = build(kind, size, recipe, prompt, new, dtype)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, vocab, (batch, prompt), generator=g).tolist()
    synthetic = os.environ.get("VS_SYNTHETIC") == "1"
    if synthetic:
        del prompts
        run = lambda m, ps, n: run_decode_only(m, batch, prompt if n == new else min(64, prompt), n)  # noqa: E731
        prompts = [[0]] * batch
    else:
        run = RUNNERS[kind]
    if warmup:  # at the timed batch, a short prompt: compiles and caches everything the timed run needs
        run(model, [p[: min(64, prompt)] for p in prompts], min(4, new))
    exact = reset_peak_rss()
    prefill_s, decode_s, steps = run(model, prompts, new)
    hwm = rss_kib("VmHWM")
    elem = torch.finfo(dtype).bits // 8
    est = estimate_bytes(kind, size, recipe, batch, prompt, new, elem, prefill=not synthetic)
    return dict(
        model=kind, batch=batch, prompt=prompt, new=new, dtype=dtype_name, params=model.num_parameters(),
        prefill_s=prefill_s, decode_s=decode_s, decode_steps=steps,
        tokens_per_s=float("nan") if synthetic else batch * new / (prefill_s + decode_s), synthetic=synthetic,
        decode_tokens_per_s=batch * steps / decode_s if decode_s > 0 else float("nan"),
        peak_gib=hwm / 2**20 if exact and hwm else float("nan"), est_gib=est["total"] / GIB,
        per_seq_mib=est["per_seq"] / 2**20, threads=torch.get_num_threads(),
    )


def run_cell(args, kind: str, batch: int) -> dict:
    """A cell in a fresh subprocess (or in this one with --in-process)."""
    spec = [kind, args.size, args.recipe, str(batch), str(args.prompt), str(args.new), args.dtype]
    if args.in_process:
        os.environ["VS_SYNTHETIC"] = "1" if args.synthetic_prefix else "0"
        return cell(kind, args.size, args.recipe, batch, args.prompt, args.new, args.dtype)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "MALLOC_MMAP_THRESHOLD_": "131072"}
    if args.threads:
        env["VS_THREADS"] = str(args.threads)
    if args.synthetic_prefix:
        env["VS_SYNTHETIC"] = "1"
    try:
        out = subprocess.run([sys.executable, __file__, "--worker", *spec], capture_output=True, text=True,
                             env=env, timeout=args.cell_timeout)
    except subprocess.TimeoutExpired:
        return dict(model=kind, batch=batch, error=f"timeout > {args.cell_timeout:.0f} s")
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        err = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(model=kind, batch=batch, error=err[:200])
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------------ report
def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit("the plot needs matplotlib: pip install mambakit[plot]") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"mamba": "tab:blue", "transformer": "tab:red"}
    for kind in ("mamba", "transformer"):
        rows = [r for r in results["cells"] if r["model"] == kind and "error" not in r]
        if not rows:
            continue
        bs = [r["batch"] for r in rows]
        label = results["models"][kind]
        ax1.plot(bs, [r["tokens_per_s"] for r in rows], "o-", color=colors[kind], label=f"{label}: end to end")
        ax1.plot(bs, [r["decode_tokens_per_s"] for r in rows], "s--", color=colors[kind], alpha=0.6,
                 label=f"{label}: decode only")
        ax2.plot(bs, [r["peak_gib"] for r in rows], "o-", color=colors[kind], label=f"{label}: measured")
        ax2.plot(bs, [r["est_gib"] for r in rows], ":", color=colors[kind], label=f"{label}: estimate")
    ax2.axhline(results["budget_gib"], color="gray", lw=0.8, ls="--", label=f"{results['budget_gib']:g} GiB")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    ax1.set_yscale("log")
    ax1.set_ylabel("generated tokens / s")
    ax2.set_ylabel("peak memory (GiB)")
    ax1.set_title(f"prompt {results['prompt']} + {results['new']} greedy tokens, {results['dtype']}", fontsize=9)
    ax2.set_title("peak resident memory per cell", fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    plt.close(fig)


def summary(results: dict) -> dict:
    """Best throughput of each model over its measured batches, and their ratio (the paper's comparison)."""
    best = {}
    for kind in ("mamba", "transformer"):
        rows = [r for r in results["cells"] if r["model"] == kind and "error" not in r]
        if rows:
            dec = max(rows, key=lambda r: r["decode_tokens_per_s"])
            best[kind] = dict(decode_tokens_per_s=dec["decode_tokens_per_s"], decode_at_batch=dec["batch"])
            e2e = [r for r in rows if r["tokens_per_s"] == r["tokens_per_s"]]  # NaN (decode-only runs) left out
            if e2e:
                top = max(e2e, key=lambda r: r["tokens_per_s"])
                best[kind].update(tokens_per_s=top["tokens_per_s"], at_batch=top["batch"])
    out = dict(best=best)
    if len(best) == 2:
        out["ratio_decode"] = best["mamba"]["decode_tokens_per_s"] / best["transformer"]["decode_tokens_per_s"]
        if "tokens_per_s" in best["mamba"] and "tokens_per_s" in best["transformer"]:
            out["ratio_end_to_end"] = best["mamba"]["tokens_per_s"] / best["transformer"]["tokens_per_s"]
    return out


def write_json(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, prompt 32 + 8, batch 1 and 2, in-process")
    p.add_argument("--size", choices=SIZES, default="130m")
    p.add_argument("--recipe", choices=RECIPES, default="gpt3", help="the Transformer's recipe (default GPT-3)")
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--max-batch", type=int, default=32, help="largest batch to run (powers of two from 1)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--budget-gib", type=float, default=24.0, help="the memory budget of 'largest batch that fits'")
    p.add_argument("--mem-cap-gib", type=float, default=8.0,
                   help="never run a cell whose estimated peak exceeds this (the machine is shared)")
    p.add_argument("--time-budget-min", type=float, default=30.0, help="skip cells projected to end past this")
    p.add_argument("--cell-timeout", type=float, default=900.0, help="seconds before a cell is abandoned")
    p.add_argument("--threads", type=int, default=0, help="torch threads per cell (default: torch's choice)")
    p.add_argument("--in-process", action="store_true", help="run cells in this process (peaks then overlap)")
    p.add_argument("--synthetic-prefix", action="store_true",
                   help="decode only: cache / state filled at random to the prompt's size, no prefill (see above)")
    p.add_argument("--out", type=Path, default=OUT_DIR, help="where results.json and throughput.png go")
    p.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        import torch

        if os.environ.get("VS_THREADS"):
            torch.set_num_threads(int(os.environ["VS_THREADS"]))
        kind, size, recipe, b, prompt, new, dtype = args.worker
        print(json.dumps(cell(kind, size, recipe, int(b), int(prompt), int(new), dtype)))
        return 0
    if args.quick:
        args.size, args.prompt, args.new, args.max_batch, args.in_process = "tiny", 32, 8, 2, True
    if args.prompt < 1 or args.new < 2 or args.max_batch < 1:
        p.error("--prompt must be >= 1, --new >= 2 and --max-batch >= 1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    elem = 4 if args.dtype == "float32" else 2
    fits = {k: largest_batch_within(k, args.size, args.recipe, args.prompt, args.new, elem, args.budget_gib * GIB)
            for k in RUNNERS}
    prefill = not args.synthetic_prefix
    names = {"mamba": f"Mamba {SIZES[args.size][0]}", "transformer": f"Transformer {SIZES[args.size][1]} "
             f"({args.recipe})"}
    print(f"# prompt {args.prompt} + {args.new} greedy new tokens, {args.dtype}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; Transformer recipe {args.recipe}")
    for k in RUNNERS:
        e = estimate_bytes(k, args.size, args.recipe, 1, args.prompt, args.new, elem)
        print(f"# {names[k]}: weights {e['weights'] / GIB:.2f} GiB (with any decode copy), per sequence {e['per_seq'] / 2**20:.1f} MiB "
              f"({'KV cache' if k == 'transformer' else 'state'}); largest batch within {args.budget_gib:g} GiB "
              f"by estimate: {fits[k]}")
    print("| model | batch | tok/s | decode tok/s | prefill s | decode s | peak GiB | est GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    results = dict(prompt=args.prompt, new=args.new, dtype=args.dtype, size=args.size, recipe=args.recipe,
                   budget_gib=args.budget_gib, mem_cap_gib=args.mem_cap_gib, cpus=os.cpu_count(),
                   models=names, largest_batch_in_budget=fits, cells=[], skipped=[],
                   synthetic_prefix=args.synthetic_prefix,
                   load_average_start=os.getloadavg()[0], command=" ".join([Path(__file__).name, *(argv or
                                                                                                   sys.argv[1:])]))
    start = time.perf_counter()
    last_time: dict[str, float] = {}
    b = 1
    while b <= args.max_batch:
        # Memory is checked per model (a batch the Transformer's cache cannot hold may still run for Mamba:
        # the paper's point); time for the pair, so the two models are always measured at the same batches.
        est = {k: estimate_bytes(k, args.size, args.recipe, b, args.prompt, args.new, elem, prefill)["total"] / GIB
               for k in RUNNERS}
        fit = [k for k in RUNNERS if est[k] <= args.mem_cap_gib]
        projected = sum(2 * last_time.get(k, 0.0) for k in fit)
        left = args.time_budget_min * 60 - (time.perf_counter() - start)
        for kind in RUNNERS:  # the two models alternate, so they share the machine's load at each batch
            why = (f"estimated {est[kind]:.1f} GiB > --mem-cap-gib {args.mem_cap_gib:g}" if kind not in fit
                   else f"projected {projected / 60:.1f} min for the batch > {left / 60:.1f} min left"
                   if projected > left else None)
            if why:
                results["skipped"].append(dict(model=kind, batch=b, reason=why))
                print(f"| {names[kind]} | {b} | skipped: {why} | | | | | |", flush=True)
                continue
            t0 = time.perf_counter()
            r = run_cell(args, kind, b)
            last_time[kind] = time.perf_counter() - t0
            results["cells"].append(r)
            if "error" in r:
                print(f"| {names[kind]} | {b} | error: {r['error']} | | | | | |", flush=True)
                continue
            e2e = "—" if r["synthetic"] else f"{r['tokens_per_s']:.1f}"
            print(f"| {names[kind]} | {b} | {e2e} | {r['decode_tokens_per_s']:.1f} | "
                  f"{r['prefill_s']:.2f} | {r['decode_s']:.2f} | {r['peak_gib']:.2f} | {r['est_gib']:.2f} |",
                  flush=True)
        b *= 2
    results.update(summary(results), wall_s=time.perf_counter() - start, load_average_end=os.getloadavg()[0])
    best = results["best"]
    for kind, v in best.items():
        e2e = (f"{v['tokens_per_s']:.1f} tok/s end to end (batch {v['at_batch']}), " if "tokens_per_s" in v else "")
        print(f"# best {names[kind]}: {e2e}{v['decode_tokens_per_s']:.1f} tok/s decode only (batch "
              f"{v['decode_at_batch']})")
    if "ratio_decode" in results:
        e2e = f"end to end {results['ratio_end_to_end']:.2f}×, " if "ratio_end_to_end" in results else ""
        print(f"# Mamba / Transformer, best vs best: {e2e}decode only {results['ratio_decode']:.2f}× "
              "(paper: 4–5×, target ≥ 5×)")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "_decode" if args.synthetic_prefix else ""
    json_path, png_path = args.out / f"results{stem}.json", args.out / f"throughput{stem}.png"
    write_json(results, json_path)
    plot(results, png_path)
    print(f"# wrote {json_path} and {png_path} ({results['wall_s'] / 60:.1f} min)")
    return 0 if results["cells"] and not any("error" in r for r in results["cells"]) else 1


if __name__ == "__main__":
    sys.exit(main())
