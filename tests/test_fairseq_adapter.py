"""The fairseq host: registration, incremental decoding through fairseq's decoder API, the criterion, and a
real fairseq-train -> fairseq-eval-lm -> generation run on CPU (subprocesses of the host's own CLIs)."""
import os
import re
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

fairseq = pytest.importorskip("fairseq")
from fairseq.criterions import CRITERION_REGISTRY  # noqa: E402
from fairseq.data import Dictionary  # noqa: E402
from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY  # noqa: E402

from tnllm_plugin import fairseq_adapter, host_common  # noqa: E402
from tnllm_plugin.fairseq_adapter import TransNormerCrossEntropy, TransNormerLanguageModel  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRESETS = ["tiny", "385m", "1b", "3b", "7b", "13b", "65b", "175b"]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_registered():
    assert MODEL_REGISTRY["transnormer_llm"] is TransNormerLanguageModel
    for name in PRESETS:
        assert ARCH_MODEL_REGISTRY[f"transnormer_llm_{name}"] is TransNormerLanguageModel
    assert CRITERION_REGISTRY["transnormer_llm_cross_entropy"] is TransNormerCrossEntropy


def make_task(vocab=40):
    d = Dictionary()
    for i in range(vocab):
        d.add_symbol(f"w{i}")
    return Namespace(target_dictionary=d, source_dictionary=d), d


def build(arch="transnormer_llm_tiny", **over):
    task, d = make_task()
    args = Namespace(arch=arch, **over)
    from fairseq.models import ARCH_CONFIG_REGISTRY
    ARCH_CONFIG_REGISTRY[arch](args)
    torch.manual_seed(0)
    return TransNormerLanguageModel.build_model(args, task).double().eval(), d


@pytest.mark.parametrize("arch", ["transnormer_llm_385m", "transnormer_llm_7b"])
def test_presets_give_table10_shapes(arch):
    task, _ = make_task()
    args = Namespace(arch=arch)
    from fairseq.models import ARCH_CONFIG_REGISTRY
    ARCH_CONFIG_REGISTRY[arch](args)
    cfg = host_common.config_from_args(args, task.target_dictionary)
    want = {"transnormer_llm_385m": (24, 1024, 8, 2816), "transnormer_llm_7b": (30, 4096, 32, 11008)}[arch]
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.glu_dim) == want


@torch.no_grad()
def test_incremental_decoding_equals_full_forward():
    model, d = build(lrpe_layers="0,1")
    tokens = torch.randint(d.nspecial, len(d), (3, 23), generator=torch.Generator().manual_seed(0))
    full = model.decoder(tokens)[0]
    inc = {}
    outs = [model.decoder(tokens[:, :9], incremental_state=inc)[0]]   # prefill of 9 tokens
    for t in range(10, 24):                                            # fairseq passes the whole prefix
        outs.append(model.decoder(tokens[:, :t], incremental_state=inc)[0])
    assert rel(torch.cat(outs, 1), full) < 1e-10


@torch.no_grad()
def test_reorder_incremental_state():
    model, d = build()
    tokens = torch.randint(d.nspecial, len(d), (3, 12), generator=torch.Generator().manual_seed(1))
    inc = {}
    model.decoder(tokens[:, :11], incremental_state=inc)
    order = torch.tensor([2, 0, 0])
    model.decoder.reorder_incremental_state_scripting(inc, order)
    step = model.decoder(tokens[order], incremental_state=inc)[0]
    full = model.decoder(tokens[order])[0]
    assert rel(step[:, -1], full[:, -1]) < 1e-10


def test_checkpoint_activations_recomputes_each_block_with_the_same_result():
    """--checkpoint-activations: every block recomputes in the backward pass; the model (weights, built one block at
    a time) and its outputs and gradients are exactly those of the plain build."""
    plain, d = build()
    ckpt, _ = build(checkpoint_activations=True)
    assert all(getattr(b, "activation_checkpointing", False) for b in ckpt.decoder.transnormer.layers)
    assert not any(getattr(b, "activation_checkpointing", False) for b in plain.decoder.transnormer.layers)
    tokens = torch.randint(d.nspecial, len(d), (2, 21), generator=torch.Generator().manual_seed(3))
    grads = []
    for model in (plain, ckpt):
        out = model(tokens)[0]
        (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
        grads.append((out.detach(), {k: p.grad for k, p in model.named_parameters()}))
    (out_p, g_p), (out_c, g_c) = grads
    assert torch.equal(out_c, out_p)
    assert set(g_c) == set(g_p)
    for k in g_p:
        assert torch.equal(g_c[k], g_p[k]), k


def test_keep_linear_inputs_reaches_every_mixer():
    """--keep-linear-inputs: every token and channel mixer keeps its linear layers' inputs (the plain composition),
    so a forward keeps more for backward, with the same outputs as the default build (which recomputes them)."""
    default, d = build()
    kept, _ = build(keep_linear_inputs=True)
    mixers = lambda m: [x for b in m.decoder.transnormer.layers for x in (b.token_mixer, b.channel_mixer)]  # noqa
    assert all(x.recompute_linear_inputs for x in mixers(default))
    assert not any(x.recompute_linear_inputs for x in mixers(kept))
    tokens = torch.randint(d.nspecial, len(d), (2, 13), generator=torch.Generator().manual_seed(4))
    outs, saved = [], []
    for model in (default, kept):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            outs.append(model(tokens)[0])
        saved.append(sum(sizes))
    assert torch.equal(outs[0], outs[1])
    assert saved[1] > saved[0]


def test_criterion_ignores_padding():
    model, d = build()
    tokens = torch.randint(d.nspecial, len(d), (2, 10), generator=torch.Generator().manual_seed(2))
    target = tokens.roll(-1, 1)
    padded = target.clone()
    padded[1, 6:] = d.pad()
    crit = TransNormerCrossEntropy(Namespace(target_dictionary=d, source_dictionary=d))
    sample = {"net_input": {"src_tokens": tokens}, "target": padded, "ntokens": int(padded.ne(d.pad()).sum())}
    loss, sample_size, log = crit(model, sample)
    logits = model(tokens)[0]
    want = torch.nn.functional.cross_entropy(logits[0], target[0], reduction="sum") + \
        torch.nn.functional.cross_entropy(logits[1, :6], target[1, :6], reduction="sum")
    assert sample_size == 16 and torch.allclose(loss.double(), want, rtol=1e-6)  # the criterion works in fp32


def criterion_batch(d, seed=5):
    tokens = torch.randint(d.nspecial, len(d), (3, 17), generator=torch.Generator().manual_seed(seed))
    target = tokens.roll(-1, 1)
    target[2, 11:] = d.pad()
    return {"net_input": {"src_tokens": tokens, "src_lengths": torch.full((3,), 17)}, "target": target,
            "ntokens": int(target.ne(d.pad()).sum())}


def loss_and_grads(model, loss_fn, weights):
    model.zero_grad()
    loss = loss_fn()
    (loss * weights).sum().backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("reduce", [True, False])
def test_criterion_equals_cross_entropy_of_the_full_logits_without_making_them(reduce):
    """The criterion has the model compute its loss (chunked LM head + loss: the LM head module never runs, so the
    [tokens, vocab] logits never exist); the loss and every gradient are those of the previous criterion, cross
    entropy on the full logits, to fp32 rounding."""
    model, d = build()
    model = model.float().train()
    sample = criterion_batch(d)
    crit = TransNormerCrossEntropy(Namespace(target_dictionary=d, source_dictionary=d))
    weights = (torch.rand(sample["target"].numel(), generator=torch.Generator().manual_seed(6)) + 0.5
               if not reduce else torch.tensor(0.7))
    head_calls = []
    hook = model.decoder.transnormer.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    loss, grads = loss_and_grads(model, lambda: crit(model, sample, reduce=reduce)[0], weights)
    hook.remove()
    assert not head_calls

    def full_logits_loss():
        logits = model(**sample["net_input"])[0]
        return host_common.model_cross_entropy(model, logits, sample["target"], d.pad(), reduce)
    want, want_grads = loss_and_grads(model, full_logits_loss, weights)
    assert loss.dtype == torch.float32 and loss.shape == want.shape
    assert rel(loss, want) < 1e-6
    if not reduce:
        assert (loss.view(3, 17)[2, 11:] == 0).all()
    assert set(grads) == set(want_grads)
    for k in want_grads:
        assert rel(grads[k], want_grads[k]) < 1e-5, k


def test_criterion_under_check_finite_still_checks_the_logits():
    """--check-finite watches the logits: with it the loss goes through the full logits (same value), and an inf
    logit stops the step naming the logits."""
    from tnllm_plugin.finite import FiniteCheck, NonFiniteError
    model, d = build(check_finite=True)
    assert isinstance(model.decoder.finite_check, FiniteCheck)
    sample = criterion_batch(d)
    crit = TransNormerCrossEntropy(Namespace(target_dictionary=d, source_dictionary=d))
    checked = crit(model, sample)[0]
    model.decoder.finite_check.remove()
    model.decoder.finite_check = None
    assert rel(checked, crit(model, sample)[0]) < 1e-6      # the full logits' loss is fp32 (token_cross_entropy)
    model.decoder.finite_check = FiniteCheck(model.decoder.transnormer)
    with torch.no_grad():
        model.decoder.transnormer.lm_head.weight[7] = float("inf")
    with pytest.raises(NonFiniteError, match="logits"):
        crit(model, sample)


def test_mismatched_checkpoint_names_the_tensor():
    model, _ = build()
    sd = model.state_dict()
    key = "decoder.transnormer.layers.0.token_mixer.qkvu_proj.weight"
    sd[key] = torch.zeros(5, 5)
    with pytest.raises(ValueError, match=re.escape(f"{key}: checkpoint (5, 5) vs model (256, 64)")):
        model.load_state_dict(sd)


# --- the real host, end to end -----------------------------------------------------------------------------

def host(cmd, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    bindir = Path(sys.executable).parent
    out = subprocess.run([str(bindir / cmd[0])] + [str(c) for c in cmd[1:]], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


@pytest.mark.slow
def test_train_eval_generate_through_fairseq(tmp_path):
    # a corpus with structure to learn: counting sequences over 30 words
    lines = [" ".join(f"w{(s + i) % 30}" for i in range(12)) for s in range(400)]
    for split, part in [("train", lines[:360]), ("valid", lines[360:])]:
        (tmp_path / f"{split}.txt").write_text("\n".join(part) + "\n")
    host(["fairseq-preprocess", "--only-source", "--trainpref", tmp_path / "train.txt", "--validpref",
          tmp_path / "valid.txt", "--destdir", tmp_path / "bin", "--workers", "1"], tmp_path)
    user_dir = REPO / "tnllm_plugin"
    log = host(["fairseq-train", tmp_path / "bin", "--user-dir", user_dir, "--task", "language_modeling", "--cpu",
                "--arch", "transnormer_llm_tiny", "--criterion", "transnormer_llm_cross_entropy",
                "--tokens-per-sample", "64", "--max-tokens", "1024", "--optimizer", "adam", "--lr", "5e-3",
                "--max-update", "60", "--log-interval", "10", "--log-format", "simple", "--save-dir",
                tmp_path / "ckpt", "--no-epoch-checkpoints", "--seed", "1", "--num-workers", "0"], tmp_path)
    losses = [float(x) for x in re.findall(r"train_inner .*? loss=([\d.]+)", log)]
    assert len(losses) >= 5 and losses[-1] < 0.5 * losses[0], losses
    # the checkpoint reloads for evaluation with the default torch.load (weights_only) and no env variable
    ev = host(["fairseq-eval-lm", tmp_path / "bin", "--user-dir", user_dir, "--path",
               tmp_path / "ckpt" / "checkpoint_last.pt", "--cpu", "--tokens-per-sample", "64",
               "--gen-subset", "valid", "--num-workers", "0"], tmp_path)
    ppl = float(re.search(r"Perplexity: ([\d.]+)", ev).group(1))
    assert ppl < 2 ** losses[0]
    # generation through fairseq's sequence generator: the learnt counting continues
    lm = TransNormerLanguageModel.from_pretrained(str(tmp_path / "ckpt"), "checkpoint_last.pt", str(tmp_path / "bin"))
    lm.eval()
    out = lm.sample("w3 w4 w5 w6 w7", beam=1, max_len_b=8)     # the length counts the prompt
    assert out.split()[:7] == ["w3", "w4", "w5", "w6", "w7", "w8", "w9"], out


def test_torch_adamw_optimizer_equals_torch_adamw():
    # --optimizer torch_adamw: fairseq's adam options on torch.optim.AdamW (fused on CUDA, foreach here)
    from fairseq.optim import build_optimizer
    cfg = Namespace(optimizer="torch_adamw", lr=[1e-2], adam_betas="(0.9, 0.95)", adam_eps=1e-8, weight_decay=0.1,
                    use_old_adam=False, fp16_adam_stats=False, tpu=False)
    ours, ref = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    ref.load_state_dict(ours.state_dict())
    opt = build_optimizer(cfg, list(ours.parameters()))
    assert isinstance(opt, fairseq_adapter.TorchAdamW)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(3):
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(step))
        for m, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-7)
