"""scripts/prepare_corpus.py on a small made-up kernel tree (no network, no apt-get): the whole pipeline from a
fake linux-source .deb and from a directory, split, tokenizer, fairseq data-bin, Metaseq jsonl, pack, unpack."""
import importlib.util
import io
import json
import os
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("prepare_corpus", REPO / "scripts" / "prepare_corpus.py")
corpus = importlib.util.module_from_spec(spec)
spec.loader.exec_module(corpus)

WORDS = ("buffer device driver queue lock page irq clock reset power table entry state flags count index "
         "timer event list node mutex spin alloc free init exit probe remove read write map unmap dma port "
         "register value mask shift offset length size error status config enable disable").split()
VOCAB = 500      # the 256 byte pieces, the characters, and a few hundred merges


def c_file(rng, n_funcs):
    """A C file made of random but C-shaped functions (tab indented, comments, numbers)."""
    out = ["// SPDX-License-Identifier: GPL-2.0", "#include <linux/kernel.h>", ""]
    for _ in range(n_funcs):
        name = "_".join(rng.sample(WORDS, 3))
        out += [f"/* {' '.join(rng.sample(WORDS, 6))}. */", f"static int {name}(struct {rng.choice(WORDS)} *p)",
                "{", f"\tint {rng.choice(WORDS)} = {rng.randrange(4096)};", "",
                f"\tif (p->{rng.choice(WORDS)} & 0x{rng.randrange(1 << 16):04x})",
                f"\t\treturn -{rng.choice(['EINVAL', 'ENOMEM', 'EBUSY'])};", "\treturn 0;", "}", ""]
    return "\n".join(out) + "\n"


def doc_file(rng):
    title = " ".join(rng.sample(WORDS, 3)).capitalize()
    body = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(8)]
    return f"{title}\n{'=' * len(title)}\n\n" + "\n".join(body) + "\n"


def make_tree(root: Path):
    """A small tree like linux-source-6.1/: what counts, and one file of each kind that must be skipped.
    Returns the paths that must be kept."""
    rng = random.Random(0)
    kept = {}
    for i in range(60):
        kept[f"drivers/{rng.choice(WORDS)}/{rng.choice(WORDS)}_{i}.{'c' if i % 3 else 'h'}"] = c_file(rng, 20)
    for i in range(10):
        kept[f"Documentation/{rng.choice(WORDS)}/{rng.choice(WORDS)}_{i}.{'rst' if i % 2 else 'txt'}"] = \
            doc_file(rng)
    # \r\n read as \n; a form feed (kernel files have them) is no line break
    kept["drivers/crlf/windows.c"] = "int a;\r\n\x0c\r\nint  b;\t/* x */\r\n"
    skipped = {
        "scripts/checkpatch.pl": "print 1;\n",                              # not C, not under Documentation/
        "Makefile": "obj-y += a.o\n",
        "README.txt": "a .txt outside Documentation/\n",
        "drivers/big/table.h": "#define X 1\n" * 2000,                     # over --max-file-bytes (8 KiB here)
        "drivers/bin/firmware.c": "\0\1\2binary",                          # NUL bytes
        "drivers/latin1/old.c": "caf\xe9",                                 # written as latin-1: not UTF-8
        "drivers/zz_copy/dup.c": kept["drivers/crlf/windows.c"],          # a duplicate (larger path: dropped)
    }
    for rel, text in {**kept, **skipped}.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text.encode("latin-1" if "latin1" in rel else "utf-8"))
    return {rel: text.replace("\r\n", "\n") for rel, text in kept.items()}


def ar_archive(members):
    """A .deb's container (ar), written here independently of the script's reader."""
    out = io.BytesIO()
    out.write(b"!<arch>\n")
    for name, data in members:
        out.write(f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode())
        out.write(data + (b"\n" if len(data) % 2 else b""))
    return out.getvalue()


def tar_bytes(files, mode):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The tree as a directory, and as a .deb laid out like Debian's (data.tar.xz holding
    ./usr/src/linux-source-6.1.tar.xz, whose files sit under linux-source-6.1/)."""
    base = tmp_path_factory.mktemp("src")
    tree = base / "linux-source-6.1"
    kept = make_tree(tree)
    inner = tar_bytes([(f"linux-source-6.1/{p.relative_to(tree).as_posix()}", p.read_bytes())
                       for p in sorted(tree.rglob("*")) if p.is_file()], "w:xz")
    data = tar_bytes([("./usr/share/doc/linux-source-6.1/copyright", b"GPL\n"),
                      ("./usr/src/linux-source-6.1.tar.xz", inner)], "w:xz")
    deb = base / "linux-source-6.1_6.1.0-1_all.deb"
    deb.write_bytes(ar_archive([("debian-binary", b"2.0\n"), ("control.tar.xz", tar_bytes([], "w:xz")),
                                ("data.tar.xz", data)]))
    return {"dir": tree, "deb": deb, "kept": kept}


def build(out, *extra):
    return corpus.main(["build", "--out", str(out), "--vocab-size", str(VOCAB), "--max-file-bytes", "8192",
                        "--valid-pct", "10", "--test-pct", "10", "--workers", "2", *map(str, extra)])


@pytest.fixture(scope="module")
def built(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("deb_build")
    return out, build(out, "--deb", source["deb"])


def read_dataset(data_bin: Path, split):
    """Every sequence of a split as fairseq's language-modeling task loads it."""
    from fairseq.data import data_utils
    ds = data_utils.load_indexed_dataset(str(data_bin / split), None)
    return [ds[i].tolist() for i in range(len(ds))]


def expected_ids(sp, texts):
    """Each line of each file, encoded, then </s> (2): what fairseq-preprocess would make of the files."""
    return [sp.encode(line) + [2] for text in texts for line in text.split("\n")[:-1]]


def test_selection_and_split_by_file(built, source):
    out, manifest = built
    kept = source["kept"]
    # every kept file in exactly one split; the skipped ones (not wanted, too big, binary, not UTF-8, duplicate)
    # in none; the .deb's files outside its source tarball not seen at all
    files = manifest["files"]
    assert sorted(p for s in corpus.SPLITS for p in files[s]) == sorted(kept)
    assert manifest["selection"] == {"files_in_source": len(kept) + 7, "not_wanted": 3, "too_big": 1,
                                     "binary_or_not_utf8": 2, "duplicates": 1}
    # the split is a function of the path only, and all three are used
    for s in corpus.SPLITS:
        assert files[s] and all(corpus.split_of(p, 10, 10) == s for p in files[s])


def test_split_is_pinned():
    """Real kernel paths at the default 98/1/1: the same in every process and on every machine (a split that
    moved would mix earlier valid/test files into train). Changing these means every published split changes."""
    pinned = {"drivers/comedi/drivers/ni_daq_dio24.c": "valid", "drivers/gpu/drm/qxl/qxl_kms.c": "valid",
              "arch/um/include/asm/dma.h": "test", "drivers/usb/gadget/udc/goku_udc.c": "test",
              "kernel/sched/core.c": "train", "include/linux/list.h": "train", "drivers/scsi/aha152x.h": "train"}
    assert {p: corpus.split_of(p, 1.0, 1.0) for p in pinned} == pinned


def test_binarized_ids_are_the_files_lines(built, source):
    import sentencepiece as spm
    from fairseq.data import Dictionary
    out, manifest = built
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    assert sp.get_piece_size() == VOCAB and sp.id_to_piece(2) == "</s>" and sp.encode("\tx")[0] != sp.unk_id()
    for s in corpus.SPLITS:
        got = read_dataset(out / "data-bin", s)
        texts = [source["kept"][p] for p in manifest["files"][s]]
        assert got == expected_ids(sp, texts)
        assert manifest["splits"][s]["tokens"] == sum(map(len, got))
        assert manifest["splits"][s]["lines"] == len(got)
        # decoding gives the text back (tabs and runs of spaces kept: identity normalisation)
        assert "\n".join(sp.decode(ids[:-1]) for ids in got) + "\n" == "".join(texts)
        # Metaseq's layout: one document per file, the same files in the same order
        docs = [json.loads(ln) for ln in (out / "metaseq" / s / "00" / "linux.jsonl").open()]
        assert [d["text"] for d in docs] == texts
    # fairseq's Dictionary reads dict.txt as the sentencepiece ids, with the train counts
    d = Dictionary.load(str(out / "data-bin" / "dict.txt"))
    assert [d[i] for i in range(4, len(d))] == [sp.id_to_piece(i) for i in range(4, VOCAB)]
    train = np.concatenate([np.array(x) for x in read_dataset(out / "data-bin", "train")])
    assert [d.count[i] for i in range(4, len(d))] == np.bincount(train, minlength=VOCAB)[4:].tolist()


def test_deterministic_and_caps(built, source, tmp_path):
    out, manifest = built
    # the directory gives the same corpus as the .deb, byte for byte
    again = build(tmp_path / "dir", "--source", source["dir"])
    assert again["files"] == manifest["files"]
    for name in ("train.bin", "train.idx", "valid.bin", "test.idx", "dict.txt"):
        assert (tmp_path / "dir" / "data-bin" / name).read_bytes() == (out / "data-bin" / name).read_bytes()
    # caps cut the fixed file order; a file never changes split
    capped = build(tmp_path / "capped", "--source", source["dir"], "--max-train-tokens", 2000, "--max-files", 40)
    train = capped["files"]["train"]
    assert train == manifest["files"]["train"][:len(train)]
    assert 2000 <= capped["splits"]["train"]["tokens"] < manifest["splits"]["train"]["tokens"]
    # it stops after the file that crosses the cap
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "capped" / "spm.model"))
    per_file = [sum(map(len, expected_ids(sp, [source["kept"][p]]))) for p in train]
    assert sum(per_file[:-1]) < 2000 <= sum(per_file) == capped["splits"]["train"]["tokens"]
    for s in ("valid", "test"):
        assert set(capped["files"][s]) <= set(manifest["files"][s])
    assert sum(len(capped["files"][s]) for s in corpus.SPLITS) <= 40
    # --max-files alone: exactly that many, the first of the fixed order over all splits
    few = build(tmp_path / "few", "--source", source["dir"], "--max-files", 20)
    first = sorted(source["kept"], key=corpus.order_key)[:20]
    assert sorted(p for s in corpus.SPLITS for p in few["files"][s]) == sorted(first)
    # and a sample of the whole tree: mostly train files, as the splits are 80/10/10 here (an order that
    # followed the split's hash would take the valid and test files first)
    assert [len(few["files"][s]) for s in corpus.SPLITS] == [16, 1, 3]


def test_pack_unpack(built, tmp_path):
    out, manifest = built
    full = {s: read_dataset(out / "data-bin", s) for s in corpus.SPLITS}
    # room for the whole corpus: unpacked data-bin equals the built one
    info = corpus.main(["pack", str(out), str(tmp_path / "all.tar")])
    assert info["tokens"]["train"] == manifest["splits"]["train"]["tokens"]
    corpus.main(["unpack", str(tmp_path / "all.tar"), str(tmp_path / "all")])
    for s in corpus.SPLITS:
        assert read_dataset(tmp_path / "all" / "data-bin", s) == full[s]
    assert (tmp_path / "all" / "spm.model").read_bytes() == (out / "spm.model").read_bytes()
    # a cap on train tokens that falls inside a line: the whole lines before it
    k = next(i for i in range(100, len(full["train"])) if len(full["train"][i]) > 1)
    cap = sum(map(len, full["train"][:k])) + 1
    info = corpus.main(["pack", str(out), str(tmp_path / "cut.tar"), "--train-tokens", str(cap)])
    corpus.main(["unpack", str(tmp_path / "cut.tar"), str(tmp_path / "cut")])
    cut = read_dataset(tmp_path / "cut" / "data-bin", "train")
    assert cut == full["train"][:k] and info["tokens"]["train"] == cap - 1
    # a size budget smaller than the train stream: it is shrunk until the pack fits
    size_all = (tmp_path / "all.tar").stat().st_size
    budget = (size_all - 12 * 1024) / 2 ** 20
    info = corpus.main(["pack", str(out), str(tmp_path / "small.tar"), "--max-mib", str(budget)])
    assert (tmp_path / "small.tar").stat().st_size <= budget * 2 ** 20
    assert 0 < info["tokens"]["train"] < manifest["splits"]["train"]["tokens"]


def test_fetch_deb_downloads_once(source, tmp_path, monkeypatch):
    """With neither --deb nor --source: `apt-get download linux-source-6.1` in the cache directory (here a
    stand-in apt-get on PATH that copies the made-up .deb and logs its arguments), then the cached file."""
    bin_dir, cache, calls = tmp_path / "bin", tmp_path / "cache", tmp_path / "calls"
    bin_dir.mkdir()
    fake = bin_dir / "apt-get"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\ncp {source['deb']} ./linux-source-6.1_6.1.9-1_all.deb\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    first = corpus.fetch_deb(cache)
    assert first == cache / "linux-source-6.1_6.1.9-1_all.deb" and calls.read_text() == "download linux-source-6.1\n"
    assert corpus.fetch_deb(cache) == first and calls.read_text().count("\n") == 1    # not downloaded again
    newer = cache / "linux-source-6.1_6.1.10-1_all.deb"            # sorts before 6.1.9 as text
    newer.write_bytes(first.read_bytes())
    os.utime(newer, (first.stat().st_mtime + 10,) * 2)
    assert corpus.fetch_deb(cache) == newer
