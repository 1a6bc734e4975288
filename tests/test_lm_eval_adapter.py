"""The lm-eval model transnormer_llm (tnllm_plugin/lm_eval_adapter.py) on a tiny random model and a tiny
sentencepiece model trained here: loglikelihood against one full forward, batched against one request at a
time (left padding, shared context states), rolling windows against one pass, generate_until against greedy
generate, and lm_eval.simple_evaluate / lm-eval's command line on the local tasks in tests/data/lm_eval_tiny
(acc and word_perplexity recomputed by hand)."""
import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (requirements.txt pins it)")
spm = pytest.importorskip("sentencepiece", reason="sentencepiece is not installed")

from lm_eval.api.instance import Instance  # noqa: E402

from tnllm_plugin import lm_eval_adapter as adapter  # noqa: E402
from tnllm_plugin.generation import SamplingConfig, TextCodec, generate  # noqa: E402
from tnllm_plugin.lm_eval_adapter import TransNormerLMEval  # noqa: E402
from tnllm_plugin.model import TransNormerConfig, TransNormerLLM  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "data" / "lm_eval_tiny"
ITEMS = [json.loads(line) for line in (TASKS / "items.jsonl").read_text().splitlines() if line.strip()]
ATOL = 1e-4


# --- fixtures: tokenizers and models --------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: threads only add overhead (tens of times slower on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    """A 100-piece BPE model trained on the tiny tasks' text plus sentences made of its words."""
    tmp = tmp_path_factory.mktemp("spm")
    text = [v for item in ITEMS for v in (item["question"], item["passage"], item["prompt"], *item["choices"])]
    words = " ".join(text).split()
    rng = random.Random(0)
    text += [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) for _ in range(300)]
    (tmp / "corpus.txt").write_text("\n".join(text) + "\n")
    spm.SentencePieceTrainer.train(input=str(tmp / "corpus.txt"), model_prefix=str(tmp / "sp"), vocab_size=100,
                                   model_type="bpe", character_coverage=1.0, minloglevel=2)
    return tmp / "sp.model"


@pytest.fixture(scope="module")
def codec(spm_path):
    return TextCodec(spm_path)


@pytest.fixture(scope="module")
def dict_codec(spm_path, tmp_path_factory):
    """fairseq ids: dict.txt lists the pieces (not the three specials) in reverse order, two left out (-> unk)."""
    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not sp.is_control(i) and not sp.is_unknown(i)]
    path = tmp_path_factory.mktemp("dict") / "dict.txt"
    path.write_text("".join(f"{p} {1000 - i}\n" for i, p in enumerate(reversed(pieces[2:]))))
    return TextCodec(spm_path, path)


def tiny_model(vocab_size, seed=0):
    # init_std 0.2: the next token depends on the context (a wrong state or position shows); block_size 8:
    # the block form crosses blocks; LRPE on layer 0 (the default): positions matter
    torch.manual_seed(seed)
    cfg = TransNormerConfig(vocab_size=vocab_size, d_model=32, n_layers=3, n_heads=4, glu_dim=48, block_size=8,
                            init_std=0.2)
    model = TransNormerLLM(cfg).eval()
    with torch.no_grad():        # a real (nonzero) pad embedding: padding must be invisible through the mask
        model.embed_tokens.weight[cfg.pad_id].normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def model(codec):
    return tiny_model(codec.vocab_size)


def make_lm(model, codec, **kw):
    return TransNormerLMEval(model=model, tokenizer=codec, **kw)


def ll_requests(pairs):
    return [Instance("loglikelihood", {}, (c, x), i) for i, (c, x) in enumerate(pairs)]


def rolling_requests(docs):
    return [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)]


def gen_requests(pairs):
    return [Instance("generate_until", {}, (c, kw), i) for i, (c, kw) in enumerate(pairs)]


# --- references computed here, by brute force -----------------------------------------------------------------

@torch.no_grad()
def full_forward_score(model, ids, n_scored):
    """Sum of log-softmax over ONE forward of ids[:-1] at the last n_scored targets, and whether each of them
    is the argmax."""
    logits, _ = model(torch.tensor([ids[:-1]]))
    logp = logits[0].double().log_softmax(-1)
    targets = torch.tensor(ids[1:])
    picked = logp.gather(-1, targets[:, None])[:, 0][-n_scored:]
    greedy = (logp.argmax(-1) == targets)[-n_scored:]
    return float(picked.sum()), bool(greedy.all())


def hand_loglikelihood(model, codec, prefix, context, continuation):
    """The documented convention, spelled out: prefix + tokens of context + continuation as ONE text, the
    continuation being the tokens after those of the (right-stripped) context."""
    own = codec.encode(context.rstrip()) if context.strip() else []
    whole = codec.encode(context + continuation)
    assert whole[:len(own)] == own, "test text whose context tokens are not a prefix of the whole"
    return full_forward_score(model, [prefix] + whole, len(whole) - len(own))


PAIRS = [
    ("Question: What colour is the lighthouse?\nAnswer:", " red"),
    ("Question: What colour is the lighthouse?\nAnswer:", " green"),
    ("Question: What colour is the lighthouse?\nAnswer:", " striped blue and white"),
    ("Question: What colour is the lighthouse?\nAnswer: ", "striped"),            # trailing space moves over
    ("", "The keeper climbs ninety steps."),                                       # empty context: the prefix
    ("The goat", " Pell"),
    (ITEMS[4]["passage"] + " " + ITEMS[5]["passage"], " The bell rings at noon."),  # longer than the windows
    ("Snow falls on the village in the deepest part of", " winter"),
]


# --- loglikelihood --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch_size,max_length", [(1, 4096), (3, 5), (8, 16)])
def test_loglikelihood_equals_sum_over_one_full_forward(model, codec, batch_size, max_length):
    lm = make_lm(model, codec, batch_size=batch_size, max_length=max_length)
    assert lm.prefix_id == codec.bos_id == 1          # sentencepiece ids: conditioned on <s>
    got = lm.loglikelihood(ll_requests(PAIRS))
    for (context, continuation), (ll, greedy) in zip(PAIRS, got):
        want_ll, want_greedy = hand_loglikelihood(model, codec, lm.prefix_id, context, continuation)
        assert ll == pytest.approx(want_ll, abs=ATOL), (context, continuation)
        assert greedy == want_greedy
    assert len(codec.encode(PAIRS[6][0])) > 3 * 16     # the long context really runs in several windows
    assert len({round(ll, 3) for ll, _ in got}) == len(PAIRS)


def test_batched_equals_one_by_one(model, codec):
    """Left-padded prefills, shared context states and right-padded continuations in windows (batch 4,
    windows of 3) against each request alone in one window, without padding."""
    batched = make_lm(model, codec, batch_size=4, max_length=3).loglikelihood(ll_requests(PAIRS))
    single = [make_lm(model, codec, batch_size=1, max_length=4096).loglikelihood(ll_requests([p]))[0]
              for p in PAIRS]
    for (a, ga), (b, gb) in zip(batched, single):
        assert a == pytest.approx(b, abs=ATOL)
        assert ga == gb


@torch.no_grad()
def test_left_padding_with_mask_is_exact_and_needed(model, codec):
    """The prefill of two contexts of different lengths in one left-padded batch: next-token log-probs and
    states equal those of each context alone; without the padding mask they would not (the test can fail)."""
    lm = make_lm(model, codec, batch_size=2, max_length=4)
    short, long = [1] + codec.encode("The goat"), [1] + codec.encode("In summer the children swim in the river")
    lp, state = lm._prefill([long, short])
    for row, ctx in enumerate([long, short]):
        lp1, state1 = lm._prefill([ctx])
        assert torch.allclose(lp[row], lp1[0], atol=1e-5)
        for kv, kv1 in zip(state.kv, state1.kv):
            assert torch.allclose(kv[row], kv1[0], atol=1e-5)
    # the same batch with the padding unmasked: the short row's state takes in the pad tokens
    pad = model.cfg.pad_id
    tokens = torch.tensor([long, [pad] * (len(long) - len(short)) + short])
    positions = torch.tensor([0, len(short) - len(long)])
    logits, _ = model(tokens, use_cache=True, positions=positions)
    assert not torch.allclose(logits[1, -1].float().log_softmax(-1), lp[1], atol=1e-3)


def test_greedy_flag_and_token_level_sharing(model, codec):
    """is_greedy on continuations made of the model's own argmax tokens, and one changed token."""
    lm = make_lm(model, codec, batch_size=2, max_length=4)
    ctx = [1] + codec.encode("The twins mend the nets")
    seq = list(ctx)
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
    greedy = seq[len(ctx):]
    other = greedy[:3] + [(greedy[3] + 1) % model.cfg.vocab_size] + greedy[4:]
    got = lm._loglikelihood_tokens([(ctx, greedy), (ctx, other), (ctx, greedy[:1]), (ctx, [])])
    assert [g for _, g in got] == [True, False, True, True]
    assert got[0][0] == pytest.approx(full_forward_score(model, seq, 6)[0], abs=ATOL)
    assert got[3][0] == 0.0


def test_fairseq_dict_ids_and_eos_prefix(dict_codec):
    """With a fairseq dict.txt the ids are the dictionary's (pieces by string, missing ones -> <unk>=3) and the
    conditioning token is </s> = 2 (fairseq's convention)."""
    model = tiny_model(dict_codec.vocab_size, seed=1)
    lm = make_lm(model, dict_codec, batch_size=3, max_length=6)
    assert (lm.prefix_id, lm.eos_id) == (2, 2)
    ids = [i for c, x in PAIRS for i in dict_codec.encode(c + x)]
    assert 3 in ids and max(ids) < dict_codec.vocab_size          # some pieces are unknown to the dict
    for (context, continuation), (ll, greedy) in zip(PAIRS, lm.loglikelihood(ll_requests(PAIRS))):
        want_ll, want_greedy = hand_loglikelihood(model, dict_codec, 2, context, continuation)
        assert ll == pytest.approx(want_ll, abs=ATOL)
        assert greedy == want_greedy


# --- loglikelihood_rolling ------------------------------------------------------------------------------------

def test_rolling_windows_equal_one_pass(model, codec):
    docs = [ITEMS[0]["passage"] + " " + ITEMS[1]["passage"] + " " + ITEMS[2]["passage"], ITEMS[3]["passage"],
            "Snow.", ""]
    want = [full_forward_score(model, [1] + codec.encode(d), len(codec.encode(d)))[0] if d else 0.0 for d in docs]
    assert len(codec.encode(docs[0])) > 100
    for batch_size, max_length in [(1, 4096), (2, 7), (4, 3)]:
        got = make_lm(model, codec, batch_size=batch_size, max_length=max_length) \
            .loglikelihood_rolling(rolling_requests(docs))
        assert got == pytest.approx(want, abs=ATOL), (batch_size, max_length)
    assert want[0] < want[1] < want[2] < 0


# --- generate_until -------------------------------------------------------------------------------------------

def greedy_text(model, codec, context, n):
    ids = codec.encode(context)
    new = generate(model, [[1] + ids], SamplingConfig(max_new_tokens=n, stop_tokens=(codec.eos_id,)))[0]
    return codec.decode(ids + new)[len(codec.decode(ids)):], new


def test_generate_until_is_greedy_generate_cut_at_the_stop_string(codec, monkeypatch):
    model = tiny_model(codec.vocab_size)
    with torch.no_grad():   # eos logit 0 while the others spread around 0: greedy text runs the full 20 tokens
        model.lm_head.weight[codec.eos_id] = 0
    contexts = ["The lighthouse on Brindle Point is", "Every Tuesday the baker sells", "Snow"]
    full = [greedy_text(model, codec, c, 20) for c in contexts]
    assert all(len(new) == 20 for _, new in full), "pick contexts whose greedy text does not end at eos"
    # stop strings: two characters taken from the middle of each greedy text, and one that never occurs
    stops = [text[6:8] for text, _ in full]
    calls = []
    real_generate = adapter.generate

    def counting_generate(*args, on_token=None, **kw):
        def count(row, token):
            calls.append(row)
            on_token(row, token)
        return real_generate(*args, on_token=count, **kw)

    monkeypatch.setattr(adapter, "generate", counting_generate)
    lm = make_lm(model, codec, batch_size=2)
    requests = [(c, {"until": [s, "no such text"], "max_gen_toks": 20}) for c, s in zip(contexts, stops)]
    requests.append((contexts[0], {"until": "no such text", "max_gen_toks": 20, "do_sample": False}))
    got = lm.generate_until(gen_requests(requests))
    for (text, _), stop, out in zip(full, stops, got):
        assert out == text[:text.index(stop)]
        assert len(out) <= 6 < len(text)
    assert got[3] == full[0][0]                     # no stop string: the whole greedy text
    # the batches stopped once every row had its stop string: far fewer tokens than 20 per row
    assert len(calls) < 20 * 3 + 20


def test_gen_kwargs():
    parse = adapter.sampling_from_gen_kwargs
    assert parse({"until": "\n\n"}, 256) == (["\n\n"], 256, 0.0, 0, 1.0)
    assert parse({"until": ["a", "b"], "max_gen_toks": 5, "temperature": 0.7}, 256) == (["a", "b"], 5, 0.7, 0, 1.0)
    assert parse({"do_sample": True}, 9) == ([], 9, 1.0, 0, 1.0)
    assert parse({"do_sample": False, "temperature": 0.8, "top_k": 5, "top_p": 0.9}, 9) == ([], 9, 0.0, 5, 0.9)
    assert parse({"do_sample": True, "temperature": 0.5, "top_p": 0.9}, 9)[2:] == (0.5, 0, 0.9)
    with pytest.raises(ValueError):
        parse({"max_gen_toks": 0}, 9)
    assert adapter.cut_at_stop("abc. def\nxyz", [".", "\n"]) == ("abc", True)
    assert adapter.cut_at_stop("abc", ["", "z"]) == ("abc", False)


def test_constructor_checks(model, codec):
    with pytest.raises(ValueError, match="checkpoint"):
        TransNormerLMEval(spm="x.model")
    with pytest.raises(ValueError, match="batch_size"):
        make_lm(model, codec, batch_size=0)
    with pytest.raises(TypeError, match="unknown model_args"):
        make_lm(model, codec, pretrained="gpt2")
    with pytest.raises(ValueError, match="vocabulary"):
        make_lm(tiny_model(50), codec)



def test_loading_checks_name_the_argument(model, codec):
    """Bad loading arguments fail before anything is read or converted, with a message naming the argument."""
    with pytest.raises(ValueError, match="dtype must be one of"):
        make_lm(model, codec, dtype="float8")
    with pytest.raises(ValueError, match="either checkpoint= or model="):
        make_lm(model, codec, checkpoint="no/such/checkpoint")
    with pytest.raises(ValueError, match="spm="):
        TransNormerLMEval(model=model)
    with pytest.raises(ValueError, match="prefix token id"):
        make_lm(model, codec, prefix_token_id=model.cfg.vocab_size)
    assert next(model.parameters()).dtype == torch.float32

# --- lm-eval itself -------------------------------------------------------------------------------------------

def by_hand_metrics(model, codec, prefix):
    """acc of the multiple-choice task and word_perplexity of the rolling task, from full forwards."""
    correct = 0
    for item in ITEMS:
        context = f"Question: {item['question']}\nAnswer:"
        lls = [hand_loglikelihood(model, codec, prefix, context, " " + c)[0] for c in item["choices"]]
        correct += int(max(range(len(lls)), key=lls.__getitem__) == item["label"])
    total_ll = sum(full_forward_score(model, [prefix] + codec.encode(it["passage"]),
                                      len(codec.encode(it["passage"])))[0] for it in ITEMS)
    words = sum(len(re.split(r"\s+", it["passage"])) for it in ITEMS)
    return correct / len(ITEMS), math.exp(-total_ll / words)


def test_simple_evaluate_on_the_local_tasks(model, codec):
    from lm_eval.api.registry import get_model, model_registry
    from lm_eval.tasks import TaskManager
    assert get_model("transnormer_llm") is TransNormerLMEval
    assert "hf" in model_registry.keys()          # lm-eval's own models are still there
    tm = TaskManager(include_path=str(TASKS), include_defaults=False)
    out = lm_eval.simple_evaluate(
        model="transnormer_llm", model_args={"model": model, "tokenizer": codec, "batch_size": 3, "max_length": 8},
        tasks=["tnllm_tiny"], task_manager=tm, bootstrap_iters=0, log_samples=True)
    res = out["results"]
    acc, word_ppl = by_hand_metrics(model, codec, 1)
    assert res["tnllm_tiny_mc"]["acc,none"] == pytest.approx(acc)
    assert res["tnllm_tiny_ppl"]["word_perplexity,none"] == pytest.approx(word_ppl, rel=1e-4)
    assert 0.0 <= res["tnllm_tiny_gen"]["exact_match,none"] <= 1.0
    sample = out["samples"]["tnllm_tiny_gen"][0]
    text = greedy_text(model, codec, sample["arguments"][0][0], 12)[0]
    assert sample["resps"][0][0] == adapter.cut_at_stop(text, [".", "\n"])[0]


@pytest.mark.slow
def test_command_line_on_a_checkpoint(model, codec, spm_path, tmp_path):
    """lm-eval's CLI (python -m tnllm_plugin.lm_eval_adapter) with checkpoint= a released-layout directory
    written by tnllm_plugin.released_format: the same acc as by hand. (The perplexity task is left to the in-process
    test: the command line cannot turn off lm-eval's 100000-sample bootstrap of its standard error.)"""
    from tnllm_plugin import released_format
    from tnllm_plugin.checkpoint import config_to_released, state_dict_to_released
    ckpt = tmp_path / "ckpt"
    released_format.write_released(ckpt, config_to_released(model.cfg), state_dict_to_released(model.state_dict()))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "tnllm_plugin.lm_eval_adapter", "--model", "transnormer_llm",
           "--model_args", f"checkpoint={ckpt},spm={spm_path},device=cpu,batch_size=4,max_length=16",
           "--tasks", "tnllm_tiny_mc", "--include_path", str(TASKS), "--output_path", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    assert results["tnllm_tiny_mc"]["acc,none"] == pytest.approx(by_hand_metrics(model, codec, 1)[0])
