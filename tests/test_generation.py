"""Generation (tnllm_plugin.generation, examples/generate.py): greedy against recomputing everything, batches of
prompts of different lengths against each prompt alone (left padding and per-row LRPE positions), stop tokens,
sampling filters and seeds, streaming, fairseq's sequence generator, text <-> ids, the example script, and the
CUDA-graph decoder against the eager one (GPU)."""
import importlib.util
import io
import itertools
from pathlib import Path

import pytest
import torch

from tnllm_plugin.generation import (SamplingConfig, TextCodec, TextStream, choose_next, decode_steps, generate,
                                     read_fairseq_dict, stream, top_k_filter, top_p_filter)
from tnllm_plugin.model import LRPE, DecodeState, TransNormerConfig, TransNormerLLM

REPO = Path(__file__).resolve().parents[1]
VOCAB = 97


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def tiny(**kw):
    # init_std 0.2 (not 0.02): the next token then depends on the context, not just on the last token, so a
    # wrong state or position changes the greedy tokens
    base = dict(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, glu_dim=48, block_size=64, init_std=0.2)
    torch.manual_seed(0)
    return with_real_pad_embedding(TransNormerLLM(TransNormerConfig(**{**base, **kw})).eval())


def with_real_pad_embedding(model):
    """A random model's zero pad embedding makes the pad token a fixed point (all-zero hidden states, all-equal
    logits, argmax 0 forever). A nonzero one (released checkpoints have one too) also shows that padding is
    invisible through the mask, not because its embedding happens to be zero."""
    with torch.no_grad():
        model.embed_tokens.weight[model.cfg.pad_id].normal_(0, model.cfg.init_std)
    return model


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def argmax_loop(model, prompt, steps):
    """Greedy by brute force: a full forward over the whole sequence for every new token."""
    seq, tokens, logits = list(prompt), [], []
    for _ in range(steps):
        out, _ = model(torch.tensor([seq]))
        logits.append(out[0, -1])
        tokens.append(int(out[0, -1].argmax()))
        seq.append(tokens[-1])
    return tokens, torch.stack(logits)


def run_steps(model, prompts, sampling, cuda_graph=None):
    """(tokens per row, logits [steps, B, vocab]) straight from the decode loop (no stop tokens)."""
    steps = list(decode_steps(model, prompts, sampling, cuda_graph))
    tokens = [[s.chosen[r] for s in steps] for r in range(len(prompts))]
    return tokens, torch.stack([s.logits.clone() for s in steps])


# --- greedy and the padding / position scheme -----------------------------------------------------------------

def fused_ran(decode_path, layers, steps):
    """With the fused path (conftest.decode_path), its kernel ran for every layer of every decode step."""
    return decode_path is None or len(decode_path) == layers * steps


@pytest.mark.parametrize("kw", [dict(), dict(lrpe_layers=(0, 2), block_size=8), dict(decay="paper", norm="rms"),
                                dict(qk_act="1+elu", lrpe_layers=(1,)), dict(qk_act="none", norm="layer", bias=True)])
def test_greedy_equals_argmax_over_full_forwards(kw, decode_path):
    """The decode loop's steps (the composition, or the fused Triton step) against full block-form forwards."""
    model = tiny(**kw)
    prompt = prompts_of([70], seed=1)[0]        # prefill crosses the 64 block; decoding crosses blocks of 8
    want_tokens, want_logits = argmax_loop(model, prompt, 15)
    tokens, logits = run_steps(model, [prompt], SamplingConfig(max_new_tokens=15))
    assert fused_ran(decode_path, 3, 14)
    assert tokens[0] == want_tokens
    assert rel(logits[:, 0], want_logits) < 1e-5
    assert len(set(want_tokens)) > 3      # the test means something: not one token repeated


@pytest.mark.parametrize("block_size", [64, 8])
def test_batch_of_different_lengths_equals_each_prompt_alone(block_size, decode_path):
    model = tiny(block_size=block_size, lrpe_layers=(0, 1))
    lengths = [5, 70, 1, 23]            # differ by more than 1; 70 crosses the block of 64, and pads 69 for "1"
    prompts = prompts_of(lengths, seed=1)
    sampling = SamplingConfig(max_new_tokens=12)
    tokens, logits = run_steps(model, prompts, sampling)
    for r, prompt in enumerate(prompts):
        alone_tokens, alone_logits = run_steps(model, [prompt], sampling)
        assert tokens[r] == alone_tokens[0], f"row {r} (length {lengths[r]})"
        assert rel(logits[:, r], alone_logits[:, 0]) < 1e-5, f"row {r} (length {lengths[r]})"
        assert alone_tokens[0] == argmax_loop(model, prompt, 12)[0]


@torch.no_grad()
def test_left_padding_leaves_the_state_exact_and_right_padding_would_not():
    """Why left padding: padding with a zero v adds nothing, and decaying a zero state keeps it zero. After real
    tokens the decay still applies per padded step, so right padding would shrink the state by lambda^pad."""
    model = tiny()
    prompt = torch.tensor([prompts_of([9])[0]])
    pad = torch.full((1, 6), model.cfg.pad_id)
    _, want = model(prompt, use_cache=True)
    mask = torch.tensor([[True] * 6 + [False] * 9])
    _, left = model(torch.cat([pad, prompt], 1), padding_mask=mask, use_cache=True,
                    positions=torch.tensor([-6]))
    for a, b in zip(left.kv, want.kv):
        assert rel(a, b) < 1e-6
    assert left.positions.tolist() == [9]
    _, right = model(torch.cat([prompt, pad], 1), padding_mask=mask.flip(1), use_cache=True)
    assert max(rel(a, b) for a, b in zip(right.kv, want.kv)) > 1e-2
    # and without the padding mask, left padding pollutes the state
    _, unmasked = model(torch.cat([pad, prompt], 1), use_cache=True, positions=torch.tensor([-6]))
    assert max(rel(a, b) for a, b in zip(unmasked.kv, want.kv)) > 1e-2


@torch.no_grad()
@pytest.mark.parametrize("window", [1, 3, 7, 100])
def test_prefill_in_windows_equals_one_forward(window):
    """prefill(window=w): left-padded prompts (padding spread over several windows, then windows without any)
    in forwards of w positions that carry the state: the logits, states and positions of one forward."""
    from tnllm_plugin.generation import prefill
    model = tiny(lrpe_layers=(0, 2), block_size=8)
    prompts = prompts_of([5, 17, 11], seed=5)
    want_logits, want = prefill(model, prompts)
    logits, state = prefill(model, prompts, window=window)
    assert rel(logits, want_logits) < 1e-5
    assert all(rel(a, b) < 1e-5 for a, b in zip(state.kv, want.kv))
    assert state.positions.tolist() == want.positions.tolist() == [5, 17, 11]
    assert state.offset == want.offset == 17


def test_per_row_lrpe_positions_are_each_rows_own_offset():
    torch.manual_seed(0)
    lrpe = LRPE(n_heads=2, head_dim=8)
    x = torch.randn(3, 5, 2, 8)
    starts = torch.tensor([0, 7, -4])
    both = lrpe(x, offset=starts)
    for r in range(3):
        assert torch.allclose(both[r:r + 1], lrpe(x[r:r + 1], offset=int(starts[r])), rtol=0, atol=1e-7)


@torch.no_grad()
def test_row_positions_matter_only_through_relative_positions():
    """LRPE is relative: shifting a whole row's positions changes its logits by rounding only, while giving the
    decode step a position that does not follow the prefill changes them for real."""
    model = tiny(lrpe_layers=(0, 1, 2))
    tokens = torch.tensor(prompts_of([12, 12], seed=3))
    base, state = model(tokens, use_cache=True)
    shifted, _ = model(tokens, use_cache=True, positions=torch.tensor([0, 40]))
    assert rel(shifted, base) < 1e-5
    nxt = tokens[:, :1]
    step, _ = model(nxt, state)
    wrong = DecodeState(kv=state.kv, offset=state.offset, positions=torch.tensor([12, 15]))
    step_wrong, _ = model(nxt, wrong)
    assert rel(step_wrong[0], step[0]) < 1e-6 and rel(step_wrong[1], step[1]) > 1e-4
    assert state.positions is None and state.index_select(torch.tensor([1])).positions is None
    assert wrong.index_select(torch.tensor([1, 1])).positions.tolist() == [15, 15]


@torch.no_grad()
def test_in_place_decode_step_equals_the_forward_step(decode_path):
    """decode_step_ (what the CUDA graph captures) against model.forward's step, on CPU; with the fused step,
    decode_step_ updates the state in place inside the kernel and forward writes a new one."""
    model = tiny(lrpe_layers=(0, 2))
    prompts = prompts_of([4, 10, 7], seed=4)
    from tnllm_plugin.generation import prefill
    _, state = prefill(model, prompts)
    static = DecodeState(kv=[s.clone() for s in state.kv], offset=state.offset, positions=state.positions.clone())
    kv_ids = [s.data_ptr() for s in static.kv]
    tok = torch.tensor([[5], [6], [7]])
    for _ in range(5):
        want, state = model(tok, state)
        got = model.decode_step_(tok, static)
        assert rel(got, want) < 1e-6
        tok = want[:, -1].argmax(-1, keepdim=True)
    assert [s.data_ptr() for s in static.kv] == kv_ids          # updated in place
    assert static.positions.tolist() == state.positions.tolist() == [9, 15, 12]
    assert all(rel(a, b) < 1e-6 for a, b in zip(static.kv, state.kv))
    assert fused_ran(decode_path, 3, 2 * 5)


@pytest.mark.parametrize("decode_path", ["fused"], indirect=True)
@torch.no_grad()
def test_fused_step_equals_the_composition(decode_path):
    """The model's fused one-token step (interpreted on CPU) against its PyTorch composition, step by step from one
    prefill: the same greedy tokens, logits and states to fp32 rounding; the states it was handed are left as they
    were (forward's step is not in place). A wrong position in the fused path is seen."""
    import tnllm_kernels.gla_decode as gla_decode
    model = tiny(lrpe_layers=(0, 1), qk_act="1+elu")
    from tnllm_plugin.generation import prefill
    _, state = prefill(model, prompts_of([6, 30], seed=7))
    fused_state = composed_state = state
    tok = torch.tensor([[5], [9]])
    for _ in range(6):
        handed, before = fused_state.kv, [s.clone() for s in fused_state.kv]
        got, fused_state = model(tok, fused_state)
        assert all(torch.equal(a, b) for a, b in zip(handed, before))
        gla_decode.interpret_on_cpu = False
        try:
            want, composed_state = model(tok, composed_state)
        finally:
            gla_decode.interpret_on_cpu = True
        assert rel(got, want) < 1e-5
        assert all(rel(a, b) < 1e-5 for a, b in zip(fused_state.kv, composed_state.kv))
        tok = want[:, -1].argmax(-1, keepdim=True)
        assert torch.equal(got[:, -1].argmax(-1, keepdim=True), tok)
    assert fused_ran(decode_path, 3, 6)
    shifted = DecodeState(kv=fused_state.kv, offset=fused_state.offset, positions=fused_state.positions + 1)
    wrong, _ = model(tok, shifted)
    right, _ = model(tok, fused_state)
    assert rel(wrong, right) > 1e-4


# --- stop tokens, sampling, streaming ----------------------------------------------------------------------------

def test_stop_token_ends_its_row_and_the_others_continue():
    model = tiny()
    prompts = prompts_of([3, 8, 15], seed=5)
    free = generate(model, prompts, SamplingConfig(max_new_tokens=10))
    stop = free[0][3]
    got = generate(model, prompts, SamplingConfig(max_new_tokens=10, stop_tokens=[stop]))
    for r in range(3):
        want = free[r][:free[r].index(stop)] if stop in free[r] else free[r]
        assert got[r] == want
    assert len(got[0]) <= 3 and stop not in got[0]
    assert any(len(g) == 10 for g in got[1:])      # another row ran to max_new_tokens


def test_generation_ends_when_every_row_has_stopped():
    model = tiny()
    prompts = prompts_of([3, 8], seed=5)
    free = generate(model, prompts, SamplingConfig(max_new_tokens=6))
    firsts = [free[0][0], free[1][0]]
    steps = list(decode_steps(model, prompts, SamplingConfig(max_new_tokens=6, stop_tokens=firsts)))
    assert len(steps) == 1 and steps[0].emitted == [False, False]
    assert generate(model, prompts, SamplingConfig(max_new_tokens=6, stop_tokens=firsts)) == [[], []]


def test_sampling_is_seeded():
    model = tiny()
    prompts = prompts_of([4, 9], seed=6)

    def sample(seed):
        return generate(model, prompts, SamplingConfig(max_new_tokens=20, temperature=1.0, top_p=0.95, seed=seed))

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert sample(1) != generate(model, prompts, SamplingConfig(max_new_tokens=20))    # not greedy


def test_tiny_temperature_samples_the_argmax():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0], [5.0, 1.0, 4.99, 0.0]])
    draws = choose_next(logits, SamplingConfig(temperature=1e-40), torch.Generator().manual_seed(0))
    assert draws.tolist() == [1, 0]


def test_top_k_1_is_greedy():
    model = tiny()
    prompts = prompts_of([4, 30], seed=7)
    greedy = generate(model, prompts, SamplingConfig(max_new_tokens=15))
    assert generate(model, prompts, SamplingConfig(max_new_tokens=15, temperature=0.7, top_k=1, seed=3)) == greedy


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])            # ranked: 1 (0.5), 3 (0.3), 0 (0.15), 2 (0.05)
    scores = probs.log()[None]
    for p, kept in [(0.3, {1}), (0.5, {1}), (0.75, {1, 3}), (0.85, {1, 3, 0}), (0.97, {0, 1, 2, 3}),
                    (1.0, {0, 1, 2, 3})]:
        out = top_p_filter(scores, p)[0]
        assert set(torch.nonzero(out > float("-inf")).flatten().tolist()) == kept, p
        assert torch.equal(out[list(kept)], scores[0, list(kept)])       # kept scores unchanged
    # a top token above p on its own is still kept, alone
    assert (top_p_filter(torch.tensor([[0.0, 5.0, 1.0]]), 0.01) > float("-inf")).tolist() == [[False, True, False]]
    # sampling draws only from the kept set, and from all of it
    g = torch.Generator().manual_seed(0)
    draws = choose_next(scores.expand(2000, 4), SamplingConfig(temperature=1.0, top_p=0.75), g)
    assert set(draws.tolist()) == {1, 3}
    assert abs((draws == 1).float().mean().item() - 0.5 / 0.8) < 0.05      # renormalised over the kept set


def test_top_k_filter():
    scores = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5]])
    assert (top_k_filter(scores, 2) > float("-inf")).tolist() == [[False, True, False, True, False]]
    assert torch.equal(top_k_filter(scores, 0), scores) and torch.equal(top_k_filter(scores, 9), scores)


def test_stream_yields_what_generate_returns_lazily():
    model = tiny()
    prompt = prompts_of([11], seed=8)[0]
    for sampling in (SamplingConfig(max_new_tokens=12), SamplingConfig(max_new_tokens=12, temperature=0.9, seed=4)):
        assert list(stream(model, prompt, sampling)) == generate(model, [prompt], sampling)[0]
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    first = list(itertools.islice(stream(model, prompt, SamplingConfig(max_new_tokens=1000)), 3))
    assert len(first) == 3 and len(calls) == 3           # prefill + 2 steps: nothing runs ahead of the consumer
    assert torch.is_grad_enabled()                       # no_grad did not leak out of the suspended generator


def test_running_ahead_gives_the_same_steps_and_stays_one_step_ahead(monkeypatch):
    """The loop as it runs on CUDA (step i + 1 queued before step i's tokens are read), forced on the CPU: the same
    tokens and logits as the loop that waits, for greedy, seeded sampling and stop tokens that end rows at different
    steps; a consumer that stops early has paid for one step beyond what it took, not more."""
    from tnllm_plugin import generation
    model = tiny()
    prompts = prompts_of([3, 8, 20], seed=5)
    free = generate(model, prompts, SamplingConfig(max_new_tokens=10))
    settings = [SamplingConfig(max_new_tokens=10), SamplingConfig(max_new_tokens=10, temperature=0.9, top_k=20,
                                                                  seed=4),
                SamplingConfig(max_new_tokens=10, stop_tokens=[free[0][2], free[1][5]])]
    waiting = [run_steps(model, prompts, sampling) + (generate(model, prompts, sampling),) for sampling in settings]
    monkeypatch.setattr(generation, "runs_ahead", lambda device: True)
    for sampling, (want_tokens, want_logits, want_out) in zip(settings, waiting):
        tokens, logits = run_steps(model, prompts, sampling)
        assert tokens == want_tokens and torch.equal(logits, want_logits)
        assert generate(model, prompts, sampling) == want_out
    assert waiting[2][2][0] == free[0][:2]                  # the stops did end rows early
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    first = list(itertools.islice(stream(model, prompts[0], SamplingConfig(max_new_tokens=1000)), 3))
    assert first == free[0][:3] and len(calls) == 4         # prefill + 2 steps + the one queued ahead
    calls.clear()
    assert generate(model, prompts, SamplingConfig(max_new_tokens=5)) == [f[:5] for f in free]
    assert len(calls) == 5                                  # prefill + 4 steps: nothing queued past the last
    calls.clear()
    firsts = SamplingConfig(max_new_tokens=5, stop_tokens=[f[0] for f in free])
    assert generate(model, prompts, firsts) == [[], [], []]
    assert len(calls) == 1                  # every row ended at its first token: no step ahead, no decoder built


def test_decode_from_continues_a_prefill():
    """decode_from(model, state, logits) after prefill is decode_steps; its logits must be a prefill's last ones."""
    from tnllm_plugin.generation import check_prompts, decode_from, prefill
    model = tiny()
    prompts = prompts_of([4, 9], seed=7)
    sampling = SamplingConfig(max_new_tokens=8)
    want = list(decode_steps(model, prompts, sampling))
    with torch.no_grad():
        logits, state = prefill(model, check_prompts(prompts, VOCAB))
    got = list(decode_from(model, state, logits, sampling))
    assert [s.chosen for s in got] == [s.chosen for s in want]
    assert torch.equal(torch.stack([s.logits for s in got]), torch.stack([s.logits for s in want]))
    with pytest.raises(ValueError, match=r"logits must be \[batch, vocab=97\]"):
        next(decode_from(model, state, logits[:, :-1], sampling))
    with pytest.raises(ValueError, match="top_p"):
        next(decode_from(model, state, logits, SamplingConfig(top_p=0)))


def test_a_vocab_parallel_shard_is_refused_before_the_prefill(monkeypatch):
    from tnllm_plugin import generation
    model = tiny()
    model.vocab_parallel = True                 # what tnllm_plugin.parallel marks a tensor-parallel model with
    monkeypatch.setattr(generation, "prefill", lambda *a, **k: pytest.fail("prefilled before the check"))
    with pytest.raises(ValueError, match="vocab-parallel shard"):
        generate(model, [[1, 2]], SamplingConfig(max_new_tokens=2))


def test_on_token_is_called_in_production_order():
    model = tiny()
    prompts = prompts_of([2, 6, 13], seed=9)
    first = generate(model, prompts, SamplingConfig(max_new_tokens=8))
    stop = first[1][2]
    events = []
    out = generate(model, prompts, SamplingConfig(max_new_tokens=8, stop_tokens=[stop]),
                   on_token=lambda row, tok: events.append((row, tok)))
    for r in range(3):
        assert [t for row, t in events if row == r] == out[r]
    # step by step: every row's k-th token comes before any row's (k+1)-th; rows in order within a step
    seen = {r: 0 for r in range(3)}
    ranks = []
    for row, _ in events:
        ranks.append((seen[row], row))
        seen[row] += 1
    assert ranks == sorted(ranks)


@pytest.mark.parametrize("kw, prompts, message", [
    (dict(), [[]], "prompt 0 is empty"),
    (dict(), [], "no prompts"),
    (dict(), [[1, 2], [3, VOCAB]], f"prompt 1: token ids \\[{VOCAB}\\] are outside the vocabulary"),
    (dict(), [[-1]], "outside the vocabulary"),
    (dict(temperature=-0.5), [[1]], "temperature"),
    (dict(temperature=float("nan")), [[1]], "temperature"),
    (dict(top_k=-1), [[1]], "top_k"),
    (dict(top_p=0.0), [[1]], "top_p"),
    (dict(top_p=1.5), [[1]], "top_p"),
    (dict(max_new_tokens=0), [[1]], "max_new_tokens"),
    (dict(stop_tokens=[VOCAB + 3]), [[1]], "stop tokens"),
])
def test_bad_input_fails_early(kw, prompts, message):
    with pytest.raises(ValueError, match=message):
        generate(tiny(), prompts, SamplingConfig(**kw))


def test_cuda_graph_on_cpu_is_an_error():
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        generate(tiny(), [[1, 2]], SamplingConfig(max_new_tokens=2), cuda_graph=True)


# --- fairseq's sequence generator ----------------------------------------------------------------------------

@torch.no_grad()
def test_greedy_equals_fairseq_sequence_generator():
    """fairseq's generator (beam 1) forces the prompt one token at a time through the adapter's incremental_state
    and starts from </s>; our generate prefills in one block form. Same tokens; fairseq appends </s> at the end."""
    pytest.importorskip("fairseq")
    from fairseq.data import Dictionary
    from fairseq.sequence_generator import SequenceGenerator

    from tnllm_plugin.fairseq_adapter import TransNormerDecoder, TransNormerLanguageModel
    d = Dictionary()
    for i in range(VOCAB - d.nspecial):
        d.add_symbol(f"w{i}")
    cfg = TransNormerConfig(vocab_size=len(d), d_model=32, n_layers=2, n_heads=4, glu_dim=48, init_std=0.2,
                            pad_id=d.pad(), bos_id=d.bos(), eos_id=d.eos())
    torch.manual_seed(0)
    lm = TransNormerLanguageModel(TransNormerDecoder(TransNormerLLM(cfg), d)).eval()
    with_real_pad_embedding(lm.decoder.transnormer)
    new = 10
    for prompt in prompts_of([5, 17], seed=10):
        ours = generate(lm, [[d.eos()] + prompt], SamplingConfig(max_new_tokens=new, stop_tokens=[d.eos()]))[0]
        assert d.pad() not in ours      # fairseq never picks pad: the comparison needs a run where we do not either
        gen = SequenceGenerator([lm], d, beam_size=1, max_len_b=len(prompt) + new)
        src = torch.tensor([prompt])
        hypo = gen.generate([lm], {"net_input": {"src_tokens": src, "src_lengths": torch.tensor([len(prompt)])}},
                            prefix_tokens=src, bos_token=d.eos())[0][0]["tokens"].tolist()
        assert hypo[:len(prompt)] == prompt and hypo[-1] == d.eos()
        assert hypo[len(prompt):-1] == ours


# --- text <-> ids and the example script ----------------------------------------------------------------------

CORPUS = ["def read_file(path):", "    with open(path) as f:", "        return f.read()",
          "for line in lines: print(line)", "the quick brown fox jumps over the lazy dog",
          "import os, sys", "x = [i * i for i in range(10)]", "café naïve résumé"] * 20


@pytest.fixture(scope="module")
def spm_files(tmp_path_factory):
    """A small sentencepiece BPE model and a fairseq dict.txt of its pieces (count order, not spm order; the
    pieces the corpus does not use, byte pieces among them, follow with count 0)."""
    spm = pytest.importorskip("sentencepiece")
    tmp = tmp_path_factory.mktemp("spm")
    (tmp / "corpus.txt").write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(tmp / "corpus.txt"), model_prefix=str(tmp / "spm"), vocab_size=350,
                                   model_type="bpe", character_coverage=1.0, byte_fallback=True, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp / "spm.model"))
    counts = {}
    for line in CORPUS:
        for piece in sp.encode(line, out_type=str):
            counts[piece] = counts.get(piece, 0) + 1
    ordered = sorted(counts, key=lambda p: (-counts[p], p))
    ordered += [sp.id_to_piece(i) for i in range(sp.get_piece_size())
                if sp.id_to_piece(i) not in counts and not sp.is_control(i) and not sp.is_unknown(i)]
    lines = [f"{p} {counts.get(p, 0)}" for p in ordered] + ["madeupword0000 0", "madeupword0001 0"]
    (tmp / "dict.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp / "spm.model", tmp / "dict.txt", sp


def test_fairseq_dict_ids_match_fairseq_dictionary(spm_files):
    spm_model, dict_txt, sp = spm_files
    codec = TextCodec(spm_model, dict_txt)
    text = "def read_file(path): return the fox"
    pieces = sp.encode(text, out_type=str)
    ids = codec.encode(text)
    symbols = read_fairseq_dict(dict_txt)
    assert [symbols[i] for i in ids] == pieces and symbols[:4] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert codec.decode(ids) == text
    assert codec.decode([codec.eos_id] + ids + [codec.pad_id]) == text
    assert ids != list(sp.encode(text))                 # the dict's order is not sentencepiece's
    fairseq = pytest.importorskip("fairseq")             # the reference: fairseq's own Dictionary
    from fairseq.data import Dictionary
    d = Dictionary.load(str(dict_txt))
    assert len(d) == len(symbols) == codec.vocab_size
    assert ids == [d.index(p) for p in pieces]
    assert (codec.bos_id, codec.pad_id, codec.eos_id, codec.unk_id) == (d.bos(), d.pad(), d.eos(), d.unk())
    assert fairseq is not None


def test_without_a_dict_sentencepiece_ids_are_model_ids(spm_files):
    spm_model, _, sp = spm_files
    codec = TextCodec(spm_model)
    text = "import os, sys"
    assert codec.encode(text) == list(sp.encode(text)) and codec.decode(codec.encode(text)) == text
    assert codec.vocab_size == sp.get_piece_size() and codec.eos_id == sp.eos_id()
    assert codec.token_id("</s>") == sp.eos_id()


def test_a_dict_listing_ids_means_sentencepiece_ids(spm_files, tmp_path, monkeypatch):
    """tnllm_plugin.convert writes a dict.txt of ids ("4", "5", ...) beside a checkpoint converted from the released
    layout; it names no pieces, so text must encode to sentencepiece's ids (not to <unk> everywhere), in the codec
    and in the example script, which finds that dict.txt through load_model's info."""
    spm_model, _, sp = spm_files
    ids_dict = tmp_path / "dict.txt"
    ids_dict.write_text("".join(f"{i} 1\n" for i in range(4, sp.get_piece_size())), encoding="utf-8")
    text = "def read_file(path): return the fox"
    codec = TextCodec(spm_model, ids_dict)
    assert codec.symbols is None and codec.encode(text) == list(sp.encode(text))
    model = tiny(vocab_size=sp.get_piece_size())
    example = load_example()
    info = {"dict_path": str(ids_dict), "bos_id": 1, "eos_id": 2}
    monkeypatch.setattr(example, "load_model", lambda path, device: (model, info))
    out = io.StringIO()
    example.main(["--checkpoint", "converted", "--spm", str(spm_model), "--prompt", text, "--max-new-tokens", "6"],
                 out=out)
    prompt = [1] + list(sp.encode(text))
    want = generate(model, [prompt], SamplingConfig(max_new_tokens=6, stop_tokens=[2]))[0]
    assert out.getvalue() == text + sp.decode(prompt + want)[len(sp.decode(prompt)):] + "\n"


def test_dict_reader_errors_and_overwrite(tmp_path):
    p = tmp_path / "dict.txt"
    p.write_text("a 3\nb 2\na 1 #fairseq:overwrite\n")
    assert read_fairseq_dict(p) == ["<s>", "<pad>", "</s>", "<unk>", "a", "b", "a"]
    p.write_text("a 3\na 2\n")
    with pytest.raises(ValueError, match="duplicate symbol 'a'"):
        read_fairseq_dict(p)
    p.write_text("a 3\nnocount\n")
    with pytest.raises(ValueError, match="dict.txt:2: expected"):
        read_fairseq_dict(p)


def test_text_stream_deltas_add_up_to_the_decoded_text(spm_files):
    spm_model, dict_txt, _ = spm_files
    for codec in (TextCodec(spm_model, dict_txt), TextCodec(spm_model)):
        prompt, cont = codec.encode("def read_file"), codec.encode("(path): résumé 😀 done")
        s = TextStream(codec, prompt)
        deltas = [s.push(t) for t in cont] + [s.flush()]
        assert "".join(deltas) == codec.decode(prompt + cont)[len(codec.decode(prompt)):]
        assert "".join(deltas) == " (path): résumé 😀 done"     # sentencepiece's dummy prefix: a leading space
        assert not any("\ufffd" in d for d in deltas)      # a multi-byte character waits for all its bytes
        assert deltas.count("") >= 3                        # (the emoji is 4 byte pieces: 3 pushes show nothing)


def load_example():
    spec = importlib.util.spec_from_file_location("generate_example", REPO / "examples" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("with_dict", [True, False])
def test_example_script_streams_the_continuation(spm_files, monkeypatch, with_dict):
    spm_model, dict_txt, sp = spm_files
    codec = TextCodec(spm_model, dict_txt if with_dict else None)
    model = tiny(vocab_size=codec.vocab_size + 3)
    example = load_example()
    info = {"dict_path": str(dict_txt)} if with_dict else {"bos_id": 1, "eos_id": 2}
    monkeypatch.setattr(example, "load_model", lambda path, device: (model, info))
    out = io.StringIO()
    example.main(["--checkpoint", "unused.pt", "--spm", str(spm_model), "--prompt", "def read", "--max-new-tokens",
                  "9", "--stop", "path"], out=out)
    start = codec.eos_id if with_dict else 1
    prompt = [start] + codec.encode("def read")
    want = generate(model, [prompt], SamplingConfig(max_new_tokens=9, stop_tokens=[2, codec.token_id("path")]))[0]
    assert out.getvalue() == "def read" + codec.decode(prompt + want)[len(codec.decode(prompt)):] + "\n"
    with pytest.raises(ValueError, match="a stop token must be a single token"):
        example.main(["--checkpoint", "x", "--spm", str(spm_model), "--prompt", "a", "--stop", "read_file(path)"],
                     out=io.StringIO())
    small = tiny(vocab_size=codec.vocab_size - 1)
    monkeypatch.setattr(example, "load_model", lambda path, device: (small, info))
    with pytest.raises(ValueError, match="the tokenizer has .* ids, the model"):
        example.main(["--checkpoint", "x", "--spm", str(spm_model), "--prompt", "a"], out=io.StringIO())


def test_example_script_checks_options_before_loading(spm_files, monkeypatch):
    example = load_example()
    monkeypatch.setattr(example, "load_model", lambda path, device: pytest.fail("loaded before the checks"))
    for bad, message in [(["--top-p", "0"], "top_p"), (["--temperature", "-1"], "temperature"),
                         (["--max-new-tokens", "0"], "max_new_tokens")]:
        with pytest.raises(ValueError, match=message):
            example.main(["--checkpoint", "x", "--spm", str(spm_files[0]), "--prompt", "a"] + bad, out=io.StringIO())


# --- CUDA graph (GPU) -----------------------------------------------------------------------------------------

GPU_SHAPE = dict(vocab_size=512, d_model=128, n_heads=2, glu_dim=256)


@pytest.mark.gpu
@pytest.mark.parametrize("lrpe_layers", [(0,), (0, 1, 2)])
def test_cuda_graph_decoding_equals_eager(lrpe_layers, monkeypatch):
    """fp32, Triton kernels inside the graph: the replayed step runs the eager step's kernels, so the same tokens
    and (to rounding) the same logits at every step; a position frozen at capture would drift from step 2 on."""
    from tnllm_plugin import generation
    model = tiny(**GPU_SHAPE, lrpe_layers=lrpe_layers).cuda()
    prompts = prompts_of([3, 40, 90], seed=11)             # batch 3, different lengths, one past the block of 64
    greedy = SamplingConfig(max_new_tokens=20)
    eager_tokens, eager_logits = run_steps(model, prompts, greedy, cuda_graph=False)
    graph_tokens, graph_logits = run_steps(model, prompts, greedy, cuda_graph=True)
    assert graph_tokens == eager_tokens
    assert len(eager_logits) == 20
    for i in range(20):
        assert rel(graph_logits[i], eager_logits[i]) < 1e-5, f"step {i}"
    sampled = SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.9, seed=5)
    assert generate(model, prompts, sampled, cuda_graph=True) == generate(model, prompts, sampled, cuda_graph=False)
    # the default on CUDA is the graph
    built = []
    real = generation.CudaGraphDecoder
    monkeypatch.setattr(generation, "CudaGraphDecoder", lambda *a, **k: built.append(1) or real(*a, **k))
    assert generate(model, prompts, greedy) == eager_tokens and built == [1]
    # Triton prefill of the left-padded batch against each prompt alone (tf32-class kernels: loose)
    for r, prompt in enumerate(prompts):
        _, alone = run_steps(model, [prompt], SamplingConfig(max_new_tokens=1), cuda_graph=False)
        assert rel(eager_logits[0, r], alone[0, 0]) < 5e-3, f"row {r}"


@pytest.mark.gpu
def test_cuda_graph_decoders_leave_no_memory_behind():
    """Every decoder warms up on one stream per device: with a new stream each, cuBLAS kept another 32 MiB workspace
    per decoder built (its LM head's product runs in the warm-up), so memory grew with every generate() call."""
    import gc
    from tnllm_plugin.generation import CudaGraphDecoder, check_prompts, prefill
    model = tiny(**GPU_SHAPE).cuda()
    with torch.no_grad():
        logits, state = prefill(model, check_prompts(prompts_of([3, 40], seed=2), VOCAB))
        tok = logits.argmax(-1)
        left = []
        for _ in range(4):
            decoder = CudaGraphDecoder(model, state)
            decoder(tok)
            del decoder
            gc.collect()
            torch.cuda.synchronize()
            left.append(torch.cuda.memory_allocated())
    assert left[1:] == left[:1] * 3, [f"{b / 2**20:.1f} MiB" for b in left]


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [dict(), dict(lrpe_layers=(0, 1, 2), qk_act="1+elu"), dict(norm="rms", qk_act="none")])
def test_cuda_fused_step_equals_the_composition_and_the_block_form(kw, monkeypatch):
    """fp32 on CUDA: the graphed decode with the fused Triton step (what the model takes there) gives the tokens and,
    to fp32 rounding, the logits of the graphed decode through the PyTorch composition; and the logits of one
    block-form forward over each prompt and its generated tokens (Triton's chunked kernel: tf32-class, so to 5e-3,
    and teacher-forced, so a near-tie of two tokens cannot make the sequences part)."""
    from tnllm_kernels.gla_decode import triton_step
    from tnllm_plugin import model as model_module
    model = tiny(**GPU_SHAPE, **kw).cuda()
    prompts = prompts_of([3, 40, 90], seed=13)
    greedy = SamplingConfig(max_new_tokens=20)
    calls = []
    real = triton_step.gla_decode_step_triton
    monkeypatch.setattr(triton_step, "gla_decode_step_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused_tokens, fused_logits = run_steps(model, prompts, greedy, cuda_graph=True)
    assert calls, "the fused step did not run"
    monkeypatch.setattr(model_module, "gla_decode_step_applies", lambda *a, **k: False)
    calls.clear()
    composed_tokens, composed_logits = run_steps(model, prompts, greedy, cuda_graph=True)
    assert not calls
    assert fused_tokens == composed_tokens
    for i in range(20):
        assert rel(fused_logits[i], composed_logits[i]) < 1e-5, f"step {i}"
    for r, prompt in enumerate(prompts):
        with torch.no_grad():
            full, _ = model(torch.tensor([prompt + fused_tokens[r][:-1]], device="cuda"))
        assert rel(fused_logits[:, r], full[0, len(prompt) - 1:]) < 5e-3, f"row {r}"


@pytest.mark.gpu
def test_cuda_graph_fp64_equals_cpu_argmax_loop_for_each_prompt():
    """float64 (PyTorch paths on the GPU, rounding ~1e-15): the graphed batch of different lengths gives every
    prompt's brute-force greedy tokens and logits, so nothing but rounding separates the schemes."""
    cpu = tiny(**GPU_SHAPE).double()
    gpu = tiny(**GPU_SHAPE).double().cuda()
    prompts = prompts_of([3, 40, 90], seed=12)
    tokens, logits = run_steps(gpu, prompts, SamplingConfig(max_new_tokens=20), cuda_graph=True)
    for r, prompt in enumerate(prompts):
        want_tokens, want_logits = argmax_loop(cpu, prompt, 20)
        assert tokens[r] == want_tokens, f"row {r}"
        assert rel(logits[:, r].cpu(), want_logits) < 1e-9, f"row {r}"


@pytest.mark.slow
def test_example_script_on_a_fairseq_checkpoint_equals_fairseq_hub(tmp_path):
    """End to end: sentencepiece + fairseq-preprocess + a few fairseq-train updates (the quickstart's recipe, tiny),
    then examples/generate.py (tnllm_plugin.convert.load_model) against fairseq's hub generator, greedy."""
    pytest.importorskip("fairseq")
    pytest.importorskip("tnllm_plugin.convert")
    import os
    import subprocess
    import sys

    import sentencepiece as spm
    (tmp_path / "raw.txt").write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "raw.txt"), model_prefix=str(tmp_path / "spm"),
                                   vocab_size=350, model_type="bpe", character_coverage=1.0, byte_fallback=True,
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "spm.model"))
    with open(tmp_path / "train.bpe", "w", encoding="utf-8") as f:
        for line in CORPUS:
            f.write(" ".join(sp.encode(line, out_type=str)) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    bindir = Path(sys.executable).parent

    def run(cmd):
        out = subprocess.run([str(c) for c in cmd], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out.stdout

    run([bindir / "fairseq-preprocess", "--only-source", "--trainpref", "train.bpe", "--validpref", "train.bpe",
         "--destdir", "bin", "--workers", "1"])
    run([bindir / "fairseq-train", "bin", "--user-dir", REPO / "tnllm_plugin", "--task", "language_modeling",
         "--cpu", "--arch", "transnormer_llm_tiny", "--criterion", "transnormer_llm_cross_entropy",
         "--tokens-per-sample", "64", "--max-tokens", "512", "--optimizer", "adam", "--lr", "5e-3",
         "--max-update", "30", "--save-dir", "ckpt", "--no-epoch-checkpoints", "--seed", "1", "--num-workers", "0"])
    prompt, new = "the quick brown", 12
    ckpt = tmp_path / "ckpt" / "checkpoint_last.pt"
    # no --dict: load_model's info names the dict.txt of the checkpoint's data directory
    text = run([sys.executable, REPO / "examples" / "generate.py", "--checkpoint", ckpt, "--spm",
                tmp_path / "spm.model", "--prompt", prompt, "--max-new-tokens", new])
    from tnllm_plugin.fairseq_adapter import TransNormerLanguageModel
    lm = TransNormerLanguageModel.from_pretrained(str(tmp_path / "ckpt"), "checkpoint_last.pt",
                                                  str(tmp_path / "bin"), bpe="sentencepiece",
                                                  sentencepiece_model=str(tmp_path / "spm.model")).eval()
    n_prompt = len(sp.encode(prompt))
    want = lm.sample(prompt, beam=1, max_len_b=n_prompt + new)      # fairseq's length counts the prompt
    assert text.strip() == want.strip() and len(want) > len(prompt)
