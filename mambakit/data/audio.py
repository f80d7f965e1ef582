"""Audio for Mamba's waveform modelling (paper §4.4): audio files → samples in [−1, 1] → 8-bit μ-law tokens.

    read_audio(path) -> (x, rate)        WAV, FLAC, OGG (and every format libsndfile reads) via `soundfile`
    write_audio(path, x, rate)           atomic write; the format from the extension (.wav, .flac, .ogg)
    resample(x, orig_rate, new_rate)     band-limited resampling by libsoxr (`soxr`, its "HQ" quality), any ratio
    mu_law_encode(x) / mu_law_decode(q)  the 256-level μ-law companding of WaveNet / SaShiMi / the paper
    spectrogram(x, rate)                 log-power STFT (for plots); log_mel_spectrogram for classifiers
    AudioWindows(arrays, l)              random token windows (b, l + 1) over a set of clips

File I/O and resampling need the optional extra `pip install mambakit[audio]` (soundfile, soxr); without it
they raise an ImportError that says so. Bad files get a ValueError naming the file: not a format libsndfile
reads, or no samples. A truncated file is read as far as it goes (libsndfile's behaviour).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .._io import atomic_write

AUDIO_INSTALL = "pip install mambakit[audio]  (or: pip install soundfile soxr)"
# the container written for each extension, and its default sample encoding (soundfile's names)
FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS")}


def _soundfile():
    try:
        import soundfile
    except (ImportError, OSError):  # OSError: the package is there but its libsndfile cannot be loaded
        raise ImportError(f"reading and writing audio files needs soundfile: {AUDIO_INSTALL}") from None
    return soundfile


# ---------------------------------------------------------------------------------------------- files
def read_audio(path: str | os.PathLike, mono: bool = True) -> tuple[np.ndarray, int]:
    """Reads an audio file. Returns (samples float32 in [−1, 1], sample rate). mono=True averages the
    channels into shape (n,); mono=False keeps (n, channels)."""
    sf = _soundfile()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file {str(path)!r} does not exist")
    try:
        x, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (n, channels)
    except sf.LibsndfileError as e:
        raise ValueError(f"{path}: not a readable audio file (WAV, FLAC, OGG, ...): {e}") from None
    if len(x) == 0:
        raise ValueError(f"{path}: the audio file holds no samples")
    return (x.mean(axis=1) if mono else x), int(rate)


def write_audio(path: str | os.PathLike, x, rate: int, subtype: str | None = None) -> None:
    """Writes x (n,) or (n, channels), float in [−1, 1] (clipped) or integer PCM (int16 / int32, full scale),
    as WAV, FLAC or OGG Vorbis by the file's extension; `subtype` is soundfile's sample encoding (default
    FORMATS: 16-bit PCM for WAV and FLAC; e.g. "PCM_24", "FLOAT"). The file appears whole or not at all."""
    sf = _soundfile()
    ext = Path(path).suffix.lower()
    if ext not in FORMATS:
        raise ValueError(f"write_audio writes {sorted(FORMATS)} files (chosen by the extension), got {str(path)!r}")
    container, default = FORMATS[ext]
    subtype = subtype or default
    if not sf.check_format(container, subtype):
        raise ValueError(f"{container} files cannot hold subtype {subtype!r}; valid: "
                         f"{sorted(sf.available_subtypes(container))}")
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise ValueError(f"rate must be a positive int (samples per second), got {rate!r}")
    x = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if x.ndim not in (1, 2) or x.shape[0] == 0:
        raise ValueError(f"audio must have shape (n,) or (n, channels) with n > 0, got {x.shape}")
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise ValueError("audio contains NaN or infinite samples")
        x = np.clip(x, -1.0, 1.0)
    elif x.dtype not in (np.int16, np.int32):
        raise TypeError(f"audio must be float, int16 or int32 samples, got dtype {x.dtype}")
    # soundfile picks the container from the name's extension, which the temporary file lacks: name it
    atomic_write(path, lambda tmp: sf.write(str(tmp), x, int(rate), subtype=subtype, format=container))


# ------------------------------------------------------------------------------------------ resampling
def resample(x, orig_rate: int, new_rate: int) -> np.ndarray:
    """Band-limited resampling of x (n,) from orig_rate to new_rate by libsoxr (module doc): anti-aliased when
    downsampling, linear phase and delay-compensated, so the output lines up with the input in time;
    round(n · new_rate / orig_rate) samples, float32."""
    for name, r in (("orig_rate", orig_rate), ("new_rate", new_rate)):
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r <= 0:
            raise ValueError(f"{name} must be a positive int, got {r!r}")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"resample takes mono audio (n,), got shape {x.shape}")
    if orig_rate == new_rate:
        return x.astype(np.float32)
    try:
        import soxr
    except ImportError:
        raise ImportError(f"resampling needs soxr: {AUDIO_INSTALL}") from None
    return soxr.resample(x, int(orig_rate), int(new_rate), quality="HQ").astype(np.float32)


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
