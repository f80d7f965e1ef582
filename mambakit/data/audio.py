"""Audio for Mamba's waveform modelling (paper §4.4): WAV files → samples in [−1, 1] → 8-bit μ-law tokens.

    read_wav(path) -> (x, rate)          PCM WAV (8/16/24/32-bit, any channels) via the stdlib `wave` module
    write_wav(path, x, rate)             atomic write (temporary file + os.replace), 8/16/24/32-bit PCM
    resample(x, orig_rate, new_rate)     band-limited (Kaiser-windowed sinc) resampling, any rational ratio
    mu_law_encode(x) / mu_law_decode(q)  the 256-level μ-law companding of WaveNet / SaShiMi / the paper
    spectrogram(x, rate)                 log-power STFT (for plots); log_mel_spectrogram for classifiers
    AudioWindows(arrays, l)              random token windows (b, l + 1) over a set of clips

Bad files get a ValueError naming the file and the problem: not a RIFF/WAVE file, a non-PCM format
(e.g. 32-bit float), an unsupported sample width, a header that promises more frames than the file holds
(truncated download), an empty file.
"""

from __future__ import annotations

import math
import os
import wave
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .._io import atomic_write

SAMPLE_WIDTHS = (1, 2, 3, 4)  # bytes per sample that PCM WAV files use; 1 is unsigned, the others signed


# ------------------------------------------------------------------------------------------------ WAV
def read_wav(path: str | os.PathLike, mono: bool = True) -> tuple[np.ndarray, int]:
    """Reads a PCM WAV file. Returns (samples float32 in [−1, 1], sample rate). mono=True averages the
    channels into shape (n,); mono=False keeps (n, channels)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"WAV file {str(path)!r} does not exist")
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate, n_frames = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            raw = w.readframes(n_frames)
    except wave.Error as e:
        msg = str(e)
        if "unknown format" in msg:
            msg += " (only integer PCM WAV is supported: convert float or compressed WAV to 16-bit PCM)"
        raise ValueError(f"{path}: not a readable PCM WAV file: {msg}") from None
    except EOFError:
        raise ValueError(f"{path}: the WAV header is truncated (file of {path.stat().st_size} bytes)") from None
    if width not in SAMPLE_WIDTHS:
        raise ValueError(f"{path}: sample width {width} bytes is not supported (PCM WAV uses 1, 2, 3 or 4)")
    if rate <= 0 or channels <= 0:
        raise ValueError(f"{path}: invalid header (sample rate {rate}, {channels} channels)")
    frame = channels * width
    if len(raw) < n_frames * frame:
        raise ValueError(f"{path}: truncated: the header says {n_frames} frames, the file holds "
                         f"{len(raw) // frame} (+{len(raw) % frame} bytes)")
    if n_frames == 0:
        raise ValueError(f"{path}: the WAV file holds no samples")
    x = _pcm_to_float(raw, width).reshape(n_frames, channels)
    return (x.mean(axis=1) if mono else x), rate


def _pcm_to_float(raw: bytes, width: int) -> np.ndarray:
    if width == 1:  # 8-bit WAV is unsigned, centred on 128
        return (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 3:  # 24-bit little-endian: widen to int32 by placing the 3 bytes in the top of 4
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3)
        wide = np.zeros((len(b), 4), dtype=np.uint8)
        wide[:, 1:] = b
        return wide.view("<i4")[:, 0].astype(np.float32) / 2.0**31
    dtype = {2: "<i2", 4: "<i4"}[width]
    return np.frombuffer(raw, dtype=dtype).astype(np.float32) / float(2 ** (8 * width - 1))


def write_wav(path: str | os.PathLike, x, rate: int, sample_width: int = 2) -> None:
    """Writes x (n,) or (n, channels), float in [−1, 1] (clipped) or integer PCM already at this width,
    as PCM WAV; the file appears whole or not at all (temporary file + os.replace)."""
    if sample_width not in SAMPLE_WIDTHS:
        raise ValueError(f"sample_width must be one of {SAMPLE_WIDTHS} bytes, got {sample_width}")
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise ValueError(f"rate must be a positive int (samples per second), got {rate!r}")
    x = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if x.ndim not in (1, 2) or x.shape[0] == 0:
        raise ValueError(f"audio must have shape (n,) or (n, channels) with n > 0, got {x.shape}")
    x2 = x.reshape(x.shape[0], -1)
    if np.issubdtype(x2.dtype, np.floating):
        if not np.isfinite(x2).all():
            raise ValueError("audio contains NaN or infinite samples")
        full = float(2 ** (8 * sample_width - 1))
        ints = np.clip(np.round(x2.astype(np.float64) * full), -full, full - 1).astype(np.int64)
    elif np.issubdtype(x2.dtype, np.integer):
        ints = x2.astype(np.int64)
        lo, hi = -(2 ** (8 * sample_width - 1)), 2 ** (8 * sample_width - 1) - 1
        if ints.min() < lo or ints.max() > hi:
            raise ValueError(f"integer samples outside the {8 * sample_width}-bit range [{lo}, {hi}]")
    else:
        raise TypeError(f"audio must be float or integer samples, got dtype {x2.dtype}")
    if sample_width == 1:
        data = (ints + 128).astype(np.uint8).tobytes()
    elif sample_width == 3:
        data = ints.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    else:
        data = ints.astype({2: "<i2", 4: "<i4"}[sample_width]).tobytes()
    def write(tmp: Path) -> None:
        with wave.open(str(tmp), "wb") as w:
            w.setnchannels(x2.shape[1])
            w.setsampwidth(sample_width)
            w.setframerate(int(rate))
            w.writeframes(data)

    atomic_write(path, write)


# ------------------------------------------------------------------------------------------ resampling
def resample(x, orig_rate: int, new_rate: int, zero_crossings: int = 16, beta: float = 8.6) -> np.ndarray:
    """Band-limited resampling of x (n,) from orig_rate to new_rate: each output sample is the input
    convolved with a Kaiser-windowed sinc low-pass at min(orig, new)/2 (anti-aliasing when downsampling),
    evaluated at the output time. `zero_crossings` sinc lobes each side; beta = 8.6 gives ≈ −90 dB side lobes."""
    for name, r in (("orig_rate", orig_rate), ("new_rate", new_rate)):
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r <= 0:
            raise ValueError(f"{name} must be a positive int, got {r!r}")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"resample takes mono audio (n,), got shape {x.shape}")
    if orig_rate == new_rate:
        return x.astype(np.float32)
    g = math.gcd(orig_rate, new_rate)
    up, down = new_rate // g, orig_rate // g
    cutoff = min(1.0, up / down)  # of the input's Nyquist frequency
    half = int(math.ceil(zero_crossings / cutoff))  # filter half-width in input samples
    n_out = int(math.ceil(len(x) * up / down))
    xp = np.concatenate([np.zeros(half), x, np.zeros(half + 1)])
    k = np.arange(-half + 1, half + 1)  # (taps,)
    out = np.empty(n_out, dtype=np.float64)
    chunk = max(1, 2**20 // len(k))
    for s in range(0, n_out, chunk):
        m = np.arange(s, min(n_out, s + chunk))  # output indices
        num = m * down  # output time in units of 1/up input samples (exact integers)
        base = num // up  # (c,) the input sample at or before the output time
        frac = (num - base * up) / up  # (c,) in [0, 1)
        idx = base[:, None] + k[None, :]  # (c, taps) input samples around it
        dist = frac[:, None] - k[None, :]  # (c, taps) distance in input samples
        taper = np.clip(1.0 - (dist / half) ** 2, 0.0, None)
        h = cutoff * np.sinc(cutoff * dist) * np.i0(beta * np.sqrt(taper)) / np.i0(beta)
        out[m] = (xp[idx + half] * h).sum(1)
    return out.astype(np.float32)


# ----------------------------------------------------------------------------------------------- μ-law
def mu_law_encode(x, bits: int = 8):
    """x in [−1, 1] (clipped) → integer codes in [0, 2^bits): q = round((F(x) + 1)/2 · (2^bits − 1)) with
    F(x) = sign(x)·ln(1 + μ|x|)/ln(1 + μ), μ = 2^bits − 1 (WaveNet's companding; the paper's audio is 8-bit
    μ-law, 256 tokens). Takes and returns np.ndarray or Tensor (int64)."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in [1, 16], got {bits}")
    mu = 2**bits - 1
    if isinstance(x, Tensor):
        if not bool(torch.isfinite(x).all()):
            raise ValueError("audio contains NaN or infinite samples")
        x = x.double().clamp(-1, 1)  # float64 as the numpy path, so both give the same codes
        f = torch.sign(x) * torch.log1p(mu * x.abs()) / math.log1p(mu)
        return torch.round((f + 1) / 2 * mu).long()
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError("audio contains NaN or infinite samples")
    x = np.clip(x, -1, 1)
    f = np.sign(x) * np.log1p(mu * np.abs(x)) / math.log1p(mu)
    return np.round((f + 1) / 2 * mu).astype(np.int64)


def mu_law_decode(q, bits: int = 8):
    """The inverse of mu_law_encode: codes in [0, 2^bits) → samples in [−1, 1] (float32)."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in [1, 16], got {bits}")
    mu = 2**bits - 1
    is_t = isinstance(q, Tensor)
    qa = q.detach().cpu().numpy() if is_t else np.asarray(q)
    if qa.size and (qa.min() < 0 or qa.max() > mu):
        raise ValueError(f"μ-law codes must be in [0, {mu}], got values in [{qa.min()}, {qa.max()}]")
    f = 2 * qa.astype(np.float64) / mu - 1
    x = (np.sign(f) * np.expm1(np.abs(f) * math.log1p(mu)) / mu).astype(np.float32)
    return torch.from_numpy(x) if is_t else x


# ----------------------------------------------------------------------------------------- spectrograms
def spectrogram(x, rate: int, win_s: float = 0.025, hop_s: float = 0.01) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Log-power STFT with a Hann window: returns (S dB (freq, frames), freqs Hz, times s)."""
    x = np.asarray(x, dtype=np.float64)
    n_fft = int(round(win_s * rate))
    hop = max(1, int(round(hop_s * rate)))
    if len(x) < n_fft:
        x = np.pad(x, (0, n_fft - len(x)))
    n_frames = 1 + (len(x) - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(n_frames)[:, None]  # (frames, n_fft)
    frames = x[idx] * np.hanning(n_fft)[None, :]
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # (frames, n_fft // 2 + 1)
    s_db = 10 * np.log10(power.T + 1e-10)
    return s_db, np.fft.rfftfreq(n_fft, 1 / rate), (np.arange(n_frames) * hop + n_fft / 2) / rate


def _mel(f):
    return 2595.0 * np.log10(1.0 + f / 700.0)


def log_mel_spectrogram(x, rate: int, n_mels: int = 40, win_s: float = 0.025, hop_s: float = 0.01) -> np.ndarray:
    """Log mel-filterbank energies (frames, n_mels), float32: the usual speech-classifier features."""
    s_db, freqs, _ = spectrogram(x, rate, win_s, hop_s)
    power = 10 ** (s_db / 10)  # (freq, frames)
    edges = np.linspace(_mel(0.0), _mel(rate / 2), n_mels + 2)
    hz = 700.0 * (10 ** (edges / 2595.0) - 1)
    fb = np.zeros((n_mels, len(freqs)))
    for i in range(n_mels):
        lo, mid, hi = hz[i], hz[i + 1], hz[i + 2]
        fb[i] = np.clip(np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)), 0, None)
    return np.log(fb @ power + 1e-6).T.astype(np.float32)


# --------------------------------------------------------------------------------------------- windows
class AudioWindows:
    """Random windows of length + 1 tokens (the model reads the first l, predicts the last l) from a set of
    token arrays (one per clip / track); a window never crosses a clip's end. Clips are picked with
    probability proportional to their number of window starts, so every sample is equally likely."""

    def __init__(self, arrays: Sequence[np.ndarray], length: int):
        if length < 1:
            raise ValueError(f"window length must be >= 1, got {length}")
        self.arrays = [np.asarray(a) for a in arrays]
        self.length = length
        self._ok = [i for i, a in enumerate(self.arrays) if len(a) >= length + 1]
        if not self._ok:
            longest = max((len(a) for a in self.arrays), default=0)
            raise ValueError(f"no clip holds a window of {length + 1} samples (the longest has {longest})")
        starts = np.array([len(self.arrays[i]) - length for i in self._ok], dtype=np.float64)
        self._p = starts / starts.sum()

    def sample(self, batch_size: int, rng: np.random.Generator) -> Tensor:
        """(b, l + 1) int64 token windows drawn with rng."""
        picks = rng.choice(len(self._ok), size=batch_size, p=self._p)
        out = np.empty((batch_size, self.length + 1), dtype=np.int64)
        for i, k in enumerate(picks):
            a = self.arrays[self._ok[k]]
            s = int(rng.integers(0, len(a) - self.length))
            out[i] = a[s:s + self.length + 1]
        return torch.from_numpy(out)

    def tiles(self, max_windows: int | None = None) -> Tensor:
        """Consecutive non-overlapping windows (n, l + 1) over every clip, for evaluation (the same windows
        at every call), up to max_windows spread evenly."""
        wins = [a[s:s + self.length + 1] for a in self.arrays
                for s in range(0, len(a) - self.length, self.length)]
        if max_windows and len(wins) > max_windows:
            pick = np.linspace(0, len(wins) - 1, max_windows).round().astype(int)
            wins = [wins[i] for i in pick]
        return torch.from_numpy(np.stack(wins).astype(np.int64))
