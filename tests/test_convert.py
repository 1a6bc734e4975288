"""Checkpoint conversion (released Hugging Face layout <-> fairseq-format plugin checkpoint) and the standalone
loader: bit-exact round trips, logits of the released fixture, fairseq's own loader, and the errors that name
what is wrong."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tnllm_plugin import convert
from tnllm_plugin.checkpoint import config_from_released, config_to_released, load_checked, state_dict_from_released
from tnllm_plugin.model import TransNormerConfig, TransNormerLLM

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "fixtures" / "released_tiny"


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def expected():
    return torch.load(FIXTURE / "expected.pt")


def fixture_model():
    """The plugin model loaded directly from the fixture (as tests/test_model.py does)."""
    model = TransNormerLLM(config_from_released(json.loads((FIXTURE / "config.json").read_text()))).eval()
    load_checked(model, state_dict_from_released(torch.load(FIXTURE / "pytorch_model.bin")))
    return model


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("plugin")
    convert.released_to_plugin(FIXTURE, out, overwrite=True)
    return out


# --- load_model -----------------------------------------------------------------------------------------------

@torch.no_grad()
@pytest.mark.parametrize("which", ["released_dir", "plugin_dir", "plugin_file"])
def test_load_model_gives_the_fixture_logits(which, plugin_dir, expected):
    path = {"released_dir": FIXTURE, "plugin_dir": plugin_dir, "plugin_file": plugin_dir / "checkpoint.pt"}[which]
    model, info = convert.load_model(path)
    logits, _ = model(expected["tokens"])
    assert rel(logits, expected["logits"]) < 1e-5
    direct, _ = fixture_model()(expected["tokens"])
    assert torch.equal(logits, direct)          # same weights, same computation: identical numbers
    assert (info.vocab_size, info.pad_id, info.bos_id, info.eos_id) == (300, 0, 1, 2)
    assert info.config.lrpe_layers == (0,) and info.config.decay == "released"
    assert not model.training and info.dtype == torch.float32
    if which != "released_dir":
        assert info.format == "plugin" and Path(info.dict_path) == (plugin_dir / "dict.txt").resolve()


def test_load_model_dtype_and_no_copies(plugin_dir):
    model, info = convert.load_model(plugin_dir, dtype=torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16 and info.dtype == torch.bfloat16
    assert all(layer.token_mixer.slope.dtype == torch.float32 for layer in model.layers)   # decay stays fp32
    assert all(p.requires_grad for p in model.parameters())


def test_load_model_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        convert.load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no checkpoint.pt"):
        convert.load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(json.loads((FIXTURE / "config.json").read_text())))
    with pytest.raises(FileNotFoundError, match="no weights found"):
        convert.load_model(tmp_path)


@torch.no_grad()
def test_load_model_without_fairseq(plugin_dir, tmp_path, expected):
    """In a process where fairseq and omegaconf cannot be imported: a converted checkpoint, one whose cfg is an
    omegaconf DictConfig (weights_only with stand-ins), and the released directory all load."""
    omegaconf = pytest.importorskip("omegaconf")
    state = torch.load(plugin_dir / "checkpoint.pt", weights_only=False)
    model_args = {k: v for k, v in vars(state["cfg"]["model"]).items()}
    state["cfg"] = omegaconf.OmegaConf.create({"task": {"_name": "language_modeling", "data": str(tmp_path)},
                                               "model": model_args})
    del state["tnllm"]
    torch.save(state, tmp_path / "dictconfig.pt")
    script = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("fairseq", "omegaconf"):
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
import torch
from tnllm_plugin.convert import load_model
exp = torch.load({str(FIXTURE / 'expected.pt')!r})
for p in sys.argv[1:]:
    model, info = load_model(p)
    err = ((model(exp["tokens"])[0] - exp["logits"]).norm() / exp["logits"].norm()).item()
    print(info.format, info.pad_id, info.bos_id, err)
assert "fairseq" not in sys.modules and "omegaconf" not in sys.modules
"""
    out = subprocess.run([sys.executable, "-c", script, str(plugin_dir), str(tmp_path / "dictconfig.pt"), str(FIXTURE)],
                         capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.strip().splitlines()]
    # the DictConfig checkpoint has no tnllm entry and no dict beside it: fairseq's own ids (pad 1, bos 0)
    assert [r[:3] for r in rows] == [["plugin", "0", "1"], ["plugin", "1", "0"], ["released", "0", "1"]]
    assert all(float(r[3]) < 1e-5 for r in rows)
