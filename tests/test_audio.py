"""mambakit.data.audio: WAV / FLAC / OGG through soundfile, resampling through soxr (against the analytic
signal), bad files, the missing-extra error, μ-law, spectrograms, windows."""

import sys

import numpy as np
import pytest
import torch

from mambakit.data.audio import (AudioWindows, log_mel_spectrogram, mu_law_decode, mu_law_encode, read_audio,
                                 resample, spectrogram, write_audio)

needs_audio = pytest.mark.skipif(
    not all(__import__("importlib").util.find_spec(m) for m in ("soundfile", "soxr")),
    reason="audio I/O and resampling need the extra: pip install mambakit[audio]")


def tone(rate=8000, f=440.0, s=0.25, amp=0.5):
    """amp · sin(2π f t) sampled at `rate` for s seconds: the analytic signal at any rate."""
    t = np.arange(int(rate * s)) / rate
    return (amp * np.sin(2 * np.pi * f * t)).astype(np.float32)


# --------------------------------------------------------------------------------------------------- files
@needs_audio
@pytest.mark.parametrize("subtype, bits", [("PCM_U8", 8), ("PCM_16", 16), ("PCM_24", 24), ("PCM_32", 32)])
def test_wav_round_trip_at_every_pcm_width(tmp_path, subtype, bits):
    x = tone()
    write_audio(tmp_path / "a.wav", x, 8000, subtype=subtype)
    y, rate = read_audio(tmp_path / "a.wav")
    assert rate == 8000 and y.dtype == np.float32 and y.shape == x.shape
    assert np.abs(y - x).max() <= 2.0 ** (1 - bits) + 1e-7  # one quantisation step
    assert not list(tmp_path.glob("*.tmp"))


@needs_audio
def test_flac_round_trip_is_lossless_and_ogg_keeps_the_tone(tmp_path):
    x = tone(16000, 440.0, 0.5)
    write_audio(tmp_path / "a.flac", x, 16000, subtype="PCM_24")
    y, rate = read_audio(tmp_path / "a.flac")
    assert rate == 16000 and y.shape == x.shape
    assert np.abs(y - x).max() <= 2.0 ** -23 + 1e-7  # lossless: only the 24-bit quantisation
    i16 = np.round(x * 32767).astype(np.int16)  # integer samples are written as they are
    write_audio(tmp_path / "b.flac", i16, 16000)
    y16, _ = read_audio(tmp_path / "b.flac")
    np.testing.assert_array_equal(np.round(y16 * 32768).astype(np.int16), i16)
    write_audio(tmp_path / "c.ogg", x, 16000)  # Vorbis is lossy: the tone survives, the samples do not
    yo, rate = read_audio(tmp_path / "c.ogg")
    assert rate == 16000 and len(yo) == len(x)
    s, f, _ = spectrogram(yo, 16000)
    assert abs(f[s.mean(1).argmax()] - 440.0) <= 40
    assert np.sqrt(np.mean((yo - x) ** 2)) < 0.05  # within 10% of the tone's RMS (0.35)


@needs_audio
def test_stereo_and_mono(tmp_path):
    st = np.stack([tone(), -tone()], 1)
    write_audio(tmp_path / "s.wav", st, 16000)
    both, _ = read_audio(tmp_path / "s.wav", mono=False)
    assert both.shape == st.shape
    mono, _ = read_audio(tmp_path / "s.wav")
    assert np.abs(mono).max() < 1e-4


@needs_audio
def test_bad_files_and_arguments(tmp_path):
    (tmp_path / "txt.wav").write_bytes(b"hello, not audio at all" * 4)
    with pytest.raises(ValueError, match="txt.wav: not a readable audio file"):
        read_audio(tmp_path / "txt.wav")
    with pytest.raises(FileNotFoundError):
        read_audio(tmp_path / "absent.flac")
    write_audio(tmp_path / "a.wav", tone(), 8000)
    data = (tmp_path / "a.wav").read_bytes()
    (tmp_path / "hdr.wav").write_bytes(data[:44])  # a header and no samples
    with pytest.raises(ValueError, match="no samples|not a readable"):
        read_audio(tmp_path / "hdr.wav")
    with pytest.raises(ValueError, match=r"\['.flac', '.ogg', '.wav'\]"):
        write_audio(tmp_path / "a.mp4", tone(), 8000)
    with pytest.raises(ValueError, match="cannot hold subtype 'VORBIS'"):
        write_audio(tmp_path / "b.wav", tone(), 8000, subtype="VORBIS")
    with pytest.raises(ValueError, match="NaN"):
        write_audio(tmp_path / "b.wav", np.array([0.0, np.nan]), 8000)
    with pytest.raises(ValueError, match="rate must be a positive int"):
        write_audio(tmp_path / "b.wav", tone(), 0)
    with pytest.raises(TypeError, match="int16 or int32"):
        write_audio(tmp_path / "b.wav", np.array([1, 2], dtype=np.int64), 8000)
    assert not (tmp_path / "b.wav").exists()


def test_missing_extra_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "soundfile", None)  # import soundfile now raises ImportError
    monkeypatch.setitem(sys.modules, "soxr", None)
    with pytest.raises(ImportError, match=r"pip install mambakit\[audio\]"):
        read_audio(tmp_path / "a.wav")
    with pytest.raises(ImportError, match=r"pip install mambakit\[audio\]"):
        write_audio(tmp_path / "a.flac", tone(), 8000)
    with pytest.raises(ImportError, match=r"pip install mambakit\[audio\]"):
        resample(tone(), 8000, 16000)


# ---------------------------------------------------------------------------------------------- resampling
@needs_audio
def test_resample_matches_the_analytic_tone_and_removes_aliases():
    # a 440 Hz tone resampled must equal the same tone sampled at the new rate; the bounds are a few times the
    # errors measured with soxr 1.1 "HQ" (2e-7 down, 4e-7 up), far below the 16-bit step (3e-5)
    x = tone(16000, 440.0, 0.5)
    y = resample(x, 16000, 8000)
    assert len(y) == 4000 and y.dtype == np.float32
    assert np.abs(y[100:-100] - tone(8000, 440.0, 0.5)[100:-100]).max() < 2e-6
    hi = tone(16000, 6000.0, 0.5)  # above the new Nyquist (4 kHz): filtered out, not folded to 2 kHz
    assert np.abs(resample(hi, 16000, 8000)[100:-100]).max() < 1e-5
    up = resample(tone(8000, 440.0, 0.5), 8000, 22050)  # a ratio of 441/160
    assert len(up) == 11025
    assert np.abs(up[300:-300] - tone(22050, 440.0, 0.5)[300:-300]).max() < 2e-6
    np.testing.assert_array_equal(resample(x, 16000, 16000), x)
    with pytest.raises(ValueError, match="new_rate"):
        resample(x, 16000, 0)
    with pytest.raises(ValueError, match="mono"):
        resample(np.zeros((4, 2)), 16000, 8000)


# ------------------------------------------------------------------------------------------ μ-law and the rest
def test_mu_law_round_trip_and_range():
    x = np.linspace(-1, 1, 200001)
    q = mu_law_encode(x)
    assert q.min() == 0 and q.max() == 255 and len(np.unique(q)) == 256
    assert mu_law_encode(np.array([0.0]))[0] in (127, 128)
    back = mu_law_decode(q)
    # companding: the error is small near 0, larger near ±1, never above one code step
    assert np.abs(back - x)[np.abs(x) < 0.01].max() < 5e-4
    assert np.abs(back - x).max() < 0.04
    assert np.array_equal(mu_law_encode(back), q)  # decode then encode is the identity on codes
    qt = mu_law_encode(torch.from_numpy(x))
    assert torch.equal(qt, torch.from_numpy(q))
    assert torch.is_tensor(mu_law_decode(qt))
    with pytest.raises(ValueError, match=r"codes must be in \[0, 255\]"):
        mu_law_decode(np.array([256]))
    with pytest.raises(ValueError, match="NaN"):
        mu_law_encode(np.array([np.nan]))


def test_spectrogram_peak_and_mel():
    s, f, t = spectrogram(tone(8000, 1000.0, 0.5), 8000)
    assert abs(f[s.mean(1).argmax()] - 1000.0) <= 40
    m = log_mel_spectrogram(tone(8000, 1000.0, 0.5), 8000, n_mels=20)
    assert m.shape == (len(t), 20) and np.isfinite(m).all()


def test_audio_windows():
    arrays = [np.arange(100), np.arange(1000, 1005)]  # the second clip is too short for a window
    w = AudioWindows(arrays, 10)
    b = w.sample(16, np.random.default_rng(0))
    assert b.shape == (16, 11)
    assert torch.all(b[:, 1:] - b[:, :-1] == 1)  # contiguous, from the first clip
    tiles = w.tiles()
    assert tiles.shape == (9, 11) and tiles[1, 0] == tiles[0, -1]  # every sample predicted once
    with pytest.raises(ValueError, match="no clip holds a window of 201"):
        AudioWindows(arrays, 200)
