"""Continue a prompt with a TransNormerLLM checkpoint, streaming the text to stdout as tokens arrive.

    python examples/generate.py --checkpoint CKPT --spm SPM_MODEL [--dict DICT_TXT] --prompt "text" \
        [--max-new-tokens 64] [--temperature 0.8 --top-k 50 --top-p 0.95 --seed 1] [--stop TEXT ...] [--device cuda]

The checkpoint is anything tnllm_plugin.convert.load_model reads (a fairseq checkpoint such as the quickstart's,
or a converted released one). Token ids: with a fairseq dict.txt (given, or named by the checkpoint) they are
fairseq Dictionary indices of the sentencepiece pieces and the prompt starts with </s> (fairseq's language-model
convention: its training stream separates lines with </s> and its generator starts from it); without one they
are sentencepiece's ids and the prompt starts with bos. Generation stops at eos (and at every --stop token).
"""
import argparse
import sys

from tnllm_plugin.generation import (SamplingConfig, TextCodec, TextStream, info_field, prompt_special_ids,
                                     stream, unwrap_model)


def load_model(path, device):
    from tnllm_plugin.convert import load_model as load     # -> (model, info)
    return load(path, device)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--spm", required=True, help="the sentencepiece model file")
    p.add_argument("--dict", help="fairseq dict.txt (default: the one the checkpoint names, if any)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", nargs="+", default=[], metavar="TEXT",
                   help="stop at these tokens (each a single token: a piece or special name, or one-token text)")
    p.add_argument("--no-bos", action="store_true", help="do not start the prompt with bos (</s> with a dict)")
    p.add_argument("--no-eos-stop", action="store_true", help="do not stop at eos")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on CUDA")
    return p.parse_args(argv)


def main(argv=None, out=sys.stdout):
    args = parse_args(argv)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed)
    sampling.validate(vocab_size=sys.maxsize)      # bad options fail before the (slow) load
    model, info = load_model(args.checkpoint, args.device)
    model = unwrap_model(model).eval()
    codec = TextCodec(args.spm, args.dict or info_field(info, "dict_path"))
    if codec.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"the tokenizer has {codec.vocab_size} ids, the model {model.cfg.vocab_size}: a --spm/--dict "
                         "of another model?")
    bos, eos = prompt_special_ids(codec, info, model.cfg)
    prompt = ([] if args.no_bos else [bos]) + codec.encode(args.prompt)
    stops = ([] if args.no_eos_stop else [eos]) + [codec.token_id(text) for text in args.stop]
    sampling.stop_tokens = stops
    cuda_graph = False if args.no_cuda_graph else None
    text = TextStream(codec, prompt)
    out.write(args.prompt)
    out.flush()
    for token in stream(model, prompt, sampling, cuda_graph=cuda_graph):
        out.write(text.push(token))
        out.flush()
    out.write(text.flush() + "\n")
    out.flush()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:      # bad input: the message, not a traceback
        sys.exit(f"error: {e}")
