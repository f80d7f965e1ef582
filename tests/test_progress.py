"""Progress bars and training logs: a tqdm bar on a terminal (a pseudo-terminal as stderr) and nothing of it
elsewhere or with --quiet, for training and evaluation; metrics.jsonl one record per step, also across a resume;
TensorBoard event files when asked, read back with tensorboard's own reader."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import struct
import sys
import termios
import threading
from pathlib import Path

import pytest

from _models import random_model
from test_train import corpus, tiny  # noqa: F401  (corpus: the module fixture of small documents)
from mambakit import cli
from mambakit.tokenizer import ByteTokenizer
from mambakit.train import train

# tqdm's bar: "n%|███   | done/total [elapsed<remaining, rate"
BAR = re.compile(r"\d+%\|.*\| *\d+(\.\d+)?k?/\d+(\.\d+)?k? \[\d\d:\d\d<\d\d:\d\d, ")


@contextlib.contextmanager
def terminal_stderr():
    """sys.stderr is a pseudo-terminal for the block (isatty() is true, as in an interactive shell); yields a list
    that holds, after the block, everything written to it (ANSI sequences and carriage returns included)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 24 × 120, as a terminal window
    out: list[str] = []
    chunks: list[bytes] = []

    def drain() -> None:  # read as it is written: a full pty buffer would block the writer
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the slave side is closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    saved, sys.stderr = sys.stderr, open(slave, "w", buffering=1, closefd=True)
    try:
        yield out
    finally:
        sys.stderr.close()
        sys.stderr = saved
        reader.join(timeout=10)
        os.close(master)
        out.append(b"".join(chunks).decode("utf-8", "replace"))


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_bar_on_a_terminal_only(corpus, tmp_path, capsys):  # noqa: F811
    with terminal_stderr() as seen:
        train(tiny(corpus, tmp_path / "tty", max_steps=4, progress=True))
    assert BAR.search(seen[0]) and "train: 100%" in seen[0] and "4/4" in seen[0] and "tok/s" in seen[0], seen[0]
    with terminal_stderr() as seen:  # --quiet on a terminal (not a terminal: see the test of metrics.jsonl below)
        assert cli.main(["train", *(f"--{k}={v}" for k, v in tiny(corpus, tmp_path / "quiet", max_steps=1).to_dict()
                                    .items() if k not in ("progress", "val_docs")), "--quiet"]) == 0
    assert "%|" not in seen[0]
    assert cli.main(["train", "--quiet", "--progress=true"]) == 1
    assert "--quiet turns the progress bar off" in capsys.readouterr().err


def test_eval_bars_on_a_terminal_only(tmp_path, capsys):
    model = random_model(vocab_size=260, tokenizer=ByteTokenizer())
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    args = ["eval", "--model", str(tmp_path / "m"), "--ppl", str(tmp_path / "text.txt"), "--chunk-tokens", "64"]
    with terminal_stderr() as seen:
        assert cli.main(args) == 0
    assert BAR.search(seen[0]) and "perplexity: 100%" in seen[0] and "tok/s" in seen[0], seen[0]
    with terminal_stderr() as seen:
        assert cli.main([*args, "--quiet"]) == 0
    assert "%|" not in seen[0]
    capsys.readouterr()
    assert cli.main(args) == 0
    assert "%|" not in capsys.readouterr().err

    # the lm-eval adapter's requests
    pytest.importorskip("lm_eval")
    from mambakit.eval import register

    class Request:
        def __init__(self, *args):
            self.args = args

    lm = register()(model=model)
    requests = [Request("the quick", " brown fox"), Request("over the", " lazy dog")]
    with terminal_stderr() as seen:
        lm.loglikelihood(requests)
        lm.generate_until([Request("the", {"until": ["\n"], "max_gen_toks": 3, "do_sample": False})])
    assert BAR.search(seen[0]) and "loglikelihood: 100%" in seen[0] and "generate_until: 100%" in seen[0], seen[0]
    with terminal_stderr() as seen:
        register()(model=model, progress="false").loglikelihood(requests)
    assert "%|" not in seen[0]


def test_jsonl_and_tensorboard_one_record_per_step_across_a_resume(corpus, tmp_path, capsys):  # noqa: F811
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"

    def die(step, model):
        if step == 5:  # after the checkpoint at 3: steps 4 and 5 are logged, then lost
            raise KeyboardInterrupt

    cfg = tiny(corpus, run, max_steps=6, ckpt_every=3, log="tensorboard", eval_every=3, eval_windows=2, progress=True)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step=die)
    assert [r["step"] for r in _records(run) if "loss" in r] == [1, 2, 3, 4, 5]
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # and a record a kill left half-written
    final = train(cfg.replace(resume=True))
    assert "%|" not in capsys.readouterr().err  # the bar is on, but stderr (pytest's capture) is not a terminal

    records = _records(run)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6] and records[-1]["final"]
    assert all(set(r) >= {"lr", "grad_norm", "tokens_per_s"} for r in records if "loss" in r)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5, 6]  # the lost steps 4, 5 purged, then logged again
    by_step = {r["step"]: r for r in records if "loss" in r}
    assert all(abs(e.value - by_step[e.step]["loss"]) < 1e-6 for e in loss)
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss", "val/bpc"} <= set(
        events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("val/loss")] == [3, 6]
    assert abs(events.Scalars("val/loss")[-1].value - final["val_loss"]) < 1e-6


def test_tensorboard_missing_is_a_clear_error(corpus, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"--log tensorboard needs the tensorboard package: pip install "
                                          r"'mambakit\[tensorboard\]'"):
        train(tiny(corpus, tmp_path / "run", log="tensorboard"))
    assert not (tmp_path / "run").exists()  # refused before any work
    assert cli.main(["train", "--log", "tensorboard", f"--out_dir={tmp_path / 'run'}"]) == 1
    assert "--log tensorboard needs the tensorboard package" in capsys.readouterr().err
    with pytest.raises(ValueError, match="log must be one of"):
        tiny(corpus, tmp_path / "run", log="wandb")


def test_convert_bar_on_a_terminal_only(tmp_path, capsys):
    """`mambakit convert` shows a bar over the bytes read (a weight file or shard at a time) and written."""
    model = random_model(vocab_size=260, tokenizer=ByteTokenizer())
    model.save_pretrained(tmp_path / "m")
    with terminal_stderr() as seen:
        assert cli.main(["convert", str(tmp_path / "m"), str(tmp_path / "official"), "--layout", "official"]) == 0
    assert "convert: 100%" in seen[0] and "B/s" in seen[0] and "writing" in seen[0], seen[0]
    with terminal_stderr() as seen:
        assert cli.main(["convert", str(tmp_path / "official"), str(tmp_path / "back"), "--quiet"]) == 0
    assert "%|" not in seen[0]
    capsys.readouterr()
    assert cli.main(["convert", str(tmp_path / "m"), str(tmp_path / "again")]) == 0
    assert "%|" not in capsys.readouterr().err  # not a terminal


def test_backtest_and_budgeted_experiment_bars_on_a_terminal_only(capsys):
    """Backtests (mambakit.forecast) and the experiments' budgeted training loop draw a bar on a terminal."""
    import numpy as np
    import torch

    from experiments._common import run_budgeted
    from mambakit.data.timeseries import regularize
    from mambakit.forecast.backtest import backtest
    from mambakit.forecast.baselines import Naive, SeasonalNaive

    t = np.arange(60)
    series = regularize(np.arange(np.datetime64("2001-01"), np.datetime64("2001-01") + 60).astype("datetime64[s]"),
                        (10 + np.sin(2 * np.pi * t / 12))[:, None], ["s"])
    with terminal_stderr() as seen:
        backtest(series, {"naive": Naive(), "seasonal naive": SeasonalNaive(12)}, horizon=3, n_windows=4)
    assert "backtest: 100%" in seen[0] and "10/10" in seen[0], seen[0]
    model = torch.nn.Linear(4, 1)

    def loss_fn(step):
        return model(torch.ones(2, 4)).pow(2).mean(), 8

    with terminal_stderr() as seen:
        run_budgeted(model, loss_fn, budget_s=0, lr=1e-3, max_steps=20, label="tiny", log_every=10)
    assert "tiny: 100%" in seen[0] and "step 20 loss" in seen[0], seen[0]
    capsys.readouterr()
    backtest(series, {"naive": Naive()}, horizon=3, n_windows=2)
    assert "%|" not in capsys.readouterr().err  # not a terminal
