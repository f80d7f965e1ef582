"""Spoken digits (SC09-like, paper §4.4.2 in spirit): synthesised clips → a Mamba digit classifier → a Mamba
waveform generator whose unconditional and prompt-continued clips the classifier scores (IS / AM).

Clips: "zero" … "nine" spoken by offline speech synthesisers (flite's 4 voices, espeak-ng voice variants ×
accents × speeds × pitches), resampled to 8 kHz, trimmed, placed 50 ms into a 1-second clip. Voices are split:
the classifier and the generator train on some voices, and are tested on voices they never heard. The real
speaker's digits (asterisk's en_US_f_Allison/digits/0..9.wav) are an extra out-of-distribution check.

Classifier: log-mel frames (100 × 40 per clip) → Linear → Mamba backbone (inputs_embeds) → mean-pooled head
(`mambakit.heads.SequenceClassifier`); the paper's SC09 metrics use a ResNeXt on spectrograms for the same role.
Scores from its class probabilities p(y|x) over a set of clips (SaShiMi / the paper's Table 4 metrics):
    IS = exp(E_x KL(p(y|x) ‖ p(y)))            higher: confident and diverse (10 at most)
    AM = KL(p_ref(y) ‖ p(y)) + E_x H(p(y|x))   lower: confident, with the reference (uniform) class balance
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from mambakit.config import MambaConfig
from mambakit.data.audio import (log_mel_spectrogram, mu_law_decode, mu_law_encode, read_audio, resample,
                                 write_audio)
from mambakit.generate import generate
from mambakit.heads import SequenceClassifier
from mambakit.model import MambaLM
from mambakit.train import next_token_loss

from experiments._common import eval_lm, pyplot, run_budgeted, save_figure

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ALLISON_DIGITS = Path("/usr/share/asterisk/sounds/en_US_f_Allison/digits")
RATE = 8000
CLIP = RATE  # 1 s
LEAD = 400  # 50 ms of silence before the word
# voices: (engine, voice, speed words/min, pitch 0..99); train and test voices never overlap
_ESPEAK_TRAIN = [f"en-us+{v}" for v in ("m1", "m2", "m3", "m4", "f1", "f2", "f3")] + ["en-gb+m1", "en-gb+f1", "en-029+m5"]
_ESPEAK_TEST = ["en-us+m6", "en-us+f4", "en-gb-scotland+m7", "en-gb+f5"]
TRAIN_VOICES = [("flite", v, 0, 0) for v in ("slt", "awb", "rms")] + [
    ("espeak", v, s, p) for v in _ESPEAK_TRAIN for s in (140, 185) for p in (35, 65)]
TEST_VOICES = [("flite", "kal16", 0, 0)] + [("espeak", v, s, p) for v in _ESPEAK_TEST for s in (150, 175)
                                             for p in (40, 60)]


# ------------------------------------------------------------------------------------------------ data
def fit_clip(x: np.ndarray, threshold: float = 0.02) -> np.ndarray:
    """Trims leading/trailing silence (|x| below threshold · peak), scales the peak to 0.9, and places the
    word LEAD samples into a CLIP-long clip (cut at the end if longer)."""
    peak = float(np.abs(x).max())
    if peak == 0:
        raise ValueError("silent clip")
    loud = np.flatnonzero(np.abs(x) > threshold * peak)
    x = x[loud[0]:loud[-1] + 1] * (0.9 / peak)
    out = np.zeros(CLIP, dtype=np.float32)
    n = min(len(x), CLIP - LEAD)
    out[LEAD:LEAD + n] = x[:n]
    return out


def synthesize(voices, tmp: Path) -> tuple[np.ndarray, np.ndarray]:
    """(clips (n, CLIP) float32 at 8 kHz, labels (n,)) for every voice × digit."""
    for tool in ("flite", "espeak-ng"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(f"{tool} is not installed (run experiments/audio/setup.sh)")
    clips, labels = [], []
    for i, (engine, voice, speed, pitch) in enumerate(voices):
        for d, word in enumerate(WORDS):
            f = tmp / f"{i}_{d}.wav"
            if engine == "flite":
                cmd = ["flite", "-voice", voice, "-t", word, "-o", str(f)]
            else:
                cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(f), word]
            subprocess.run(cmd, check=True, capture_output=True, timeout=60)
            x, r = read_audio(f)
            clips.append(fit_clip(resample(x, r, RATE)))
            labels.append(d)
    return np.stack(clips), np.array(labels)


def allison_digits() -> tuple[np.ndarray, np.ndarray] | None:
    """The real speaker's 0..9 (8 kHz recordings), or None when the package is not installed."""
    files = [ALLISON_DIGITS / f"{d}.wav" for d in range(10)]
    if not all(f.is_file() for f in files):
        return None
    clips = []
    for f in files:
        x, r = read_audio(f)
        clips.append(fit_clip(resample(x, r, RATE)))
    return np.stack(clips), np.arange(10)


# ------------------------------------------------------------------------------------------ classifier
class DigitClassifier(nn.Module):
    """log-mel frames (b, frames, n_mels) → normalise → Linear → SequenceClassifier (inputs_embeds, mean)."""

    def __init__(self, n_mels: int, d_model: int, n_layer: int, mean: np.ndarray, std: np.ndarray):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        self.proj = nn.Linear(n_mels, d_model)
        # vocab_size is unused (the features go in as inputs_embeds); 8 keeps the unused embedding small
        self.clf = SequenceClassifier(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=8), 10, pooling="mean")

    def forward(self, feats: torch.Tensor, labels: torch.Tensor | None = None):
        return self.clf(inputs_embeds=self.proj((feats - self.mean) / self.std), labels=labels)


def features(clips: np.ndarray) -> np.ndarray:
    return np.stack([log_mel_spectrogram(c, RATE, n_mels=40) for c in clips])  # (n, frames, 40)


def train_classifier(args, feats: np.ndarray, labels: np.ndarray) -> DigitClassifier:
    torch.manual_seed(args.seed)
    flat = feats.reshape(-1, feats.shape[-1])
    model = DigitClassifier(feats.shape[-1], args.cls_d_model, args.cls_n_layer, flat.mean(0), flat.std(0) + 1e-5)
    rng = np.random.default_rng(args.seed)
    X, Y = torch.from_numpy(feats), torch.from_numpy(labels)

    def loss_fn(step):
        idx = rng.integers(0, len(X), args.cls_batch)
        x = X[idx].clone()
        # augmentation: a random time shift of up to ±15 frames (150 ms) and a random gain (±6 dB in log power)
        shift = int(rng.integers(-15, 16))
        x = torch.roll(x, shift, dims=1)
        x = x + float(rng.uniform(-0.7, 0.7))
        return model(x, labels=Y[idx]).loss, x.shape[0] * x.shape[1]

    run_budgeted(model, loss_fn, args.cls_s, args.cls_lr, max_steps=args.max_steps, label="digit classifier",
                 log_every=20, budget_tokens=args.cls_tokens)
    return model


@torch.no_grad()
def probs(model: DigitClassifier, feats: np.ndarray, batch: int = 64) -> np.ndarray:
    model.eval()
    out = [torch.softmax(model(torch.from_numpy(feats[i:i + batch])).logits, -1) for i in range(0, len(feats), batch)]
    return torch.cat(out).numpy().astype(np.float64)


def scores(p: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """IS, AM, mean confidence and class histogram of a set of clips (and accuracy given labels)."""
    eps = 1e-12
    marginal = p.mean(0)
    kl = (p * (np.log(p + eps) - np.log(marginal + eps))).sum(1)
    ent = -(p * np.log(p + eps)).sum(1).mean()
    ref = np.full(p.shape[1], 1 / p.shape[1])
    out = {"IS": float(np.exp(kl.mean())), "AM": float((ref * (np.log(ref) - np.log(marginal + eps))).sum() + ent),
           "mean_max_prob": float(p.max(1).mean()), "n": int(len(p)),
           "class_histogram": np.bincount(p.argmax(1), minlength=p.shape[1]).tolist()}
    if labels is not None:
        out["accuracy"] = float((p.argmax(1) == labels).mean())
    return out


# ------------------------------------------------------------------------------------------- generator
def train_generator(args, clips: np.ndarray) -> MambaLM:
    """A μ-law MambaLM on whole clips: token 0 of each row is the code of silence (the 'start' the
    unconditional samples are prompted with), then the clip's 8000 codes."""
    torch.manual_seed(args.seed)
    model = MambaLM(MambaConfig(d_model=args.gen_d_model, n_layer=args.gen_n_layer, vocab_size=256))
    start = int(mu_law_encode(np.zeros(1))[0])
    tokens = torch.from_numpy(np.concatenate([np.full((len(clips), 1), start), mu_law_encode(clips)], 1))  # (n, 1 + CLIP)
    rng = np.random.default_rng(args.seed)

    def loss_fn(step):
        idx = rng.integers(0, len(tokens), args.gen_batch)
        return next_token_loss(model, tokens[idx]), args.gen_batch * CLIP

    print(f"[digits] generator: {model.num_parameters():,} params, batch {args.gen_batch} clips",
          file=sys.stderr, flush=True)
    model.gen_run = run_budgeted(model, loss_fn, args.gen_s, args.gen_lr, max_steps=args.max_steps,
                                 label="generator", log_every=10, budget_tokens=args.gen_tokens)
    model.start_code = start
    return model


def sample_clips(model: MambaLM, prompts: list[list[int]], n_total: int, seed: int) -> np.ndarray:
    """Continues every prompt to n_total codes with pure sampling (temperature 1, as the paper's SC09
    samples), returns the clips decoded from μ-law, (b, n_total) float32."""
    n_new = n_total - len(prompts[0]) + 1  # the prompts start with the start code, not a sample
    out = generate(model, prompts, n_new, temperature=1.0, seed=seed, eos_token_id=[])
    seqs = [p[1:] + list(s) for p, s in zip(prompts, out.tokens.tolist())]
    return mu_law_decode(np.array([s[:n_total] for s in seqs]))


def spectrogram_grid(rows: list[tuple[str, np.ndarray]], png: Path) -> None:
    from mambakit.data.audio import spectrogram

    plt = pyplot()
    cols = 4
    fig, axes = plt.subplots(len(rows), cols, figsize=(3 * cols, 2.2 * len(rows)), squeeze=False)
    for r, (title, clips) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            if c < len(clips):
                s, f, t = spectrogram(clips[c], RATE)
                ax.imshow(s, origin="lower", aspect="auto", extent=[t[0], t[-1], f[0], f[-1]], vmin=-80, vmax=20,
                          cmap="magma")
            ax.set_xticks([]) if r < len(rows) - 1 else ax.set_xlabel("s")
            ax.set_yticks([]) if c else ax.set_ylabel(title, fontsize=8)
    fig.tight_layout()
    save_figure(fig, png, dpi=100)


def run(args, out: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        train_x, train_y = synthesize(TRAIN_VOICES[:args.max_voices or None], Path(tmp))
        test_x, test_y = synthesize(TEST_VOICES[:args.max_voices or None], Path(tmp))
    print(f"[digits] {len(train_x)} training clips ({len(train_x) // 10} voices), {len(test_x)} test clips "
          f"({len(test_x) // 10} held-out voices)", file=sys.stderr, flush=True)
    clf = train_classifier(args, features(train_x), train_y)
    res = {"classifier_params": sum(p.numel() for p in clf.parameters()),
           "real_train": scores(probs(clf, features(train_x)), train_y),
           "real_test_voices": scores(probs(clf, features(test_x)), test_y)}
    allison = allison_digits()
    if allison is not None:
        res["real_allison"] = scores(probs(clf, features(allison[0])), allison[1])
    gen = train_generator(args, train_x)
    # held-out voices' clips, one per digit, for NLL and continuation prompts
    start = gen.start_code
    test_tok = np.concatenate([np.full((len(test_x), 1), start), mu_law_encode(test_x)], 1)
    res["generator"] = {"params": gen.num_parameters(), **{k: v for k, v in gen.gen_run.items() if k != "loss_curve"},
                        "test_bits_per_sample": eval_lm(gen, torch.from_numpy(test_tok), 8) / math.log(2)}
    uncond = sample_clips(gen, [[start]] * args.n_samples, CLIP, args.seed)
    res["generated_unconditional"] = scores(probs(clf, features(uncond)))
    pick = [int(np.flatnonzero(test_y == d)[0]) for d in range(10)]  # one held-out clip per digit
    n_prompt = LEAD + int(args.prompt_s * RATE)
    prompts = [[start] + test_tok[i, 1:n_prompt + 1].tolist() for i in pick]
    cont = sample_clips(gen, prompts, CLIP, args.seed + 1000)
    res["generated_continuations"] = scores(probs(clf, features(cont)), test_y[pick])
    res["prompt_only"] = scores(probs(clf, features(np.pad(test_x[pick][:, :n_prompt], ((0, 0), (0, CLIP - n_prompt))))),
                                test_y[pick])
    res["prompt_seconds_of_speech"] = args.prompt_s
    samples = out / "samples"
    for i in range(min(4, len(uncond))):
        write_audio(samples / f"unconditional_{i}.wav", uncond[i], RATE)
    for i in range(min(4, len(cont))):
        d = int(test_y[pick[i]])
        write_audio(samples / f"continued_{WORDS[d]}.wav", cont[i], RATE)
        write_audio(samples / f"real_{WORDS[d]}.wav", test_x[pick[i]], RATE)
    spectrogram_grid([("real (held-out voices)", test_x[pick][:4]), ("unconditional", uncond[:4]),
                      (f"continued after {args.prompt_s:g} s", cont[:4])], out / "spectrograms.png")
    return res
