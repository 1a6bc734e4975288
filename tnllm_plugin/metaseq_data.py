"""Metaseq's two data formats, written for the plugin's users (Metaseq has no preprocessing command of its own):

  streaming   DATA/{split}/00/NAME.jsonl, one {"text": ...} document a line, for --task
              streaming_language_modeling, which tokenizes while it trains with a byte-level BPE
              (DATA/vocab.json, DATA/merges.txt) whose ids 0-3 are <s> <pad> </s> <unk>, as its tasks require
  binarized   OUT/{split}.bin/.idx, Metaseq's mmap indexed dataset of each document's BPE ids followed by </s>,
              for --task language_modeling (same --vocab-filename / --merges-filename)

    python -m tnllm_plugin.metaseq_data binarize DATA OUT [--splits train,valid,test]

Needs the ``tokenizers`` package (and Metaseq, for binarizing).
"""
import argparse
import json
from pathlib import Path
from typing import Iterable, Mapping, Sequence

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]      # ids 0-3: Metaseq's Dictionary and tasks check them


def write_streaming_splits(root, splits: Mapping[str, Sequence[str]], name: str = "corpus") -> None:
    """Documents of each split as ROOT/{split}/00/NAME.jsonl (shard 00: one shard per split)."""
    for split, documents in splits.items():
        folder = Path(root) / split / "00"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for document in documents:
                f.write(json.dumps({"text": document}) + "\n")


def train_bpe(texts: Iterable[str], root, vocab_size: int):
    """A byte-level BPE of ``vocab_size`` tokens with the special tokens first, saved as ROOT/vocab.json and
    ROOT/merges.txt. Returns the tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer.save_model(str(root))
    return tokenizer


def binarize(data, out, splits=("train", "valid", "test")) -> dict:
    """The streaming layout under DATA (with its vocab.json and merges.txt) as Metaseq's binarized layout under
    OUT; returns the number of tokens of each split. A split missing under DATA is an error naming it."""
    import torch
    from metaseq.data import indexed_dataset
    from tokenizers import ByteLevelBPETokenizer
    data, out = Path(data), Path(out)
    for needed in (data / "vocab.json", data / "merges.txt"):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed}: the byte-level BPE of the data is missing")
    tokenizer = ByteLevelBPETokenizer.from_file(str(data / "vocab.json"), str(data / "merges.txt"))
    eos = tokenizer.token_to_id("</s>")
    if [tokenizer.id_to_token(i) for i in range(4)] != SPECIAL_TOKENS:
        raise ValueError(f"{data / 'vocab.json'}: ids 0-3 must be {SPECIAL_TOKENS} (Metaseq's tasks require it)")
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in splits:
        files = sorted((data / split).glob("*/*.jsonl"))
        if not files:
            raise FileNotFoundError(f"{data / split}: no */*.jsonl files for split {split!r}")
        builder = indexed_dataset.make_builder(str(out / f"{split}.bin"), impl="mmap",
                                               vocab_size=tokenizer.get_vocab_size())
        counts[split] = 0
        for path in files:
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{path}:{n}: not a JSON object with a \"text\" field") from None
                # as the streaming task tokenizes a document: trailing whitespace dropped, </s> appended
                ids = tokenizer.encode(text.rstrip()).ids + [eos]
                builder.add_item(torch.tensor(ids, dtype=torch.int32))
                counts[split] += len(ids)
        builder.finalize(str(out / f"{split}.idx"))
    return counts


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tnllm_plugin.metaseq_data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="verb", required=True)
    b = sub.add_parser("binarize", help="streaming layout -> binarized layout")
    b.add_argument("data")
    b.add_argument("out")
    b.add_argument("--splits", default="train,valid,test")
    args = ap.parse_args(argv)
    for split, tokens in binarize(args.data, args.out, args.splits.split(",")).items():
        print(f"{split}: {tokens} tokens")


if __name__ == "__main__":
    main()
