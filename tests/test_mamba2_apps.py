"""Mamba-2 models everywhere mambakit goes: generate (greedy parity with transformers on a mixed-length batch,
seeded sampling, streaming), the server engine (continuous batching over its state pool), eval perplexity, the
trainer with a Mamba-2 preset, and the fused decode engine falling back to MambaLM.step."""

import logging
import math
import random
import time

import pytest
import torch

from _models import random_model
from mambakit import ByteTokenizer, MambaLM, generate
from mambakit import cli

PROMPTS = [[5, 17, 3, 40, 22, 9, 31], [12], [7, 7, 50, 2], [33, 1, 60, 4, 4, 18, 27, 11, 9, 2, 45]]
MAMBA2 = dict(layer="Mamba2", headdim=16, ngroups=2, chunk_size=4)


@pytest.fixture(scope="module")
def model():
    return random_model(vocab_size=64, **MAMBA2)


def test_greedy_batch_of_mixed_lengths_equals_transformers_row_by_row(tmp_path, model):
    transformers = pytest.importorskip("transformers")
    model.save_pretrained(tmp_path, layout="hf")
    hf = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path).eval()
    out = generate(model, PROMPTS, 10, temperature=0, eos_token_id=0)
    for i, prompt in enumerate(PROMPTS):
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10, eos_token_id=0,
                          pad_token_id=0)[0, len(prompt):].tolist()
        assert out.sequences[i] == ref, i


def test_sampling_is_batch_independent_and_streaming_gives_the_same_text():
    model, tok = random_model(vocab_size=128, seed=2, **MAMBA2), ByteTokenizer()
    kw = dict(temperature=1.2, top_k=20, top_p=0.95, min_p=0.01, repetition_penalty=1.2)
    batch = generate(model, PROMPTS, 12, seed=7, **kw)
    for i, p in enumerate(PROMPTS):  # row i == that prompt alone with seed + i
        assert generate(model, [p], 12, seed=7 + i, **kw).sequences[0] == batch.sequences[i]
    prompts = ["Hello", "A longer prompt, with more bytes"]
    whole = generate(model, prompts, 16, temperature=0, tokenizer=tok)
    stream = generate(model, prompts, 16, temperature=0, tokenizer=tok, stream=True)
    pieces = ["", ""]
    for step in stream:
        for i in range(2):
            pieces[i] += step.texts[i]
    assert pieces == whole.texts and stream.output.sequences == whole.sequences


def test_the_engine_decodes_mamba2_with_its_fused_step_and_says_so_once(model, caplog, monkeypatch):
    import mambakit.engine as engine

    monkeypatch.setattr(engine, "_SAID", set())  # the log-once set is per process
    with caplog.at_level(logging.INFO, logger="mambakit.engine"):
        step = engine.step_function(model)
        state = model.allocate_state(1)
        for t in range(3):
            step(torch.tensor([t]), state)
    assert isinstance(step.decoder, engine.Mamba2Decoder) and step.last == "fused"
    said = [r.getMessage() for r in caplog.records if "decode:" in r.getMessage()]
    assert said == ["decode: the fused CPU step (mambakit.engine.Mamba2Decoder)"]


def test_server_engine_batches_mamba2_sequences_as_generate_alone():
    from mambakit.generate import check_sampling
    from mambakit.serve import Engine, Job

    model = random_model(vocab_size=258, tokenizer=ByteTokenizer(), **MAMBA2)
    engine = Engine(model, model.tokenizer, {256}, max_batch=4, prefill_chunk=4)
    prompts = [[(7 * i + j) % 256 for j in range(3 + i)] for i in range(5)]  # 5 jobs, 4 slots: one waits
    params = check_sampling(7, 1.1, 50, 0.9, None, 1.0)
    out: dict = {}

    def collector(key):
        def emit(events):
            for e in events:
                out.setdefault(key, []).append(e.token_id)
        return emit

    for i, p in enumerate(prompts):
        engine.submit(Job([p], 1, 7, params, [], 100 + i, collector(i)))
    with engine:
        t0 = time.monotonic()
        while engine.stats()["tokens"] < 7 * 5 and time.monotonic() - t0 < 30:
            time.sleep(0.01)
    for i, p in enumerate(prompts):
        assert out[i] == generate(model, [p], 7, seed=100 + i, temperature=1.1, top_k=50, top_p=0.9,
                                  eos_token_id=256).sequences[0], i


def test_eval_perplexity_equals_the_models_own_log_likelihood():
    from mambakit.eval import perplexity

    model = random_model(vocab_size=258, tokenizer=ByteTokenizer(), **MAMBA2)
    ids = torch.randint(0, 258, (90,), generator=torch.Generator().manual_seed(1)).tolist()
    got = perplexity(model, ids, prefix_token_id=256, chunk_tokens=16)
    with torch.no_grad():
        logits = model(torch.tensor([[256] + ids])).logits[0, :-1, :258].double()
    want = -torch.log_softmax(logits, -1)[torch.arange(90), torch.tensor(ids)].mean().item()
    assert got["tokens"] == 90 and got["nats_per_token"] == pytest.approx(want, rel=1e-4)
    assert got["perplexity"] == pytest.approx(math.exp(want), rel=1e-4)


def test_train_a_mamba2_preset_from_the_command_line(tmp_path):
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while the cat sat on the mat".split()
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"doc{i}.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(8))
                                                    for _ in range(200)) + "\n")
    run = tmp_path / "run"
    args = [f"--data={data}", "--model=mamba2-tiny", "--d_model=32", "--seq_len=32", "--batch_size=4",
            "--max_steps=30", "--warmup_steps=2", "--lr=5e-3", "--eval_every=30", "--eval_windows=4",
            "--sample_tokens=0", "--log_every=1", "--ckpt_every=1000", "--progress=false", "--plot=false",
            f"--out_dir={run}", f"--cache_dir={tmp_path / 'cache'}", "--threads=1"]
    assert cli.main(["train", *args]) == 0
    import json

    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5  # from ln(258) = 5.55
    trained = MambaLM.from_pretrained(run)
    assert trained.config.layer == "Mamba2" and trained.config.headdim == 32 and trained.config.nheads == 2
