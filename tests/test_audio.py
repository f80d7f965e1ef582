"""mambakit.data.audio: WAV read/write at every PCM width, bad files, resampling, μ-law, windows."""

import wave

import numpy as np
import pytest
import torch

from mambakit.data.audio import (AudioWindows, log_mel_spectrogram, mu_law_decode, mu_law_encode, read_wav,
                                 resample, spectrogram, write_wav)


def tone(rate=8000, f=440.0, s=0.25, amp=0.5):
    t = np.arange(int(rate * s)) / rate
    return (amp * np.sin(2 * np.pi * f * t)).astype(np.float32)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_wav_round_trip(tmp_path, width):
    x = tone()
    write_wav(tmp_path / "a.wav", x, 8000, sample_width=width)
    y, rate = read_wav(tmp_path / "a.wav")
    assert rate == 8000 and y.dtype == np.float32 and y.shape == x.shape
    assert np.abs(y - x).max() <= 2.0 ** (1 - 8 * width) + 1e-7
    assert not list(tmp_path.glob("*.tmp"))


def test_wav_stereo_and_mono(tmp_path):
    st = np.stack([tone(), -tone()], 1)
    write_wav(tmp_path / "s.wav", st, 16000)
    both, _ = read_wav(tmp_path / "s.wav", mono=False)
    assert both.shape == st.shape
    mono, _ = read_wav(tmp_path / "s.wav")
    assert np.abs(mono).max() < 1e-4


def test_wav_bad_files(tmp_path):
    write_wav(tmp_path / "a.wav", tone(), 8000)
    data = (tmp_path / "a.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated: the header says 2000 frames"):
        read_wav(tmp_path / "cut.wav")
    (tmp_path / "hdr.wav").write_bytes(data[:20])
    with pytest.raises(ValueError, match="truncated|not a readable"):
        read_wav(tmp_path / "hdr.wav")
    (tmp_path / "txt.wav").write_bytes(b"hello, not audio at all" * 4)
    with pytest.raises(ValueError, match="not a readable PCM WAV"):
        read_wav(tmp_path / "txt.wav")
    # an IEEE-float WAV (format tag 3): the stdlib reader refuses it; the message says what to do
    fl = bytearray(data)
    fl[20:22] = (3).to_bytes(2, "little")
    (tmp_path / "float.wav").write_bytes(bytes(fl))
    with pytest.raises(ValueError, match="only integer PCM"):
        read_wav(tmp_path / "float.wav")
    with pytest.raises(ValueError, match="sample_width"):
        write_wav(tmp_path / "b.wav", tone(), 8000, sample_width=5)
    with pytest.raises(ValueError, match="NaN"):
        write_wav(tmp_path / "b.wav", np.array([0.0, np.nan]), 8000)
    with pytest.raises(ValueError, match="16-bit range"):
        write_wav(tmp_path / "b.wav", np.array([40000]), 8000)
    with wave.open(str(tmp_path / "empty.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
    with pytest.raises(ValueError, match="no samples"):
        read_wav(tmp_path / "empty.wav")


def test_resample_preserves_tones_and_removes_aliases():
    x = tone(16000, 440.0, 0.5)
    y = resample(x, 16000, 8000)
    assert len(y) == 4000
    ref = tone(8000, 440.0, 0.5)
    assert np.abs(y[100:-100] - ref[100:-100]).max() < 1e-3  # in-band tone unchanged
    hi = tone(16000, 6000.0, 0.5)  # above the new Nyquist (4 kHz): must be filtered, not folded to 2 kHz
    assert np.abs(resample(hi, 16000, 8000)[100:-100]).max() < 1e-3
    up = resample(ref, 8000, 22050)
    assert len(up) == int(np.ceil(4000 * 22050 / 8000))
    assert np.abs(up[300:-300] - tone(22050, 440.0, 0.5)[300:len(up) - 300]).max() < 2e-3
    with pytest.raises(ValueError, match="new_rate"):
        resample(x, 16000, 0)


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
