"""A real corpus for training runs: the Linux 6.1 kernel source as Debian ships it (package linux-source-6.1,
about 1.3 GB of C and English documentation), written by no one here.

    python scripts/prepare_corpus.py build [--deb PATH | --source TARBALL_OR_DIR] [--out work_dirs/corpus]
                                           [--vocab-size 32000] [--max-files N] [--max-train-tokens N]
                                           [--pack work_dirs/corpus/linux-6.1.pack.tar]
    python scripts/prepare_corpus.py pack  OUT_DIR PACK.tar [--train-tokens 60000000] [--max-mib 26]
    python scripts/prepare_corpus.py unpack PACK.tar DEST          # DEST/data-bin for fairseq (e.g. on the GPU)

build:
  1. source: with neither --deb nor --source, `apt-get download linux-source-6.1` into --cache-dir (skipped when
     a linux-source-6.1_*.deb is already there; needs only the package registry, after `apt-get update`). The
     .deb (an ar archive) holds data.tar.xz, which holds usr/src/linux-source-6.1.tar.xz: both are read as
     streams, member by member, so the 1.3 GB tree is never written out. --source takes that tarball, any
     other source tarball, or an extracted directory.
  2. which files count (select()): C sources and headers (*.c, *.h) anywhere, and the English documentation
     under Documentation/ (*.rst, *.txt); a file counts only if it is at most --max-file-bytes (256 KiB: above
     that are generated tables, e.g. AMD's register headers, 400 MB of #defines in drivers/gpu/drm/amd/include/
     asic_reg), valid UTF-8 and free of NUL bytes (binaries). Files with the same content are kept once (the
     first path in sorted order), so no text is in two splits and train tokens are distinct.
  3. split by file: sha256 of the path inside the tree decides train / valid / test (98 / 1 / 1 by default), so
     the same file lands in the same split on every run and with any caps. Files are taken in the order of
     another hash of the path (a fixed shuffle of the tree); --max-files and --max-train-tokens cut that order,
     so a capped corpus is a sample of the whole tree rather than its first directories.
  4. tokenizer: sentencepiece BPE trained on a seeded random sample of train lines only (--spm-sample-lines)
     with ids that equal fairseq's (<s>=0, <pad>=1, </s>=2, <unk>=3, then the pieces), identity normalisation
     and no whitespace folding (indentation is kept: tabs are pieces), byte fallback (no <unk> for rare bytes).
  5. encode and binarize: every line is a fairseq sequence ending with </s>, as fairseq-preprocess makes them
     (blank lines included, so decoding a stream with </s> as newline gives the files back);
     OUT/data-bin/{train,valid,test}.{bin,idx} in fairseq's mmap format (written with fairseq's own index
     writer) and dict.txt, listing every piece in sentencepiece's order, so a fairseq id is the sentencepiece
     id. Also Metaseq's streaming_language_modeling layout, OUT/metaseq/{train,valid,test}/00/linux.jsonl, one
     {"text": ...} document per file. OUT/manifest.json records the source, options, files, bytes and tokens
     per split.

pack / unpack: the GPU machine has no network and at most 64 MiB travels with the checkout, the device wheels
(.whl/, 37 MB on 2026-11-29) included. The pack holds the spm model, dict.txt, the valid and test streams whole
and the train stream cut at a line end after --train-tokens (shrunk until the pack is under --max-mib), as
xz-compressed token ids; the .idx files are not packed, since each line ends with </s> (id 2, which no text
encodes to): unpack writes them back from the positions of </s>. Measured on the full build: 60M train tokens
compress to 22.1 MiB (0.39 bytes per token; kernel code repeats itself), the pack with valid and test is 25.5 MiB.

Full build here (2 shared cores, nice 15, 2026-11-29): 12 minutes (8 to build, 4 to pack), 2.2 GB peak memory;
60,121 files kept of 78,579, 778 MB of text; train 58,921 files / 307M tokens, valid 601 / 3.2M, test 599 / 3.1M.
On one H200 (carrying the pack and the six fairseq wheels, 48 MB): unpack, then fairseq-train
transnormer_llm_385m, 400 updates of 16k tokens: loss 12.8 -> 5.2 bits, valid loss 5.20 on the held-out files.
"""
import argparse
import hashlib
import io
import json
import lzma
import os
import random
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

SPLITS = ("train", "valid", "test")
C_SUFFIXES = (".c", ".h")
DOC_SUFFIXES = (".rst", ".txt")
EOS = 2                    # fairseq's </s>; sentencepiece is trained with the same id (see train_tokenizer)
SPECIALS = 4               # <s>, <pad>, </s>, <unk>: ids 0-3 in both fairseq and our sentencepiece model
DEB_PACKAGE = "linux-source-6.1"


def log(msg):
    print(f"[corpus {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# source: a .deb, a tarball or a directory, read as (path inside the tree, bytes) pairs

def read_ar_members(f):
    """The members of an ar archive (a .deb is one) as (name, size) with f left at the member's data. Written
    out (the format is a 8-byte magic, then 60-byte headers) so that no dpkg or binutils is needed."""
    if f.read(8) != b"!<arch>\n":
        raise ValueError("not an ar archive (.deb)")
    while True:
        header = f.read(60)
        if len(header) < 60:
            return
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        start = f.tell()
        yield name, size
        f.seek(start + size + (size % 2))        # members are 2-byte aligned


def tar_files(fileobj, deb_data=False):
    """(name, member, tar) for each regular file of a tar stream (any compression), in archive order. In a
    .deb's data.tar (deb_data) only the source tarballs under usr/src/ count: their files are given instead."""
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            if not deb_data:
                yield member.name, member, tar
            elif member.name.lstrip("./").startswith("usr/src/") and ".tar" in Path(member.name).name:
                log(f"reading the source tarball {member.name} ({member.size / 1e6:.0f} MB) inside the .deb")
                yield from tar_files(tar.extractfile(member))


def iter_source(path: Path):
    """(path inside the tree, raw bytes reader) for every regular file of a .deb, tarball or directory. The
    first directory level of a tarball (linux-source-6.1/) is dropped, so paths read like Documentation/...;
    the reader is called only for files whose name and size pass select(), so skipped files cost nothing."""
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file() and not p.is_symlink():
                yield p.relative_to(path).as_posix(), p.stat().st_size, p.read_bytes
        return
    with open(path, "rb") as f:
        if path.suffix == ".deb":
            for name, size in read_ar_members(f):
                if name.startswith("data.tar"):
                    for member_name, member, tar in tar_files(io.BufferedReader(_Slice(f, size)), deb_data=True):
                        yield _tree_path(member_name), member.size, _reader(tar, member)
                    return
            raise ValueError(f"{path}: no data.tar.* member")
        for member_name, member, tar in tar_files(f):
            yield _tree_path(member_name), member.size, _reader(tar, member)


def _reader(tar, member):
    return lambda: tar.extractfile(member).read()


def _tree_path(name):
    while name.startswith("./"):
        name = name[2:]
    parts = name.lstrip("/").split("/", 1)
    return parts[1] if len(parts) == 2 else parts[0]


class _Slice(io.RawIOBase):
    """size bytes of f from its current position, as a stream (one member of the ar archive)."""

    def __init__(self, f, size):
        self.f, self.left = f, size

    def readable(self):
        return True

    def readinto(self, b):
        n = self.f.readinto(memoryview(b)[:min(len(b), self.left)])
        self.left -= n
        return n


def fetch_deb(cache_dir: Path) -> Path:
    """The linux-source-6.1_*.deb in cache_dir, downloaded with apt-get first if none is there (with several,
    the last written: version strings do not sort as text). Its name and sha256 go into the manifest, as
    Debian's security updates replace the package now and then."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    debs = list(cache_dir.glob(f"{DEB_PACKAGE}_*.deb"))
    if not debs:
        log(f"apt-get download {DEB_PACKAGE} into {cache_dir} (run `apt-get update` first if it is not found)")
        subprocess.run(["apt-get", "download", DEB_PACKAGE], cwd=cache_dir, check=True)
        debs = list(cache_dir.glob(f"{DEB_PACKAGE}_*.deb"))
    if not debs:
        sys.exit(f"apt-get download {DEB_PACKAGE} left no {DEB_PACKAGE}_*.deb in {cache_dir}")
    return max(debs, key=lambda p: p.stat().st_mtime)


# ----------------------------------------------------------------------------------------------------------------
# selection and split

def wanted(path: str) -> bool:
    """C sources and headers anywhere, English text documentation under Documentation/."""
    if path.endswith(C_SUFFIXES):
        return True
    return path.startswith("Documentation/") and path.endswith(DOC_SUFFIXES)


def decode_text(raw: bytes):
    """The file as text with newlines only (\\r\\n and \\r become \\n), or None for binaries and non-UTF-8."""
    if b"\0" in raw:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def path_hash(path: str, salt: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}:{path}".encode()).digest()[:8], "big")


def order_key(path: str) -> int:
    """The fixed shuffle of files within a split: a hash of the path other than split_of's (with the same
    hash, a split's files would sit at one end of the order and every cap would take them first)."""
    return path_hash(path, "order")


def split_of(path: str, valid_pct: float, test_pct: float) -> str:
    """The split of a file, from its path alone: 64 bits of sha256 of the path as a fraction of 2^64."""
    u = path_hash(path, "split") / 2.0 ** 64 * 100
    return "valid" if u < valid_pct else "test" if u < valid_pct + test_pct else "train"


def file_lines(text: str):
    """A file's lines as fairseq sequences: split at \\n only (str.splitlines also splits at form feeds and
    others, which C files contain), without the empty string after the final newline."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def collect(source: Path, work: Path, args):
    """Pass over the source: the selected files' texts into work/texts.bin (utf-8, concatenated), and a record
    (path, split, offset, length) for each; duplicate contents dropped. Returns records and counts."""
    seen = {}                                  # content sha256 -> record (the smallest path wins)
    counts = {"files_in_source": 0, "not_wanted": 0, "too_big": 0, "binary_or_not_utf8": 0, "duplicates": 0}
    t0 = time.time()
    with open(work / "texts.bin", "wb") as blob:
        for path, size, read in iter_source(source):
            counts["files_in_source"] += 1
            if not wanted(path):
                counts["not_wanted"] += 1
                continue
            if size > args.max_file_bytes:
                counts["too_big"] += 1
                continue
            text = decode_text(read())
            if text is None:
                counts["binary_or_not_utf8"] += 1
                continue
            data = text.encode("utf-8")
            digest = hashlib.sha256(data).digest()
            if digest in seen:
                counts["duplicates"] += 1
                if path >= seen[digest]["path"]:
                    continue
                # a smaller path with the same text: it becomes the one kept (its split is its own)
                seen[digest].update(path=path, split=split_of(path, args.valid_pct, args.test_pct))
                continue
            offset = blob.tell()
            blob.write(data)
            seen[digest] = {"path": path, "split": split_of(path, args.valid_pct, args.test_pct),
                            "offset": offset, "length": len(data)}
    records = sorted(seen.values(), key=lambda r: order_key(r["path"]))
    log(f"read {counts['files_in_source']} files in {time.time() - t0:.0f} s: kept {len(records)} "
        f"({sum(r['length'] for r in records) / 1e6:.1f} MB); skipped {counts}")
    if args.max_files:
        records = records[:args.max_files]     # hash order: each split keeps its share
    return records, counts


def read_text(blob, record) -> str:
    blob.seek(record["offset"])
    return blob.read(record["length"]).decode("utf-8")


# ----------------------------------------------------------------------------------------------------------------
# tokenizer

def train_tokenizer(train_records, blob, prefix: Path, args):
    """sentencepiece BPE on a random sample of non-blank train lines: every train line is kept with
    probability sample/total (seeded), so the sample spreads over all train files."""
    total = 0
    for r in train_records:
        total += sum(1 for ln in file_lines(read_text(blob, r)) if ln.strip())
    keep = min(1.0, args.spm_sample_lines / max(total, 1))
    rng = random.Random(args.seed)
    sample_path = prefix.parent / "spm_sample.txt"
    n = 0
    with open(sample_path, "w", encoding="utf-8") as out:
        for r in train_records:
            for ln in file_lines(read_text(blob, r)):
                if ln.strip() and rng.random() < keep:
                    out.write(ln + "\n")
                    n += 1
    log(f"sentencepiece BPE, {args.vocab_size} pieces, on {n} of {total} non-blank train lines")
    t0 = time.time()
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(
        input=str(sample_path), model_prefix=str(prefix), model_type="bpe", vocab_size=args.vocab_size,
        # ids as fairseq's Dictionary numbers its specials, so a token id means the same to both
        bos_id=0, pad_id=1, eos_id=2, unk_id=3,
        # code: keep every character as written (no NFKC, no folding of runs of spaces), tabs included
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        split_digits=True, byte_fallback=True, character_coverage=0.9999,
        input_sentence_size=0, max_sentence_length=1 << 14, num_threads=args.workers, minloglevel=2)
    sample_path.unlink()
    log(f"tokenizer trained in {time.time() - t0:.0f} s: {prefix}.model")
    return time.time() - t0


def write_dict(sp, path: Path, counts):
    """dict.txt: pieces 4.. in sentencepiece's order with their train counts (fairseq reads 'symbol count')."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(SPECIALS, sp.get_piece_size()):
            f.write(f"{sp.id_to_piece(i)} {int(counts[i])}\n")


def check_dict(sp, path: Path):
    """fairseq's own reader must give every piece its sentencepiece id (a piece with odd characters in it
    would shift all ids after it)."""
    from fairseq.data import Dictionary
    d = Dictionary.load(str(path))
    assert len(d) == sp.get_piece_size(), (len(d), sp.get_piece_size())
    bad = [i for i in range(SPECIALS, len(d)) if d[i] != sp.id_to_piece(i)]
    assert not bad, f"dict.txt reads back differently at ids {bad[:10]}"


# ----------------------------------------------------------------------------------------------------------------
# encode and binarize

def token_dtype(vocab_size):
    return np.uint16 if vocab_size < 65500 else np.int32     # fairseq's choice (best_fitting_int_dtype)


def write_index(idx_path: Path, sizes, dtype):
    from fairseq.data.indexed_dataset import MMapIndexedDataset
    with MMapIndexedDataset.Index.writer(str(idx_path), dtype) as w:
        w.write(sizes)


def encode_split(split, records, blob, sp, data_bin: Path, metaseq: Path, max_tokens, dtype, batch_lines=20000):
    """Encode a split's files in order, each line + </s>, into data-bin/SPLIT.bin/.idx and metaseq jsonl.
    With max_tokens, files are added until the split holds at least that many tokens."""
    sizes, n_tokens, n_files, n_bytes = [], 0, 0, 0
    counts = np.zeros(sp.get_piece_size(), dtype=np.int64)
    (metaseq / split / "00").mkdir(parents=True, exist_ok=True)
    pending = []

    def flush(bin_f):
        nonlocal n_tokens
        if not pending:
            return
        ids = sp.encode(pending, num_threads=os.cpu_count())
        lens = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
        flat = np.full(int(lens.sum()), EOS, dtype=dtype)
        ends = np.cumsum(lens)
        starts = ends - lens
        for s, x in zip(starts, ids):
            flat[s:s + len(x)] = x
        bin_f.write(flat.tobytes())
        counts[:] += np.bincount(flat, minlength=len(counts))[:len(counts)]
        sizes.extend(lens.tolist())
        n_tokens += len(flat)
        pending.clear()

    with open(data_bin / f"{split}.bin", "wb") as bin_f, \
            open(metaseq / split / "00" / "linux.jsonl", "w", encoding="utf-8") as jsonl:
        for r in records:
            if max_tokens and n_tokens >= max_tokens:
                break
            text = read_text(blob, r)
            jsonl.write(json.dumps({"text": text, "path": r["path"]}, ensure_ascii=False) + "\n")
            pending.extend(file_lines(text))
            n_files += 1
            n_bytes += r["length"]
            if len(pending) >= batch_lines or max_tokens:
                flush(bin_f)                   # with a cap, count after every file
        flush(bin_f)
    write_index(data_bin / f"{split}.idx", sizes, dtype)
    return {"files": n_files, "bytes": n_bytes, "lines": len(sizes), "tokens": n_tokens}, counts


def build(args):
    t_start = time.time()
    out = Path(args.out).resolve()
    work, data_bin, metaseq = out / "work", out / "data-bin", out / "metaseq"
    for d in (work, data_bin):
        d.mkdir(parents=True, exist_ok=True)
    if args.source:
        source = Path(args.source)
    else:
        source = Path(args.deb) if args.deb else fetch_deb(Path(args.cache_dir).expanduser())
    source_info = {"path": str(source)}
    if source.is_file():
        source_info.update(bytes=source.stat().st_size, sha256=_sha256_file(source))
    log(f"source: {source}")

    records, skip_counts = collect(source, work, args)
    by_split = {s: [r for r in records if r["split"] == s] for s in SPLITS}
    for s in SPLITS:
        if not by_split[s]:
            sys.exit(f"the {s} split is empty: the source has too few files for --valid-pct/--test-pct")

    import sentencepiece as spm
    with open(work / "texts.bin", "rb") as blob:
        # the tokenizer sees the train files that are binarized (with --max-train-tokens, about as many as
        # that cap needs: estimated at 3 bytes per token, which over-covers it)
        train_pool = by_split["train"]
        if args.max_train_tokens:
            pool, total = [], 0
            for r in train_pool:
                if total >= 3 * args.max_train_tokens:
                    break
                pool.append(r)
                total += r["length"]
            train_pool = pool
        spm_seconds = train_tokenizer(train_pool, blob, out / "spm", args)
        sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
        dtype = token_dtype(sp.get_piece_size())
        stats, t0 = {}, time.time()
        for s in SPLITS:
            cap = args.max_train_tokens if s == "train" else 0
            stats[s], counts = encode_split(s, by_split[s], blob, sp, data_bin, metaseq, cap, dtype)
            if s == "train":
                write_dict(sp, data_bin / "dict.txt", counts)
            log(f"{s}: {stats[s]}")
        encode_seconds = time.time() - t0
    check_dict(sp, data_bin / "dict.txt")
    manifest = {"source": source_info, "selection": skip_counts, "splits": stats,
                "vocab_size": sp.get_piece_size(), "dtype": np.dtype(dtype).name,
                "options": {k: v for k, v in vars(args).items() if k != "func"},
                "seconds": {"tokenizer": round(spm_seconds, 1), "encode": round(encode_seconds, 1),
                            "total": round(time.time() - t_start, 1)},
                "files": {s: [r["path"] for r in by_split[s][:stats[s]["files"]]] for s in SPLITS}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if not args.keep_work:
        (work / "texts.bin").unlink()
        work.rmdir()
    log(f"done in {time.time() - t_start:.0f} s: {out}/data-bin, {out}/metaseq, {out}/manifest.json")
    if args.pack:
        pack(out, Path(args.pack), args.pack_train_tokens, args.pack_max_mib)
    return manifest


def _sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# pack / unpack

# LZMA2 with 2-byte literal alignment (lp=1, pb=1): the token ids are uint16
XZ_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "lc": 3, "lp": 1, "pb": 1}]


def _trimmed(ids, max_tokens):
    """ids cut after the last </s> within the first max_tokens (whole lines only)."""
    if len(ids) <= max_tokens:
        return ids
    ends = np.flatnonzero(ids[:max_tokens] == EOS)
    return ids[:ends[-1] + 1] if len(ends) else ids[:0]


def pack(out: Path, pack_path: Path, train_tokens: int, max_mib: float):
    """A tar of xz-compressed token streams (train cut to train_tokens, shrunk until the pack fits in
    max_mib), spm.model, dict.txt and a manifest; see unpack."""
    manifest = json.loads((out / "manifest.json").read_text())
    dtype = np.dtype(manifest["dtype"])
    streams = {s: np.fromfile(out / "data-bin" / f"{s}.bin", dtype=dtype) for s in SPLITS}
    eval_blobs = {s: lzma.compress(streams[s].tobytes(), format=lzma.FORMAT_XZ, filters=XZ_FILTERS)
                  for s in ("valid", "test")}
    max_bytes = int(max_mib * 2 ** 20)
    tokens = train_tokens
    pack_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        train = _trimmed(streams["train"], tokens)
        t0 = time.time()
        blob = lzma.compress(train.tobytes(), format=lzma.FORMAT_XZ, filters=XZ_FILTERS)
        log(f"pack: {len(train)} train tokens compress to {len(blob) / 2 ** 20:.1f} MiB "
            f"({len(blob) / max(len(train), 1):.3f} bytes/token, {time.time() - t0:.0f} s)")
        info = {"dtype": dtype.name, "vocab_size": manifest["vocab_size"], "source": manifest["source"],
                "tokens": {"train": int(len(train)), "valid": int(len(streams["valid"])),
                           "test": int(len(streams["test"]))},
                "train_tokens_in_build": manifest["splits"]["train"]["tokens"]}
        members = {"train.bin.xz": blob, **{f"{s}.bin.xz": eval_blobs[s] for s in ("valid", "test")},
                   "spm.model": (out / "spm.model").read_bytes(),
                   "dict.txt": (out / "data-bin" / "dict.txt").read_bytes(),
                   "pack.json": json.dumps(info, indent=1).encode()}
        with tarfile.open(pack_path, "w") as tar:
            for name, data in members.items():
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
        size = pack_path.stat().st_size
        if size <= max_bytes or len(train) == 0:
            break
        # what the train stream may take: the budget less everything else; its size scales with its tokens
        room = max_bytes - (size - len(blob))
        tokens = int(len(train) * max(room, 0) / len(blob) * 0.99)
    if size > max_bytes:
        sys.exit(f"pack: {size} bytes even without train tokens, over --max-mib {max_mib}")
    log(f"pack: {pack_path} {pack_path.stat().st_size / 2 ** 20:.1f} MiB, tokens {info['tokens']}")
    return info


def unpack(pack_path: Path, dest: Path):
    """DEST/data-bin/{train,valid,test}.{bin,idx} + dict.txt and DEST/spm.model from a pack: each .idx is
    written from the positions of </s> in the stream (every sequence is one line ending with it)."""
    data_bin = dest / "data-bin"
    data_bin.mkdir(parents=True, exist_ok=True)
    with tarfile.open(pack_path, "r") as tar:
        def member(name):
            return tar.extractfile(name).read()
        info = json.loads(member("pack.json"))
        dtype = np.dtype(info["dtype"])
        (dest / "spm.model").write_bytes(member("spm.model"))
        (data_bin / "dict.txt").write_bytes(member("dict.txt"))
        for s in SPLITS:
            ids = np.frombuffer(lzma.decompress(member(f"{s}.bin.xz")), dtype=dtype)
            assert len(ids) == info["tokens"][s] and (len(ids) == 0 or ids[-1] == EOS), s
            ids.tofile(data_bin / f"{s}.bin")
            ends = np.flatnonzero(ids == EOS) + 1
            write_index(data_bin / f"{s}.idx", np.diff(ends, prepend=0).tolist(), dtype.type)
    log(f"unpacked {pack_path} into {dest}: tokens {info['tokens']}")
    return info


# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="source -> split -> tokenizer -> data-bin + metaseq jsonl")
    src = b.add_mutually_exclusive_group()
    src.add_argument("--deb", help=f"a downloaded {DEB_PACKAGE}_*.deb")
    src.add_argument("--source", help="a source tarball (.tar.xz/.gz/...) or an extracted directory")
    b.add_argument("--cache-dir", default="~/.cache/tnllm/corpus",
                   help="where apt-get download puts the .deb (reused when present)")
    b.add_argument("--out", default="work_dirs/corpus")
    b.add_argument("--vocab-size", type=int, default=32000)
    b.add_argument("--spm-sample-lines", type=int, default=1_000_000,
                   help="train lines the tokenizer is trained on (a random sample)")
    b.add_argument("--max-file-bytes", type=int, default=256 * 1024)
    b.add_argument("--valid-pct", type=float, default=1.0)
    b.add_argument("--test-pct", type=float, default=1.0)
    b.add_argument("--max-files", type=int, default=0, help="keep only the first N files in hash order (0: all)")
    b.add_argument("--max-train-tokens", type=int, default=0, help="stop adding train files at N tokens (0: all)")
    b.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    b.add_argument("--seed", type=int, default=1)
    b.add_argument("--keep-work", action="store_true", help="keep work/texts.bin (the selected files' text)")
    b.add_argument("--pack", help="also write the pack for the GPU machine here (see `pack`)")
    b.add_argument("--pack-train-tokens", type=int, default=60_000_000)
    b.add_argument("--pack-max-mib", type=float, default=26.0,
                   help="the pack's size limit: 26 MiB leaves room for .whl/ and the checkout in the 64 MiB carry")
    b.set_defaults(func=build)
    k = sub.add_parser("pack", help="data-bin -> one compressed file for the GPU machine")
    k.add_argument("out", help="a build's --out directory")
    k.add_argument("pack")
    k.add_argument("--train-tokens", type=int, default=60_000_000)
    k.add_argument("--max-mib", type=float, default=26.0)
    k.set_defaults(func=lambda a: pack(Path(a.out), Path(a.pack), a.train_tokens, a.max_mib))
    u = sub.add_parser("unpack", help="pack -> DEST/data-bin (+ DEST/spm.model)")
    u.add_argument("pack")
    u.add_argument("dest")
    u.set_defaults(func=lambda a: unpack(Path(a.pack), Path(a.dest)))
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    main()
