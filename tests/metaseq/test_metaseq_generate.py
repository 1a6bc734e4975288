"""Metaseq's own generation path on a checkpoint that metaseq-train wrote with the plugin: the hub's
GeneratorInterface (what metaseq-api-local serves through) and the metaseq-api-local server itself, answering a
real HTTP request on 127.0.0.1. The reference for every output is the same model's full forward (no
incremental state), so each check also checks that incremental decoding through Metaseq's SequenceGenerator is
exact. Run in the Metaseq environment: source scripts/ensure_metaseq.sh && python -m pytest tests/metaseq
"""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

SERVER_START_TIMEOUT_S = 90
REQUEST_TIMEOUT_S = 30


# ---------------------------------------------------------------------------------------------------------
# The hub, loaded exactly as metaseq-api-local loads it (same launch arguments)

def _serve_env(checkpoint, corpus, **extra):
    return {"TNLLM_SERVE_CHECKPOINT": str(checkpoint), "TNLLM_SERVE_VOCAB": str(corpus.vocab),
            "TNLLM_SERVE_MERGES": str(corpus.merges), **extra}


@pytest.fixture(scope="module")
def hub(metaseq_checkpoint, metaseq_corpus):
    from metaseq import options
    from metaseq.dataclass.utils import convert_namespace_to_omegaconf
    from metaseq.hub_utils import GeneratorInterface

    from tnllm_plugin import metaseq_service

    launch_args = metaseq_service.settings(_serve_env(metaseq_checkpoint, metaseq_corpus))["LAUNCH_ARGS"]
    parser = options.get_generation_parser()
    parser.set_defaults(lr_scheduler=None, criterion=None)       # as metaseq-api-local does
    args = options.parse_args_and_arch(parser, input_args=launch_args)
    generator = GeneratorInterface(convert_namespace_to_omegaconf(args))
    generator.load_model()
    generator.models[0].eval()
    return generator


def _model(hub):
    return hub.models[0]


def _full_logprobs(hub, tokens, temperature=1.0):
    """log-probabilities of the next token after each prefix of ``tokens``: one full forward, no state."""
    with torch.no_grad():
        logits = _model(hub)(torch.tensor([tokens]))[0][0].float()
    return torch.log_softmax(logits / temperature, dim=-1)


def _special(hub):
    return {hub.tgt_dict.eos(), hub.tgt_dict.pad(), hub.tgt_dict.bos(), hub.tgt_dict.unk()}


def _greedy_reference(hub, prompt, n_new):
    """Greedy continuation by full forwards, with Metaseq's rules: the prompt after </s>, never <pad>, and the
    text ends at any special token. Returns (token ids, their log-probabilities)."""
    tokens, out, scores = [hub.tgt_dict.eos()] + list(prompt), [], []
    for _ in range(n_new):
        logprobs = _full_logprobs(hub, tokens)[-1]
        allowed = logprobs.clone()
        allowed[hub.tgt_dict.pad()] = -float("inf")
        token = int(allowed.argmax())
        if token in _special(hub):
            break
        out.append(token)
        scores.append(float(logprobs[token]))
        tokens.append(token)
    return out, scores


@contextlib.contextmanager
def _recording_model_inputs(hub):
    """Yields a list that receives the token ids of each call of the model (prefill, then each step)."""
    transnormer = _model(hub).decoder.transnormer
    calls = []

    def recording(tokens, *args, **kwargs):
        calls.append(tokens[0].tolist())
        return type(transnormer).forward(transnormer, tokens, *args, **kwargs)

    transnormer.forward = recording
    try:
        yield calls
    finally:
        del transnormer.forward


def _texts(hub, ids):
    return [hub.decode_fn([t]) for t in ids]


PROMPTS = ["def main(", "import os\nimport sys\n\nclass Parser:\n    "]


def test_hub_greedy_equals_full_forward_through_incremental_decoding(hub):
    # Metaseq's generator stops one token short of max_tokens: its last step is a forced </s>
    max_tokens = 20
    for text in PROMPTS:
        prompt = hub.encode_fn(text)
        ref, ref_scores = _greedy_reference(hub, prompt, max_tokens - 1)
        assert len(ref) >= 5, "the reference ends at once: the test would check too little"
        with _recording_model_inputs(hub) as calls:
            [[out]] = hub.generate([prompt], max_tokens=[max_tokens], temperature=0.0)
        assert out["text"] == hub.decode_fn(ref)
        assert out["tokens"] == _texts(hub, ref)
        assert out["token_scores"] == pytest.approx(ref_scores, abs=1e-4)
        # incremental: one prefill with </s> + prompt, then each chosen token alone (the last, a forced </s>
        # or an early end, is not fed back)
        assert calls == [[hub.tgt_dict.eos()] + prompt] + [[t] for t in ref]


def test_hub_batch_of_prompts_equals_each_alone(hub):
    # two prompts of one length in one batch. (Of different lengths, Metaseq's generator pads the shorter on the
    # right and feeds those pads to the model before its continuation: that row then differs slightly from the
    # prompt alone, ~1e-3 in log-probability here; a property of the generator, not checked)
    a = hub.encode_fn(PROMPTS[1])[:8]
    b = hub.encode_fn("for i in range(10):\n        x")[:8]
    assert len(a) == len(b) == 8
    outs = hub.generate([a, b], max_tokens=[12, 12], temperature=0.0)
    for prompt, [out] in zip((a, b), outs):
        ref, _ = _greedy_reference(hub, prompt, 11)
        assert out["tokens"] == _texts(hub, ref)


def test_hub_logprobs_of_prompt_and_completion(hub):
    prompt = hub.encode_fn(PROMPTS[0])
    k = 5
    [[out]] = hub.generate([prompt], max_tokens=[8], temperature=0.0, logprobs=k, echo=True)
    ref, _ = _greedy_reference(hub, prompt, 7)
    seq = [hub.tgt_dict.eos()] + prompt + ref
    logprobs = _full_logprobs(hub, seq)
    # echo: the prompt comes back after </s>, each token with its log-probability given its prefix
    assert out["tokens"] == _texts(hub, seq)
    assert out["text"] == hub.decode_fn(prompt + ref)
    expected = [float(logprobs[i - 1, seq[i]]) for i in range(1, len(seq))]
    assert out["token_scores"][0] is None
    assert out["token_scores"][1:] == pytest.approx(expected, abs=1e-4)
    # top_logprobs: the k best tokens of the distribution each token was predicted from (at generated
    # positions without <pad>, which the generator never picks)
    top = out["top_logprobs"]
    assert top[0] is None and len(top) == len(seq)
    for i in range(1, len(seq)):
        dist = logprobs[i - 1].clone()
        if i > len(prompt):
            dist[hub.tgt_dict.pad()] = -float("inf")
        values, ids = dist.topk(k)
        expected_top = {hub.decode_fn([int(t)]): float(v) for t, v in zip(ids, values)}
        assert top[i].keys() == expected_top.keys()
        assert list(top[i].values()) == pytest.approx(list(expected_top.values()), abs=1e-4)


def test_hub_sampling_is_seeded_and_draws_from_the_nucleus(hub):
    prompt = hub.encode_fn(PROMPTS[1])
    temperature, top_p = 0.8, 0.9

    def sample(seed):
        with _recording_model_inputs(hub) as calls:
            [[out]] = hub.generate([prompt], max_tokens=[16], temperature=temperature, top_p=top_p, seed=seed)
        drawn = [step for [step] in calls[1:]]       # the tokens fed back, one per step
        assert _texts(hub, drawn) == out["tokens"]
        return out, drawn

    (first, drawn), (again, _), (other, _) = sample(1234), sample(1234), sample(4321)
    assert len(drawn) >= 5
    assert first["tokens"] == again["tokens"] and first["token_scores"] == again["token_scores"]
    assert first["tokens"] != other["tokens"]
    # each drawn token: its score is its probability at this temperature (renormalised without <pad>), taken
    # from a full forward of the drawn sequence; and it lies in the top-p nucleus
    seq = [hub.tgt_dict.eos()] + prompt + drawn
    logprobs = _full_logprobs(hub, seq, temperature)
    for j, token in enumerate(drawn):
        dist = logprobs[len(prompt) + j].clone()
        dist[hub.tgt_dict.pad()] = -float("inf")
        dist = torch.log_softmax(dist, dim=-1)
        assert first["token_scores"][j] == pytest.approx(float(dist[token]), abs=1e-4)
        probs = dist.exp()
        mass_before = float(probs[probs > probs[token]].sum())
        assert mass_before < top_p


# ---------------------------------------------------------------------------------------------------------
# The service constants

def test_service_settings(metaseq_checkpoint, metaseq_corpus):
    from tnllm_plugin import metaseq_service

    s = metaseq_service.settings(_serve_env(metaseq_checkpoint, metaseq_corpus, TNLLM_SERVE_PORT="6123"))
    args = s["LAUNCH_ARGS"]
    assert all(len(a.split()) == 1 for a in args)          # the launcher splits entries on whitespace
    value = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    assert value["--user-dir"] == str(Path(metaseq_service.__file__).resolve().parent)
    assert value["--path"] == str(metaseq_checkpoint.resolve())
    assert value["--model-parallel-size"] == "1" and value["--distributed-world-size"] == "1"
    assert s["TOTAL_WORLD_SIZE"] == 1 and s["DEFAULT_PORT"] == 6123 and s["HOST"] == "127.0.0.1"
    assert ("--cpu" in args) == (not torch.cuda.is_available())


@pytest.mark.parametrize("change, variable", [
    ({"TNLLM_SERVE_CHECKPOINT": ""}, "TNLLM_SERVE_CHECKPOINT"),
    ({"TNLLM_SERVE_CHECKPOINT": "/nonexistent/checkpoint_last.pt"}, "TNLLM_SERVE_CHECKPOINT"),
    ({"TNLLM_SERVE_VOCAB": ""}, "TNLLM_SERVE_VOCAB"),          # default vocab.json beside the checkpoint: absent
    ({"TNLLM_SERVE_MERGES": "/nonexistent/merges.txt"}, "TNLLM_SERVE_MERGES"),
    ({"TNLLM_SERVE_PORT": "http"}, "TNLLM_SERVE_PORT"),
    ({"TNLLM_SERVE_PORT": "70000"}, "TNLLM_SERVE_PORT"),
    ({"TNLLM_SERVE_MAX_SEQ_LEN": "0"}, "TNLLM_SERVE_MAX_SEQ_LEN"),
])
def test_service_settings_name_the_bad_variable(metaseq_checkpoint, metaseq_corpus, change, variable):
    from tnllm_plugin import metaseq_service

    env = _serve_env(metaseq_checkpoint, metaseq_corpus)
    env.update(change)
    with pytest.raises(metaseq_service.ServiceConfigError, match=variable):
        metaseq_service.settings(env)


def test_service_refuses_a_path_with_whitespace(tmp_path, metaseq_checkpoint, metaseq_corpus):
    from tnllm_plugin import metaseq_service

    spaced = tmp_path / "my vocab.json"
    spaced.write_bytes(metaseq_corpus.vocab.read_bytes())
    env = _serve_env(metaseq_checkpoint, metaseq_corpus, TNLLM_SERVE_VOCAB=str(spaced))
    with pytest.raises(metaseq_service.ServiceConfigError, match="TNLLM_SERVE_VOCAB.*whitespace"):
        metaseq_service.settings(env)


# ---------------------------------------------------------------------------------------------------------
# metaseq-api-local, started for real, asked on 127.0.0.1 only, always stopped

def _api_local():
    beside = Path(sys.executable).with_name("metaseq-api-local")
    return str(beside) if beside.exists() else "metaseq-api-local"


def _server_env(**values):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TNLLM_SERVE_", "SLURM_"))}
    env.update(METASEQ_SERVICE_CONSTANTS_MODULE="tnllm_plugin.metaseq_service", OMP_NUM_THREADS="1", **values)
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent():
    """Runs in the server's process before exec: Linux sends it SIGKILL if the test process dies first
    (killed, crashed), so no server outlives the tests even when the fixture's cleanup cannot run."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _stop(proc):
    """End the server and anything it started (its own process group), politely first."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _post(port, body, authorization="Bearer tnllm-test"):
    headers = {"Content-Type": "application/json"}
    if authorization:
        headers["Authorization"] = authorization
    request = urllib.request.Request(f"http://127.0.0.1:{port}/completions", data=json.dumps(body).encode(),
                                     headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def server(tmp_path_factory, metaseq_checkpoint, metaseq_corpus):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("api_local") / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([_api_local()], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                                env=_server_env(**_serve_env(metaseq_checkpoint, metaseq_corpus,
                                                             TNLLM_SERVE_PORT=str(port))))
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"metaseq-api-local exited ({proc.returncode}):\n{log_path.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"metaseq-api-local not up in {SERVER_START_TIMEOUT_S} s:\n"
                            f"{log_path.read_text()[-4000:]}")
            with socket.socket() as s:
                s.settimeout(1)
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        yield port, proc, log_path
    finally:
        _stop(proc)


def test_api_local_greedy_completion_equals_hub_and_full_forward(server, hub):
    port, proc, log_path = server
    prompt = PROMPTS[1]
    status, reply = _post(port, {"prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 3})
    assert status == 200, f"{reply}\n{log_path.read_text()[-3000:]}"
    [choice] = reply["choices"]
    ref, ref_scores = _greedy_reference(hub, hub.encode_fn(prompt), 11)
    assert choice["text"] == hub.decode_fn(ref)
    assert choice["logprobs"]["tokens"] == _texts(hub, ref)
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(ref_scores, abs=1e-4)
    assert len(choice["logprobs"]["top_logprobs"]) == len(ref)
    assert all(len(top) == 3 for top in choice["logprobs"]["top_logprobs"])
    [[from_hub]] = hub.generate([hub.encode_fn(prompt)], max_tokens=[12], temperature=0.0)
    assert choice["text"] == from_hub["text"]
    assert reply["object"] == "text_completion" and reply["model"] == str(Path(hub.cfg.common_eval.path).parent)

    # pre-tokenized prompts, two at once: one choice each, in order (of one length: see the batch test above)
    ids = [hub.encode_fn(PROMPTS[1])[:6], hub.encode_fn("for i in range(10):\n        x")[:6]]
    status, reply = _post(port, {"prompt": ids, "max_tokens": 6, "temperature": 0})
    assert status == 200, reply
    assert [c["text"] for c in reply["choices"]] == [hub.decode_fn(_greedy_reference(hub, p, 5)[0]) for p in ids]
    assert proc.poll() is None


def test_api_local_sampling_and_refusals(server):
    port, proc, _ = server
    status, reply = _post(port, {"prompt": "def main(", "max_tokens": 8, "temperature": 0.7, "top_p": 0.9})
    assert status == 200 and len(reply["choices"]) == 1
    assert 1 <= len(reply["choices"][0]["logprobs"]["tokens"]) <= 7
    # Metaseq's handler refuses a request without an API key
    status, reply = _post(port, {"prompt": "def main(", "max_tokens": 4}, authorization=None)
    assert status == 401 and "API key" in reply["error"]["message"]
    assert proc.poll() is None


def test_api_local_fails_early_naming_the_missing_variable(tmp_path):
    # no TNLLM_SERVE_CHECKPOINT: the launcher stops while reading its constants, before any model or port
    run = subprocess.run([_api_local()], env=_server_env(), capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, start_new_session=True)
    assert run.returncode != 0
    assert "ServiceConfigError: TNLLM_SERVE_CHECKPOINT is not set" in run.stderr
