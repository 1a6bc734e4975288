"""Tensor parallelism equals the single-device model: logits, loss (vocab-parallel cross entropy) and
gradients at model-parallel sizes 2 and 4, on CPU with gloo. One spawn of 4 processes does all the sharded
work (MP 2 as two groups of 2, then MP 4) and saves what it computed; the tests compare that here with the
unsharded model. Through fairseq's model too: full-vocabulary log-probs (get_normalized_probs), greedy
decoding with incremental_state (by hand and by SequenceGenerator), per-token criterion losses.
Resharding, activation checkpointing and bf16 state run in this process."""
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
from argparse import Namespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tnllm_plugin.model import TransNormerConfig, TransNormerLLM
from tnllm_plugin.parallel import (apply_activation_checkpointing, consolidate_state_dict, reshard_state_dicts,
                                   shard_state_dict)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IGNORE = -100
WORLD = 4
# preset-like, with n_heads divisible by 4, LRPE on layer 0 (theta slicing), several attention blocks
CONFIGS = {
    "srms": dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, hidden_dim=32, glu_dim=64, lrpe_layers=(0,),
                 block_size=8),
    "layer_bias": dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, hidden_dim=32, glu_dim=64,
                       lrpe_layers=(0,), block_size=8, norm="layer", bias=True),
}


def build(name, seed=0):
    torch.manual_seed(seed)
    model = TransNormerLLM(TransNormerConfig(**CONFIGS[name]))
    if name == "layer_bias":      # non-trivial norm weights and biases, so that wrong slices show
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.normal_(1.0, 0.3)
    return model


def batch(vocab=64):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, vocab, (2, 19), generator=g)
    target = torch.randint(0, vocab, (2, 19), generator=g)
    target[0, -4:] = IGNORE           # padded positions
    return tokens, target


def loss_of(per_token, target):
    return per_token.sum() / (target != IGNORE).sum()


def unsharded_run(name):
    model = build(name)
    tokens, target = batch()
    logits, _ = model(tokens)
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE,
                                                  reduction="none")
    loss = loss_of(per_token, target)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    return model, logits.detach(), loss.detach(), grads


# ---------------------------------------------------------------------------------------------------------
# fairseq's model and criterion at the current model-parallel size (1 here, 2 and 4 in the spawned ranks):
# what generation and scoring see (get_normalized_probs, incremental decoding) and per-token losses

PROMPT_LEN, NEW_TOKENS = 7, 8
INIT_STD = 0.2     # peaked enough that greedy tokens depend on the context (at 0.02 the logits are near uniform)


def fairseq_lm(model_parallel_size):
    from fairseq.data import Dictionary
    from fairseq.models import ARCH_CONFIG_REGISTRY
    from tnllm_plugin.fairseq_adapter import TransNormerLanguageModel

    dictionary = Dictionary()
    for i in range(60):         # + 4 specials: a vocabulary of 64, divisible by 2 and 4
        dictionary.add_symbol(f"w{i}")
    task = Namespace(target_dictionary=dictionary, source_dictionary=dictionary)
    args = Namespace(arch="transnormer_llm_tiny", model_parallel_size=model_parallel_size, init_std=INIT_STD)
    ARCH_CONFIG_REGISTRY[args.arch](args)
    torch.manual_seed(0)        # under MP each rank builds its shard of the model this seed makes on one device
    return TransNormerLanguageModel.build_model(args, task).eval(), task


@torch.no_grad()
def greedy_by_hand(model, prompt):
    """Greedy decoding, calling the model as SequenceGenerator does: the whole prefix each step, incremental_state
    keeping what was seen, log-probs of the last position (a strided view) only."""
    tokens, incremental_state, step_lprobs = prompt, {}, []
    for _ in range(NEW_TOKENS):
        logits, extra = model.decoder(tokens, incremental_state=incremental_state)
        lprobs = model.get_normalized_probs((logits[:, -1:, :], extra), log_probs=True)[:, -1]
        step_lprobs.append(lprobs)
        tokens = torch.cat([tokens, lprobs.argmax(-1, keepdim=True)], 1)
    return tokens[:, prompt.size(1):], torch.stack(step_lprobs, 1)


@torch.no_grad()
def greedy_by_sequence_generator(model, dictionary, prompt):
    from fairseq.sequence_generator import SequenceGenerator
    length = prompt.size(1) + NEW_TOKENS
    generator = SequenceGenerator([model], dictionary, beam_size=1, max_len_b=length, min_len=length)
    sample = {"net_input": {"src_tokens": prompt, "src_lengths": torch.full((prompt.size(0),), prompt.size(1))}}
    hypotheses = generator.generate([model], sample, prefix_tokens=prompt)
    return torch.stack([h[0]["tokens"][prompt.size(1):length] for h in hypotheses])


def fairseq_outputs(model_parallel_size):
    from tnllm_plugin.fairseq_adapter import TransNormerCrossEntropy

    model, task = fairseq_lm(model_parallel_size)
    dictionary = task.target_dictionary
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(dictionary.nspecial, len(dictionary), (2, 19), generator=g)
    target = tokens.roll(-1, 1)
    target[0, -4:] = dictionary.pad()
    with torch.no_grad():
        lprobs = model.get_normalized_probs(model(tokens), log_probs=True)
        probs = model.get_normalized_probs(model(tokens), log_probs=False)
    criterion = TransNormerCrossEntropy(task)
    sample = {"net_input": {"src_tokens": tokens}, "target": target,
              "ntokens": int(target.ne(dictionary.pad()).sum())}
    per_token, _, _ = criterion(model, sample, reduce=False)
    summed, _, _ = criterion(model, sample)
    prompt = tokens[:, :PROMPT_LEN]
    greedy, step_lprobs = greedy_by_hand(model, prompt)
    return dict(lprobs=lprobs, probs=probs, per_token_loss=per_token.detach(), loss=summed.detach(),
                greedy=greedy, step_lprobs=step_lprobs,
                generated=greedy_by_sequence_generator(model, dictionary, prompt))


# ---------------------------------------------------------------------------------------------------------
# the sharded side, in spawned processes

def _sharded_step(name, out):
    from fairscale.nn.model_parallel import initialize as mpu
    from tnllm_plugin.parallel import apply_tensor_parallel, gather_vocab_parallel_logits, vocab_parallel_cross_entropy

    model = apply_tensor_parallel(build(name))
    tokens, target = batch()
    logits_shard, _ = model(tokens)
    per_token = vocab_parallel_cross_entropy(logits_shard, target, IGNORE, reduction="none")
    loss = loss_of(per_token, target)
    assert torch.equal(vocab_parallel_cross_entropy(logits_shard, target, IGNORE), per_token.sum())
    loss.backward()
    group = mpu.get_model_parallel_group()
    shards = [None] * mpu.get_model_parallel_world_size()
    dist.all_gather_object(shards, {k: p.grad for k, p in model.named_parameters()}, group=group)
    weights = [None] * len(shards)
    dist.all_gather_object(weights, {k: v.detach() for k, v in model.state_dict().items()}, group=group)
    out.update(logits=gather_vocab_parallel_logits(logits_shard.detach()), loss=loss.detach(),
               grads=consolidate_state_dict(shards), weights=weights)


def _built_shard_weights(name, seed=0):
    """Every rank's weights of build_tensor_parallel (the shard made without the whole model), gathered."""
    from fairscale.nn.model_parallel import initialize as mpu
    from tnllm_plugin.parallel import build_tensor_parallel

    torch.manual_seed(seed)
    model = build_tensor_parallel(TransNormerConfig(**CONFIGS[name]))
    assert not any(p.is_meta for p in model.parameters())
    shards = [None] * mpu.get_model_parallel_world_size()
    dist.all_gather_object(shards, {k: v.detach() for k, v in model.state_dict().items()},
                           group=mpu.get_model_parallel_group())
    return shards


def _errors():
    """Indivisible sizes raise, naming the culprit (at the current model-parallel size, 2)."""
    from tnllm_plugin.parallel import apply_tensor_parallel
    bad = {"n_heads": dict(n_heads=3, d_model=24, hidden_dim=24), "vocab_size": dict(vocab_size=63),
           "glu_dim": dict(glu_dim=63)}
    messages = {}
    for culprit, overrides in bad.items():
        cfg = TransNormerConfig(**{**CONFIGS["srms"], **overrides})
        try:
            apply_tensor_parallel(TransNormerLLM(cfg))
            messages[culprit] = None
        except ValueError as e:
            messages[culprit] = str(e)
    return messages


def _worker(rank, init_file, out_dir):
    from fairscale.nn.model_parallel import initialize as mpu
    from tnllm_plugin.parallel import apply_tensor_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {}
    for tp in (2, 4):
        mpu.initialize_model_parallel(tp)
        for name in CONFIGS:
            out = results.setdefault((tp, name), {})
            _sharded_step(name, out)
            results[(tp, "built", name)] = _built_shard_weights(name)
        results[(tp, "fairseq")] = fairseq_outputs(tp)
        if tp == 2:
            results["errors"] = _errors()
            # an MP2 checkpoint (the weights gathered above) loaded at MP4 into a differently seeded model
            mp2_shards = results[(2, "srms")]["weights"]
        else:
            model = apply_tensor_parallel(build("srms", seed=123))
            model.load_state_dict(reshard_state_dicts(mp2_shards, tp)[mpu.get_model_parallel_rank()])
            from tnllm_plugin.parallel import gather_vocab_parallel_logits
            results["mp2_to_mp4_logits"] = gather_vocab_parallel_logits(model(batch()[0])[0].detach())
        mpu.destroy_model_parallel()
    if rank in (0, 1, 3):    # a rank of each position in the groups is enough to catch rank-dependent bugs
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(os.path.join(d, "init"), d), nprocs=WORLD, join=True)
        return {r: torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in (0, 1, 3)}


# ---------------------------------------------------------------------------------------------------------

TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_loss_grads_match_single_device(sharded, tp, name):
    _, logits, loss, grads = unsharded_run(name)
    for rank, results in sharded.items():
        got = results[(tp, name)]
        torch.testing.assert_close(got["logits"], logits, **TOL, msg=f"logits, rank {rank}")
        torch.testing.assert_close(got["loss"], loss, **TOL, msg=f"loss, rank {rank}")
        assert set(got["grads"]) == set(grads)
        for k in grads:
            torch.testing.assert_close(got["grads"][k], grads[k], **TOL, msg=f"grad of {k}, rank {rank}")


@pytest.mark.parametrize("tp", [2, 4])
def test_fairseq_generation_and_per_token_loss_match_single_device(sharded, tp):
    """Under model parallelism fairseq's get_normalized_probs (generation, eval-lm) covers the whole
    vocabulary, greedy decoding picks the same tokens, and the criterion gives per-token losses without
    reduce."""
    want = fairseq_outputs(1)
    assert want["lprobs"].shape[-1] == 64 and want["per_token_loss"].shape == (2 * 19,)
    assert (want["per_token_loss"].view(2, 19)[0, -4:] == 0).all()     # padding
    for rank, results in sharded.items():
        got = results[(tp, "fairseq")]
        for key in ("lprobs", "probs", "step_lprobs", "per_token_loss", "loss"):
            torch.testing.assert_close(got[key], want[key], **TOL, msg=f"{key}, rank {rank}")
        assert torch.equal(got["greedy"], want["greedy"]), f"rank {rank}"
        assert torch.equal(got["generated"], want["generated"]), f"rank {rank}"


def test_sharded_weights_consolidate_to_the_model(sharded):
    model = build("srms")
    full = model.state_dict()
    for tp in (2, 4):
        got = consolidate_state_dict(sharded[0][(tp, "srms")]["weights"])
        assert set(got) == set(full)
        for k in full:
            assert torch.equal(got[k], full[k]), k


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shard_built_alone_equals_the_slice_of_the_model(sharded, name):
    """build_tensor_parallel (structure on the meta device, the rank's blocks of each initial value made alone)
    gives every rank exactly its slice of the model TransNormerLLM(cfg) makes under the same seed."""
    torch.manual_seed(0)
    full = TransNormerLLM(TransNormerConfig(**CONFIGS[name])).state_dict()
    for tp in (2, 4):
        for rank, results in sharded.items():
            shards = results[(tp, "built", name)]
            assert len(shards) == tp
            got = consolidate_state_dict(shards)
            assert set(got) == set(full)
            for k in full:
                assert torch.equal(got[k], full[k]), f"{k}, tp {tp}, rank {rank}"


def test_mp2_checkpoint_loads_at_mp1_and_mp4(sharded):
    _, logits, _, _ = unsharded_run("srms")
    mp2_shards = sharded[0][(2, "srms")]["weights"]
    model = build("srms", seed=123)
    model.load_state_dict(consolidate_state_dict(mp2_shards))
    torch.testing.assert_close(model(batch()[0])[0], logits, **TOL)
    for results in sharded.values():
        torch.testing.assert_close(results["mp2_to_mp4_logits"], logits, **TOL)


def test_fairseq_checkpoint_files_reshard(sharded, tmp_path):
    """MP2 checkpoint files (fairseq naming, a host prefix on the keys) -> MP4 files and an MP1 file."""
    from tnllm_plugin.parallel import main as reshard_cli
    mp2 = sharded[0][(2, "srms")]["weights"]
    for r, shard in enumerate(mp2):
        cfg = {"common": {"model_parallel_size": 2}, "checkpoint": {"model_parallel_size": 2},
               "model": Namespace(arch="transnormer_llm_tiny", model_parallel_size=2)}    # build_model reads this
        torch.save({"model": {f"decoder.{k}": v for k, v in shard.items()}, "last_optimizer_state": {"r": r},
                    "extra_state": {"epoch": 3}, "cfg": cfg}, tmp_path / f"checkpoint_last-model_part-{r}.pt")
    full = {f"decoder.{k}": v for k, v in build("srms").state_dict().items()}
    for size in (4, 1):
        (tmp_path / f"mp{size}").mkdir()
        reshard_cli([str(tmp_path / "checkpoint_last.pt"), "--from-size", "2", "--to-size", str(size),
                     "--out", str(tmp_path / f"mp{size}" / "checkpoint_last.pt")])
        for r in range(size):
            name = "checkpoint_last.pt" if size == 1 else f"checkpoint_last-model_part-{r}.pt"
            state = torch.load(tmp_path / f"mp{size}" / name, weights_only=False)
            assert "last_optimizer_state" not in state and state["extra_state"] == {"epoch": 3}
            cfg = state["cfg"]
            assert cfg["common"]["model_parallel_size"] == cfg["checkpoint"]["model_parallel_size"] == size
            assert cfg["model"].model_parallel_size == size and cfg["model"].arch == "transnormer_llm_tiny"
            expected = shard_state_dict(full, r, size)
            assert set(state["model"]) == set(expected)
            assert all(torch.equal(state["model"][k], expected[k]) for k in expected)


def test_indivisible_sizes_are_clear_errors(sharded):
    for culprit, message in sharded[0]["errors"].items():
        assert message is not None, f"{culprit} not divisible by 2 was accepted"
        assert culprit in message and "2" in message, message


def test_shard_then_consolidate_roundtrip_and_qkvu_layout():
    model = build("layer_bias")
    full = model.state_dict()
    for tp in (1, 2, 4):
        shards = [shard_state_dict(full, r, tp) for r in range(tp)]
        back = consolidate_state_dict(shards)
        assert all(torch.equal(back[k], full[k]) for k in full)
    # rank r of 2 holds whole heads: rows [q_r | k_r | v_r | u_r]
    w = full["layers.0.token_mixer.qkvu_proj.weight"]
    q, k, v, u = w.chunk(4)
    rank1 = shard_state_dict(full, 1, 2)["layers.0.token_mixer.qkvu_proj.weight"]
    assert torch.equal(rank1, torch.cat([t.chunk(2)[1] for t in (q, k, v, u)]))
    with pytest.raises(ValueError, match="rank 2"):
        shard_state_dict(full, 2, 2)


def test_activation_checkpointing_same_loss_and_grads():
    ref_model, _, loss, grads = unsharded_run("srms")
    model = apply_activation_checkpointing(build("srms"))
    assert list(model.state_dict()) == list(ref_model.state_dict())     # checkpoints unaffected
    tokens, target = batch()
    logits, _ = model(tokens)
    got = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE)
    got.backward()
    torch.testing.assert_close(got, loss, **TOL)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[k], **TOL, msg=k)


def test_bf16_model_keeps_fp32_attention_state():
    model = build("srms").to(torch.bfloat16)
    logits, state = model(batch()[0], use_cache=True)
    assert logits.dtype == torch.bfloat16
    assert all(s.dtype == torch.float32 for s in state.kv)
    # the decay rates stay fp32 constants under the cast (fairseq --bf16 casts the whole model)
    fp32_slopes = [layer.token_mixer.slope for layer in build("srms").layers]
    for layer, ref in zip(model.layers, fp32_slopes):
        assert layer.token_mixer.slope.dtype == torch.float32
        assert torch.equal(layer.token_mixer.slope, ref)


# ---------------------------------------------------------------------------------------------------------
# One host: fairseq-train at --model-parallel-size 2 (two CPU processes, gloo) against size 1

def _fairseq_train(data, save_dir, world, port=None):
    bin_dir = os.path.dirname(sys.executable)
    cmd = [os.path.join(bin_dir, "fairseq-train"), data, "--user-dir", os.path.join(REPO, "tnllm_plugin"),
           "--task", "language_modeling", "--arch", "transnormer_llm_tiny", "--criterion",
           "transnormer_llm_cross_entropy", "--tokens-per-sample", "32", "--max-tokens", "128",
           "--required-batch-size-multiple", "1", "--optimizer", "adam", "--lr", "1e-3", "--max-update", "2",
           "--seed", "7", "--cpu", "--num-workers", "0", "--disable-validation", "--log-format", "simple",
           "--log-interval", "1", "--save-dir", save_dir, "--no-epoch-checkpoints", "--save-interval-updates", "2"]
    if world > 1:      # with per-block activation checkpointing too: it must not change the numbers
        cmd += ["--checkpoint-activations", "--model-parallel-size", str(world), "--distributed-world-size", str(world),
                "--distributed-backend", "gloo", "--distributed-no-spawn",
                "--distributed-init-method", f"tcp://127.0.0.1:{port}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(cmd + (["--distributed-rank", str(r), "--device-id", str(r)] if world > 1 else []),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for r in range(world)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return [float(x) for x in re.findall(r"\| train_inner \|.* loss=([\d.]+)", logs[0])]


@pytest.mark.slow
def test_fairseq_train_step_model_parallel_2_equals_1(tmp_path):
    if not os.path.exists(os.path.join(REPO, "tnllm_plugin", "fairseq_adapter.py")):
        pytest.skip("tnllm_plugin/fairseq_adapter.py is not there yet")
    rng = random.Random(0)
    for name, n in (("train", 60), ("valid", 4)):     # 60 words + 4 specials: a vocabulary divisible by 2
        with open(tmp_path / f"{name}.txt", "w") as f:
            for _ in range(n):
                start = rng.randrange(60)
                f.write(" ".join(f"w{(start + 3 * j) % 60}" for j in range(rng.randint(5, 30))) + "\n")
    words = " ".join(f"w{i}" for i in range(60))
    with open(tmp_path / "train.txt", "a") as f:
        f.write(words + "\n")
    data = str(tmp_path / "data-bin")
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "fairseq-preprocess"), "--only-source",
                    "--trainpref", str(tmp_path / "train.txt"), "--validpref", str(tmp_path / "valid.txt"),
                    "--destdir", data, "--workers", "1"], check=True, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    loss_mp1 = _fairseq_train(data, str(tmp_path / "mp1"), 1)
    loss_mp2 = _fairseq_train(data, str(tmp_path / "mp2"), 2, port)
    assert len(loss_mp1) == 2 and len(loss_mp2) == 2
    assert loss_mp2 == pytest.approx(loss_mp1, abs=2e-3)      # the host logs 3 decimals
    # the weights after two Adam steps: the MP2 checkpoint files, resharded to MP1, equal the MP1 checkpoint
    from tnllm_plugin.parallel import main as reshard_cli
    reshard_cli([str(tmp_path / "mp2" / "checkpoint_last.pt"), "--from-size", "2", "--to-size", "1",
                 "--out", str(tmp_path / "mp2_as_mp1.pt")])
    mp1 = torch.load(tmp_path / "mp1" / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]
    resharded = torch.load(tmp_path / "mp2_as_mp1.pt", map_location="cpu", weights_only=False)
    assert resharded["cfg"]["common"]["model_parallel_size"] == resharded["cfg"]["model"].model_parallel_size == 1
    mp2 = resharded["model"]
    assert set(mp2) == set(mp1)
    for k in mp1:
        torch.testing.assert_close(mp2[k], mp1[k], rtol=1e-4, atol=1e-5, msg=k)


# ---------------------------------------------------------------------------------------------------------
# host memory of building a shard: the shard and one parameter's slice at a time, never the whole model

MEMORY_CFG = dict(vocab_size=4096, d_model=1024, n_layers=12, n_heads=8, hidden_dim=1024, glu_dim=2816)


def _peak_growth(build):
    """build() and how much the process's peak memory grew while it ran (bytes)."""
    import gc
    import resource
    with torch.device("meta"):      # the first model on the meta device loads ~150 MB of torch once: not measured
        TransNormerLLM(TransNormerConfig(**{**MEMORY_CFG, "n_layers": 1}))
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024      # Linux: KiB; the peak so far
    result = build()
    return result, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def _memory_worker(rank, init_file, out_dir):
    from fairscale.nn.model_parallel import initialize as mpu
    from tnllm_plugin.parallel import build_tensor_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    mpu.initialize_model_parallel(WORLD)
    model, growth = _peak_growth(lambda: build_tensor_parallel(TransNormerConfig(**MEMORY_CFG)))
    shard_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    torch.save(dict(growth=growth, shard_bytes=shard_bytes), os.path.join(out_dir, f"mem{rank}.pt"))
    mpu.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss units differ off Linux")
def test_building_a_shard_never_holds_the_whole_model():
    with torch.device("meta"):
        full_bytes = sum(p.numel() * 4 for p in TransNormerLLM(TransNormerConfig(**MEMORY_CFG)).parameters())
    assert full_bytes > 650e6       # 175M parameters: big enough that the whole model would show in the peak
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_memory_worker, args=(os.path.join(d, "init"), d), nprocs=WORLD, join=True)
        got = [torch.load(os.path.join(d, f"mem{r}.pt")) for r in range(WORLD)]
    for rank, g in enumerate(got):
        assert abs(g["shard_bytes"] - full_bytes / WORLD) < 0.02 * full_bytes, g     # a quarter of each matrix
        # the shard (a quarter) plus one parameter's slice at a time; the whole model would be 4x the shard
        assert g["growth"] < 0.5 * full_bytes, f"rank {rank}: peak grew {g['growth'] / 1e6:.0f} MB while building a " \
                                                f"{g['shard_bytes'] / 1e6:.0f} MB shard of a {full_bytes / 1e6:.0f} MB model"


# ---------------------------------------------------------------------------------------------------------
# building one block at a time (the --ddp-backend fully_sharded path): the same model, never held whole

@pytest.mark.parametrize("name", list(CONFIGS))
def test_block_by_block_build_equals_the_model(name):
    """build_block_by_block gives exactly TransNormerLLM(cfg) under the same seed (weights, decay buffers,
    logits), with every block handed to the wrapper once, in order, already holding its values."""
    from tnllm_plugin.parallel import build_block_by_block

    cfg = TransNormerConfig(**CONFIGS[name])
    torch.manual_seed(0)
    full = TransNormerLLM(cfg)
    handed = []

    def wrap(block):
        assert not any(t.is_meta for t in [*block.parameters(), *block.buffers()])
        handed.append(block)
        return block

    torch.manual_seed(0)
    built = build_block_by_block(cfg, wrap)
    assert handed == list(built.layers) and len(handed) == cfg.n_layers
    assert not any(t.is_meta for t in [*built.parameters(), *built.buffers()])
    want, got = full.state_dict(), built.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    for a, b in zip(full.layers, built.layers):
        assert a.token_mixer.slope.dtype == b.token_mixer.slope.dtype == torch.float32
        assert torch.equal(a.token_mixer.slope, b.token_mixer.slope)
    tokens, _ = batch()
    assert torch.equal(built(tokens)[0], full(tokens)[0])


FSDP_MEMORY_CFG = dict(MEMORY_CFG, n_layers=24)
FSDP_WORLD = 4


def _fsdp_memory_worker(_, init_file, out_dir):
    """fairseq's build_model as fairseq-train calls it under --ddp-backend fully_sharded (inside the wrap
    context), with fairseq's FSDP class over a stand-in group of 4 ranks: fairscale shards each block as it
    is wrapped, on the CPU too. One real process (the stand-in group never communicates while building)."""
    from fairscale.nn import enable_wrap
    from fairseq.data import Dictionary
    from fairseq.distributed.fully_sharded_data_parallel import DummyProcessGroup, FullyShardedDataParallel
    from tnllm_plugin.fairseq_adapter import TransNormerLanguageModel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    cfg = FSDP_MEMORY_CFG
    d = Dictionary()
    for i in range(cfg["vocab_size"] - len(d)):
        d.add_symbol(f"w{i}")
    args = Namespace(arch="transnormer_llm", decoder_embed_dim=cfg["d_model"], decoder_layers=cfg["n_layers"],
                     decoder_attention_heads=cfg["n_heads"], hidden_dim=cfg["hidden_dim"], glu_dim=cfg["glu_dim"],
                     checkpoint_activations=True)

    def build():
        with enable_wrap(wrapper_cls=FullyShardedDataParallel, flatten_parameters=True,
                         process_group=DummyProcessGroup(rank=0, size=FSDP_WORLD)):
            return TransNormerLanguageModel.build_model(args, Namespace(target_dictionary=d))

    model, growth = _peak_growth(build)
    blocks = model.decoder.transnormer.layers
    torch.save(dict(growth=growth, vocab=len(d),
                    wrapped=[isinstance(b, FullyShardedDataParallel) for b in blocks],
                    block_bytes=sum(p.numel() * p.element_size() for p in blocks.parameters())),
               os.path.join(out_dir, "fsdp_mem.pt"))
    dist.destroy_process_group()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss units differ off Linux")
def test_fully_sharded_build_never_holds_the_whole_model(monkeypatch):
    # glibc's malloc raises its mmap threshold after large frees and then keeps freed blocks in its heap, so
    # the process's peak would count memory the build had already released; a fixed threshold makes every
    # tensor above 1 MB its own mapping, returned when freed, and the peak counts what was held at once
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    with torch.device("meta"):
        model = TransNormerLLM(TransNormerConfig(**FSDP_MEMORY_CFG))
    full_bytes = sum(p.numel() * 4 for p in model.parameters())
    full_block_bytes = sum(p.numel() * 4 for p in model.layers.parameters())
    assert full_bytes > 1.3e9       # 340M parameters: the whole model would dominate the peak
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_fsdp_memory_worker, args=(os.path.join(d, "init"), d), nprocs=1, join=True)
        got = torch.load(os.path.join(d, "fsdp_mem.pt"))
    assert got["vocab"] == FSDP_MEMORY_CFG["vocab_size"]
    assert all(got["wrapped"]) and len(got["wrapped"]) == FSDP_MEMORY_CFG["n_layers"]
    # each block keeps its quarter (flat, padded by at most 3 elements per block)
    assert abs(got["block_bytes"] - full_block_bytes / FSDP_WORLD) < 1e-3 * full_block_bytes, got
    # the shards (a quarter), one whole block and its flat copy, embedding and head: about 0.36 of the model
    assert got["growth"] < 0.5 * full_bytes, f"peak grew {got['growth'] / 1e6:.0f} MB while building the shards " \
                                             f"of a {full_bytes / 1e6:.0f} MB model"
