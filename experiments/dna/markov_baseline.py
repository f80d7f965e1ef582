"""A reference point for the pretraining perplexities: order-k Markov chains (k-mer counts with add-one
smoothing) fitted on the training strains, scored on the same held-out segments as the LMs.

    python -m experiments.dna.markov_baseline            # k = 0..8, ≈ 1 min; prints a table, writes markov.json

An order-k chain sees k bases of context; a language model that does not beat it has not yet learned to use
more than k bases of its window.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from mambakit._io import atomic_write

from .run import HERE, RAGOUT, VAL_STRAINS, eval_segments, load_genomes


def kmer_codes(seq: np.ndarray, k: int) -> np.ndarray:
    """Base-4 code of every (k + 1)-mer of ACGT-only stretches (windows holding an N are dropped): (n,) int64."""
    s = seq.astype(np.int64)
    code = np.zeros(len(s) - k, dtype=np.int64)
    bad = np.zeros(len(s) - k, dtype=bool)
    for j in range(k + 1):
        part = s[j:len(s) - k + j]
        code = code * 4 + np.minimum(part, 3)
        bad |= part > 3
    return code[~bad]


def fit_and_score(train_records, segments, k: int) -> float:
    """Held-out bits per base of the order-k chain (targets from position k of each segment on)."""
    counts = np.ones(4 ** (k + 1), dtype=np.float64)  # add-one smoothing
    for rec in train_records:
        counts += np.bincount(kmer_codes(rec, k), minlength=4 ** (k + 1))
    # the same for the reverse complement strand (the LMs train with RC augmentation)
    for rec in train_records:
        rc = np.where(rec[::-1] < 4, 3 - rec[::-1], rec[::-1])
        counts += np.bincount(kmer_codes(rc, k), minlength=4 ** (k + 1))
    cond = counts.reshape(-1, 4)
    logp = np.log2(cond / cond.sum(1, keepdims=True)).ravel()
    bits, n = 0.0, 0
    for seg in segments:
        codes = kmer_codes(seg, k)
        bits -= logp[codes].sum()
        n += len(codes)
    return bits / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.dna.markov_baseline", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=RAGOUT)
    p.add_argument("--val_strains", default=",".join(VAL_STRAINS))
    p.add_argument("--segment", type=int, default=16385, help="held-out segment length (the LMs' longest context + 1)")
    p.add_argument("--eval_segments", type=int, default=2)
    p.add_argument("--max_k", type=int, default=8)
    p.add_argument("--out", type=Path, default=HERE / "markov.json")
    a = p.parse_args(argv)
    train, val, _ = load_genomes(a.root, tuple(a.val_strains.split(",")), 100_000)
    segs = eval_segments(val, a.segment, a.eval_segments)
    recs = [r for g in train for r in g.records]
    rows = {}
    for k in range(a.max_k + 1):
        b = fit_and_score(recs, segs, k)
        rows[k] = {"bits_per_base": b, "perplexity": 2 ** b}
        print(f"order {k}: {b:.4f} bits/base, perplexity {2 ** b:.4f}", flush=True)
    atomic_write(a.out, json.dumps({"segments": f"{a.eval_segments} × {a.segment} per held-out genome",
                                    "orders": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
