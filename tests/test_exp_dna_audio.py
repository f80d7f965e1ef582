"""Tiny CI versions of experiments/dna and experiments/audio: the whole pipeline (data → training → evaluation
→ results.json / results.md / PNGs) in seconds on synthetic FASTA and WAV files written to tmp_path; no Debian
data packages needed. The digit part needs flite + espeak-ng: its pieces are tested on synthetic clips, and the
whole part runs only where the synthesisers are installed."""

import gzip
import json
import shutil

import numpy as np
import pytest

from mambakit.data.audio import write_audio


def write_genomes(root, rng):
    """Two 'species' (GC 35% / 60%), two strains each, one 6 kb record per strain."""
    for sp, gc in (("A.one", 0.35), ("B.two", 0.60)):
        for strain in ("s1", "s2"):
            d = root / sp / "references"
            d.mkdir(parents=True, exist_ok=True)
            p = [(1 - gc) / 2, gc / 2, gc / 2, (1 - gc) / 2]
            seq = "".join(rng.choice(list("ACGT"), 6000, p=p))
            lines = "\n".join(seq[i:i + 70] for i in range(0, len(seq), 70))
            (d / f"{strain}.fasta.gz").write_bytes(gzip.compress(f">{strain} chromosome\n{lines}\n".encode()))


def test_dna_experiment_tiny(tmp_path):
    from experiments.dna.run import main, strand_labeller
    from mambakit.data.dna import Genome

    write_genomes(tmp_path / "g", np.random.default_rng(0))
    out = tmp_path / "out"
    rc = main(["--root", str(tmp_path / "g"), "--val_strains", "s2", "--out", str(out), "--contexts", "64,128",
               "--windows", "64,128", "--d_model", "16", "--n_layer", "1", "--tokens_per_step", "256",
               "--max_steps", "2", "--pretrain_s", "0", "--finetune_s", "0", "--eval_segments", "1",
               "--eval_tokens", "1024", "--min_eval_windows", "8", "--max_eval_windows", "8", "--min_record", "1000",
               "--cls_tokens_per_step", "256", "--ckpt_dir", str(tmp_path / "ckpt"), "--warmup_stage_frac", "0.08"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["pretrain"]) == {"64", "128"}
    for r in res["pretrain"].values():
        assert r["steps"] == 2 and 1.0 < r["val_ppl"] < 8.0  # at most the vocabulary size
        assert r["tokens"] == 2 * 256  # the same tokens per step at every context
        # the position buckets cover the window (1, 2–3, …) and average back to the held-out loss
        bs = r["position_buckets"]
        assert bs[0]["lo"] == 1 and bs[-1]["hi"] == r["context"]
        sizes = np.array([b["hi"] - b["lo"] + 1 for b in bs])
        assert np.dot(sizes, [b["nats"] for b in bs]) / sizes.sum() == pytest.approx(r["val_nats"], rel=1e-6)
    # the 128 model warmed up at 64 (batch 4) for one step, then 128 (batch 2); the 64 model had no warm-up
    assert res["pretrain"]["128"]["stages"] == [{"length": 64, "batch": 4, "steps": 1},
                                                {"length": 128, "batch": 2, "steps": 1}]
    assert res["pretrain"]["64"]["stages"] == [{"length": 64, "batch": 4, "steps": 2}]
    assert (out / "loss_by_position.png").stat().st_size > 0
    assert "by position" in (out / "results.md").read_text()
    from experiments.dna.run import parse_args
    a = parse_args(["--contexts", "1024,65536"])  # the defaults: no warm-up, one step = the longest context
    assert a.warmup_stage_frac == 0.0 and a.tokens_per_step == 65536 and a.warmup_start == 1024
    with pytest.raises(SystemExit):
        parse_args(["--contexts", "1024,3000"])  # not a power of two
    assert len(res["classify"]) == 8  # 2 tasks × 2 windows × (pretrained, scratch)
    md = (out / "results.md").read_text()
    for v in res["classify"].values():
        # a count of correct windows over the 8 asked for (4 from each of the 2 held-out genomes), as reported;
        # both tasks have 2 classes (2 species here; the strand)
        correct = v["accuracy"] * v["n_eval"]
        assert v["n_eval"] == 8 and correct == pytest.approx(round(correct), abs=1e-9)
        assert v["classes"] == 2 and v["chance"] == 0.5 and f"{100 * v['accuracy']:.1f} ({v['n_eval']})" in md
    assert (out / "ppl_vs_context.png").stat().st_size > 0 and (out / "accuracy_vs_window.png").stat().st_size > 0
    assert "held-out perplexity" in (out / "results.md").read_text()
    assert (tmp_path / "ckpt" / "lm_128" / "config.json").is_file()  # the pretrained LMs are saved
    assert set(json.loads((out / "results_pretrain.json").read_text())) == {"64", "128"}
    # a classification-only rerun on the saved LMs
    out2 = tmp_path / "out2"
    assert main(["--root", str(tmp_path / "g"), "--val_strains", "s2", "--out", str(out2), "--contexts", "64",
                 "--windows", "64", "--tasks", "species", "--d_model", "16", "--n_layer", "1", "--max_steps", "1",
                 "--min_record", "1000", "--eval_tokens", "1024", "--min_eval_windows", "8", "--max_eval_windows", "8",
                 "--ckpt_dir", str(tmp_path / "ckpt"), "--skip_pretrain", str(out / "results_pretrain.json"),
                 "--freeze_backbone"]) == 0
    res2 = json.loads((out2 / "results.json").read_text())
    assert res2["pretrain"]["64"] == res["pretrain"]["64"] and len(res2["classify"]) == 2
    # the strand label: ori at the minimum of Σ(G − C), ter at its maximum; RC flips it
    rec = np.array([1] * 100 + [2] * 100, dtype=np.uint8)  # Σ(G−C) falls to −100 (ori at 99), then rises (ter 199)
    lab = strand_labeller([Genome("x", "y", [rec], ["r"])])
    assert lab(0, 0, 120, 20, False) == 1 and lab(0, 0, 120, 20, True) == 0
    assert lab(0, 0, 20, 20, False) == 0


def test_audio_waveform_tiny(tmp_path):
    from experiments.audio.run import main

    rng = np.random.default_rng(0)
    t = np.arange(8000 * 2) / 8000
    for i in range(3):
        write_audio(tmp_path / "moh" / f"t{i}.wav", 0.3 * np.sin(2 * np.pi * (220 + 110 * i) * t)
                    + 0.02 * rng.standard_normal(len(t)), 8000)
    out = tmp_path / "out"
    assert main(["--parts", "waveform", "--out", str(out), "--moh_dir", str(tmp_path / "moh"), "--held_out", "t2",
                 "--contexts", "64,128", "--d_model", "16", "--n_layer", "1", "--tokens_per_step", "256",
                 "--max_steps", "2", "--waveform_s", "0", "--eval_segments", "2"]) == 0
    res = json.loads((out / "results.json").read_text())["waveform"]
    assert {v["model"] for v in res["results"].values()} == {"mamba", "s4d"}
    p = {v["model"]: v["params"] for v in res["results"].values()}
    assert abs(p["s4d"] - p["mamba"]) / p["mamba"] < 0.1  # equal size, within 10%
    assert all(0 < v["val_bits_per_sample"] < 9 for v in res["results"].values())
    assert (out / "bits_vs_context.png").stat().st_size > 0
    assert (out / "loss_by_position.png").stat().st_size > 0
    for v in res["results"].values():
        assert v["tokens"] == 2 * 256 and v["position_buckets"][-1]["hi"] == v["context"]
    assert res["results"]["s4d/128"]["stages"][0] == {"length": 64, "batch": 4, "steps": 1}
    # a tokens-per-step that the longest context does not divide is refused
    with pytest.raises(SystemExit):
        main(["--parts", "waveform", "--contexts", "64,128", "--tokens_per_step", "192"])


def test_seq_len_warmup_schedule():
    from experiments._common import Stage, seq_len_warmup, stage_at

    st = seq_len_warmup(2**16, 2**16, 100, start=2**10, stage_frac=0.08)
    assert [s.length for s in st] == [2**k for k in range(10, 17)]  # every power of two from the start
    assert [s.batch for s in st] == [2**k for k in range(6, -1, -1)]  # the batch halves as the length doubles
    assert all(s.length * s.batch == 2**16 for s in st)  # tokens per step constant
    assert [s.steps for s in st] == [8] * 6 + [52] and sum(s.steps for s in st) == 100
    assert stage_at(st, 0).length == 2**10 and stage_at(st, 47).length == 2**15 and stage_at(st, 48).length == 2**16
    assert stage_at(st, 10**6) == st[-1]
    # no warm-up: the shortest context, a zero fraction, or no start
    assert seq_len_warmup(2**10, 2**16, 50, start=2**10, stage_frac=0.08) == [Stage(2**10, 64, 50)]
    assert seq_len_warmup(2**12, 2**14, 50, start=2**10, stage_frac=0.0) == [Stage(2**12, 4, 50)]
    assert seq_len_warmup(2**12, 2**14, 50) == [Stage(2**12, 4, 50)]
    # tiny budgets: one step per warm-up stage at least; an impossible plan is refused
    assert [s.steps for s in seq_len_warmup(2**12, 2**12, 3, start=2**10, stage_frac=0.01)] == [1, 1, 1]
    with pytest.raises(ValueError, match="leave no step"):
        seq_len_warmup(2**12, 2**12, 2, start=2**10, stage_frac=0.01)
    with pytest.raises(ValueError, match="multiple"):
        seq_len_warmup(2**14, 2**13, 10)  # a step shorter than one window
    with pytest.raises(ValueError, match="powers of two"):
        seq_len_warmup(3000, 3000 * 64, 10, start=1000, stage_frac=0.1)


def test_position_buckets():
    import torch

    from experiments._common import merge_tail, position_buckets

    # loss 1.0 after 1 token, 2.0 after 2–3, 3.0 after 4–7, 4.0 after 8–10 (a cut last bucket); 2 rows
    row = [1.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0, 4.0, 4.0, 4.0]
    b = position_buckets(torch.tensor([row, row]))
    assert [(x["lo"], x["hi"]) for x in b] == [(1, 1), (2, 3), (4, 7), (8, 10)]
    assert [x["nats"] for x in b] == [1.0, 2.0, 3.0, 4.0]
    assert b[1]["bits"] == pytest.approx(2.0 / np.log(2))
    # rows are averaged within a bucket; a length of 1 gives one bucket
    b = position_buckets(torch.tensor([[0.0, 1.0, 3.0], [2.0, 3.0, 5.0]]))
    assert [x["nats"] for x in b] == [1.0, 3.0]
    assert position_buckets(torch.tensor([0.5]))[0] == {"lo": 1, "hi": 1, "nats": 0.5, "bits": 0.5 / np.log(2)}
    # a power-of-two length: the last bucket is the second half [l/2, l], not the single position l
    b = position_buckets(torch.tensor([[1.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0, 7.0]]))
    assert [(x["lo"], x["hi"], x["nats"]) for x in b] == [(1, 1, 1.0), (2, 3, 2.0), (4, 8, 3.8)]
    # merge_tail turns the older form (…, [4, 7], [8]) into this one
    old = [{"lo": 1, "hi": 1, "nats": 1.0}, {"lo": 2, "hi": 3, "nats": 2.0}, {"lo": 4, "hi": 7, "nats": 3.0},
           {"lo": 8, "hi": 8, "nats": 7.0}]
    assert [(x["lo"], x["hi"], x["nats"]) for x in merge_tail(old)] == [(1, 1, 1.0), (2, 3, 2.0), (4, 8, 3.8)]
    assert merge_tail(b) == b
    with pytest.raises(ValueError, match="l >= 1"):
        position_buckets(torch.zeros(3, 0))


def test_eval_lm_by_position():
    """The per-position losses of eval_lm average back to its mean and match a manual computation."""
    import torch
    import torch.nn.functional as F

    from experiments._common import eval_lm
    from mambakit.config import MambaConfig
    from mambakit.model import MambaLM

    torch.manual_seed(0)
    m = MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=8))
    w = torch.randint(0, 8, (5, 17))
    mean, per_pos = eval_lm(m, w, 2, by_position=True)
    assert per_pos.shape == (16,) and mean == pytest.approx(float(per_pos.mean()))
    assert eval_lm(m, w, 3) == pytest.approx(mean, rel=1e-6)  # batch size does not matter
    with torch.no_grad():
        ref = F.cross_entropy(m(w[:, :-1]).logits.transpose(1, 2), w[:, 1:], reduction="none").mean(0)
    assert torch.allclose(per_pos.float(), ref, atol=1e-5)


def test_digit_scores_and_pieces():
    from experiments.audio import digits

    # IS / AM on known probabilities: one-hot and balanced → IS = classes, AM = 0; uniform → IS = 1
    eye = np.eye(10)
    s = digits.scores(eye, np.arange(10))
    assert s["IS"] == pytest.approx(10.0, rel=1e-6) and s["AM"] == pytest.approx(0.0, abs=1e-6)
    assert s["accuracy"] == 1.0
    u = digits.scores(np.full((5, 10), 0.1))
    assert u["IS"] == pytest.approx(1.0) and u["AM"] == pytest.approx(np.log(10), rel=1e-6)
    # fit_clip places the trimmed, normalised word 50 ms into a 1 s clip
    x = np.concatenate([np.zeros(300), 0.5 * np.sin(np.arange(1000) / 3.0), np.zeros(300)])
    c = digits.fit_clip(x)
    assert c.shape == (8000,) and np.all(c[:digits.LEAD] == 0) and abs(np.abs(c).max() - 0.9) < 1e-3
    with pytest.raises(ValueError, match="silent"):
        digits.fit_clip(np.zeros(100))


def test_digit_classifier_and_generator_on_tones(tmp_path):
    """The classifier learns 'digits' that are tones of 10 pitches; the generator samples 1-second clips."""
    from argparse import Namespace

    from experiments.audio import digits

    rng = np.random.default_rng(0)
    t = np.arange(digits.CLIP) / digits.RATE
    clips = np.stack([0.5 * np.sin(2 * np.pi * (300 + 250 * d) * t + rng.uniform(0, 6)) for d in range(10)
                      for _ in range(3)]).astype(np.float32)
    labels = np.repeat(np.arange(10), 3)
    args = Namespace(seed=0, cls_d_model=16, cls_n_layer=1, cls_batch=30, cls_s=0, cls_tokens=0, cls_lr=1e-2, max_steps=40,
                     gen_d_model=16, gen_n_layer=1, gen_batch=1, gen_s=0, gen_tokens=0, gen_lr=1e-3)
    feats = digits.features(clips)
    assert feats.shape == (30, 98, 40)
    clf = digits.train_classifier(args, feats, labels)
    assert digits.scores(digits.probs(clf, feats), labels)["accuracy"] >= 0.9
    args.max_steps = 1
    gen = digits.train_generator(args, clips[:2])
    out = digits.sample_clips(gen, [[gen.start_code] + [128] * 9] * 2, 40, seed=0)
    assert out.shape == (2, 40) and out.dtype == np.float32 and np.abs(out).max() <= 1.0


@pytest.mark.skipif(shutil.which("flite") is None or shutil.which("espeak-ng") is None,
                    reason="needs flite and espeak-ng (experiments/audio/setup.sh)")
@pytest.mark.slow
def test_audio_digits_tiny(tmp_path):
    from experiments.audio.run import main

    out = tmp_path / "out"
    assert main(["--parts", "digits", "--out", str(out), "--max_voices", "1", "--cls_d_model", "16",
                 "--cls_n_layer", "1", "--gen_d_model", "16", "--gen_n_layer", "1", "--max_steps", "2",
                 "--cls_s", "0", "--gen_s", "0", "--n_samples", "2", "--cls_batch", "8", "--gen_batch", "1"]) == 0
    res = json.loads((out / "results.json").read_text())["digits"]
    assert res["real_train"]["n"] == 10 and res["generated_unconditional"]["n"] == 2
    assert (out / "spectrograms.png").stat().st_size > 0 and len(list((out / "samples").glob("*.wav"))) == 10


def test_run_budgeted_scales_the_lr_of_chosen_parameters():
    """lr_mults: a factor 0 freezes a parameter (its AdamW update is lr · 0, weight decay included), a factor
    0.1 moves it less than the rest; the others train at the full rate."""
    import torch

    from experiments._common import run_budgeted

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    mults = {id(p): 0.0 for p in model[0].parameters()} | {id(p): 0.1 for p in model[1].parameters()}
    run_budgeted(model, lambda step: (torch.nn.functional.cross_entropy(model(x), y), 16), 0, 1e-2, max_steps=5,
                 lr_mults=mults, log_every=100)
    moved = [float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before)]
    assert moved[0] == 0 and moved[1] == 0  # the first layer: factor 0
    assert 0 < moved[2] < moved[4] / 3 and 0 < moved[3] < moved[5] / 3  # factor 0.1 against the full-rate head
