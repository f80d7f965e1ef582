"""Prefill speed and memory: one full forward of a Mamba LM (random weights, the 130m shape by default),
mambakit side by side with its peers, in one table.

Implementations (--impls):
    mambakit          MambaLM (fused CPU ops)
    mambakit-noscan   the same model with the selective scan replaced by an identity: the matmul-only floor
    hf-slow           transformers MambaForCausalLM, torch fallback ("slow path": sequential scan)
    hf-mambapy        transformers MambaForCausalLM with use_mambapy=True (mamba.py's parallel scan)
    mambapy           mambapy.mamba.Mamba (pscan) + our own embedding, final RMSNorm and tied head
    mamba2            mambakit MambaLM with the Mamba-2 mixer (layer="Mamba2": d_state 128, headdim 64, 1 group)
    mamba2-noscan     the same with the SSD scan replaced by an identity: the Mamba-2 matmul-only floor
    mamba2-interleaved  mamba2 and its floor in one process, forwards alternating between the SSD and the identity
                      (two rows; their ratio is robust to a machine whose speed drifts between cells)
    hf-mamba2         transformers Mamba2ForCausalLM, torch path (no mamba_ssm / causal_conv1d on a CPU)

Every (implementation, dtype, batch, length) cell runs in a fresh subprocess so that its peak memory is its
own: peak MB = the process's high-water RSS during the timed forwards minus its RSS just before them
(weights excluded; activations and workspace included). tokens/s = batch · length / median forward time.
bf16 means the weights cast with `.to(torch.bfloat16)` (mambakit keeps A_log and D in float32).

    python benchmarks/prefill.py                       # the full grid: b ∈ {1, 4}, l ∈ {256, 1024, 4096}, fp32+bf16
    python benchmarks/prefill.py --quick               # a tiny model and sizes: checks that everything runs
    python benchmarks/prefill.py --impls mambakit,hf-slow --batch 1 --lengths 1024 --dtypes float32
    python benchmarks/prefill.py --impls mamba2,mamba2-noscan,hf-mamba2,mambakit --batch 1 --lengths 1024,4096
    python benchmarks/prefill.py --impls mamba2,mamba2-noscan --baseline-tree ../main   # before/after a change
    python benchmarks/prefill.py --impls mamba2-interleaved --baseline-tree ../main --baseline-impls mamba2-interleaved

"vs first" divides by the first implementation listed in --impls that ran for that (batch, length, dtype).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from _rss import reset_peak_rss, rss_kib  # benchmarks/ is on sys.path when a script here runs

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the mambakit command sets it (mambakit/cli), before torch

IMPLS = ("mambakit", "mambakit-noscan", "hf-slow", "hf-mambapy", "mambapy", "mamba2", "mamba2-noscan", "hf-mamba2",
         "mamba2-interleaved")
DEFAULT_IMPLS = IMPLS[:5]  # Mamba-1 and its peers; Mamba-2 rows are asked for with --impls
SHAPES = {  # name → (d_model, n_layer, vocab); 130m is state-spaces/mamba-130m
    "130m": (768, 24, 50280),
    "tiny": (64, 2, 256),
}


# ----------------------------------------------------------------------------------------------- models
def build(impl: str, shape: str):
    """(model, forward(ids) -> logits) for one implementation, float32, random weights."""
    import torch

    d_model, n_layer, vocab = SHAPES[shape]
    torch.manual_seed(0)
    if impl.startswith("mamba2"):
        from mambakit import MambaConfig, MambaLM

        model = MambaLM(MambaConfig(layer="Mamba2", d_model=d_model, n_layer=n_layer, vocab_size=vocab))
        if impl == "mamba2-noscan":
            _replace_ssd_by_identity()
        return model, lambda ids: model(ids).logits
    if impl == "hf-mamba2":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers asks the hub for kernels otherwise
        import transformers

        heads = 2 * d_model // 64
        cfg = transformers.Mamba2Config(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layer,
                                        state_size=128, expand=2, head_dim=64, num_heads=heads, n_groups=1,
                                        chunk_size=256)
        model = transformers.Mamba2ForCausalLM(cfg)
        return model, lambda ids: model(ids, use_cache=False).logits
    if impl.startswith("mambakit"):
        from mambakit import MambaConfig, MambaLM

        model = MambaLM(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab))
        if impl == "mambakit-noscan":
            _replace_scan_by_identity()
        return model, lambda ids: model(ids).logits
    if impl.startswith("hf"):
        import transformers

        cfg = transformers.MambaConfig(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layer,
                                       use_mambapy=impl == "hf-mambapy")
        model = transformers.MambaForCausalLM(cfg)
        return model, lambda ids: model(ids, use_cache=False).logits
    if impl == "mambapy":
        # `from mambapy.lm import LM` needs mamba_ssm importable; use the backbone with our own embedding and head.
        from mambapy.mamba import Mamba, MambaConfig, RMSNorm

        backbone = Mamba(MambaConfig(d_model=d_model, n_layers=n_layer, pscan=True))
        model = torch.nn.ModuleDict(dict(embedding=torch.nn.Embedding(vocab, d_model), backbone=backbone,
                                         norm_f=RMSNorm(d_model, 1e-5)))

        def forward(ids):
            h = model["norm_f"](model["backbone"](model["embedding"](ids)))
            return h @ model["embedding"].weight.t()  # tied head

        return model, forward
    raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")


def _replace_scan_by_identity() -> None:
    """y = u (and a zero final state): what is left is every matmul, the conv and the norms."""
    import torch

    from mambakit import ops

    def identity_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      initial_state=None, return_final_state=False, backend=None):
        if not return_final_state:
            return u
        return u, torch.zeros(u.shape[0], u.shape[2], A.shape[1], dtype=torch.float32)

    ops.selective_scan = identity_scan  # the model looks the op up at call time


def _replace_ssd_by_identity() -> None:
    """y = x (and a zero final state) for the SSD: every matmul, the conv and the norms are left."""
    import torch

    from mambakit import ops

    def identity_ssd(x, dt, A, B, C, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=False,
                     dt_limit=(0.0, float("inf")), initial_states=None, seq_idx=None, return_final_states=False,
                     cu_seqlens=None, return_varlen_states=False, backend=None):
        if not return_final_states:
            return x
        b, _, h, p = x.shape
        return x, torch.zeros(b, h, p, B.shape[-1], dtype=torch.float32)

    ops.ssd = identity_ssd  # the model looks the op up at call time


# ----------------------------------------------------------------------------------------------- worker
def worker(impl: str, shape: str, dtype_name: str, batch: int, length: int, repeats: int, budget: float) -> dict:
    import torch

    if os.environ.get("PREFILL_THREADS"):
        torch.set_num_threads(int(os.environ["PREFILL_THREADS"]))
    interleaved = impl == "mamba2-interleaved"
    model, forward = build("mamba2" if interleaved else impl, shape)
    ops_pair = None
    if interleaved:
        from mambakit import ops

        real = ops.ssd
        _replace_ssd_by_identity()
        ops_pair = (real, ops.ssd)  # the model looks ops.ssd up at call time
        ops.ssd = real
    model.eval()
    if dtype_name == "bfloat16":
        model.to(torch.bfloat16)
    vocab = SHAPES[shape][2]
    ids = torch.randint(0, min(vocab, 50277), (batch, length))
    with torch.inference_mode():
        t = time.perf_counter()
        forward(ids)  # warm-up at the timed shape: kernel compilation, oneDNN primitives, allocator
        if time.perf_counter() - t > budget:
            repeats = 1
        exact_peak = reset_peak_rss()
        rss0 = rss_kib("VmRSS")
        times, floor_times = [], []
        while len(times) < repeats:
            t = time.perf_counter()
            forward(ids)  # the logits are freed at once, as in a prefill that keeps only the state
            times.append(time.perf_counter() - t)
            if ops_pair is not None:  # the same forward with the SSD replaced by the identity, right after
                from mambakit import ops

                ops.ssd = ops_pair[1]
                t = time.perf_counter()
                forward(ids)
                floor_times.append(time.perf_counter() - t)
                ops.ssd = ops_pair[0]
            if sum(times) + sum(floor_times) > budget:  # slow peers at long lengths: fewer repeats rather than hours
                break
        hwm = rss_kib("VmHWM")
    med = statistics.median(times)
    peak = (hwm - rss0) / 1024 if exact_peak and hwm and rss0 and not floor_times else float("nan")
    pkg = sys.modules.get("mambakit")
    out = dict(tokens_per_s=batch * length / med, ms=med * 1e3, runs=len(times), peak_mb=peak,
               mambakit=os.path.dirname(os.path.dirname(pkg.__file__)) if pkg else None)
    if floor_times:
        floor = statistics.median(floor_times)
        out.update(floor_tokens_per_s=batch * length / floor, floor_ms=floor * 1e3)
    return out


# ----------------------------------------------------------------------------------------------- driver
def run_cell(args, impl, dtype, batch, length, tree: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, args.shape, dtype, str(batch), str(length),
           str(args.repeats), str(args.budget)]
    # A fixed mmap threshold makes freed large buffers go back to the OS, so RSS tracks live memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "TRANSFORMERS_VERBOSITY": "error"}
    if tree:  # another checkout's mambakit (--baseline-tree): first on the worker's path
        env["PYTHONPATH"] = os.pathsep.join([tree] + [v for v in [env.get("PYTHONPATH")] if v])
    if args.threads:
        env["PREFILL_THREADS"] = str(args.threads)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"timeout > {args.timeout}s")
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        err = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(error=err[:100])
    return json.loads(lines[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, b=1, l=64, two runs: a smoke test")
    p.add_argument("--impls", default=",".join(DEFAULT_IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    p.add_argument("--shape", default="130m", choices=SHAPES)
    p.add_argument("--batch", default="1,4", help="batch sizes, comma-separated")
    p.add_argument("--lengths", default="256,1024,4096", help="sequence lengths, comma-separated")
    p.add_argument("--dtypes", default="float32,bfloat16", help="float32 and/or bfloat16")
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per cell (median reported)")
    p.add_argument("--budget", type=float, default=120.0, help="stop repeating a cell after this many seconds")
    p.add_argument("--timeout", type=float, default=1800.0, help="give up on a cell after this many seconds")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--baseline-tree", default="", help="another mambakit checkout (a path): each implementation "
                   "in --baseline-impls also runs with it first on PYTHONPATH, just before the current tree's row "
                   "(before/after in one run)")
    p.add_argument("--baseline-impls", default="mambakit,mamba2", help="the implementations --baseline-tree reruns")
    p.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        impl, shape, dtype, b, l, repeats, budget = args.worker
        print(json.dumps(worker(impl, shape, dtype, int(b), int(l), int(repeats), float(budget))))
        return
    if args.quick:
        args.shape, args.batch, args.lengths, args.repeats = "tiny", "1", "64", 2
    impls = [s for s in args.impls.split(",") if s]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        p.error(f"unknown implementation(s) {unknown}; choose from {', '.join(IMPLS)}")
    dtypes = [s for s in args.dtypes.split(",") if s]
    if set(dtypes) - {"float32", "bfloat16"}:
        p.error("--dtypes takes float32 and/or bfloat16")
    batches = [int(s) for s in args.batch.split(",")]
    lengths = [int(s) for s in args.lengths.split(",")]
    import torch

    print(f"# prefill, shape {args.shape} {SHAPES[args.shape]} (d_model, n_layer, vocab), torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, median of up to {args.repeats} runs")
    header = "| batch | length | dtype | implementation | tokens/s | ms / forward | peak MB | vs first |"
    print(header)
    print("|---:|---:|---|---|---:|---:|---:|---:|")
    trees = set()
    for dtype in dtypes:
        for b in batches:
            for l in lengths:
                base = None
                rows = []
                for impl in impls:
                    if args.baseline_tree and impl in args.baseline_impls.split(","):
                        rows.append((f"{impl} ({args.baseline_tree})", impl, args.baseline_tree))
                    rows.append((impl, impl, None))
                for label, impl, tree in rows:
                    r = run_cell(args, impl, dtype, b, l, tree)
                    if "error" in r:
                        print(f"| {b} | {l} | {dtype} | {label} | error: {r['error']} | | | |", flush=True)
                        continue
                    if r.get("mambakit"):
                        trees.add(f"{label}: {r['mambakit']}")
                    if base is None:
                        base = r["tokens_per_s"]
                    rel = f"{r['tokens_per_s'] / base:.2f}×" if base else ""
                    print(f"| {b} | {l} | {dtype} | {label} | {r['tokens_per_s']:,.0f} | {r['ms']:,.1f} | "
                          f"{r['peak_mb']:,.0f} | {rel} |", flush=True)
                    if "floor_ms" in r:
                        rel = f"{r['floor_tokens_per_s'] / base:.2f}×"
                        print(f"| {b} | {l} | {dtype} | {label}: its floor (SSD removed) | "
                              f"{r['floor_tokens_per_s']:,.0f} | {r['floor_ms']:,.1f} | | {rel} |", flush=True)
    for line in sorted(trees):  # which checkout each row's mambakit came from (PYTHONPATH=. for a worktree's own)
        print(f"# {line}")


if __name__ == "__main__":
    main()
