"""Same-size quality comparison (issue 13): TransNormerLLM against a LLaMA-style Transformer of the same parameter
count, and the paper's ablations, each trained by the same `fairseq-train` loop on the same data.

    python benchmarks/quality.py --list                 # the runs, their flags and an estimate of their minutes
    python benchmarks/quality.py --only main            # the main comparison (2 models x the learning rates)
    python benchmarks/quality.py --only ablations       # the ablations (shorter budget)
    python benchmarks/quality.py --only tnl_lr6e-4,llama_lr6e-4 --gpus 0,1   # one run per GPU, side by side
    python benchmarks/quality.py --table                # markdown table from the collected results
    python benchmarks/quality.py --plot                 # PNGs of valid loss against tokens (benchmarks/quality_*.png)
    python benchmarks/quality.py --smoke                # everything at tiny size on CPU, on a slice of the corpus

Every run is one `fairseq-train` command, printed and logged, with `--user-dir benchmarks/quality_models` (that
package registers the baseline `llama_baseline` beside the plugin's `transnormer_llm`; fairseq takes one user dir).
Identical for all runs: data (the Linux 6.1 corpus of scripts/prepare_corpus.py; on a GPU machine its pack,
unpacked into --work), tokenizer, data order (--seed), sequence length, tokens per update, optimizer (AdamW, betas
0.9/0.95, weight decay 0.1, clip 1.0), cosine schedule with linear warm-up to the run's learning rate and down to a
tenth of it, bf16 autocast over fp32 weights; only the model flags and the learning rate differ. Validation every
100 updates (50 in the ablations) on the first 32 batches (1M tokens) of valid gives the curve; at the end
`fairseq-validate` scores the last checkpoint on the whole valid and test splits (the table). Losses are fairseq's,
in bits per token (base 2), as the paper's tables (their PPL is 2^loss, averaged over the last 1k updates).

Results go to --out (default benchmarks/logs/quality): per run NAME.json (settings, command, parameter counts,
curve, final losses, tokens/s) and NAME.log (fairseq's output). A run killed by a time limit (--time-limit, or the
GPU machine's) resumes from its last checkpoint (every 300 updates) in --work when started again;
finished runs (in --work, or in benchmarks/logs/quality, which travels with the checkout) are skipped unless
--force; their results are copied to --out, so that --table and --plot there see every run.
"""
import argparse
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
USER_DIR = REPO / "benchmarks" / "quality_models"
DEFAULT_PACK = REPO / "work_dirs" / "corpus" / "linux-6.1.pack.tar"
DEFAULT_DATA_BIN = REPO / "work_dirs" / "corpus" / "data-bin"
DEFAULT_OUT = REPO / "benchmarks" / "logs" / "quality"

# Model shape: TransNormerLLM d_model 768, 12 layers, 12 heads (head 64; LRPE doubles q/k to 128, within the
# Triton kernel's Dk <= 256), SGLU width 8/3 d = 2048 (presets.glu_dim_for). The baseline has the same width,
# depth and heads; its SwiGLU width is chosen so that a block has TransNormerLLM's parameters (llama_ffn_dim).
# Tokens per update 16 x 2048 = 32768; the main budget is 1832 updates = 60.0M tokens (the pack's train split,
# 59,999,988 tokens = 1831 full updates, then one update into epoch 2), the ablations 10M tokens. Learning rates:
# both models were best at the lower of 6e-4 and 1.5e-3 (2026-11-29), the edge of that sweep, so 3e-4 is added.
FULL = dict(d=768, layers=12, heads=12, glu=2048, seq=2048, batch=16, main_tokens=60_000_000,
            ablation_tokens=10_000_000, lrs=(3e-4, 6e-4, 1.5e-3), ablation_lr=1e-3, warmup=0.05, valid_every=100,
            ablation_valid_every=50, valid_batches=32, save_every=300, log_interval=20, cpu=False,
            assume_tokens_per_s=200_000, overhead_s=60)
# tiny, CPU: a few dozen updates of 4 x 64 tokens
SMOKE = dict(d=64, layers=2, heads=4, glu=128, seq=64, batch=4, main_tokens=256 * 12, ablation_tokens=256 * 4,
             lrs=(1e-3, 3e-3), ablation_lr=3e-3, warmup=0.1, valid_every=4, ablation_valid_every=2, valid_batches=2,
             save_every=5,
             log_interval=2, cpu=True, assume_tokens_per_s=300, overhead_s=15)
SMOKE_SLICE = dict(train=200_000, valid=4_000, test=4_000)     # tokens of each split in the smoke data

# The paper's numbers (arXiv 2307.14995; 385M models, 100K updates, loss in bits, PPL averaged over the last 1k
# updates). Table 8's text extraction is garbled; the values below are the legible ones (RMSNorm: "2 2 4 7" and
# "4./00" read as 2.247 / 4.766, the digits of its other copy "1766"). Table 4 prints "2 258" / "4 804".
PAPER = {
    "table1_transformer": ("Table 1", "Transformer", 2.362, 5.160),
    "table1_transnormer": ("Table 1", "TransNormerLLM", 2.248, 4.770),
    "tables3_8_base": ("Tables 3-8", "TransNormerLLM (Mix, w/ temperature, Swish, SRMSNorm)", 2.248, 4.770),
    "table3_mix": ("Table 3", "Mix (LRPE-d first layer, Exp-Decay rest)", 2.248, 4.770),
    "table3_lrpe_d": ("Table 3", "LRPE-d (all layers)", 2.236, 4.728),
    "table3_exp_decay": ("Table 3", "Exp-Decay (no LRPE)", 2.267, 4.834),
    "table4_with": ("Table 4", "w/ temperature", 2.248, 4.770),
    "table4_without": ("Table 4", "w/o temperature", 2.258, 4.804),
    "table6_swish": ("Table 6", "Swish", 2.248, 4.770),
    "table6_1elu": ("Table 6", "1+elu", 2.252, 4.767),
    "table6_none": ("Table 6", "No Act", 2.283, 4.882),
    "table8_srms": ("Table 8", "SRMSNorm", 2.248, 4.770),
    "table8_rms": ("Table 8", "RMSNorm", 2.247, 4.766),
    "table8_layer": ("Table 8", "LayerNorm", 2.247, 4.765),
}

# Ablations: (name, extra model flags, paper row, group). Each group is read against abl_base, TransNormerLLM's
# defaults (released decay, LRPE-d on the first layer, silu, SRMSNorm). Table 4 compares eq. 2 with and without its
# layer factor; here the factor is dropped from the released schedule (--decay-schedule no-temperature: ALiBi
# slopes in every layer), and eq. 2 as printed (head 0 without decay) is a third row with no paper number.
ABLATIONS = [
    ("abl_base", [], "tables3_8_base", "base"),
    ("abl_decay_paper", ["--decay-schedule", "paper"], None, "decay"),      # eq. 2 as printed: no row of its own
    ("abl_decay_no_temperature", ["--decay-schedule", "no-temperature"], "table4_without", "decay"),
    ("abl_lrpe_all", ["--lrpe-layers", "ALL"], "table3_lrpe_d", "lrpe"),
    ("abl_lrpe_none", ["--lrpe-layers", ","], "table3_exp_decay", "lrpe"),
    ("abl_qk_1elu", ["--qk-act", "1+elu"], "table6_1elu", "qk_act"),
    ("abl_qk_none", ["--qk-act", "none"], "table6_none", "qk_act"),
    ("abl_norm_rms", ["--norm-type", "rms"], "table8_rms", "norm"),
    ("abl_norm_layer", ["--norm-type", "layer"], "table8_layer", "norm"),
]
BASE_ROWS = {"decay": "table4_with", "lrpe": "table3_mix", "qk_act": "table6_swish", "norm": "table8_srms"}


def lr_tag(lr):
    """6e-4 -> '6e-4', 1.5e-3 -> '1.5e-3' (run names)."""
    return f"{lr:.1e}".replace(".0e", "e").replace("e-0", "e-").replace("e+0", "e")


def llama_ffn_dim(s, multiple=16):
    """SwiGLU width giving a LLaMA block TransNormerLLM's block parameters: TransNormerLLM has 4 d^2 (QKVU) + d^2
    (output) + 3 d glu; LLaMA 4 d^2 (QKVO) + 3 d ffn, so ffn = glu + d / 3 (2304 at d 768), rounded."""
    return multiple * round((s["glu"] + s["d"] / 3) / multiple)


def runs_for(s):
    """Ordered {name: run} of every run at these settings."""
    runs = {}
    for lr in s["lrs"]:
        runs[f"tnl_lr{lr_tag(lr)}"] = dict(model="tnl", lr=lr, budget="main", flags=[], paper="table1_transnormer",
                                           group="main")
        runs[f"llama_lr{lr_tag(lr)}"] = dict(model="llama", lr=lr, budget="main", flags=[],
                                             paper="table1_transformer", group="main")
    for name, flags, paper, group in ABLATIONS:
        flags = [",".join(str(i) for i in range(s["layers"])) if f == "ALL" else f for f in flags]
        runs[name] = dict(model="tnl", lr=s["ablation_lr"], budget="ablation", flags=flags, paper=paper, group=group)
    return runs


def updates_for(s, run):
    tokens = s["main_tokens"] if run["budget"] == "main" else s["ablation_tokens"]
    return math.ceil(tokens / (s["batch"] * s["seq"]))


def model_flags(s, run):
    common = ["--decoder-embed-dim", s["d"], "--decoder-layers", s["layers"], "--decoder-attention-heads", s["heads"]]
    if run["model"] == "tnl":
        # the plugin registers presets only; every shape flag is given, so the preset decides nothing
        flags = ["--arch", "transnormer_llm_385m", *common, "--hidden-dim", s["d"], "--glu-dim", s["glu"],
                 *run["flags"]]
    else:
        flags = ["--arch", "llama_baseline", *common, "--decoder-ffn-embed-dim", llama_ffn_dim(s)]
    return [str(f) for f in flags]


def train_command(s, run, data, save_dir):
    updates = updates_for(s, run)
    cmd = ["fairseq-train", data, "--user-dir", USER_DIR, "--task", "language_modeling",
           "--sample-break-mode", "none", "--tokens-per-sample", s["seq"], "--batch-size", s["batch"],
           "--batch-size-valid", s["batch"], *model_flags(s, run),
           "--criterion", "transnormer_llm_cross_entropy",
           "--optimizer", "torch_adamw", "--adam-betas", "(0.9, 0.95)", "--adam-eps", "1e-8", "--weight-decay", "0.1",
           "--clip-norm", "1.0", "--lr", run["lr"], "--lr-scheduler", "cosine",
           "--warmup-updates", max(1, int(s["warmup"] * updates)), "--warmup-init-lr", "1e-7",
           "--min-lr", run["lr"] / 10, "--max-update", updates,
           "--validate-interval-updates", s["valid_every" if run["budget"] == "main" else "ablation_valid_every"],
           "--max-valid-steps", s["valid_batches"],
           "--valid-subset", "valid", "--save-dir", save_dir, "--save-interval-updates", s["save_every"],
           "--keep-interval-updates", "1", "--no-epoch-checkpoints", "--seed", "1",
           "--log-format", "json", "--log-interval", s["log_interval"], "--num-workers", "2" if not s["cpu"] else "0"]
    cmd += ["--cpu"] if s["cpu"] else ["--bf16-autocast"]
    return [str(c) for c in cmd]


def validate_command(s, data, save_dir):
    cmd = ["fairseq-validate", data, "--user-dir", USER_DIR, "--task", "language_modeling",
           "--path", Path(save_dir) / "checkpoint_last.pt", "--valid-subset", "valid,test",
           "--batch-size", s["batch"], "--log-format", "json", "--num-workers", "0"]
    cmd += ["--cpu"] if s["cpu"] else []
    return [str(c) for c in cmd]


# ---------------------------------------------------------------------------------------------------------
# Parameter counts (both models built on the meta device: no memory, no initialisation)

def build_model(s, vocab, run):
    """The run's model as fairseq-train builds it (same flags), as a plain module: for the parameter counts and the
    plugin's own training-step benchmark."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from quality_models import LlamaConfig, LlamaLM
    from tnllm_plugin.model import TransNormerConfig, TransNormerLLM
    if run["model"] == "tnl":
        flags = dict(zip(run["flags"][::2], run["flags"][1::2]))
        lrpe = flags.get("--lrpe-layers", "0")
        return TransNormerLLM(TransNormerConfig(
            vocab_size=vocab, d_model=s["d"], n_layers=s["layers"], n_heads=s["heads"], glu_dim=s["glu"],
            lrpe_layers=tuple(int(i) for i in lrpe.split(",") if i.strip()),
            decay=flags.get("--decay-schedule", "released"), qk_act=flags.get("--qk-act", "silu"),
            norm=flags.get("--norm-type", "srms")))
    return LlamaLM(LlamaConfig(vocab_size=vocab, d_model=s["d"], n_layers=s["layers"], n_heads=s["heads"],
                               ffn_dim=llama_ffn_dim(s)))


def parameter_counts(s, vocab, run=None):
    import torch
    from quality_models import count_parameters
    with torch.device("meta"):
        model = build_model(s, vocab, run or dict(model="tnl", flags=[]))
    return dict(total=count_parameters(model), non_embedding=count_parameters(model, non_embedding=True))


STEP_BENCHMARK = "step_benchmark.json"     # in --out beside the runs' NAME.json


def run_records(out: Path):
    """The runs' NAME.json files in a results directory (the step benchmark's file beside them is not a run)."""
    return [f for f in out.glob("*.json") if f.name != STEP_BENCHMARK]


def step_benchmark(s, vocab, out: Path):
    """Issue 13 item 5: both models' training step outside any host, at the runs' shape and tokens per update, timed
    as benchmarks/train_throughput.py times it (bf16 autocast over fp32 weights, fp32 cross entropy, fused AdamW;
    median of 10 steps after 3). fairseq-train's tokens/s (the table) is read against these; written to
    --out's step_benchmark.json."""
    import torch
    sys.path.insert(0, str(REPO / "benchmarks"))
    import train_throughput
    device = torch.device("cpu" if s["cpu"] else "cuda")
    shape = dict(tokens=s["batch"] * s["seq"], vocab=vocab, warmup=1 if s["cpu"] else 3, steps=2 if s["cpu"] else 10)
    results = {}
    for model_name in ("tnl", "llama"):
        torch.manual_seed(0)
        model = build_model(s, vocab, dict(model=model_name, flags=[])).to(device)
        logits = (lambda m, x: m(x)[0]) if model_name == "tnl" else (lambda m, x: m(x))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        results[model_name] = train_throughput.measure(model, train_throughput.plain_loss(logits), opt, shape,
                                                       s["seq"], device)
        print(f"step benchmark {model_name}: {results[model_name]}", flush=True)
        del model, opt
        train_throughput.free_memory(device)
    out.mkdir(parents=True, exist_ok=True)
    (out / STEP_BENCHMARK).write_text(json.dumps(dict(
        results, settings=shape, seq=s["seq"], device=device_name(s, None), date=time.strftime("%Y-%m-%d")), indent=1))
    return results


def check_same_size(s, vocab):
    """Both counts printed; the baseline's total and non-embedding counts within 3% of TransNormerLLM's."""
    tnl, llama = parameter_counts(s, vocab), parameter_counts(s, vocab, dict(model="llama"))
    for key in ("total", "non_embedding"):
        rel = llama[key] / tnl[key] - 1
        print(f"parameters ({key.replace('_', '-')}): TransNormerLLM {tnl[key]:,}  LLaMA baseline {llama[key]:,}  "
              f"({rel:+.2%})", flush=True)
        if abs(rel) > 0.03:
            sys.exit(f"the baseline's {key} parameter count is {rel:+.1%} off TransNormerLLM's (limit 3%)")
    return tnl, llama


# ---------------------------------------------------------------------------------------------------------
# Data

def dictionary_size(data: Path) -> int:
    """len(fairseq Dictionary): 4 specials, the dict.txt symbols, padded to a multiple of 8 (fairseq's default)."""
    from fairseq.data import Dictionary
    return len(Dictionary.load(str(data / "dict.txt")))


def smoke_slice_sizes(text):
    """--smoke-slice "train=3000000,valid=200000" -> tokens of each split (the others as SMOKE_SLICE)."""
    sizes = dict(SMOKE_SLICE)
    for part in filter(None, (text or "").split(",")):
        key, _, value = part.partition("=")
        if key not in SMOKE_SLICE or not value.isdigit() or int(value) <= 0:
            sys.exit(f"--smoke-slice {text}: {part!r} is not SPLIT=TOKENS with SPLIT one of "
                     f"{', '.join(SMOKE_SLICE)} and TOKENS a positive integer")
        sizes[key] = int(value)
    return sizes


def prepare_data(args, s, work: Path) -> Path:
    """A data-bin directory: --data as given; the smoke settings' slice of it (or of work_dirs/corpus/data-bin);
    else the pack unpacked into WORK/data (once: kept while the machine is)."""
    sys.path.insert(0, str(REPO / "scripts"))
    import prepare_corpus
    if args.smoke:
        src = Path(args.data) if args.data else DEFAULT_DATA_BIN
        sizes = args.smoke_slice
        # another slice, another directory (the slice is made once per directory)
        dest = work / ("data-smoke" if sizes == SMOKE_SLICE else
                       "data-smoke-" + "-".join(str(sizes[k]) for k in ("train", "valid", "test"))) / "data-bin"
        if not (dest / "test.idx").exists():
            slice_data_bin(src, dest, sizes, prepare_corpus)
        return dest
    if args.data:
        return Path(args.data)
    dest = work / "data"
    if not (dest / "data-bin" / "test.idx").exists():
        t0 = time.time()
        prepare_corpus.unpack(Path(args.pack), dest)
        print(f"unpacked {args.pack} in {time.time() - t0:.0f} s", flush=True)
    return dest / "data-bin"


def slice_data_bin(src: Path, dest: Path, tokens: dict, prepare_corpus):
    """The first tokens[split] tokens of each split (whole lines: the streams end every line with </s>)."""
    import numpy as np
    if not (src / "dict.txt").exists():
        sys.exit(f"{src}: no dict.txt; --smoke slices a fairseq data-bin (scripts/prepare_corpus.py build, or --data)")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "dict.txt").write_bytes((src / "dict.txt").read_bytes())
    dtype = np.dtype(prepare_corpus.token_dtype(dictionary_size(src)))
    for split, n in tokens.items():
        ids = prepare_corpus._trimmed(np.memmap(src / f"{split}.bin", dtype=dtype, mode="r"), n)
        np.asarray(ids).tofile(dest / f"{split}.bin")
        ends = np.flatnonzero(np.asarray(ids) == prepare_corpus.EOS) + 1
        prepare_corpus.write_index(dest / f"{split}.idx", np.diff(ends, prepend=0).tolist(), dtype.type)


# ---------------------------------------------------------------------------------------------------------
# fairseq's JSON log lines -> the run's record

LOG_LINE = re.compile(r"\| (train_inner|valid|test) \| (\{.*\})\s*$")


def parse_log(text: str, tokens_per_update: int):
    """Curve of valid loss against tokens (last record per update: a resumed run repeats some), train losses and
    tokens/s (fairseq's wps, per log interval), and fairseq-validate's valid/test losses (its records have no
    update count: that tells them from fairseq-train's)."""
    curve, train, wps, final = {}, {}, [], {}
    for m in map(LOG_LINE.search, text.splitlines()):
        if not m:
            continue
        tag, rec = m.group(1), json.loads(m.group(2))
        if tag == "train_inner":
            step = int(rec["num_updates"])
            train[step] = float(rec["loss"])
            wps.append((step, float(rec["wps"])))
        elif tag == "valid" and "valid_num_updates" in rec:
            curve[int(rec["valid_num_updates"])] = float(rec["valid_loss"])
        else:
            final[tag] = dict(loss=float(rec[f"{tag}_loss"]), ppl=float(rec[f"{tag}_ppl"]))
    # tokens/s: the median over log intervals, leaving out the first one after each (re)start (compiling,
    # autotuning); the intervals fairseq logs are train time only (validation and saving excluded)
    restarts = {i for i, (step, _) in enumerate(wps) if i == 0 or step <= wps[i - 1][0]}
    steady = [w for i, (_, w) in enumerate(wps) if i not in restarts] or [w for _, w in wps]
    return dict(curve=[[u * tokens_per_update, curve[u]] for u in sorted(curve)],
                train_curve=[[u * tokens_per_update, train[u]] for u in sorted(train)],
                tokens_per_s=statistics.median(steady) if steady else None, final=final)


# ---------------------------------------------------------------------------------------------------------
# Running

def finished(name, work: Path, args):
    """The result of a run done before: in this machine's work dir, or in --done-dir (benchmarks/logs/quality: a
    fresh GPU machine has lost the last one's work dir, but results copied back into the checkout travel)."""
    for path in (work / "runs" / name / "result.json", Path(args.done_dir) / f"{name}.json" if args.done_dir else None):
        if path is not None and path.exists():
            return path
    return None


def run_one(name, run, s, args, data, work: Path, out: Path, params, gpu=None, deadline=None, sharing=1):
    """Train (or resume) one run, validate it, write out/NAME.json; returns its record, or None if cut short."""
    rdir = work / "runs" / name
    save_dir = rdir / "ckpt"
    done = rdir / "result.json"
    out.mkdir(parents=True, exist_ok=True)
    found = finished(name, work, args)
    if found and not args.force:
        if found.resolve() != (out / f"{name}.json").resolve():
            (out / f"{name}.json").write_text(found.read_text())
            log_before = rdir / "train.log" if found == done else found.with_suffix(".log")
            if log_before.exists():
                copy_log(log_before, out / f"{name}.log")
        print(f"[{name}] done before: {found}", flush=True)
        return json.loads(found.read_text())
    if args.force and rdir.exists():
        import shutil
        shutil.rmtree(rdir)
    rdir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO / "benchmarks"))
    from quality_models import REFUSE_BLOCK_FORM_ENV
    # the user dir refuses lightning attention's PyTorch block form on CUDA in these runs: they train the Triton path
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1", **{REFUSE_BLOCK_FORM_ENV: "1"})
    env.setdefault("OMP_NUM_THREADS", "2")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    log_path = rdir / "train.log"
    cmd = train_command(s, run, data, save_dir)
    print(f"[{name}] " + shlex.join(cmd), flush=True)
    t0 = time.time()
    pid_file = rdir / "train.pid"
    stop_leftover(pid_file, save_dir)
    with open(log_path, "a") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        log.flush()
        # in this process's group: whatever kills this script (the GPU machine's time limit) kills the training too
        proc = subprocess.Popen([host_exe(cmd[0])] + cmd[1:], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        pid_file.write_text(str(proc.pid))
        try:
            proc.wait(timeout=None if deadline is None else max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()         # fairseq resumes from checkpoint_last.pt (written atomically by the plugin)
            proc.wait()
            print(f"[{name}] stopped by the time limit after {time.time() - t0:.0f} s; run it again to resume",
                  flush=True)
            copy_log(log_path, out / f"{name}.log")
            return None
    wall = time.time() - t0
    copy_log(log_path, out / f"{name}.log")
    if proc.returncode != 0:
        print(f"[{name}] fairseq-train failed (exit {proc.returncode}); log: {log_path}\n" +
              log_path.read_text()[-3000:], flush=True)
        return None
    vcmd = validate_command(s, data, save_dir)
    val = subprocess.run([host_exe(vcmd[0])] + vcmd[1:], capture_output=True, text=True, env=env, cwd=REPO)
    with open(log_path, "a") as log:
        log.write(f"# {shlex.join(vcmd)}\n" + val.stdout + val.stderr)
    copy_log(log_path, out / f"{name}.log")
    if val.returncode != 0:
        print(f"[{name}] fairseq-validate failed; log: {log_path}\n" + val.stderr[-3000:], flush=True)
        return None
    positions = position_loss(s, data, save_dir, rdir, env)
    tokens_per_update = s["batch"] * s["seq"]
    text = log_path.read_text()
    parsed = parse_log(text, tokens_per_update)
    record = dict(name=name, **run, settings=dict(s), updates=updates_for(s, run),
                  tokens=updates_for(s, run) * tokens_per_update, tokens_per_update=tokens_per_update,
                  params=params, vocab=dictionary_size(Path(data)), command=shlex.join(cmd),
                  validate_command=shlex.join(vcmd), last_call_wall_s=wall,
                  triton="kernels: Triton" in text, device=device_name(s, gpu), date=time.strftime("%Y-%m-%d"),
                  runs_sharing_the_device=sharing, position_loss=positions,
                  **parsed)
    done.write_text(json.dumps(record, indent=1))
    (out / f"{name}.json").write_text(done.read_text())
    if not args.keep_checkpoints:        # 1.7 GB each at the full size: the disk holds a few runs' worth only
        for f in save_dir.glob("*.pt"):
            f.unlink()
    fin = record["final"]
    print(f"[{name}] valid {fin.get('valid', {}).get('loss')} test {fin.get('test', {}).get('loss')} bits, "
          f"{record['tokens_per_s'] or 0:,.0f} tokens/s, {wall:.0f} s", flush=True)
    return record


def position_loss(s, data, save_dir, rdir, env):
    """The final checkpoint's valid loss by position in the context (benchmarks/position_loss.py, the first
    valid_batches x 2 batches): whether the model uses its context, and where a gap between the models lies. Taken
    before the checkpoint is deleted; a diagnostic, so its failure is recorded rather than failing the run."""
    path = rdir / "position_loss.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "position_loss.py"), "--path", str(save_dir / "checkpoint_last.pt"),
           "--data", str(data), "--split", "valid", "--batch-size", str(s["batch"]),
           "--max-batches", str(2 * s["valid_batches"]), "--json", str(path)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if res.returncode != 0:
        return {"error": res.stderr[-2000:]}
    model = next(iter(json.loads(path.read_text())["models"].values()))
    return {k: model[k] for k in ("edges", "buckets", "overall", "samples", "tokens")}


def stop_leftover(pid_file: Path, save_dir: Path):
    """A training of this run still alive from an earlier start (its parent killed without it) would write the same
    checkpoints as the resumed one: stop it first, by the pid recorded, if its command line is this run's."""
    try:
        pid = int(pid_file.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError):
        return
    if "fairseq-train" in cmdline and str(save_dir) in cmdline:
        print(f"stopping a leftover fairseq-train of this run (pid {pid})", flush=True)
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]:
                break
            time.sleep(0.1)


def host_exe(name):
    """fairseq's console script beside this Python (its venv), else from PATH (the GPU machine's /tmp/site/bin)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


def copy_log(src: Path, dst: Path):
    dst.write_text(src.read_text())


def device_name(s, gpu):
    if s["cpu"]:
        return "cpu"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", str(gpu or 0)],
                             capture_output=True, text=True)
        return out.stdout.strip() or "cuda"
    except OSError:
        return "cuda"


def select(runs, only):
    if not only:
        return list(runs)
    names = []
    for part in only.split(","):
        part = part.strip()
        if part == "main":
            names += [n for n, r in runs.items() if r["budget"] == "main"]
        elif part == "ablations":
            names += [n for n, r in runs.items() if r["budget"] == "ablation"]
        elif part in runs:
            names.append(part)
        else:
            sys.exit(f"unknown run {part!r}; known: main, ablations, {', '.join(runs)}")
    return list(dict.fromkeys(names))


def estimate_s(s, run, measured):
    tps = measured.get(run["model"]) or s["assume_tokens_per_s"]
    return updates_for(s, run) * s["batch"] * s["seq"] / tps + s["overhead_s"]


def measured_rates(*dirs: Path):
    """tokens/s per model from finished runs (out/NAME.json or work/runs/NAME/result.json), for the estimates."""
    rates = {}
    for f in sorted(p for d in dirs for p in [*run_records(d), *d.glob("runs/*/result.json")]):
        r = json.loads(f.read_text())
        if r.get("tokens_per_s"):
            rates.setdefault(r["model"], r["tokens_per_s"])
    return rates


def list_runs(runs, s, out, work):
    measured = measured_rates(out, work)
    total = 0
    for name, run in runs.items():
        est = estimate_s(s, run, measured)
        total += est
        state = "done" if (out / f"{name}.json").exists() else "todo"
        print(f"{name:26s} {run['budget']:8s} lr {run['lr']:.1e} {updates_for(s, run):5d} updates "
              f"{updates_for(s, run) * s['batch'] * s['seq'] / 1e6:6.1f}M tokens ~{est / 60:4.1f} min  {state}  "
              + " ".join(model_flags(s, run)[2:]).replace("--decoder-", "").replace("--", ""))
    src = "measured " + ", ".join(f"{k} {v:,.0f}" for k, v in measured.items()) if measured else \
        f"assumed {s['assume_tokens_per_s']:,}"
    print(f"total ~{total / 60:.0f} min on one device (tokens/s {src}; +{s['overhead_s']} s per run for start-up "
          f"and validation)")


def run_selected(names, runs, s, args, data, work, out, deadline):
    measured = measured_rates(out, work)
    counts = {n: parameter_counts(s, dictionary_size(Path(data)), runs[n]) for n in names}   # here, not in threads
    queue, lock, results = list(names), threading.Lock(), {}

    def worker(gpu):
        while True:
            with lock:
                if not queue:
                    return
                name = queue.pop(0)
            run = runs[name]
            done_before = finished(name, work, args) and not args.force     # no training: copied to --out
            if deadline is not None and not done_before:
                if time.time() > deadline - 30:
                    print(f"[{name}] not started: less than 30 s left (--time-limit)", flush=True)
                    continue
                if not args.start_anyway and time.time() + estimate_s(s, run, measured) > deadline \
                        and not (work / "runs" / name / "ckpt" / "checkpoint_last.pt").exists():
                    print(f"[{name}] not started: its estimate exceeds the time left (--time-limit)", flush=True)
                    continue
            results[name] = run_one(name, run, s, args, data, work, out, counts[name], gpu, deadline,
                                    sharing=gpus.count(gpu))

    # a GPU id given n times runs n trainings on it at once (their tokens/s are then shares of one device)
    gpus = [g for g in args.gpus.split(",") if g] if args.gpus else [None]
    threads = [threading.Thread(target=worker, args=(g,)) for g in gpus]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# ---------------------------------------------------------------------------------------------------------
# Reports

def load_results(out: Path):
    """{name: record} in table order: the main runs (TransNormerLLM first, by learning rate), then the ablations as
    ABLATIONS lists them."""
    results = [json.loads(f.read_text()) for f in run_records(out)]
    ablations = [a[0] for a in ABLATIONS]

    def order(r):
        if r["budget"] == "main":
            return (0, r["model"] != "tnl", r["lr"], r["name"])
        return (1, ablations.index(r["name"]) if r["name"] in ablations else len(ablations), 0, r["name"])
    return {r["name"]: r for r in sorted(results, key=order)}


def best_of(results, model):
    main = [r for r in results.values() if r["model"] == model and r["budget"] == "main" and r["final"].get("valid")]
    return min(main, key=lambda r: r["final"]["valid"]["loss"]) if main else None


def si(x):
    """12_345_678 -> '12.3M', 3072 -> '3.1k', 12 -> '12'."""
    for div, unit in ((1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def shared_note(r):
    n = r.get("runs_sharing_the_device", 1)
    return f" ({n} runs on the GPU)" if n > 1 else ""


def table(results):
    lines = ["| run | setting | params (non-emb.) | lr | tokens | valid loss | valid ppl | test loss | test ppl | "
             "tokens/s | paper (385M, 100K upd.) loss / ppl | ours minus reference | paper minus reference |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    refs = {"main": best_of(results, "tnl"), **{g: results.get("abl_base") for g in BASE_ROWS}}
    paper_refs = {"main": "table1_transnormer", **BASE_ROWS}
    for name, r in results.items():
        fin = r["final"]
        v, t = fin.get("valid", {}), fin.get("test", {})
        setting = ("TransNormerLLM" if r["model"] == "tnl" else "LLaMA baseline") + \
            (" " + " ".join(r["flags"]) if r["flags"] else "")
        if r["budget"] == "main" and r is best_of(results, r["model"]):
            setting += " (best lr)"
        paper = PAPER.get(r.get("paper") or "")
        ref = refs.get(r["group"])
        d_ours = f"{v['loss'] - ref['final']['valid']['loss']:+.3f}" if ref and v and ref is not r else ""
        p_ref = PAPER.get(paper_refs.get(r["group"], ""))
        d_paper = f"{paper[2] - p_ref[2]:+.3f}" if paper and p_ref and paper is not p_ref else ""
        lines.append(
            f"| {name} | {setting} | {si(r['params']['total'])} ({si(r['params']['non_embedding'])}) | "
            f"{r['lr']:.1e} | {si(r['tokens'])} | {v.get('loss', float('nan')):.3f} | "
            f"{v.get('ppl', float('nan')):.2f} | {t.get('loss', float('nan')):.3f} | "
            f"{t.get('ppl', float('nan')):.2f} | "
            f"{si(r['tokens_per_s'] or 0)}{shared_note(r)} | "
            + (f"{paper[0]} {paper[1]}: {paper[2]:.3f} / {paper[3]:.3f}" if paper else "")
            + f" | {d_ours} | {d_paper} |")
    lines += ["", "Losses in bits per token (fairseq's base 2; the paper's tables likewise, PPL = 2^loss averaged "
              "over its last 1k updates). 'minus reference': main runs against TransNormerLLM's best main run (paper: "
              "Table 1 TransNormerLLM); ablations against abl_base (paper: the table's own first row). Ours: the "
              "last checkpoint on the whole valid and test splits."]
    return "\n".join(lines)


def host_overhead(results, out: Path):
    """Lines setting each main run's fairseq-train tokens/s beside the plugin's own step at the same shape
    (step_benchmark.json, when measured). Per run, not a median: runs made on other days may have run other code."""
    path = out / STEP_BENCHMARK
    if not path.exists():
        return []
    bench = json.loads(path.read_text())
    lines = ["", f"Host path against the model's own training step (`--step-benchmark`, {bench['device']}, "
                 f"{bench['date']}; {bench['settings']['tokens']} tokens per step at sequence {bench['seq']}):", ""]
    for model, label in (("tnl", "TransNormerLLM"), ("llama", "LLaMA baseline")):
        if model not in bench:
            continue
        own = bench[model]["tokens_per_s"]
        lines.append(f"- {label}: own step {own:,.0f} tokens/s, peak {bench[model]['peak_gb']:.1f} GB")
        for r in results.values():
            if r["model"] == model and r["budget"] == "main" and r.get("tokens_per_s") \
                    and r.get("runs_sharing_the_device", 1) == 1:
                lines.append(f"  - {r['name']} ({r.get('date', '?')}): fairseq-train {r['tokens_per_s']:,.0f} "
                             f"tokens/s = {r['tokens_per_s'] / own:.3f} x own")
    return lines


def position_table(results):
    """Lines of a table: each main run's valid loss (bits) by position in the context, where measured."""
    runs = [r for r in results.values() if r["budget"] == "main" and "buckets" in (r.get("position_loss") or {})]
    if not runs:
        return []
    first = runs[0]["position_loss"]
    lines = ["", f"Valid loss by position in the context (`benchmarks/position_loss.py` on each run's last checkpoint, "
                 f"first {first['samples']} valid samples, {first['tokens']:,} tokens):", "",
             "| positions | " + " | ".join(r["name"] for r in runs) + " |", "|---|" + "---|" * len(runs)]
    for i, (lo, hi, _, _) in enumerate(first["buckets"]):
        lines.append(f"| {lo}-{hi - 1} | " + " | ".join(f"{r['position_loss']['buckets'][i][3]:.3f}" for r in runs)
                     + " |")
    lines.append("| all | " + " | ".join(f"{r['position_loss']['overall']:.3f}" for r in runs) + " |")
    return lines


def plot(results, plot_dir: Path):
    try:
        import matplotlib
    except ImportError:
        sys.exit("--plot needs matplotlib (the GPU machine's image has it; pip install matplotlib elsewhere)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = {"main": [n for n, r in results.items() if r["budget"] == "main"]}
    for g in BASE_ROWS:
        groups[g] = ["abl_base"] + [n for n, r in results.items() if r["group"] == g]
    written = []
    for g, names in groups.items():
        names = [n for n in names if n in results and results[n]["curve"]]
        if not names or (g != "main" and len(names) < 2):     # an ablation group is read against abl_base
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for n in names:
            xs, ys = zip(*results[n]["curve"])
            ax.plot([x / 1e6 for x in xs], ys, label=n, lw=2 if results[n]["model"] == "tnl" else 1.2,
                    ls="-" if results[n]["model"] == "tnl" else "--")
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel("valid loss (bits per token, first valid batches)")
        ax.set_title("TransNormerLLM vs LLaMA baseline" if g == "main" else f"ablation: {g}")
        lo = min(min(y for _, y in results[n]["curve"]) for n in names)
        ax.set_ylim(lo - 0.1, lo + 3.5)      # high enough to show the early part, where the order can differ
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = plot_dir / f"quality_{g}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    print("plots: " + ", ".join(str(p) for p in written))
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, on a slice of the corpus")
    ap.add_argument("--list", action="store_true", help="list the runs and estimates, run nothing")
    ap.add_argument("--only", help="comma list of runs, or 'main' / 'ablations' (default: all)")
    ap.add_argument("--table", action="store_true", help="print the markdown table of --out's results")
    ap.add_argument("--plot", action="store_true", help="PNGs of valid loss against tokens into --plot-dir")
    ap.add_argument("--data", help="a fairseq data-bin (default: the pack, unpacked into --work)")
    ap.add_argument("--pack", default=str(DEFAULT_PACK), help="scripts/prepare_corpus.py's pack")
    ap.add_argument("--work", help="checkpoints, logs, unpacked data (default work_dirs/quality[_smoke])")
    ap.add_argument("--out", help="results (default benchmarks/logs/quality; --smoke: WORK/results)")
    ap.add_argument("--plot-dir", default=str(REPO / "benchmarks"))
    ap.add_argument("--done-dir", help="results of finished runs to skip and copy to --out (default "
                                       "benchmarks/logs/quality; none with --smoke)")
    ap.add_argument("--gpus", help="comma list of GPU ids: one run on each at a time (default: one run at a time)")
    ap.add_argument("--time-limit", type=float, help="minutes: stop (resumably) before this; start no run whose "
                                                     "estimate does not fit")
    ap.add_argument("--start-anyway", action="store_true",
                    help="with --time-limit: start runs whose estimate does not fit too (they stop resumably at the "
                         "limit; for calls that follow each other on one machine, which keeps --work)")
    ap.add_argument("--lrs", help="comma list of main learning rates (default %s)" % ",".join(map(str, FULL["lrs"])))
    ap.add_argument("--main-tokens", type=int)
    ap.add_argument("--ablation-tokens", type=int)
    ap.add_argument("--ablation-lr", type=float)
    ap.add_argument("--ablation-valid-every", type=int, help="updates between the ablations' validations")
    ap.add_argument("--force", action="store_true", help="redo finished runs from scratch")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one of the settings (FULL / SMOKE: d, layers, heads, glu, seq, batch, "
                         "valid_every, valid_batches, save_every, log_interval, ...), e.g. --smoke --set seq=256")
    ap.add_argument("--smoke-slice", help="--smoke: tokens of each split, e.g. train=3000000,valid=200000 "
                                          "(the others as default: %s)" % SMOKE_SLICE)
    ap.add_argument("--keep-checkpoints", action="store_true",
                    help="keep the run's checkpoints after validation (for benchmarks/position_loss.py)")
    ap.add_argument("--step-benchmark", action="store_true",
                    help="time both models' training step outside the host at the runs' shape (first)")
    args = ap.parse_args(argv)
    args.smoke_slice = smoke_slice_sizes(args.smoke_slice)     # refused here, before anything is unpacked or run
    deadline = time.time() + args.time_limit * 60 if args.time_limit else None    # from the start: unpacking counts
    s = dict(SMOKE if args.smoke else FULL)
    if args.lrs:
        s["lrs"] = tuple(float(x) for x in args.lrs.split(","))
    for key in ("main_tokens", "ablation_tokens", "ablation_lr", "ablation_valid_every"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in s or isinstance(s[key], (tuple, bool)):
            sys.exit(f"--set {item}: not a numeric setting; known: {', '.join(s)}")
        try:
            number = float(value)       # also 3e6 for an integer setting
        except ValueError:
            sys.exit(f"--set {item}: {value!r} is not a number")
        if isinstance(s[key], int) and not number.is_integer():
            sys.exit(f"--set {item}: {key} takes an integer")
        s[key] = int(number) if isinstance(s[key], int) else number
    suffix = "_smoke" if args.smoke else ""
    work = Path(args.work or REPO / "work_dirs" / f"quality{suffix}").resolve()
    # the smoke's results are no evidence: they stay in the ignored work dir
    out = Path(args.out or (work / "results" if args.smoke else DEFAULT_OUT)).resolve()
    if args.done_dir is None and not args.smoke:
        args.done_dir = str(DEFAULT_OUT)
    runs = runs_for(s)
    if args.list:
        list_runs(runs, s, out, work)
        return
    if args.table or args.plot:
        results = load_results(out)
        if args.table:
            print("\n".join([table(results), *host_overhead(results, out), *position_table(results)]))
        if args.plot:
            plot(results, Path(args.plot_dir))
        return
    if not s["cpu"]:
        import torch
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --smoke on CPU")
    names = select(runs, args.only)
    data = prepare_data(args, s, work)
    check_same_size(s, dictionary_size(data))
    if args.step_benchmark:
        step_benchmark(s, dictionary_size(data), out)
    results = run_selected(names, runs, s, args, data, work, out, deadline)
    missing = [n for n in names if not results.get(n)]
    print(f"finished {len(names) - len(missing)} of {len(names)} runs; results in {out}"
          + (f"; not finished: {', '.join(missing)}" if missing else ""))
    sys.exit(1 if missing else 0)


if __name__ == "__main__":
    main()
