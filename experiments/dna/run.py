"""DNA experiment (paper §4.3): next-nucleotide pretraining at growing context on real bacterial genomes,
then species / replication-strand classification of windows, pretrained vs from scratch.

    bash experiments/dna/setup.sh            # once: apt-installs ragout-examples (16 genomes, 4 species)
    python -m experiments.dna                # ≈ 20 min on an idle core; writes results.json, *.png, results.md

Data: ragout-examples' complete reference genomes, `<root>/<Species>/references/<strain>.fasta.gz`. Whole
strains are held out (default DH1, SJM180, USA300_FPR3757, O395: one per species): the validation perplexity
and the classification accuracy are measured only on genomes never trained on.

1. Pretraining (Figure 5 right, pattern): one Mamba per context length L ∈ {2^10, 2^12, 2^14, 2^16}, the same
   steps of the same tokens per step (2^16 = the longest context; batch = 2^16 / L), reverse-complement
   augmentation. Optional: the paper's sequence-length warm-up (App. E.3.3; --warmup_stage_frac 0.08): the
   model of context L trains first on 2^10-long windows, then on every power of two up to L, 8% of the steps
   each, the batch doubling as the length halves (off by default: at this budget it did not help, see the
   README). Perplexity on held-out strains, each model at its own context, over the same 2^16-long
   segments (cut into L-long windows), and the same loss bucketed by the position inside the window (does the
   model use its context?).
2. Classification (Table 13, pattern), for windows L ∈ {2^10, 2^12, 2^14}:
   - species: 4 classes (E. coli, H. pylori, S. aureus, V. cholerae), held-out strains;
   - replication strand (the harder task): is the window, read as given, on the leading strand (between the
     origin and the terminus of replication, clockwise) or the lagging one? ori / ter are the minimum /
     maximum of the cumulative GC skew Σ(G − C) of each chromosome (the standard way to place them in
     bacteria). Only the window is shown, so the model must pick up the weak strand asymmetries (GC skew,
     gene orientation) from L bases. Reverse-complementing a window flips its label.
   Each task and length: from the pretrained model of the same context (or the nearest shorter) and from
   scratch, same token budget (1M). The head averages the hidden states over the window (--pooling mean); the
   paper reads the last one (--pooling last), which in short fine-tuning runs learns far more slowly (measured:
   4-species accuracy 37% vs 44% after 60 steps of 16 × 256-base windows).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mambakit._io import atomic_write
from mambakit.config import MambaConfig
from mambakit.data.dna import Genome, GenomeWindows, NucleotideTokenizer, load_genome
from mambakit.heads import SequenceClassifier
from mambakit.model import MambaLM

from experiments._common import (check_contexts, choices, cli_args, eval_at_context, log2_axes, merge_tail, plan_text,
                                 plot_loss_by_position, position_table, pyplot, run_budgeted, save_figure,
                                 seq_len_warmup, settings, train_stages)

HERE = Path(__file__).resolve().parent
RAGOUT = Path("/usr/share/doc/ragout/examples")
VAL_STRAINS = ("DH1", "SJM180", "USA300_FPR3757", "O395")

# Paper numbers next to ours. Figure 5 (right) is plot-only: HG38, 6×128 Mamba (≈1.4M params), 2^10 → 2^20,
# perplexity falls steadily with context (from ≈3.0 towards ≈2.9 read off the plot, unconfirmed).
PAPER_TABLE13 = {  # Great Apes species classification accuracy (%), 5 classes, random = 20%
    "HyenaDNA 1.4M": {10: 28.04, 12: 28.43, 14: 41.17, 16: 42.22, 18: 31.10, 20: 54.87},
    "Mamba 1.4M": {10: 31.47, 12: 27.50, 14: 27.66, 16: 40.72, 18: 42.41, 20: 71.67},
    "Mamba 7M": {10: 30.00, 12: 29.01, 14: 31.48, 16: 43.73, 18: 56.60, 20: 81.31},
}


# ------------------------------------------------------------------------------------------------ data
def load_genomes(root: Path, val_strains: tuple[str, ...], min_record: int) -> tuple[list[Genome], list[Genome], list[str]]:
    """(train genomes, held-out genomes, species names) from <root>/<Species>/references/*.fa[sta][.gz]."""
    files = sorted(p for p in root.glob("*/references/*") if ".fa" in p.name)
    if not files:
        raise FileNotFoundError(f"no genomes under {root}/<Species>/references/ (run experiments/dna/setup.sh)")
    species = sorted({p.parent.parent.name for p in files})
    train, val = [], []
    for p in files:
        strain = p.name.split(".fa")[0]
        g = load_genome(p, p.parent.parent.name, strain, min_record_length=min_record)
        (val if strain in val_strains else train).append(g)
    for s in species:
        if not any(g.species == s for g in val) or not any(g.species == s for g in train):
            raise ValueError(f"species {s}: need at least one training and one held-out strain "
                             f"(held out: {val_strains})")
    return train, val, species


def strand_labeller(genomes: list[Genome]):
    """label_fn for GenomeWindows: 1 if the window's centre lies on the leading strand of the + strand
    (clockwise from ori to ter), else 0; flipped for a reverse-complemented window."""
    arcs = []
    for gen in genomes:
        per = []
        for rec in gen.records:
            skew = np.cumsum((rec == 2).astype(np.int32) - (rec == 1).astype(np.int32))  # Σ(G − C)
            per.append((int(skew.argmin()), int(skew.argmax()), len(rec)))
        arcs.append(per)

    def label(g: int, r: int, start: int, length: int, rc: bool) -> int:
        ori, ter, n = arcs[g][r]
        c = start + length // 2
        leading = (c - ori) % n < (ter - ori) % n
        return int(leading != rc)

    return label


def eval_segments(genomes: list[Genome], seg_len: int, per_genome: int) -> list[np.ndarray]:
    """Fixed held-out segments (the same for every context length): per_genome evenly spaced per genome."""
    segs = []
    for gen in genomes:
        rec = max(gen.records, key=len)
        starts = np.linspace(0, len(rec) - seg_len, per_genome).astype(int)
        segs += [rec[s:s + seg_len].astype(np.int64) for s in starts]
    return segs


# ------------------------------------------------------------------------------------------ experiments
def model_config(args) -> MambaConfig:
    return MambaConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=NucleotideTokenizer().vocab_size)


def pretrain(args, train_g, val_g) -> tuple[dict, dict]:
    """One LM per context; returns ({L: results}, {L: model}).

    Every context gets the same steps of the same tokens per step (args.tokens_per_step, a multiple of the
    longest context), so the runs differ only in how the tokens are cut into windows. With the sequence-length
    warm-up (paper App. E.3.3) the model of context L first trains on args.warmup_start-long windows, then on
    every power of two up to L, args.warmup_stage_frac of the steps each, the batch growing as the length
    shrinks."""
    results, models = {}, {}
    seg_len = args.eval_segment_len or max(args.contexts)
    if seg_len < max(args.contexts):
        raise ValueError(f"--eval_segment_len {seg_len} is shorter than the longest context {max(args.contexts)}")
    segs = eval_segments(val_g, seg_len + 1, args.eval_segments)  # + 1: the last target
    total_steps = max(1, args.pretrain_tokens // args.tokens_per_step)
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    for L in args.contexts:
        torch.manual_seed(args.seed)
        model = MambaLM(model_config(args))
        stages = seq_len_warmup(L, args.tokens_per_step, total_steps, args.warmup_start, args.warmup_stage_frac)
        windows = {st.length: GenomeWindows(train_g, st.length + 1, rc_prob=0.5) for st in stages}
        rng = np.random.default_rng(args.seed)
        print(f"[pretrain] context 2^{int(math.log2(L))} = {L}: {total_steps} steps of {args.tokens_per_step:,} "
              f"tokens; length × batch: {plan_text(stages)}", file=sys.stderr, flush=True)
        run = train_stages(model, stages, lambda st: windows[st.length].sample(st.batch, rng)[0], args.pretrain_s,
                           args.lr, label=f"L={L}")
        nll, buckets, n_tokens = eval_at_context(model, segs, L, args.eval_tokens)  # the held-out strains
        results[L] = {"context": L, "batch": stages[-1].batch, "val_nats": nll, "val_ppl": math.exp(nll),
                      "val_bits_per_base": nll / math.log(2), "val_tokens": n_tokens,
                      "stages": [vars(st) for st in stages], "position_buckets": buckets,
                      **{k: v for k, v in run.items() if k != "loss_curve"}, "loss_curve": run["loss_curve"]}
        print(f"[pretrain] L={L}: {run['steps']} steps, {run['tokens']:,} tokens, held-out perplexity "
              f"{math.exp(nll):.4f} ({nll / math.log(2):.4f} bits/base); by position: "
              + ", ".join(f"{b['lo']}: {b['bits']:.3f}" for b in results[L]["position_buckets"]), file=sys.stderr, flush=True)
        models[L] = model
        if args.ckpt_dir:
            model.save_pretrained(Path(args.ckpt_dir) / f"lm_{L}")
    return results, models


@torch.no_grad()
def eval_classifier(clf, windows: GenomeWindows, n_windows: int, batch: int) -> dict:
    """Accuracy on deterministic held-out windows (evenly spread over every held-out genome)."""
    per_genome = max(1, n_windows // len(windows.genomes))
    tiles = list(windows.tiles(per_genome))
    correct, n = 0, 0
    for i in range(0, len(tiles), batch):
        chunk = tiles[i:i + batch]
        ids = torch.from_numpy(np.stack([windows.window(g, r, s) for g, r, s in chunk]))
        y = torch.tensor([windows.label_fn(g, r, s, windows.length, False) if windows.label_fn
                          else windows.labels[g] for g, r, s in chunk])
        correct += int((clf(ids).logits.argmax(-1) == y).sum())
        n += len(chunk)
    return {"accuracy": correct / n, "n_eval": n}


def classify(args, train_g, val_g, species, models) -> dict:
    out = {}
    tasks = {
        "species": dict(classes=len(species), labels=lambda gs: [species.index(g.species) for g in gs],
                        label_fn=lambda gs: None),
        "strand": dict(classes=2, labels=lambda gs: None, label_fn=strand_labeller),
    }
    for task in args.tasks:
        t = tasks[task]
        for L in args.windows:
            src = max((c for c in models if c <= L), default=None)
            for init in args.inits:
                if init == "pretrained" and src is None:
                    continue
                torch.manual_seed(args.seed + 1)
                if init == "pretrained":
                    clf = SequenceClassifier.from_lm(models[src], t["classes"], pooling=args.pooling)
                else:
                    clf = SequenceClassifier(model_config(args), t["classes"], pooling=args.pooling)
                if args.freeze_backbone:  # a linear probe: only the head trains (the backbone runs forward only)
                    for prm in clf.backbone.parameters():
                        prm.requires_grad_(False)
                tr = GenomeWindows(train_g, L, labels=t["labels"](train_g), rc_prob=0.5, label_fn=t["label_fn"](train_g))
                va = GenomeWindows(val_g, L, labels=t["labels"](val_g), label_fn=t["label_fn"](val_g))
                batch = max(args.min_cls_batch, args.cls_tokens_per_step // L)
                rng = np.random.default_rng(args.seed + 2)
                if args.standardize:  # head input standardised on training windows (see heads.py)
                    srng = np.random.default_rng(args.seed + 3)
                    clf.standardize([tr.sample(max(2, args.cls_tokens_per_step // L), srng)[0]
                                     for _ in range(max(1, args.standardize // max(2, args.cls_tokens_per_step // L)))])

                def loss_fn(step):
                    ids, y = tr.sample(batch, rng)
                    return clf(ids, labels=y).loss, batch * L

                print(f"[{task}] window {L}, {init}" + (f" (from the L={src} LM)" if init == "pretrained" else "")
                      + f": batch {batch}", file=sys.stderr, flush=True)
                steps = min(x for x in (args.max_steps, args.finetune_steps, 10**12) if x)
                mults = {id(prm): args.backbone_lr_mult for prm in clf.backbone.parameters()}
                run = run_budgeted(clf, loss_fn, args.finetune_s, args.cls_lr, weight_decay=0.1, max_steps=steps,
                                   label=f"{task} L={L} {init}", log_every=5, budget_tokens=args.finetune_tokens,
                                   lr_mults=mults)
                n_eval = max(args.min_eval_windows, min(args.max_eval_windows, args.eval_tokens // L))
                ev = eval_classifier(clf, va, n_eval, max(1, args.eval_tokens // (4 * L)))
                key = f"{task}/{L}/{init}"
                out[key] = {"task": task, "window": L, "init": init, "pretrained_context": src if init == "pretrained" else None,
                            "classes": t["classes"], "chance": 1 / t["classes"], **ev,
                            **{k: v for k, v in run.items() if k != "loss_curve"}}
                print(f"[{task}] window {L} {init}: held-out accuracy {ev['accuracy']:.3f} on {ev['n_eval']} windows "
                      f"({run['steps']} steps)", file=sys.stderr, flush=True)
    return out


# ----------------------------------------------------------------------------------------------- report
def plots(res: dict, out: Path) -> list[str]:
    plt = pyplot()
    made = []
    pre = res["pretrain"]
    if pre:
        Ls = sorted(int(k) for k in pre)
        fig, ax = plt.subplots(figsize=(5.5, 4))
        ax.plot(Ls, [pre[str(L)]["val_ppl"] for L in Ls], "o-", label=f"Mamba {res['params']['lm'] / 1e3:.0f}K")
        log2_axes(ax, "sequence length (bases)", "perplexity (held-out strains)",
                  "Next-base pretraining vs context (cf. paper Fig. 5 right)")
        fig.tight_layout()
        save_figure(fig, out / "ppl_vs_context.png")
        made.append("ppl_vs_context.png")
        if all("position_buckets" in pre[str(L)] for L in Ls):
            series = {f"Mamba, context 2^{int(math.log2(L))}": merge_tail(pre[str(L)]["position_buckets"]) for L in Ls}
            plot_loss_by_position(series, "bits/base", min(64, min(Ls)),
                                  "Held-out strains: loss by position in the window (does the model use its context?)",
                                  out / "loss_by_position.png")
            made.append("loss_by_position.png")
    cls = res["classify"]
    if cls:
        tasks = sorted({v["task"] for v in cls.values()})
        fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for init, style in (("pretrained", "o-"), ("scratch", "s--")):
                pts = sorted((v["window"], v["accuracy"]) for v in cls.values() if v["task"] == task and v["init"] == init)
                if pts:
                    ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], style, label=init)
            chance = next(v["chance"] for v in cls.values() if v["task"] == task)
            ax.axhline(100 * chance, color="gray", lw=0.8, ls=":", label="chance")
            log2_axes(ax, "window length (bases)", "accuracy on held-out strains (%)", f"{task} classification")
        fig.tight_layout()
        save_figure(fig, out / "accuracy_vs_window.png")
        made.append("accuracy_vs_window.png")
    return made


def _plan(r: dict) -> str:
    """'1024×64 (7) → … → 65536×1 (50)' from a result's warm-up stages (length × batch (steps))."""
    st = r.get("stages") or [{"length": r["context"], "batch": r["batch"], "steps": r["steps"]}]
    return " → ".join(f"2^{int(math.log2(x['length']))}×{x['batch']} ({x['steps']})" for x in st)


def table(res: dict) -> str:
    lines = ["### Pretraining: held-out perplexity vs context", "",
             "| context | length × batch (steps) | steps | tokens | train loss (nats) | held-out perplexity | bits/base |",
             "|---|---|---|---|---|---|---|"]
    for k in sorted(res["pretrain"], key=int):
        r = res["pretrain"][k]
        lines.append(f"| 2^{int(math.log2(r['context']))} | {_plan(r)} | {r['steps']} | {r['tokens']:,} | "
                     f"{r['train_loss']:.4f} | {r['val_ppl']:.4f} | {r['val_bits_per_base']:.4f} |")
    pre = [res["pretrain"][k] for k in sorted(res["pretrain"], key=int) if "position_buckets" in res["pretrain"][k]]
    if pre:
        lines += position_table([([f"2^{int(math.log2(r['context']))}"], r["context"], r["position_buckets"])
                                 for r in pre], ["context"], "base", 4)
    cls = res["classify"]
    for task in sorted({v["task"] for v in cls.values()}):
        Ls = sorted({v["window"] for v in cls.values() if v["task"] == task})
        lines += ["", f"### {task} classification: accuracy (%) on held-out strains", "",
                  "| init | " + " | ".join(f"2^{int(math.log2(L))}" for L in Ls) + " |",
                  "|---|" + "---|" * len(Ls)]
        for init in ("pretrained", "scratch"):
            cells = []
            for L in Ls:
                v = cls.get(f"{task}/{L}/{init}")
                cells.append(f"{100 * v['accuracy']:.1f} ({v['n_eval']})" if v else "–")
            lines.append(f"| {init} | " + " | ".join(cells) + " |")
        chance = next(v["chance"] for v in cls.values() if v["task"] == task)
        lines.append("| chance | " + " | ".join(f"{100 * chance:.1f}" for _ in Ls) + " |")
    lines += ["", "Paper Table 13 (Great Apes, 5 classes, HG38-pretrained, accuracy %):", "",
              "| model | 2^10 | 2^12 | 2^14 | 2^16 | 2^18 | 2^20 |", "|---|---|---|---|---|---|---|"]
    for name, row in PAPER_TABLE13.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[e]:.2f}" for e in (10, 12, 14, 16, 18, 20)) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.dna", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=RAGOUT, help="<root>/<Species>/references/<strain>.fasta.gz")
    p.add_argument("--val_strains", default=",".join(VAL_STRAINS), help="held-out strains (comma-separated)")
    p.add_argument("--out", type=Path, default=HERE, help="where results.json, results.md and the PNGs go")
    p.add_argument("--contexts", default="1024,4096,16384,65536", help="pretraining context lengths")
    p.add_argument("--windows", default="1024,4096,16384", help="classification window lengths")
    p.add_argument("--tasks", default="species,strand")
    p.add_argument("--inits", default="pretrained,scratch", help="classifier starts: pretrained, scratch or both")
    p.add_argument("--d_model", type=int, default=64)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--tokens_per_step", type=int, default=0,
                   help="pretraining tokens per step, the same at every context and warm-up stage; a multiple of "
                        "the longest context (default 0: the longest context)")
    p.add_argument("--pretrain_tokens", type=int, default=4_000_000,
                   help="training tokens per context (rounded down to whole steps)")
    p.add_argument("--warmup_stage_frac", type=float, default=0.0,
                   help="sequence-length warm-up: the share of the steps spent at each power of two below the "
                        "context, from --warmup_start up (default 0: off, every step at the context; 0.08 = the "
                        "paper-like schedule measured in the README, which did not help at this budget)")
    p.add_argument("--warmup_start", type=int, default=0,
                   help="first warm-up length, a power of two (default 0: the shortest context; paper 2^10)")
    p.add_argument("--finetune_tokens", type=int, default=500_000, help="training tokens per classifier")
    p.add_argument("--pooling", default="mean", choices=("mean", "last"),
                   help="classifier head input: mean over positions (default: learns in far fewer steps), or the "
                        "last position (the paper's choice)")
    p.add_argument("--skip_pretrain", default="", metavar="RESULTS_PRETRAIN_JSON",
                   help="no pretraining: load the LMs of --contexts from --ckpt_dir and report these pretraining results")
    p.add_argument("--standardize", type=int, default=16, metavar="N",
                   help="standardise the head's input on N training windows before fine-tuning (0: off)")
    p.add_argument("--freeze_backbone", action="store_true",
                   help="train only the head (a linear probe of the pretrained / random features)")
    p.add_argument("--finetune_steps", type=int, default=None, help="step budget per classifier (instead of tokens)")
    p.add_argument("--ckpt_dir", default="runs/dna", help="where the pretrained LMs are saved ('' = not saved)")
    p.add_argument("--pretrain_s", type=float, default=0, help="optional cap in seconds per context (0: none)")
    p.add_argument("--finetune_s", type=float, default=0, help="optional cap in seconds per classifier (0: none)")
    p.add_argument("--max_steps", type=int, default=None, help="cap on steps per run (CI)")
    p.add_argument("--lr", type=float, default=8e-3, help="pretraining peak LR (paper: 8e-3 for Mamba)")
    p.add_argument("--cls_lr", type=float, default=2e-3)
    p.add_argument("--backbone_lr_mult", type=float, default=1.0,
                   help="classifier fine-tuning: the backbone's lr is cls_lr times this (both inits)")
    p.add_argument("--cls_tokens_per_step", type=int, default=2**15)
    p.add_argument("--min_cls_batch", type=int, default=4)
    p.add_argument("--eval_segments", type=int, default=4, help="held-out segments per held-out genome")
    p.add_argument("--eval_segment_len", type=int, default=0,
                   help="length of the held-out segments (default 0: the longest context); set it to compare runs "
                        "with different --contexts on the same held-out bases")
    p.add_argument("--eval_tokens", type=int, default=2**18, help="tokens per evaluation batch / classification eval size")
    p.add_argument("--min_eval_windows", type=int, default=64)
    p.add_argument("--max_eval_windows", type=int, default=512)
    p.add_argument("--min_record", type=int, default=100_000, help="skip records (plasmids) shorter than this")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    check_contexts(p, a)
    a.windows = [int(x) for x in a.windows.split(",") if x]
    a.inits = choices(p, a.inits, ("pretrained", "scratch"), "init")
    a.val_strains = tuple(s for s in a.val_strains.split(",") if s)
    a.tasks = choices(p, a.tasks, ("species", "strand"), "task")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    train_g, val_g, species = load_genomes(args.root, args.val_strains, args.min_record)
    print(f"genomes: {len(train_g)} train ({sum(g.n_bases for g in train_g):,} bp), {len(val_g)} held out "
          f"({', '.join(g.strain for g in val_g)}); species {species}", file=sys.stderr, flush=True)
    if args.skip_pretrain:  # reuse the LMs a previous run saved in ckpt_dir, and its pretraining results
        models = {L: MambaLM.from_pretrained(Path(args.ckpt_dir) / f"lm_{L}") for L in args.contexts}
        pre = {int(k): v for k, v in json.loads(Path(args.skip_pretrain).read_text()).items()}
        print(f"pretrained LMs for contexts {args.contexts} loaded from {args.ckpt_dir}", file=sys.stderr)
    else:
        pre, models = pretrain(args, train_g, val_g)
        # the pretraining results on disk before the (longer) classification sweep starts
        atomic_write(args.out / "results_pretrain.json",
                     json.dumps({str(k): v for k, v in pre.items()}, indent=1) + "\n")
    cls = classify(args, train_g, val_g, species, models)
    lm_params = MambaLM(model_config(args)).num_parameters()
    res = {
        "command": "python -m experiments.dna " + " ".join(cli_args(argv)),
        "params": {"lm": lm_params, "d_model": args.d_model, "n_layer": args.n_layer},
        "data": {"train": [f"{g.species}/{g.strain}" for g in train_g], "held_out": [f"{g.species}/{g.strain}" for g in val_g],
                 "gc": {f"{g.species}/{g.strain}": round(g.gc_content(), 4) for g in train_g + val_g}},
        "settings": settings(args),
        "pretrain": {str(k): v for k, v in pre.items()}, "classify": cls,
        "seconds": time.time() - t0, "threads": args.threads,
    }
    atomic_write(args.out / "results.json", json.dumps(res, indent=1) + "\n")
    md = table(res)
    atomic_write(args.out / "results.md", md)
    res["plots"] = plots(res, args.out)
    print(md)
    print(f"total {time.time() - t0:.0f} s; wrote {args.out}/results.json, results.md, {', '.join(res['plots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
