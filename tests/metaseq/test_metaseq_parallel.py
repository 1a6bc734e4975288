"""Tensor parallelism under the real Metaseq: --model-parallel-size 2 and 4 equal size 1.

One spawn of 4 CPU processes (gloo) goes through Metaseq's own set-up, as metaseq-train does: option parsing,
``metaseq.distributed.utils.distributed_init`` (its Megatron tensor-parallel groups, which the adapter mirrors
into fairscale's), ``task.build_model`` and ``task.build_criterion`` of the streaming LM task. At MP 2 (two
groups of 2) and then MP 4 it records logits, log-probs, the vocab-parallel criterion's loss (summed and per
token), the gradients, and greedy decoding through Metaseq's SequenceGenerator; this process compares them with
the same calls at MP 1. Then real runs: ``metaseq-train`` at MP 1 and under torchrun at MP 2 (per-update losses,
final weights), the MP 2 checkpoint resharded by ``python -m tnllm_plugin.parallel`` and scored by
``metaseq-validate`` at MP 1.

Metaseq's own checkpoint tools (metaseq/scripts) do not handle this model's MP checkpoints: reshard_mp and
reshard_megatron_parts know OPT's parameter names only (a fused QKV in thirds; our qkvu_proj is in quarters, and
lm_head and the SGLU's l1/l2/l3 match no rule), reshard_fsdp and consolidate_fsdp_shards need FSDP's sharded
files (CUDA), convert_to_singleton needs a GPU per part. tnllm_plugin.parallel reshards them.
"""
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[2]
PLUGIN_DIR = REPO / "tnllm_plugin"
WORLD = 4
INIT_STD = 0.2      # peaked enough that greedy tokens depend on the context (at 0.02 the logits are near uniform)
PROMPT_WORDS, MAX_LEN = 6, 16
# Sharded float32 sums run in another order (partial sums all-reduced), so values differ by rounding, which
# scales with the size of the summed terms rather than with each result: near-zero entries of a tensor whose
# largest entries are ~10 (logits at INIT_STD) carry ~1e-6 absolute error. The tolerance is therefore relative to
# the tensor's largest entry (1e-5 of it; rounding here stays below 1e-6 of it), where a wrong shard is off by
# about the whole scale.
RTOL, SCALED_ATOL = 1e-5, 1e-5
TIMEOUT_S = 300
# a shape one device takes (d_model 48, 3 heads of 16) whose heads do not split over 2 model-parallel ranks
THREE_HEADS = ("--decoder-embed-dim", 48, "--hidden-dim", 48, "--decoder-attention-heads", 3)


def _metaseq_cfg(corpus, model_parallel_size, *extra):
    """Metaseq's config for transnormer_llm_tiny on the test corpus, parsed the way metaseq-train parses its
    command line. The adapter is imported directly (importing it registers the model), since Metaseq's
    --user-dir refuses a module name that is already imported, as tnllm_plugin is in this process."""
    import tnllm_plugin.metaseq_adapter  # noqa: F401
    from metaseq import options
    from metaseq.dataclass.utils import convert_namespace_to_omegaconf

    args = options.parse_args_and_arch(options.get_training_parser(), input_args=[
        str(corpus.root), "--task", "streaming_language_modeling", "--vocab-filename", str(corpus.vocab),
        "--merges-filename", str(corpus.merges), "--arch", "transnormer_llm_tiny",
        "--criterion", "transnormer_llm_cross_entropy", "--cpu", "--init-std", str(INIT_STD),
        "--model-parallel-size", str(model_parallel_size), *map(str, extra)])
    return convert_namespace_to_omegaconf(args)


def _close(got, want, what):
    atol = SCALED_ATOL * float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=RTOL, atol=atol, msg=lambda detail: f"{what}: {detail}")


def _sample(dictionary):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(dictionary.nspecial, len(dictionary), (2, 19), generator=g)
    target = tokens.roll(-1, 1)
    target[0, -4:] = dictionary.pad()
    return {"net_input": {"src_tokens": tokens}, "target": target, "ntokens": int(target.ne(dictionary.pad()).sum())}


def _outputs(cfg, gather_grads):
    """What the model and criterion built by Metaseq's task compute at cfg's model-parallel size: full-vocabulary
    logits and log-probs, the loss summed and per token, the (consolidated) gradients, greedy generation."""
    from metaseq import tasks
    from metaseq.sequence_generator import SequenceGenerator
    from tnllm_plugin.host_common import full_vocabulary_logits

    task = tasks.setup_task(cfg.task)
    torch.manual_seed(0)        # under MP each rank builds its shard of the model this seed makes on one device
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    d = task.target_dictionary
    sample = _sample(d)
    loss, sample_size, _ = criterion(model, sample)
    loss.backward()
    out = dict(loss=loss.detach(), sample_size=sample_size, grads=gather_grads(model),
               vocab_parallel=model.vocab_parallel)
    model.eval()
    with torch.no_grad():
        tokens = sample["net_input"]["src_tokens"]
        out["logits"] = full_vocabulary_logits(model.decoder.transnormer, model(tokens)[0])
        out["lprobs"] = model.get_normalized_probs(model(tokens), log_probs=True)
        out["per_token_loss"] = criterion(model, sample, reduce=False)[0]
        # metaseq's prompts start with </s>; topp 0 is greedy
        prompt = torch.cat([torch.full((2, 1), d.eos()), tokens[:, :PROMPT_WORDS]], 1)
        generator = SequenceGenerator([model], d, beam_size=1, max_len_b=MAX_LEN, topp=0)
        result = generator.generate([model], {"net_input": {"src_tokens": prompt}})
        out["generated"], out["scores"] = result["tokens"][:, 0], result["scores"][:, 0]
    return out


def _own_grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def _gathered_grads(model):
    """The whole model's gradients from every rank's shard of them, over Metaseq's tensor-parallel group."""
    from metaseq.distributed import utils as distributed_utils
    from tnllm_plugin.parallel import consolidate_state_dict
    shards = [None] * distributed_utils.get_model_parallel_world_size()
    dist.all_gather_object(shards, _own_grads(model), group=distributed_utils.get_model_parallel_group())
    return consolidate_state_dict(shards)


def _worker(rank, corpus, init_file, out_dir):
    from fairscale.nn.model_parallel import initialize as fairscale_mp
    from metaseq.distributed import utils as distributed_utils
    from metaseq import tasks
    from metaseq.modules.megatron import mpu as megatron_mpu

    torch.set_num_threads(1)
    results = {}
    for tp in (2, 4):
        cfg = _metaseq_cfg(corpus, tp, "--distributed-world-size", WORLD, "--distributed-rank", rank,
                           "--distributed-backend", "gloo", "--distributed-init-method", f"file://{init_file}",
                           "--distributed-no-spawn")
        distributed_utils.distributed_init(cfg)     # the process group once, then Metaseq's groups of size tp
        results[("ranks", tp)] = dist.get_process_group_ranks(distributed_utils.get_model_parallel_group())
        results[tp] = _outputs(cfg, _gathered_grads)
        if tp == 2:     # 3 heads do not split over 2 ranks
            bad = _metaseq_cfg(corpus, tp, *THREE_HEADS)
            try:
                tasks.setup_task(bad.task).build_model(bad.model)
                results["error"] = None
            except ValueError as e:
                results["error"] = str(e)
        # the next size starts from no model-parallel state, in Metaseq and in fairscale alike
        megatron_mpu.destroy_model_parallel()
        fairscale_mp.destroy_model_parallel()
    if rank in (0, 1, 3):    # a rank of each position in the groups is enough to catch rank-dependent bugs
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(metaseq_corpus):
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(metaseq_corpus, os.path.join(d, "init"), d), nprocs=WORLD, join=True)
        return {r: torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in (0, 1, 3)}


@pytest.fixture(scope="module")
def single(metaseq_corpus):
    return _outputs(_metaseq_cfg(metaseq_corpus, 1), _own_grads)


# ---------------------------------------------------------------------------------------------------------

def test_groups_are_metaseqs(sharded):
    for rank, results in sharded.items():
        assert results[("ranks", 2)] == [rank // 2 * 2, rank // 2 * 2 + 1]
        assert results[("ranks", 4)] == [0, 1, 2, 3]


@pytest.mark.parametrize("tp", [2, 4])
def test_logits_loss_grads_equal_size_1(sharded, single, tp):
    assert not single["vocab_parallel"]
    assert single["logits"].shape[-1] == 512 and single["per_token_loss"].shape == (2 * 19,)
    assert (single["per_token_loss"].view(2, 19)[0, -4:] == 0).all()       # padding
    for rank, results in sharded.items():
        got = results[tp]
        assert got["vocab_parallel"]        # the sharded criterion path ran
        assert got["sample_size"] == single["sample_size"]
        for key in ("logits", "lprobs", "loss", "per_token_loss"):
            _close(got[key], single[key], f"{key}, MP {tp}, rank {rank}")
        assert set(got["grads"]) == set(single["grads"])
        for k, g in single["grads"].items():
            _close(got["grads"][k], g, f"grad of {k}, MP {tp}, rank {rank}")


@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_generator_greedy_equals_size_1(sharded, single, tp):
    want = single["generated"]
    assert want.shape == (2, MAX_LEN)      # the prompt, new tokens, the final </s>
    assert len(set(want[:, PROMPT_WORDS + 1:-1].flatten().tolist())) > 2      # not one token repeated
    for rank, results in sharded.items():
        got = results[tp]
        assert torch.equal(got["generated"], want), f"MP {tp}, rank {rank}"
        _close(got["scores"], single["scores"], f"scores, MP {tp}, rank {rank}")


def test_heads_not_divisible_by_model_parallel_size_name_the_setting(sharded, metaseq_corpus):
    from metaseq import tasks
    cfg = _metaseq_cfg(metaseq_corpus, 1, *THREE_HEADS)
    assert tasks.setup_task(cfg.task).build_model(cfg.model).decoder.transnormer.cfg.n_heads == 3     # MP 1: fine
    for rank, results in sharded.items():
        message = results["error"]
        assert message is not None, "3 heads over 2 model-parallel ranks were accepted"
        assert "--decoder-attention-heads" in message and "3" in message, message
        assert "--model-parallel-size" in message and "2" in message, message


def test_blocks_are_unwrapped_outside_fsdp_and_checkpointing_changes_nothing(metaseq_corpus, single):
    """Metaseq's fsdp_wrap is a no-op outside its FSDP context (--ddp-backend pytorch_ddp); per-block activation
    checkpointing gives the same loss and gradients."""
    from tnllm_plugin.model import TransNormerBlock
    got = _outputs(_metaseq_cfg(metaseq_corpus, 1, "--checkpoint-activations"), _own_grads)
    assert got["loss"] == single["loss"]
    for k, g in single["grads"].items():
        _close(got["grads"][k], g, k)
    from metaseq import tasks
    cfg = _metaseq_cfg(metaseq_corpus, 1, "--checkpoint-activations")
    model = tasks.setup_task(cfg.task).build_model(cfg.model)
    blocks = list(model.decoder.transnormer.layers)
    assert blocks and all(type(b) is TransNormerBlock and b.activation_checkpointing for b in blocks)


# ---------------------------------------------------------------------------------------------------------
# Real runs: metaseq-train at MP 1 and, under torchrun (2 gloo processes), at MP 2; the MP 2 checkpoint resharded
# to MP 1 by tnllm_plugin.parallel and scored by metaseq-validate.

UPDATES = 3


def _tool(name):
    """A console script of the environment running the tests (beside its python), else the one on PATH."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else name


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert run.returncode == 0, f"{cmd[0]} failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run.stdout + run.stderr


def _metaseq_train(corpus, save_dir, model_parallel_size):
    # --clip-norm 0 (Metaseq's default, made explicit): under MP Metaseq's trainer sums every rank's squared
    # gradient norm over the model-parallel group (Trainer.clip_grad_norm, _aggregate_model_parallel_grad_norm),
    # so a replicated parameter (the d_model norms' weights, row-parallel biases: --norm-type rms/layer, --bias)
    # counts once per rank. Checked: with --norm-type layer --bias the logged gnorm of the first update is 0.791 at
    # MP 2 against 0.762 at MP 1, so any clipping threshold clips differently. transnormer_llm_tiny's defaults
    # (SRMSNorm without weight, no biases) have no replicated parameters, so its gnorm agrees anyway.
    args = [str(corpus.root), "--user-dir", str(PLUGIN_DIR), "--task", "streaming_language_modeling",
            "--vocab-filename", str(corpus.vocab), "--merges-filename", str(corpus.merges),
            "--arch", "transnormer_llm_tiny", "--criterion", "transnormer_llm_cross_entropy", "--cpu",
            "--init-std", str(INIT_STD), "--optimizer", "adam", "--lr", "3e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "2",
            "--clip-norm", "0", "--batch-size", "4", "--tokens-per-sample", "64", "--max-update", str(UPDATES),
            "--num-workers", "0", "--disable-validation", "--ddp-backend", "pytorch_ddp", "--seed", "1",
            "--log-format", "json", "--log-interval", "1", "--save-dir", str(save_dir)]
    if model_parallel_size == 1:
        cmd = [_tool("metaseq-train"), *args]
    else:       # with per-block activation checkpointing too: it must not change the numbers
        cmd = [_tool("torchrun"), "--nproc_per_node", str(model_parallel_size), "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), _tool("metaseq-train"), *args, "--distributed-backend", "gloo",
               "--model-parallel-size", str(model_parallel_size), "--checkpoint-activations"]
    log = _run(cmd, save_dir.parent)
    inner = [json.loads(m) for m in re.findall(r"\| train_inner \| (\{.*\})", log)]
    return [float(x["loss"]) for x in inner], log


def _metaseq_validate(corpus, checkpoint, model_parallel_size=1):
    """metaseq-validate's loss of ``checkpoint`` (at MP > 1 each torchrun rank loads its -model_part-R file)."""
    args = [str(corpus.root), "--user-dir", str(PLUGIN_DIR), "--task", "streaming_language_modeling",
            "--vocab-filename", str(corpus.vocab), "--merges-filename", str(corpus.merges), "--path", str(checkpoint),
            "--cpu", "--batch-size", "4", "--tokens-per-sample", "64", "--num-workers", "0", "--log-format", "json"]
    if model_parallel_size == 1:
        cmd = [_tool("metaseq-validate"), *args]
    else:
        cmd = [_tool("torchrun"), "--nproc_per_node", str(model_parallel_size), "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), _tool("metaseq-validate"), *args, "--distributed-backend", "gloo",
               "--model-parallel-size", str(model_parallel_size)]
    log = _run(cmd, checkpoint.parent)
    found = re.findall(r"\| valid \| (\{.*\})", log)
    assert found, f"metaseq-validate logged no validation result:\n{log[-3000:]}"
    return float(json.loads(found[-1])["valid_loss"])


@pytest.fixture(scope="module")
def trained(metaseq_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("metaseq_mp")     # absolute: Metaseq's checkpoint_last link needs it
    runs = {}
    for size in (1, 2):
        losses, log = _metaseq_train(metaseq_corpus, root / f"mp{size}", size)
        runs[size] = dict(losses=losses, log=log, dir=root / f"mp{size}")
    return root, runs


@pytest.mark.slow
def test_metaseq_train_model_parallel_2_equals_1(trained):
    _, runs = trained
    assert len(runs[1]["losses"]) == UPDATES, runs[1]["log"][-3000:]
    assert len(runs[2]["losses"]) == UPDATES, runs[2]["log"][-3000:]
    assert runs[1]["losses"][0] != runs[1]["losses"][-1]            # the updates changed the model
    assert runs[2]["losses"] == pytest.approx(runs[1]["losses"], abs=2e-3)     # the host logs 3 decimals
    assert sorted(p.name for p in runs[2]["dir"].glob("checkpoint_last*")) == \
        ["checkpoint_last-model_part-0.pt", "checkpoint_last-model_part-1.pt"]


@pytest.mark.slow
def test_mp2_checkpoint_reshards_to_the_mp1_weights_and_validates_alike(trained, metaseq_corpus):
    """The MP 2 run's checkpoint parts, consolidated by `python -m tnllm_plugin.parallel`, hold the MP 1 run's
    weights after the same updates; metaseq-validate loads the result at MP 1 and gives the MP 1 run's loss."""
    from tnllm_plugin.parallel import main as reshard_cli
    from tnllm_plugin.parallel import shard_state_dict
    root, runs = trained
    out = root / "mp2_as_mp1" / "checkpoint_last.pt"     # a folder that does not exist yet
    reshard_cli([str(runs[2]["dir"] / "checkpoint_last.pt"), "--from-size", "2", "--to-size", "1", "--out", str(out)])
    mp1 = torch.load(runs[1]["dir"] / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    resharded = torch.load(out, map_location="cpu", weights_only=False)
    cfg = resharded["cfg"]
    assert cfg["common"]["model_parallel_size"] == cfg["checkpoint"]["model_parallel_size"] == 1
    assert cfg["model"].model_parallel_size == 1 and cfg["checkpoint"]["checkpoint_suffix"] == ""
    assert "last_optimizer_state" not in resharded
    assert set(resharded["model"]) == set(mp1["model"])
    for k, v in mp1["model"].items():       # after 3 Adam steps: Adam's normalised steps amplify rounding
        torch.testing.assert_close(resharded["model"][k], v, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")

    # and on to MP 4 (Metaseq's part naming and per-part file suffix), whose parts are the slices of MP 1's
    reshard_cli([str(out), "--from-size", "1", "--to-size", "4", "--out", str(root / "mp4" / "checkpoint_last.pt")])
    for r in range(4):
        part = torch.load(root / "mp4" / f"checkpoint_last-model_part-{r}.pt", map_location="cpu", weights_only=False)
        assert part["cfg"]["checkpoint"]["checkpoint_suffix"] == f"-model_part-{r}"
        assert part["cfg"]["model"].model_parallel_size == part["cfg"]["common"]["model_parallel_size"] == 4
        want = shard_state_dict(resharded["model"], r, 4)
        assert set(part["model"]) == set(want) and all(torch.equal(part["model"][k], want[k]) for k in want)

    loss_mp1 = _metaseq_validate(metaseq_corpus, runs[1]["dir"] / "checkpoint_last.pt")
    assert _metaseq_validate(metaseq_corpus, out) == pytest.approx(loss_mp1, abs=2e-3)      # 3 decimals logged
    # the MP 4 parts load in 4 metaseq-validate processes at --model-parallel-size 4 and score alike
    assert _metaseq_validate(metaseq_corpus, root / "mp4" / "checkpoint_last.pt", 4) == \
        pytest.approx(loss_mp1, abs=2e-3)
