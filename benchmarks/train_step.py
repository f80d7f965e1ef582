"""Training speed: one optimizer step (forward, next-token loss, backward, AdamW) of a language model with random
weights, mambakit (Mamba-1 and Mamba-2) side by side with its peers, in one table.

Implementations (--impls):
    mambakit             MambaLM, Mamba-1 mixer (the fused CPU scan and conv kernels, their backward)
    mamba2               MambaLM, Mamba-2 mixer (layer="Mamba2": d_state 128, headdim 64 or d_inner/2, 1 group;
                         the chunked SSD, autograd through its GEMMs)
    transformers         MambaForCausalLM, its CPU torch path (sequential scan)
    transformers-mamba2  Mamba2ForCausalLM, its CPU torch path (chunked scan in torch)
    mambapy              mambapy.mamba.Mamba (parallel pscan) + our embedding, final RMSNorm and tied head

Every (implementation, dtype) cell runs in a fresh subprocess. tokens/s = batch · length / median step time over
--steps timed steps after 2 warm-up steps (kernel compilation, allocator). bf16: the model cast with .to(bfloat16)
and trained in it (mambakit keeps A_log, D and Δ's bias in float32).

    python benchmarks/train_step.py                       # d_model 256 × 4 layers, batch 8 × 512, float32
    python benchmarks/train_step.py --quick               # tiny sizes: checks that everything runs
    python benchmarks/train_step.py --d-model 768 --layers 24 --vocab 50280 --batch 1 --length 1024 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the mambakit command sets it (mambakit/cli), before torch

IMPLS = ("mambakit", "mamba2", "transformers", "transformers-mamba2", "mambapy")


def build(impl: str, d_model: int, n_layer: int, vocab: int):
    """(model, loss(ids) -> scalar) for one implementation, random weights."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    headdim = min(64, d_model)  # d_inner = 2·d_model: at least two heads
    if impl in ("mambakit", "mamba2"):
        from mambakit import MambaConfig, MambaLM

        layer = "Mamba2" if impl == "mamba2" else "Mamba"
        extra = dict(headdim=headdim) if layer == "Mamba2" else {}
        model = MambaLM(MambaConfig(layer=layer, d_model=d_model, n_layer=n_layer, vocab_size=vocab, **extra))
        return model, lambda ids: model(ids, labels=ids).loss
    if impl.startswith("transformers"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers asks the hub for kernels otherwise
        import transformers

        if impl == "transformers-mamba2":
            cfg = transformers.Mamba2Config(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layer,
                                            state_size=128, expand=2, head_dim=headdim,
                                            num_heads=2 * d_model // headdim, n_groups=1, chunk_size=256)
            model = transformers.Mamba2ForCausalLM(cfg)
        else:
            model = transformers.MambaForCausalLM(transformers.MambaConfig(
                vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layer))
        return model, lambda ids: model(ids, labels=ids, use_cache=False).loss
    if impl == "mambapy":
        from mambapy.mamba import Mamba, MambaConfig, RMSNorm

        backbone = Mamba(MambaConfig(d_model=d_model, n_layers=n_layer, pscan=True))
        model = torch.nn.ModuleDict(dict(embedding=torch.nn.Embedding(vocab, d_model), backbone=backbone,
                                         norm_f=RMSNorm(d_model, 1e-5)))

        def loss(ids):
            h = model["norm_f"](model["backbone"](model["embedding"](ids)))
            logits = h @ model["embedding"].weight.t()  # tied head
            return F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), ids[:, 1:].reshape(-1))

        return model, loss
    raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")


def worker(impl: str, dtype_name: str, d_model: int, n_layer: int, vocab: int, batch: int, length: int,
           steps: int) -> dict:
    import torch

    if os.environ.get("TRAIN_THREADS"):
        torch.set_num_threads(int(os.environ["TRAIN_THREADS"]))
    model, loss_fn = build(impl, d_model, n_layer, vocab)
    model.train()
    if dtype_name == "bfloat16":
        model.to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))
    times, losses = [], []
    for i in range(steps + 2):
        t = time.perf_counter()
        loss = loss_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:  # two warm-up steps: kernel compilation, oneDNN primitives, the optimizer's state
            times.append(time.perf_counter() - t)
        losses.append(float(loss))
    med = statistics.median(times)
    return dict(tokens_per_s=batch * length / med, ms=med * 1e3, first_loss=losses[0], last_loss=losses[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="d_model 64 × 2 layers, batch 2 × 64, 2 steps")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--steps", type=int, default=5, help="timed steps per cell (median reported)")
    p.add_argument("--dtypes", default="float32", help="float32 and/or bfloat16")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--timeout", type=float, default=1800.0, help="give up on a cell after this many seconds")
    p.add_argument("--worker", nargs=8, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        impl, dtype, d, n, v, b, l, s = args.worker
        print(json.dumps(worker(impl, dtype, int(d), int(n), int(v), int(b), int(l), int(s))))
        return
    if args.quick:
        args.d_model, args.layers, args.batch, args.length, args.steps = 64, 2, 2, 64, 2
    impls = [s for s in args.impls.split(",") if s]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        p.error(f"unknown implementation(s) {unknown}; choose from {', '.join(IMPLS)}")
    dtypes = [s for s in args.dtypes.split(",") if s]
    if set(dtypes) - {"float32", "bfloat16"}:
        p.error("--dtypes takes float32 and/or bfloat16")
    import torch

    print(f"# training step, d_model {args.d_model} × {args.layers} layers, vocab {args.vocab}, batch {args.batch} × "
          f"{args.length} tokens, AdamW, torch {torch.__version__}, {os.cpu_count()} CPUs, median of {args.steps} steps")
    print("| dtype | implementation | tokens/s | ms / step | loss (first → last) | vs mambakit |")
    print("|---|---|---:|---:|---|---:|")
    for dtype in dtypes:
        base = None
        for impl in impls:
            cmd = [sys.executable, __file__, "--worker", impl, dtype, str(args.d_model), str(args.layers),
                   str(args.vocab), str(args.batch), str(args.length), str(args.steps)]
            env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
            if args.threads:
                env["TRAIN_THREADS"] = str(args.threads)
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
                lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
                r = json.loads(lines[-1]) if out.returncode == 0 and lines else dict(
                    error=((out.stderr.strip().splitlines() or ["no output"])[-1])[:100])
            except subprocess.TimeoutExpired:
                r = dict(error=f"timeout > {args.timeout}s")
            if "error" in r:
                print(f"| {dtype} | {impl} | error: {r['error']} | | | |", flush=True)
                continue
            if impl == "mambakit":
                base = r["tokens_per_s"]
            rel = f"{r['tokens_per_s'] / base:.2f}×" if base else ""
            print(f"| {dtype} | {impl} | {r['tokens_per_s']:,.0f} | {r['ms']:,.1f} | {r['first_loss']:.3f} → "
                  f"{r['last_loss']:.3f} | {rel} |", flush=True)


if __name__ == "__main__":
    main()
