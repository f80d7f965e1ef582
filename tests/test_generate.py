"""Generation: the decode step vs the parallel forward, parity with transformers, batching of different-length
prompts, per-row EOS and stop strings, seeded sampling, the samplers' filters, state size, bad input, CLI."""

import math

import pytest
import torch

from _models import random_model  # tests/ is on sys.path
from mambakit import ByteTokenizer, MambaLM, generate
from mambakit.cli import main as cli_main
from mambakit.generate import apply_repetition_penalty, filter_logits, prefill, sample

PROMPTS = [[5, 17, 3, 40, 22, 9, 31], [12], [7, 7, 50, 2], [33, 1, 60, 4, 4, 18, 27, 11, 9, 2, 45]]



@pytest.fixture(scope="module")
def model():
    return random_model()


# ------------------------------------------------------------------------------------ step vs forward
def test_step_matches_parallel_forward(model):
    ids = torch.tensor([PROMPTS[0] + PROMPTS[2]])  # (1, 11)
    full = model(ids).logits[0]  # (11, V)
    state = model.allocate_state(1)
    conv_ptr, ssm_ptr = state.conv.data_ptr(), state.ssm.data_ptr()
    for t in range(ids.shape[1]):
        logits = model.step(ids[:, t], state)  # (1, V)
        torch.testing.assert_close(logits[0], full[t], atol=1e-4, rtol=1e-4)
    assert (state.conv.data_ptr(), state.ssm.data_ptr()) == (conv_ptr, ssm_ptr)  # updated in place


def test_greedy_is_argmax_of_forward_with_teacher_forcing(model):
    for prompt in PROMPTS:
        out = generate(model, [prompt], 12, temperature=0)
        new = out.sequences[0]
        assert len(new) == 12 and out.finish_reasons == ["length"]
        logits = model(torch.tensor([prompt + new])).logits[0]  # (l, V)
        argmax = logits[len(prompt) - 1: -1, : model.config.vocab_size].argmax(-1)
        assert argmax.tolist() == new


def test_prefill_state_equals_stepping(model):
    state, last = prefill(model, [PROMPTS[0]])
    stepped = model.allocate_state(1)
    for t in PROMPTS[0]:
        logits = model.step(torch.tensor([t]), stepped)
    torch.testing.assert_close(state.ssm, stepped.ssm, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state.conv, stepped.conv)
    torch.testing.assert_close(last, logits, atol=1e-4, rtol=1e-4)


def test_greedy_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = random_model(vocab_size=64, d_model=48, n_layer=3, seed=1)
    ours.save_pretrained(tmp_path, layout="hf")
    hf = transformers.MambaForCausalLM.from_pretrained(tmp_path).eval()
    for prompt in PROMPTS:
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10, eos_token_id=0,
                          pad_token_id=0)[0, len(prompt):].tolist()
        got = generate(ours, [prompt], 10, temperature=0, eos_token_id=0)
        assert got.sequences[0] == ref


# ------------------------------------------------------------------------------------------ batching
def test_batch_of_different_lengths_equals_one_by_one_greedy(model):
    batch = generate(model, PROMPTS, 15, temperature=0)
    assert batch.tokens.shape == (len(PROMPTS), 15)
    assert batch.prompt_lengths == [len(p) for p in PROMPTS]
    for i, p in enumerate(PROMPTS):
        assert batch.sequences[i] == generate(model, [p], 15, temperature=0).sequences[0]


def test_seeded_sampling_is_reproducible_and_batch_independent(model):
    kw = dict(temperature=1.3, top_k=20, top_p=0.95, min_p=0.01, repetition_penalty=1.2)
    a = generate(model, PROMPTS, 12, seed=123, **kw)
    b = generate(model, PROMPTS, 12, seed=123, **kw)
    assert a.sequences == b.sequences
    assert generate(model, PROMPTS, 12, seed=124, **kw).sequences != a.sequences
    for i, p in enumerate(PROMPTS):  # row i == that prompt alone with seed + i
        assert generate(model, [p], 12, seed=123 + i, **kw).sequences[0] == a.sequences[i]
    torch.manual_seed(7)
    c = generate(model, PROMPTS, 6)
    torch.manual_seed(7)
    assert generate(model, PROMPTS, 6).sequences == c.sequences  # seed=None follows torch.manual_seed


def test_per_row_eos(model):
    free = generate(model, PROMPTS, 15, temperature=0)
    eos = free.sequences[0][4]  # a token row 0 produces at step 4
    out = generate(model, PROMPTS, 15, temperature=0, eos_token_id=eos, pad_token_id=63)
    for i, seq in enumerate(free.sequences):
        want = seq[: seq.index(eos) + 1] if eos in seq else seq  # cut after the row's own first eos
        assert out.sequences[i] == want
        assert out.finish_reasons[i] == ("eos" if eos in seq else "length")
        assert out.tokens[i, len(want):].eq(63).all()  # padded after the row's end
    assert len(out.sequences[0]) <= 5


def test_stop_strings_and_streaming():
    # model vocab 128 < byte tokenizer's 258: every sampled id is ASCII, so every text is plain
    model, tok = random_model(vocab_size=128, seed=2), ByteTokenizer()
    prompts = ["Hello", "A longer prompt, with more bytes"]
    free = generate(model, prompts, 20, temperature=0, tokenizer=tok)
    assert free.texts == [tok.decode(s) for s in free.sequences]
    stop = free.texts[0][6:8]
    out = generate(model, prompts, 20, temperature=0, tokenizer=tok, stop=[stop, "\x00never"])
    cut = free.texts[0].index(stop)
    assert out.texts[0] == free.texts[0][:cut] and out.finish_reasons[0] == "stop"
    assert out.sequences[0] == free.sequences[0][: cut + len(stop)]  # up to the token that completed it
    if stop not in free.texts[1]:
        assert out.texts[1] == free.texts[1] and out.finish_reasons[1] == "length"
    # streaming yields the same tokens and the same (cut) texts
    stream = generate(model, prompts, 20, temperature=0, tokenizer=tok, stop=stop, stream=True)
    pieces, toks = ["", ""], [[], []]
    for step in stream:
        for i in range(2):
            pieces[i] += step.texts[i]
            if step.token_ids[i] is not None:
                toks[i].append(step.token_ids[i])
    assert toks == out.sequences and pieces == out.texts
    assert stream.output.texts == out.texts


def test_string_prompts_use_the_tokenizer_saved_with_the_checkpoint(tmp_path):
    model = random_model(vocab_size=258, seed=3)
    model.tokenizer = ByteTokenizer()
    model.save_pretrained(tmp_path)
    loaded = MambaLM.from_pretrained(tmp_path)
    assert isinstance(loaded.tokenizer, ByteTokenizer)
    out = generate(loaded, ["hi", "hello there"], 5, temperature=0)
    assert out.texts is not None and len(out.texts) == 2
    ids = generate(loaded, [list(b"hi")], 5, temperature=0)
    assert ids.sequences[0] == out.sequences[0]


# -------------------------------------------------------------------------------------------- samplers
def test_top_k_top_p_min_p_on_hand_made_logits():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    logits = probs.log()
    kept = lambda x: torch.isfinite(x).tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [[True, True, False, False], [False, False, True, True]]
    # top-p: the smallest set reaching p (0.5 + 0.3 = 0.8 ≥ 0.75; 0.5 alone ≥ 0.45; 0.5 + 0.3 + 0.15 ≥ 0.9)
    assert kept(filter_logits(logits, top_p=0.75)) == [[True, True, False, False], [False, False, True, True]]
    assert kept(filter_logits(logits, top_p=0.45)) == [[True, False, False, False], [False, False, False, True]]
    assert kept(filter_logits(logits, top_p=0.9)) == [[True, True, True, False], [False, True, True, True]]
    assert kept(filter_logits(logits, top_p=1.0)) == [[True] * 4] * 2
    assert kept(filter_logits(logits, top_p=1e-9)) == [[True, False, False, False], [False, False, False, True]]
    # a top_p below float32's range (0 once rounded to the logits' dtype) still keeps the most likely token
    assert kept(filter_logits(logits, top_p=1e-300)) == [[True, False, False, False], [False, False, False, True]]


def test_top_p_beyond_the_topk_candidates_matches_a_full_sort():
    torch.manual_seed(0)
    logits = torch.cat([torch.randn(1, 3000) * 0.1, torch.randn(1, 3000) * 8])  # flat row, peaked row
    for p in (0.3, 0.9, 0.999):
        got = torch.isfinite(filter_logits(logits, top_p=p))
        probs, order = torch.softmax(logits.double(), -1).sort(-1, descending=True)
        n_keep = ((probs.cumsum(-1) - probs) < p).sum(-1)
        for r in range(2):
            assert got[r].sum() == n_keep[r] and got[r, order[r, : n_keep[r]]].all()


def test_min_p_threshold_is_per_row():
    # row 0 is peaked (max 0.9), row 1 flat (max 0.3): min_p 0.5 keeps p >= 0.45 in row 0, >= 0.15 in row 1
    probs = torch.tensor([[0.9, 0.05, 0.03, 0.02], [0.3, 0.25, 0.25, 0.2]])
    keep = torch.isfinite(filter_logits(probs.log(), min_p=0.5)).tolist()
    assert keep == [[True, False, False, False], [True, True, True, True]]
    one_row = torch.isfinite(filter_logits(probs[1:].log(), min_p=0.5)).tolist()
    assert one_row == keep[1:]  # a row's filtering never depends on the other rows


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_penalty_that_overflows_acts_as_its_limit(dtype):
    """logit / 5e-324 is inf for every positive logit: the limit (penalty → 0) is the largest seen positive logit
    alone, not a row of infs (whose softmax is NaN, and whose 'sample' was the last id, the padding). A penalty
    → inf sends every seen logit of a row where all are seen and negative to −inf: the least negative wins."""
    logits = torch.tensor([[2.0, 3.0, -1.0, 5.0, 3.0], [-20.0, -5.0, -30.0, -10.0, -40.0]], dtype=dtype)
    seen = torch.tensor([[True, True, True, False, True], [True] * 5])
    inf = math.inf
    assert apply_repetition_penalty(logits[:1], seen[:1], 5e-324).tolist() == [[-inf, 0.0, -inf, -inf, 0.0]]
    assert apply_repetition_penalty(logits[1:], seen[1:], 1e308 if dtype == torch.float64 else 1e38).tolist() \
        == [[-inf, 0.0, -inf, -inf, -inf]]
    # rows are independent: a row that does not overflow keeps its exact values
    both = apply_repetition_penalty(logits, torch.stack([seen[0], torch.zeros(5, dtype=torch.bool)]), 5e-324)
    assert both[1].tolist() == logits[1].tolist()


def test_tiny_temperature_is_greedy_among_ties_and_never_nan():
    """(l − max) / T: the maxima stay at 0 and the rest go to −inf, so a tie at the top is drawn uniformly."""
    from mambakit.generate import SamplingParams, next_tokens

    logits = torch.tensor([[1.0, 3.0, 3.0, -2.0]]).repeat(400, 1)
    params = SamplingParams(5e-324, None, None, None, 1.0)
    draws = next_tokens(logits, None, params, [torch.Generator().manual_seed(i) for i in range(400)])
    assert set(draws.tolist()) == {1, 2} and 120 < int((draws == 1).sum()) < 280


def test_sample_follows_the_distribution_and_never_picks_filtered_tokens():
    logits = torch.tensor([[0.0, math.log(3.0), -math.inf, 0.0]]).repeat(2, 1)  # p = (.2, .6, 0, .2)
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    draws = torch.stack([sample(logits, gens) for _ in range(3000)])  # (3000, 2)
    freq = torch.bincount(draws[:, 0], minlength=4).float() / 3000
    assert freq[2] == 0 and abs(freq[1] - 0.6) < 0.04 and abs(freq[0] - 0.2) < 0.04
    # row 1 draws from its own generator: same tokens as sampling it alone
    alone = torch.Generator().manual_seed(1)
    assert draws[:5, 1].tolist() == [sample(logits[1:], [alone]).item() for _ in range(5)]


def test_greedy_ignores_filters(model):
    a = generate(model, PROMPTS[:2], 8, temperature=0)
    b = generate(model, PROMPTS[:2], 8, temperature=0, top_k=3, top_p=0.5, min_p=0.2)
    assert a.sequences == b.sequences


# ---------------------------------------------------------------------------------------------- memory
def test_state_size_does_not_grow_with_generated_tokens(model):
    zero = model.allocate_state(len(PROMPTS))
    nbytes = zero.conv.nbytes + zero.ssm.nbytes
    for n in (2, 40):
        out = generate(model, PROMPTS, n, temperature=0)
        assert out.state.conv.nbytes + out.state.ssm.nbytes == nbytes
        assert out.state.ssm.dtype == torch.float32
    state = model.allocate_state(2)
    ptrs = (state.conv.data_ptr(), state.ssm.data_ptr())
    for _ in range(50):
        model.step(torch.tensor([3, 4]), state)
    assert (state.conv.data_ptr(), state.ssm.data_ptr()) == ptrs and state.conv.nbytes + state.ssm.nbytes \
        == zero.conv.nbytes // 2 + zero.ssm.nbytes // 2


def test_bfloat16_weights():
    model = random_model(seed=4).to(torch.bfloat16)
    out = generate(model, PROMPTS, 6, temperature=0)
    assert out.state.ssm.dtype == torch.float32 and out.state.conv.dtype == torch.bfloat16
    for i, p in enumerate(PROMPTS):
        logits = model(torch.tensor([p + out.sequences[i]])).logits[0].float()
        top2 = logits[len(p) - 1: -1, :64].topk(2, dim=-1)
        chosen = logits[len(p) - 1: -1, :64].gather(-1, torch.tensor(out.sequences[i])[:, None])[:, 0]
        # every greedy token is the argmax of the parallel forward, up to bf16 rounding between the paths
        assert (top2.values[:, 0] - chosen).max() < 0.1


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw, match", [
    (dict(prompts=[[]]), "empty"),
    (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
    (dict(prompts=[[1, 64]]), "outside the model's vocabulary"),
    (dict(prompts=[[-1]]), "outside"),
    (dict(prompts=[]), "non-empty"),
    (dict(prompts=["text"]), "tokenizer"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(stop="x"), "stop strings need a tokenizer"),
    (dict(seed=[1, 2]), "seed"),
])
def test_bad_input_is_named(model, kw, match):
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=3)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        generate(model, args.pop("prompts"), args.pop("max_new_tokens"), **args)


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_generate_streams_text(tmp_path, capsys):
    model = random_model(vocab_size=128, seed=5)
    model.tokenizer = ByteTokenizer()
    model.save_pretrained(tmp_path / "m")
    assert cli_main(["generate", "--model", str(tmp_path / "m"), "--prompt", "Hi", "--max-new-tokens", "6",
                     "--temperature", "0"]) == 0
    out = capsys.readouterr()
    want = generate(model, ["Hi"], 6, temperature=0, tokenizer=ByteTokenizer()).texts[0]
    assert out.out == "Hi" + want + "\n" and "tok/s" in out.err
    (tmp_path / "prompts.txt").write_text("one\ntwo three\n", encoding="utf-8")
    assert cli_main(["generate", "--model", str(tmp_path / "m"), "--prompt-file", str(tmp_path / "prompts.txt"),
                     "--max-new-tokens", "4", "--top-p", "0.9", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "--- [0]\none" in out and "--- [1]\ntwo three" in out
    assert cli_main(["generate", "--model", str(tmp_path / "m"), "--prompt", "Hi", "--top-p", "2"]) == 1
    assert "top_p" in capsys.readouterr().err


# ------------------------------------------------------------------- request checks (shared with serve)
def test_request_checks_and_row_output_shared_with_the_server():
    from mambakit.generate import RowOutput, check_stop, pad_id, sampling_vocab

    tok = ByteTokenizer()
    assert check_stop(None, None) == [] and check_stop("ab", tok) == ["ab"]
    with pytest.raises(ValueError, match="need a tokenizer"):
        check_stop(["x"], None)
    with pytest.raises(ValueError, match="non-empty string"):
        check_stop(["x", ""], tok)
    assert pad_id(None, tok, {256}, 300) == 257  # the tokenizer's pad
    assert pad_id(None, tok, {256}, 257) == 256  # pad outside the model's vocabulary: the eos
    assert pad_id(None, None, set(), 10) == 0
    with pytest.raises(ValueError, match="outside the vocabulary"):
        pad_id(12, None, set(), 10)
    assert sampling_vocab(random_model(vocab_size=128), tok) == 128
    row = RowOutput(tok, ["lo"])  # "hello": the stop string "lo" completes at the 4th token
    texts = [row.push(t, False, last_step=False) for t in b"hell"]
    assert row.finish_reason is None and "".join(texts) == "hel"  # the last "l" held back: it may start "lo"
    texts.append(row.push(ord("o"), False, last_step=False))
    assert row.finish_reason == "stop" and "".join(texts) == "hel" and row.final_text() == "hel"
    short = RowOutput(tok, [])
    assert short.push(ord("a"), False, last_step=True) == "a" and short.finish_reason == "length"


def test_generate_benchmark_targets_flag_a_change_of_machine_state():
    """benchmarks/generate.py's target lines: the floor from the batch-1 cell's own bandwidth, the batch 8 ÷ batch 1
    ratio, and a warning when the two cells measured copy bandwidths more than STATE_SHIFT apart (this VM moves
    between two memory states, and a ratio across them compares the states)."""
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    gen = importlib.import_module("generate")

    def cell(ms, bw):
        b = 8 if ms > 12 else 1
        return dict(weight_bytes=500e6, copy_bw=bw, ms_per_step=ms, decode_tokens_per_s=b / ms * 1e3,
                    tokens_per_s=b / ms * 900)

    same = {("float32", 1, "mambakit"): cell(11.0, 50e9), ("float32", 8, "mambakit"): cell(14.0, 48e9)}
    lines = gen.target_lines(same, "float32")
    assert "floor 10.0 ms/step" in lines[0] and "= 1.10× the floor" in lines[0]
    assert "decode 6.3×" in lines[1] and not any("warning" in ln for ln in lines)
    moved = {**same, ("float32", 8, "mambakit"): cell(14.0, 34e9)}
    assert any("warning" in ln and "50.0 and 34.0 GB/s" in ln for ln in gen.target_lines(moved, "float32"))
