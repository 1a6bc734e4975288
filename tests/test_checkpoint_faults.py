"""Loaders and converter fed damaged checkpoints (issue 16, item 1): a seeded random mutator truncates, flips bits
in, zeroes and empties files, and changes tensors (dtype, shape, missing, extra, NaN) and configs (values of the wrong
type or size, missing and unknown keys) of every layout: released bin / safetensors, single file or sharded with an
index, and the plugin (fairseq-format) checkpoint, read by load_model, by both conversions and (plugin checkpoints)
by fairseq's own loader. Every outcome must be a correct load or a ValueError / FileNotFoundError that names the file
and the cause, and a failed conversion must leave no output behind.

TNLLM_FUZZ_CASES (default 240) and TNLLM_FUZZ_SECONDS (default 40) bound the run; a failure names its case seed."""
import errno
import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch

from tnllm_plugin import convert, file_checks, plugin_checkpoint, released_format
from tnllm_plugin.model import TransNormerConfig, TransNormerLLM

try:    # with the adapter imported, as under --user-dir: its checks and error naming are installed
    from fairseq import checkpoint_utils as FAIRSEQ
    import tnllm_plugin.fairseq_adapter  # noqa: F401
except ImportError:
    FAIRSEQ = None

CASES = int(os.environ.get("TNLLM_FUZZ_CASES", 240))
SECONDS = float(os.environ.get("TNLLM_FUZZ_SECONDS", 40))
LAYOUTS = {"bin": (False, None), "safetensors": (True, None), "bin-sharded": (False, "4KB"),
           "safetensors-sharded": (True, "4KB")}
BAD_VALUES = [0, -1, 10 ** 12, 7, "x", None, 1.5, [1], True, {}]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A small random model in every layout: {name: directory}."""
    root = tmp_path_factory.mktemp("sources")
    cfg = TransNormerConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, glu_dim=24)
    torch.manual_seed(0)
    state = plugin_checkpoint.plugin_checkpoint_state(cfg, TransNormerLLM(cfg).state_dict(), str(root / "plugin"))
    (root / "plugin").mkdir()
    torch.save(state, root / "plugin" / "checkpoint.pt")
    plugin_checkpoint.write_fairseq_dict(root / "plugin" / "dict.txt", cfg.vocab_size)
    out = {"plugin": root / "plugin"}
    for name, (safetensors, shard) in LAYOUTS.items():
        convert.plugin_to_released(root / "plugin", root / name, safetensors=safetensors, max_shard_size=shard)
        out[name] = root / name
    assert len(list((root / "bin-sharded").glob("pytorch_model-*.bin"))) > 2
    return out


# --- the mutator ----------------------------------------------------------------------------------------------

def mutate_bytes(rng, path: Path) -> str:
    data = bytearray(path.read_bytes())
    kind = rng.choice(["truncate", "flip", "zero", "empty", "append"])
    if kind == "truncate":
        data = data[:rng.randrange(len(data))]
    elif kind == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == "zero":
        i, n = rng.randrange(len(data)), rng.randint(1, 256)
        data[i:i + n] = bytes(len(data[i:i + n]))
    elif kind == "empty":
        data = bytearray()
    else:
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    path.write_bytes(bytes(data))
    return f"{kind} {path.name}"


def read_tensors(path: Path):
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    return torch.load(path, weights_only=False)


def write_tensors(path: Path, obj):
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)


def mutate_tensor(rng, directory: Path) -> tuple:
    """Change one tensor in the file that holds it -> (description, file name, tensor name)."""
    files = sorted(p for p in directory.iterdir() if p.suffix in (".bin", ".safetensors", ".pt"))
    path = rng.choice(files)
    obj = read_tensors(path)
    sd = obj["model"] if path.suffix == ".pt" else obj
    name = rng.choice(sorted(sd))
    kind = rng.choice(["int64", "float16", "bool", "shape", "transpose", "missing", "extra", "nan", "inf"])
    t = sd[name]
    if kind in ("int64", "float16", "bool"):
        sd[name] = t.to(getattr(torch, kind))
    elif kind == "shape":
        sd[name] = torch.zeros(*[n + 1 for n in t.shape])
    elif kind == "transpose":
        sd[name] = t.reshape(-1, 1) if t.dim() == 1 else t.transpose(0, -1).contiguous()
    elif kind == "missing":
        del sd[name]
    elif kind == "extra":
        name = name.rsplit(".", 1)[0] + ".extra_weight"
        sd[name] = torch.zeros(3)
    else:
        sd[name] = t.clone()
        sd[name].view(-1)[rng.randrange(t.numel())] = float(kind)
    write_tensors(path, obj)
    return f"{kind} {name} in {path.name}", path.name, name


def mutate_config(rng, directory: Path) -> tuple:
    """Change config.json (released) or the model arguments of checkpoint.pt (plugin)."""
    if (directory / "checkpoint.pt").is_file():
        state = torch.load(directory / "checkpoint.pt", weights_only=False)
        args = state["cfg"]["model"]
        args = vars(args) if not isinstance(args, dict) else args       # a Namespace for add_args models
        keys = ["decoder_embed_dim", "decoder_layers", "decoder_attention_heads", "hidden_dim", "glu_dim",
                "lrpe_layers", "decay_schedule", "qk_act", "norm_type", "arch", "init_std"]
        key = rng.choice(keys)
        change = rng.choice(["value", "delete"])
        if change == "delete":
            args.pop(key, None)
        else:
            args[key] = rng.choice(BAD_VALUES)
        torch.save(state, directory / "checkpoint.pt")
        return f"{change} cfg.model.{key}", "checkpoint.pt", key
    config = file_checks.read_json(directory / "config.json")
    key = rng.choice(sorted(config) + ["num_experts", "rope_theta"])
    change = rng.choice(["value", "delete"]) if key in config else "add"
    if change == "delete":
        del config[key]
    else:
        config[key] = rng.choice(BAD_VALUES)
    (directory / "config.json").write_text(json.dumps(config))
    return f"{change} config.json {key}", "config.json", key


# --- the oracle -----------------------------------------------------------------------------------------------

def check_outcome(action, where: Path, names, case: str):
    """Run ``action``: either it succeeds (and returns what to check) or it raises a ValueError / FileNotFoundError
    whose message names ``where`` and at least one of ``names`` (the file changed, the tensor or key changed)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return True, action()
    except (ValueError, FileNotFoundError) as e:
        msg = str(e)
        assert str(where) in msg, f"{case}: the error does not name {where}: {msg}"
        assert any(n in msg for n in names), f"{case}: the error names none of {names}: {msg}"
        return False, msg
    except Exception as e:      # anything else is a crash without a named cause
        raise AssertionError(f"{case}: {type(e).__name__} escaped: {e}") from e


@torch.no_grad()
def assert_usable(model, case):
    assert all(p.isfinite().all() for p in model.parameters()), case
    logits, _ = model(torch.arange(1, 9)[None] % model.cfg.vocab_size)
    assert logits.isfinite().all(), case


def assert_same_weights(model, original, case):
    for (k, a), b in zip(model.state_dict().items(), original.state_dict().values()):
        assert torch.equal(a, b), f"{case}: {k} loaded with other values than written"


def run_case(seed: int, sources, originals, work: Path):
    rng = random.Random(seed)
    layout = rng.choice(sorted(sources))
    d = work / f"case{seed}"
    shutil.copytree(sources[layout], d)
    how = rng.choice(["bytes", "bytes", "tensor", "config"])
    if how == "bytes":
        target = rng.choice(sorted(p for p in d.iterdir()))
        case = mutate_bytes(rng, target)
        names = [target.name]
    elif how == "tensor":
        case, file, tensor = mutate_tensor(rng, d)
        names = [file, tensor, tensor.replace("decoder.transnormer.", "").replace("model.", "", 1)]
    else:
        case, file, key = mutate_config(rng, d)
        names = [file, key]
    case = f"seed {seed}, {layout}: {case}"
    where = d / "checkpoint.pt" if layout == "plugin" else d

    loaded, model_info = check_outcome(lambda: convert.load_model(d), where, names, case)
    if loaded:
        assert all(p.isfinite().all() for p in model_info[0].parameters()), case
        if how == "bytes" and target.suffix in (".bin", ".pt"):
            # torch's zip files carry a CRC-32 per record: damage that loads at all must have missed every tensor
            # (safetensors and JSON have no checksum: a flipped bit there can load as another valid value)
            assert_same_weights(model_info[0], originals[layout], case)

    if layout == "plugin" and FAIRSEQ is not None:      # fairseq's own loader (eval-lm, generate, the hub)
        check_outcome(lambda: FAIRSEQ.load_model_ensemble_and_task([str(where)], arg_overrides={"data": str(d)}),
                      where, names, case)

    out = work / f"out{seed}"
    if layout == "plugin":
        ok, _ = check_outcome(lambda: convert.plugin_to_released(d, out, safetensors=rng.random() < 0.5,
                                                                 max_shard_size=rng.choice([None, "3KB"])),
                              where, names, case)
    else:
        ok, _ = check_outcome(lambda: convert.released_to_plugin(d, out, use_fairseq=False), where, names, case)
    if ok:      # conversion renames tensors only: the output loads exactly when the source does, to the same model
        converted, again = check_outcome(lambda: convert.load_model(out), out, names, case)
        assert converted == loaded, f"{case}: the source {'loads' if loaded else 'fails'}, its conversion not"
        if loaded:
            for (k, a), b in zip(model_info[0].state_dict().items(), again[0].state_dict().values()):
                assert torch.equal(a, b), f"{case}: {k} changed in conversion"
    else:   # a failed conversion leaves nothing behind
        assert not out.exists() or not any(out.iterdir()), f"{case}: left {sorted(out.iterdir())}"
    shutil.rmtree(d)
    shutil.rmtree(out, ignore_errors=True)
    return how, ok


def test_fuzzed_checkpoints_load_correctly_or_name_file_and_cause(sources, tmp_path):
    originals = {layout: convert.load_model(d)[0] for layout, d in sources.items()}
    start, outcomes = time.monotonic(), []
    for seed in range(CASES):
        if time.monotonic() - start > SECONDS:
            break
        outcomes.append(run_case(seed, sources, originals, tmp_path))
    # the mutator reaches both outcomes for each kind of damage (a run that only ever refused would prove little)
    seen = {(how, ok) for how, ok in outcomes}
    assert len(outcomes) >= 60, f"only {len(outcomes)} cases in {SECONDS} s"
    assert {("bytes", False), ("tensor", False), ("config", False), ("bytes", True)} <= seen, seen


@pytest.mark.parametrize("layout", ["bin", "safetensors-sharded", "plugin"])
def test_truncated_file_is_named(sources, tmp_path, layout):
    """The issue's report: a truncated checkpoint gave 'OSError: [Errno 22] Invalid argument'."""
    d = tmp_path / "ckpt"
    shutil.copytree(sources[layout], d)
    weights = [p for p in d.iterdir() if p.suffix in (".bin", ".safetensors", ".pt")]
    target = max(weights, key=lambda p: p.stat().st_size)
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{target}: cannot be read, the file is truncated, corrupt"):
        convert.load_model(d)


@pytest.mark.parametrize("layout,file", [("bin", "pytorch_model.bin"), ("plugin", "checkpoint.pt")])
def test_flipped_bit_in_a_tensor_fails_the_zip_checksum(sources, tmp_path, layout, file):
    """torch.load reads a flipped mantissa bit as another finite number; the record's CRC-32 catches it."""
    import zipfile
    d = tmp_path / "ckpt"
    shutil.copytree(sources[layout], d)
    with zipfile.ZipFile(d / file) as z:
        record = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 64)
    data = bytearray((d / file).read_bytes())
    # the record's bytes follow its local header (30 bytes, the name, the extra field)
    name_len, extra_len = int.from_bytes(data[record.header_offset + 26:record.header_offset + 28], "little"), \
        int.from_bytes(data[record.header_offset + 28:record.header_offset + 30], "little")
    data[record.header_offset + 30 + name_len + extra_len + 16] ^= 1
    (d / file).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{d / file}: record {record.filename} fails its CRC-32 check"):
        convert.load_model(d)


def test_nan_weight_is_named(sources, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(sources["safetensors"], d)
    sd = read_tensors(d / "model.safetensors")
    sd["model.layers.1.channel_mixer.l2.weight"][3, 4] = float("nan")
    write_tensors(d / "model.safetensors", sd)
    with pytest.raises(ValueError, match=r"model\.safetensors: tensors holding NaN or inf: "
                                         r"\['model\.layers\.1\.channel_mixer\.l2\.weight'\]"):
        convert.load_model(d)


def test_corrupt_config_value_is_named(sources, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(sources["bin"], d)
    text = (d / "config.json").read_text().replace('"decoder_layers": 2', '"decoder_layers": "two"')
    (d / "config.json").write_text(text)
    with pytest.raises(ValueError, match=rf"{d / 'config.json'}: invalid literal for int\(\) with base 10: 'two'"):
        convert.load_model(d)
    config = json.loads(text.replace('"two"', "1000000000000"))
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: linear_use_lrpe_list has 2 entries for 1000000000000 layers"):
        convert.load_model(d)
    del config["linear_use_lrpe_list"]     # sizes are checked before any model (or per-layer list) is made
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config says 1000000000000 layers, the weights hold 2"):
        convert.load_model(d)


@pytest.mark.skipif(FAIRSEQ is None, reason="needs fairseq")
def test_fairseq_loader_checks_the_layer_count_before_building(sources, tmp_path):
    """fairseq-eval-lm / fairseq-generate build the model from the checkpoint's arguments before loading a tensor:
    a corrupt decoder_layers=10**12 was built block by block until memory ran out (the long fuzz run hit it)."""
    d = tmp_path / "ckpt"
    shutil.copytree(sources["plugin"], d)
    state = torch.load(d / "checkpoint.pt", weights_only=False)
    vars(state["cfg"]["model"])["decoder_layers"] = 10 ** 12
    torch.save(state, d / "checkpoint.pt")
    with pytest.raises(ValueError, match=rf"{d / 'checkpoint.pt'}: the model arguments say "
                                         r"decoder_layers=1000000000000, the checkpoint holds 2 layers"):
        FAIRSEQ.load_model_ensemble_and_task([str(d / "checkpoint.pt")], arg_overrides={"data": str(d)})


@pytest.mark.parametrize("direction", ["plugin-to-released", "released-to-plugin"])
def test_failed_conversion_leaves_no_partial_output(sources, tmp_path, monkeypatch, direction):
    """A disk that fills up on the second shard (plugin -> released) or on the checkpoint (released -> plugin): no
    file under a final name, no staging folder, and a previous conversion in the same directory untouched."""
    out = tmp_path / "out"
    if direction == "plugin-to-released":
        convert.plugin_to_released(sources["plugin"], out, max_shard_size="4KB")
        convert_again = lambda: convert.plugin_to_released(sources["plugin"], out, max_shard_size="3KB",  # noqa: E731
                                                           overwrite=True)
        target, patched, original = released_format, "_save_weights", released_format._save_weights
        calls = []

        def failing(path, *args):
            calls.append(path)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return original(path, *args)
    else:
        convert.released_to_plugin(sources["bin"], out, use_fairseq=False)
        convert_again = lambda: convert.released_to_plugin(sources["bin"], out, overwrite=True,  # noqa: E731
                                                           use_fairseq=False)
        target, patched, original = convert, "torch", convert.torch

        class failing:      # convert.torch whose save fails half-way through the file
            def __getattr__(self, name):
                return getattr(torch, name)

            @staticmethod
            def save(obj, path):
                Path(path).write_bytes(b"PK\x03\x04 half a checkpoint")
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        failing = failing()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(target, patched, failing)
    with pytest.raises(OSError, match="No space left on device"):
        convert_again()
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before     # nothing added, removed or changed
    assert_usable(convert.load_model(out)[0], direction)
