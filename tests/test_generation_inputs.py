"""Generation and serving inputs (issue 16, item 4): every bad argument of tnllm_plugin.generation and
examples/generate.py is a ValueError naming it (values out of range are in tests/test_generation.py's
test_bad_input_fails_early; here the wrong types that int() / float() used to accept silently), and the unusual but
valid inputs give the right answer: rows of wildly different lengths, greedy decoding with sampling filters set, a
top_k beyond the vocabulary. (Prompts far longer than any training length: tests/test_finite.py, 40k tokens.)"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tnllm_plugin.generation import SamplingConfig, decode_steps, generate
from tnllm_plugin.model import TransNormerConfig, TransNormerLLM

REPO = Path(__file__).resolve().parents[1]
VOCAB = 97


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, glu_dim=48, init_std=0.2)
    return TransNormerLLM(TransNormerConfig(**{**cfg, **kw})).eval()


@pytest.mark.parametrize("kw, prompts, message", [
    (dict(), [[1.7, 2]], r"prompt 0: token ids must be ints, got \[1\.7\]"),
    (dict(), [[3], ["5"]], r"prompt 1: token ids must be ints, got \['5'\]"),
    (dict(), [[True, 2]], r"prompt 0: token ids must be ints, got \[True\]"),
    (dict(), torch.tensor([[1.0, 2.0]]), r"prompt 0: token ids must be ints"),
    (dict(), [[float("nan")]], r"prompt 0: token ids must be ints"),
    (dict(temperature="0.8"), [[1]], r"temperature must be finite and >= 0 \(0 = greedy\), got '0\.8'"),
    (dict(temperature=True), [[1]], r"temperature"),
    (dict(temperature=float("inf")), [[1]], r"temperature"),
    (dict(temperature=0.5, top_p="0.9"), [[1]], r"top_p must be a number in \(0, 1\]"),
    (dict(temperature=0.5, top_p=float("nan")), [[1]], r"top_p"),
    (dict(temperature=0.5, top_p=-0.1), [[1]], r"top_p"),
    (dict(temperature=0.5, top_k=2.5), [[1]], r"top_k must be an int >= 0 \(0 = off\), got 2\.5"),
    (dict(temperature=0.5, top_k=True), [[1]], r"top_k"),
    (dict(max_new_tokens=-3), [[1]], r"max_new_tokens must be an int >= 1, got -3"),
    (dict(max_new_tokens=2.0), [[1]], r"max_new_tokens"),
    (dict(stop_tokens="2"), [[1]], r"stop_tokens must be a sequence of token ids"),
    (dict(stop_tokens=[2.5]), [[1]], r"stop_tokens must be a sequence of token ids"),
    (dict(seed=1.5), [[1]], r"seed must be an int or None"),
])
def test_wrong_types_are_refused_naming_the_argument(kw, prompts, message):
    with pytest.raises(ValueError, match=message):
        generate(tiny(), prompts, SamplingConfig(**kw))


def test_integer_kinds_that_are_ids_are_accepted():
    model = tiny()
    want = generate(model, [[5, 6, 7]], SamplingConfig(max_new_tokens=4))
    assert generate(model, [np.array([5, 6, 7])], SamplingConfig(max_new_tokens=np.int64(4))) == want
    assert generate(model, torch.tensor([[5, 6, 7]]), SamplingConfig(max_new_tokens=4, stop_tokens=[np.int32(0)])) == want


@torch.no_grad()
def test_rows_of_wildly_different_lengths_each_equal_the_prompt_alone():
    """One row of 1 token, one of 3000, one of 2 (LRPE on every layer: positions matter everywhere): left padding
    by 2999 tokens must change nothing for the short rows."""
    model = tiny(lrpe_layers=(0, 1, 2))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (1, 3000, 2)]
    sampling = SamplingConfig(max_new_tokens=6)
    steps = list(decode_steps(model, prompts, sampling))
    for r, prompt in enumerate(prompts):
        alone = list(decode_steps(model, [prompt], sampling))
        assert [s.chosen[r] for s in steps] == [s.chosen[0] for s in alone], f"row {r}"
        got = torch.stack([s.logits[r] for s in steps])
        want = torch.stack([s.logits[0] for s in alone])
        assert ((got - want).norm() / want.norm()) < 1e-5, f"row {r}"


def test_greedy_with_filters_is_greedy_and_top_k_beyond_the_vocabulary_is_off():
    """temperature 0 with top_k / top_p set is greedy (both filters keep the argmax, so that is the right answer,
    not an ignored setting); top_k larger than the vocabulary keeps every token."""
    model = tiny()
    prompts = [[5, 9, 13, 2, 40], [7]]
    greedy = generate(model, prompts, SamplingConfig(max_new_tokens=8))
    assert generate(model, prompts, SamplingConfig(max_new_tokens=8, top_k=3, top_p=0.5)) == greedy
    sampled = SamplingConfig(max_new_tokens=8, temperature=1.0, seed=5)
    assert generate(model, prompts, SamplingConfig(**{**vars(sampled), "top_k": 10 * VOCAB})) == \
        generate(model, prompts, sampled)


@pytest.mark.parametrize("flag, value, message", [
    ("--top-k", "-1", "top_k must be an int >= 0"),
    ("--max-new-tokens", "-5", "max_new_tokens must be an int >= 1"),
    ("--top-p", "1.5", "top_p must be a number in"),
])
def test_example_script_names_the_bad_option_without_a_traceback(flag, value, message):
    out = subprocess.run([sys.executable, str(REPO / "examples" / "generate.py"), "--checkpoint", "none",
                          "--spm", "none", "--prompt", "a", flag, value], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.startswith(f"error: {message}"), out.stderr[-2000:]
    assert "Traceback" not in out.stderr
