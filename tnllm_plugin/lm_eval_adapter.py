"""TransNormerLLM in EleutherAI's lm-evaluation-harness (lm-eval 0.4): the model ``transnormer_llm``.

    python -m tnllm_plugin.lm_eval_adapter --model transnormer_llm \\
        --model_args checkpoint=CKPT,spm=spm.model[,dict=dict.txt],device=cpu,batch_size=8,max_length=2048 \\
        --tasks tnllm_tiny --include_path tests/data/lm_eval_tiny

``python -m`` runs lm-eval's own command line after registering the model (lm-eval's CLI cannot import a
plugin itself). In Python, importing this module registers it: ``lm_eval.simple_evaluate(model=
"transnormer_llm", model_args="checkpoint=...,spm=...", tasks=[...])``; or build ``TransNormerLMEval(model=...,
tokenizer=...)`` around an in-memory model and pass that. CKPT is anything tnllm_plugin.convert.load_model reads
(a released directory, a plugin directory or fairseq checkpoint file). model_args win over lm-eval's own
--batch_size / --device; lm-eval's default device (cuda:0) becomes the CPU where there is no GPU.

Conventions
  * Text <-> ids: ``generation.TextCodec``. With a fairseq dict.txt (``dict=``, or the one load_model finds
    beside the checkpoint) the ids are fairseq Dictionary ids (<s>=0, <pad>=1, </s>=2, <unk>=3, then the
    dict's pieces; pieces it lacks are <unk>); without one, sentencepiece's own ids. A dict.txt whose symbols
    are the ids themselves (what convert writes for a checkpoint converted from the released layout) names
    no pieces and is not used.
  * Every sequence is conditioned on one start token, the "prefix": ``</s>`` with a fairseq dict (fairseq's
    language-modeling data is a stream of lines each ended by ``</s>``, and fairseq scores and generates
    from ``</s>``); otherwise the bos id the checkpoint was trained with (load_model's info), else the
    tokenizer's ``<s>``, else the model config's. ``prefix_token_id=N`` overrides it. An empty context is just
    the prefix; rolling documents are scored from the prefix on.
  * A (context, continuation) pair is tokenized as ONE text (trailing spaces of the context move to the
    continuation) and split where the tokens of the context alone stop matching, so the scored tokens are
    exactly the tokenization of context + continuation.
  * ``max_length`` is NOT a truncation: it is how many positions go through one forward. Longer inputs run in
    windows that carry the recurrent state, which gives the result of one pass over the whole input (the
    state is all a linear-attention model keeps of the past) in memory that does not grow with the length.
    ``loglikelihood_rolling`` is the log-likelihood of the whole document computed that way: no overlap, no
    token scored twice, nothing truncated.
  * generate_until: generation.generate from prefix + context (the prompt is not windowed); the text is what
    decoding context + new tokens adds to decoding the context, cut at the first of the request's ``until``
    strings; eos also ends a row. Greedy unless do_sample is true with a temperature > 0.

How requests are batched (exact, not approximations; see tests/test_lm_eval_adapter.py)
  * Contexts are prefilled together with LEFT padding and ``padding_mask``: a padded position has v = 0, so it
    adds nothing to the state S <- lambda S + k v^T, and decaying a state that is still zero keeps it zero.
    Rows get their own LRPE positions (first real token at 0), as in tnllm_plugin.generation.
  * Requests with the same context tokens (the choices of a multiple-choice question, every rolling document)
    share one prefill: its state is copied to each continuation row. Continuations run from that state with
    RIGHT padding (causality: padding after a row's last token changes none of its outputs; left padding would
    decay a state that is no longer zero).
"""
import json
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

import lm_eval.models  # noqa: F401  (lm-eval's built-in models: registered lazily when the registry is empty,
#                        which it would no longer be once ours is in)
from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry, register_model

from .generation import (SamplingConfig, TextCodec, generate, info_field, prefill, prompt_special_ids,
                         unwrap_model)
from .model import DecodeState, TransNormerLLM

MODEL_NAME = "transnormer_llm"
log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def positive_int(name, value) -> int:
    """An int >= 1 from an int or a string of digits (model_args arrive as strings)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit() \
            or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def split_pair(tokenizer, context: str, continuation: str) -> Tuple[List[int], List[int]]:
    """(context ids, continuation ids) of one tokenization of context + continuation (module docstring)."""
    stripped = context.rstrip()
    if stripped != context:
        continuation = context[len(stripped):] + continuation
        context = stripped
    whole = list(tokenizer.encode(context + continuation))
    own = list(tokenizer.encode(context)) if context else []
    k = 0
    while k < min(len(own), len(whole)) and own[k] == whole[k]:
        k += 1
    return whole[:k], whole[k:]


def cut_at_stop(text: str, until: Sequence[str]) -> Tuple[str, bool]:
    """text up to the earliest occurrence of any (non-empty) stop string, and whether one occurred."""
    hits = [i for i in (text.find(s) for s in until if s) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


def sampling_from_gen_kwargs(gen_kwargs: Dict, default_max_gen_toks: int):
    """lm-eval's gen_kwargs -> (stop strings, max new tokens, temperature, top_k, top_p). Greedy unless
    do_sample is true and the temperature is positive (do_sample without a temperature means 1.0)."""
    kw = dict(gen_kwargs or {})
    until = kw.pop("until", None)
    until = [] if until is None else [until] if isinstance(until, str) else list(until)
    if not all(isinstance(s, str) for s in until):
        raise ValueError(f"'until' must be a string or a list of strings, got {until!r}")
    max_gen = kw.pop("max_gen_toks", kw.pop("max_new_tokens", default_max_gen_toks))
    max_gen = positive_int("max_gen_toks", max_gen)
    do_sample = kw.pop("do_sample", None)
    if isinstance(do_sample, str):
        do_sample = do_sample.strip().lower() in ("1", "true", "yes")
    temperature = kw.pop("temperature", None)
    temperature = (1.0 if do_sample else 0.0) if temperature is None else float(temperature)
    if do_sample is False:        # an explicit do_sample=False is greedy whatever the temperature says
        temperature = 0.0
    top_k = int(kw.pop("top_k", None) or 0)
    top_p = float(kw.pop("top_p", None) or 1.0)
    if kw:
        log.warning("transnormer_llm: ignoring generation kwargs %s", sorted(kw))
    return until, max_gen, temperature, top_k, top_p


def load_model_and_tokenizer(checkpoint: Optional[str], spm: Optional[str], dict_path: Optional[str],
                             device: torch.device, dtype: Optional[str], model=None, tokenizer=None
                             ) -> Tuple[TransNormerLLM, object, object]:
    """-> (the TransNormerLLM in eval mode on ``device``, in ``dtype`` when given; the tokenizer; load_model's info,
    None for an in-memory model). ``model`` and ``tokenizer`` are used as given (a fairseq model is unwrapped);
    otherwise the model is read from ``checkpoint`` by tnllm_plugin.convert.load_model and the tokenizer is a
    TextCodec of ``spm`` and ``dict_path``, else of the dict.txt load_model found beside the checkpoint."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    torch_dtype = None if dtype is None else DTYPES[dtype]
    info = None
    if model is None:
        if checkpoint is None or spm is None:
            raise ValueError("transnormer_llm needs checkpoint=PATH and spm=SPM_MODEL (or model= and "
                             "tokenizer= objects)")
        from .convert import load_model
        model, info = load_model(checkpoint, device=str(device), dtype=torch_dtype)
    elif checkpoint is not None:
        raise ValueError("give either checkpoint= or model=, not both")
    if tokenizer is None:
        if spm is None:
            raise ValueError("transnormer_llm needs spm=SPM_MODEL (or a tokenizer= object)")
        tokenizer = TextCodec(spm, dict_path or info_field(info, "dict_path"))
    model = unwrap_model(model).to(device=device, dtype=torch_dtype).eval()
    vocab = getattr(tokenizer, "vocab_size", None)
    if vocab is not None and vocab > model.cfg.vocab_size:
        raise ValueError(f"the tokenizer has {vocab} ids, the model's vocabulary only {model.cfg.vocab_size}")
    return model, tokenizer, info


def right_pad(rows: List[List[int]], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> tokens [B, N] (each row followed by pad_id) and valid [B, N] (True at the rows' own tokens)."""
    width = max(len(row) for row in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, row in enumerate(rows):
        tokens[r, :len(row)] = torch.tensor(row, dtype=torch.long)
        valid[r, :len(row)] = True
    return tokens, valid


class _AllStopped(Exception):
    """Raised from generate's on_token once every row of the batch has reached a stop string or eos."""


class TransNormerLMEval(LM):
    """lm-eval's LM interface on a TransNormerLLM. Either ``checkpoint`` + ``spm`` (+ ``dict``), loaded through
    tnllm_plugin.convert.load_model, or an in-memory ``model`` (a TransNormerLLM or a fairseq model wrapping
    one) and ``tokenizer`` (a generation.TextCodec, or any object with encode(str) -> ids, decode(ids) -> str
    and bos_id / eos_id)."""

    def __init__(self, checkpoint: Optional[str] = None, spm: Optional[str] = None, dict: Optional[str] = None,
                 device: Optional[str] = "cpu", batch_size=8, max_length=2048, max_gen_toks=256,
                 prefix_token_id=None, dtype: Optional[str] = None, model=None, tokenizer=None,
                 max_batch_size=None, **unknown):
        super().__init__()
        if unknown:
            raise TypeError(f"transnormer_llm: unknown model_args {sorted(unknown)} (known: checkpoint, spm, "
                            "dict, device, batch_size, max_length, max_gen_toks, prefix_token_id, dtype)")
        if str(batch_size).startswith("auto"):
            raise ValueError("transnormer_llm: batch_size=auto is not supported; give a number")
        self.batch_size = positive_int("batch_size", batch_size)
        self.max_length = positive_int("max_length", max_length)
        self.max_gen_toks = positive_int("max_gen_toks", max_gen_toks)
        self._device = torch.device(device or "cpu")
        self.model, self.tokenizer, info = load_model_and_tokenizer(
            checkpoint, spm, dict, self._device, dtype, model=model, tokenizer=tokenizer)
        cfg = self.model.cfg
        start_id, self.eos_id = prompt_special_ids(self.tokenizer, info, cfg)
        self.prefix_id = start_id if prefix_token_id is None else int(prefix_token_id)
        if not 0 <= self.prefix_id < cfg.vocab_size:
            raise ValueError(f"prefix token id {self.prefix_id} is outside the vocabulary [0, {cfg.vocab_size})")

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None):
        from lm_eval.utils import simple_parse_args_string
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None):
        """model_args win over lm-eval's own settings of the same name (its command line always passes
        batch_size, 1 unless --batch_size is given, which would otherwise collide with batch_size= in
        model_args)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        if str(extra.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line says cuda:0 unless told otherwise; device= in model_args is obeyed as given
            log.warning("transnormer_llm: no CUDA device, running on the CPU (lm-eval's default device %s)",
                        extra.pop("device"))
        return cls(**arg_dict, **extra)

    @property
    def tokenizer_name(self) -> str:
        return type(self.tokenizer).__name__

    # ---------------------------------------------------------------------------------------------------------
    # Scoring on token ids

    @torch.no_grad()
    def _prefill(self, contexts: List[List[int]]) -> Tuple[torch.Tensor, DecodeState]:
        """Left-padded contexts through the model in windows -> (log-probs [B, vocab] of the token after each
        context, the state after each context, with per-row positions)."""
        logits, state = prefill(self.model, contexts, window=self.max_length)
        return logits.float().log_softmax(-1), state

    @torch.no_grad()
    def _score_continuations(self, first_logprobs: torch.Tensor, conts: List[List[int]], state: DecodeState
                             ) -> List[Tuple[float, bool]]:
        """From each row's log-probs [B, vocab] and state after its context -> (log P(cont | context), every
        token of cont was the argmax). The first token is scored from first_logprobs, the others by running
        cont[:-1] from the state in windows, RIGHT padded (module docstring)."""
        targets, valid = right_pad(conts, self.model.cfg.pad_id)
        targets = targets.to(self._device)
        inputs = targets[:, :-1]       # a row's own last token in place of padding: it predicts only padding
        logprobs = [first_logprobs.gather(-1, targets[:, :1])]
        greedy = [first_logprobs.argmax(-1, keepdim=True) == targets[:, :1]]
        for start in range(0, inputs.shape[1], self.max_length):
            logits, state = self.model(inputs[:, start:start + self.max_length], state=state)
            logits = logits.float()
            predicted = targets[:, start + 1:start + 1 + self.max_length]
            logprobs.append(logits.gather(-1, predicted[..., None]).squeeze(-1) - logits.logsumexp(-1))
            greedy.append(logits.argmax(-1) == predicted)
        logprobs = torch.cat(logprobs, 1).double().cpu()
        greedy = torch.cat(greedy, 1).cpu()
        return [(float(lp[v].sum()), bool(g[v].all())) for lp, g, v in zip(logprobs, greedy, valid)]

    def _loglikelihood_tokens(self, pairs: List[Tuple[List[int], List[int]]], desc: str = "loglikelihood"
                              ) -> List[Tuple[float, bool]]:
        """(context ids including the prefix, continuation ids) -> (log P(continuation | context), greedy)."""
        if not all(ctx for ctx, _ in pairs):
            raise ValueError("a context must hold at least the prefix token")
        results: List[Optional[Tuple[float, bool]]] = [None if cont else (0.0, True) for _, cont in pairs]
        requests_of: Dict[Tuple[int, ...], List[int]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            if cont:
                requests_of.setdefault(tuple(ctx), []).append(i)
        contexts = sorted(requests_of, key=len, reverse=True)       # similar lengths together: less padding
        progress = tqdm(total=len(pairs), desc=desc, disable=self.rank != 0)
        progress.update(sum(not cont for _, cont in pairs))      # nothing to score: done already
        for c0 in range(0, len(contexts), self.batch_size):
            chunk = contexts[c0:c0 + self.batch_size]
            first_logprobs, state = self._prefill([list(c) for c in chunk])
            rows = [(g, i) for g, ctx in enumerate(chunk) for i in requests_of[ctx]]
            rows.sort(key=lambda gi: len(pairs[gi[1]][1]), reverse=True)
            for r0 in range(0, len(rows), self.batch_size):
                batch = rows[r0:r0 + self.batch_size]
                shared = torch.tensor([g for g, _ in batch], device=self._device)    # each row's context
                scores = self._score_continuations(first_logprobs[shared], [pairs[i][1] for _, i in batch],
                                                   state.index_select(shared))
                for (_, i), score in zip(batch, scores):
                    results[i] = score
                progress.update(len(batch))
        progress.close()
        return results

    # ---------------------------------------------------------------------------------------------------------
    # lm-eval's interface

    def loglikelihood(self, requests) -> List[Tuple[float, bool]]:
        pairs = []
        for req in requests:
            context, continuation = req.args[0], req.args[1]
            ctx, cont = split_pair(self.tokenizer, context, continuation)
            pairs.append(([self.prefix_id] + ctx, cont))
        results = self._loglikelihood_tokens(pairs)
        for req, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return results

    def loglikelihood_rolling(self, requests) -> List[float]:
        pairs = [([self.prefix_id], list(self.tokenizer.encode(req.args[0]))) for req in requests]
        results = [ll for ll, _ in self._loglikelihood_tokens(pairs, desc="loglikelihood_rolling")]
        for req, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, res)
        return results

    def generate_until(self, requests) -> List[str]:
        """Batches of requests with equal gen_kwargs through generation.generate (eos ends a row too). A batch
        stops as soon as every row has produced a stop string or eos; each text is cut at its first stop
        string."""
        results: List[Optional[str]] = [None] * len(requests)
        groups: Dict[str, List[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        progress = tqdm(total=len(requests), desc="generate_until", disable=self.rank != 0)
        for indices in groups.values():
            until, max_gen, temperature, top_k, top_p = sampling_from_gen_kwargs(
                requests[indices[0]].args[1], self.max_gen_toks)
            sampling = SamplingConfig(max_new_tokens=max_gen, temperature=temperature, top_k=top_k, top_p=top_p)
            encoded = {i: list(self.tokenizer.encode(requests[i].args[0])) for i in indices}
            order = sorted(indices, key=lambda i: len(encoded[i]), reverse=True)
            for b0 in range(0, len(order), self.batch_size):
                batch = order[b0:b0 + self.batch_size]
                texts = self._generate_texts([encoded[i] for i in batch], sampling, until)
                for i, text in zip(batch, texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                progress.update(len(batch))
        progress.close()
        return results

    def _generate_texts(self, contexts: List[List[int]], sampling: SamplingConfig, until: Sequence[str]
                        ) -> List[str]:
        """Continuation texts of contexts (ids without the prefix). The text of a row is what decoding
        context + new tokens adds to decoding the context alone (so a leading space survives)."""
        shown = [self._decode(c) for c in contexts]
        new: List[List[int]] = [[] for _ in contexts]
        done = [False] * len(contexts)

        def on_token(row: int, token: int):
            if done[row]:
                return
            if token == self.eos_id:
                done[row] = True
            else:
                new[row].append(token)
                text = self._decode(contexts[row] + new[row])[len(shown[row]):]
                done[row] = cut_at_stop(text, until)[1]
            if all(done):
                raise _AllStopped

        prompts = [[self.prefix_id] + c for c in contexts]
        try:      # eos is watched here (not a stop token of generate) so that every row's end is seen
            generate(self.model, prompts, sampling, on_token=on_token)
        except _AllStopped:
            pass
        return [cut_at_stop(self._decode(c + n)[len(s):], until)[0] for c, n, s in zip(contexts, new, shown)]

    def _decode(self, ids: Sequence[int]) -> str:
        """Text of ids; ids past the tokenizer's vocabulary (a model vocabulary padded beyond it) read as
        nothing."""
        vocab = getattr(self.tokenizer, "vocab_size", None)
        return self.tokenizer.decode([i for i in ids if vocab is None or i < vocab])


def _register():
    """Register the model under MODEL_NAME once (a second import of this file, e.g. as __main__, keeps the
    first registration instead of failing on a different class object under the same name)."""
    current = model_registry.get(MODEL_NAME, None)
    if current is None:
        register_model(MODEL_NAME)(TransNormerLMEval)
    elif getattr(current, "__qualname__", None) != TransNormerLMEval.__qualname__:
        raise ValueError(f"lm-eval model name {MODEL_NAME!r} is already taken by {current}")


_register()


def main():
    """lm-eval's command line with transnormer_llm registered."""
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()


if __name__ == "__main__":
    main()
