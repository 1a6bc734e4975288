"""Generation with TransNormerLLM: one block-form forward over the prompts (prefill), then one recurrence step
per token, optionally replayed from a CUDA graph; greedy, temperature, top-k and top-p sampling; streaming.

Prompts of different lengths share a batch by LEFT padding, and the result of every row is the result of that
prompt alone (up to float rounding):
  * the padding carries ``padding_mask``, so its v is zero. The state update is S <- lambda S + k v^T: a zero v
    adds nothing, and the decay of a state that is still zero leaves it zero. Padding BEFORE the first real token
    is therefore invisible to every layer (right padding would decay a real state: not used here).
  * LRPE (q_s . k_t depends on s - t only) gets per-row positions: row r of length n in a batch padded to P
    starts at position n - P, so its first real token is at position 0, exactly as when it runs alone. A row-wide
    shift would cancel in exact arithmetic anyway, but then the angles (and their rounding) would differ from the
    single-prompt run; per-row positions keep them identical, and a device tensor of positions is also what a
    CUDA graph needs (a Python int offset would be frozen into the captured graph).
"""
import numbers
import operator
from dataclasses import dataclass
from typing import Callable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from .cuda_graph_step import warmup_stream
from .model import DecodeState, TransNormerLLM


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0      # 0 = greedy
    top_k: int = 0                # 0 = off
    top_p: float = 1.0            # 1 = off
    stop_tokens: Sequence[int] = ()
    seed: Optional[int] = None

    def validate(self, vocab_size: int):
        """A ValueError naming the setting for anything out of range or of the wrong type (a string, a bool, a
        float where an int is meant: none of them may slip through as a silently different setting). Greedy
        (temperature 0) with top_k / top_p is allowed and is greedy: both filters always keep the argmax."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not (_is_real(self.temperature) and 0 <= self.temperature < float("inf")):
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not (_is_real(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be a number in (0, 1] (1 = off), got {self.top_p!r}")
        if isinstance(self.stop_tokens, (str, bytes)) or not all(_is_int(t) for t in self.stop_tokens):
            raise ValueError(f"stop_tokens must be a sequence of token ids (ints), got {self.stop_tokens!r}")
        bad = [t for t in self.stop_tokens if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"stop tokens {bad} are outside the vocabulary [0, {vocab_size})")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")


def _is_int(x) -> bool:
    """An int, a numpy integer or an integer 0-d tensor; not a bool, a float or a string."""
    if isinstance(x, bool) or (torch.is_tensor(x) and x.dtype == torch.bool):
        return False
    try:
        operator.index(x)
    except TypeError:
        return False
    return True


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclass
class DecodeStep:
    """One generation step for the whole batch. ``chosen[r]`` is the token row r drew; ``emitted[r]`` is False
    where the row had already ended or ends now with a stop token (not part of the output). ``logits`` [B, vocab]
    are what the tokens were chosen from."""
    chosen: List[int]
    emitted: List[bool]
    logits: torch.Tensor


# ---------------------------------------------------------------------------------------------------------
# Input checks

def unwrap_model(model) -> TransNormerLLM:
    """The TransNormerLLM inside fairseq's language model or decoder, or the model itself."""
    for path in ((), ("transnormer",), ("decoder", "transnormer")):
        m = model
        for name in path:
            m = getattr(m, name, None)
        if isinstance(m, TransNormerLLM):
            return m
    raise TypeError(f"expected a TransNormerLLM (or a fairseq model wrapping one), got {type(model).__name__}")


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> List[List[int]]:
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    out = []
    for r, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)) or isinstance(prompt, int):
            raise TypeError(f"prompt {r} must be a sequence of token ids, got {type(prompt).__name__}")
        not_ids = [t for t in prompt if not _is_int(t)]
        if not_ids:      # int() would truncate 3.7 to 3 and read "5" or True as ids
            raise ValueError(f"prompt {r}: token ids must be ints, got {not_ids[:5]}")
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError(f"prompt {r} is empty: generation needs at least one token (e.g. a bos)")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {r}: token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
        out.append(ids)
    return out


# ---------------------------------------------------------------------------------------------------------
# Sampling

def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Scores below the k-th largest of each row become -inf (k >= vocab: unchanged)."""
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = scores.topk(k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_filter(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability adds up to >= p, i.e. a token
    stays when the mass of the tokens ranked above it is < p (so the top token always stays)."""
    if p >= 1.0:
        return scores
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    mass_above = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], dim=-1)
    drop_sorted = mass_above >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def choose_next(logits: torch.Tensor, sampling: SamplingConfig, generator=None) -> torch.Tensor:
    """logits [B, vocab] -> next token ids [B] (argmax when temperature is 0)."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    # the max first: a tiny temperature then sends the others to -inf instead of every score to +-inf (NaN)
    scores = logits.float()
    scores = (scores - scores.max(dim=-1, keepdim=True).values) / sampling.temperature
    scores = top_p_filter(top_k_filter(scores, sampling.top_k), sampling.top_p)
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def make_generator(seed: Optional[int], device: torch.device):
    """A seeded generator on the logits' device (None: torch's global RNG)."""
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------
# Prefill and decoding

def left_pad(prompts: List[List[int]], pad_id: int, device):
    """-> tokens [B, P], padding_mask [B, P] (True at padding, or None when nothing is padded) and the start
    positions [B] = length - P, which put every row's first real token at position 0."""
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.ones(len(prompts), width, dtype=torch.bool)
    for r, prompt in enumerate(prompts):
        tokens[r, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[r, width - len(prompt):] = False
    positions = torch.tensor([n - width for n in lengths], dtype=torch.long)
    padding_mask = mask.to(device) if mask.any() else None
    return tokens.to(device), padding_mask, positions.to(device)


def prefill(model: TransNormerLLM, prompts: List[List[int]], window: Optional[int] = None):
    """Block-form forwards over the left-padded prompts -> (logits [B, vocab] after each prompt's last token,
    DecodeState with per-row positions). One forward, or with ``window`` one per ``window`` positions, each
    continuing the state of the one before: the same result in memory that does not grow with the prompt."""
    device = model.lm_head.weight.device
    tokens, padding_mask, positions = left_pad(prompts, model.cfg.pad_id, device)
    width = tokens.shape[1]
    padded = width - min(len(p) for p in prompts)      # left padding fills the first `padded` columns only
    window = window or width
    state = DecodeState(positions=positions)           # no layer states yet: the model starts from zero
    for start in range(0, width, window):
        columns = slice(start, start + window)
        mask = padding_mask[:, columns] if start < padded else None
        # the LM head on the last position only: the [B, P, vocab] logits of a long prompt would not fit
        hidden, state = model(tokens[:, columns], state=state, padding_mask=mask, return_hidden=True)
    return model.lm_head(hidden[:, -1]), state


class EagerDecoder:
    """One recurrence step per call through the model's forward."""

    def __init__(self, model: TransNormerLLM, state: DecodeState):
        self.model, self.state = model, state

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        logits, self.state = self.model(tokens[:, None], self.state)
        return logits[:, -1]


class CudaGraphDecoder:
    """The decode step captured once in a CUDA graph and replayed per token: a [B, 1] token buffer in, the static
    state tensors (kv and per-row positions) updated in place by ``model.decode_step_``, static logits out."""

    def __init__(self, model: TransNormerLLM, state: DecodeState, warmup_steps: int = 2):
        if state.positions is None:
            raise ValueError("a CUDA-graph decoder needs a state with per-row positions (see prefill)")
        self.tokens = torch.full((state.positions.shape[0], 1), model.cfg.pad_id, dtype=torch.long,
                                 device=state.positions.device)
        self.state = DecodeState(kv=[s.clone() for s in state.kv], offset=state.offset,
                                 positions=state.positions.clone())
        # warm up on a side stream (Triton compiles and autotunes, cuBLAS picks its workspaces: none of that may
        # happen during capture)
        side = warmup_stream(state.positions.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                model.decode_step_(self.tokens, self.state)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.decode_step_(self.tokens, self.state)[:, -1]
        # the warm-up advanced the static state (capture only records): put the prefill state back
        for static, s in zip(self.state.kv, state.kv):
            static.copy_(s)
        self.state.positions.copy_(state.positions)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens[:, None])
        self.graph.replay()
        return self.logits.clone()        # the static buffer is overwritten by the next replay


class TokensToHost:
    """Chosen tokens [B] on their way to the host without stopping the device's queue: on CUDA a copy into pinned
    memory queued behind the work that makes them, and an event to wait for. Waiting for the event (not for the
    stream) lets the next decode step, queued after the copy, run while the host reads these tokens. One pinned
    buffer serves every step: the host reads it before it queues the next copy into it."""

    def __init__(self, batch: int, device: torch.device):
        self.on_cuda = device.type == "cuda"
        self.pinned = torch.empty(batch, dtype=torch.long, pin_memory=True) if self.on_cuda else None
        self.event = torch.cuda.Event() if self.on_cuda else None
        self.tokens = None

    def send(self, tokens: torch.Tensor):
        if self.on_cuda:
            self.pinned.copy_(tokens, non_blocking=True)
            self.event.record()
            tokens = self.pinned
        self.tokens = tokens

    def receive(self) -> List[int]:
        if self.on_cuda:
            self.event.synchronize()
        return self.tokens.tolist()


def runs_ahead(device: torch.device) -> bool:
    """Whether decode_from queues the next step before it waits for this step's tokens: on CUDA, where the device
    computes while the host waits; on a CPU the step would only run before the host's own work, for nothing, and
    a consumer that stops early would have paid for it."""
    return device.type == "cuda"


def decode_steps(model, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                 cuda_graph: Optional[bool] = None) -> Iterator[DecodeStep]:
    """The generation loop, one DecodeStep per produced position, lazily (what generate and stream consume):
    prefill, then decode_from's loop (the checks made once, before the prefill)."""
    model = unwrap_model(model)
    prompts = check_prompts(prompts, model.cfg.vocab_size)
    use_graph = check_decoding(model, sampling, cuda_graph)          # before the prefill, which may be long
    # no_grad per block, never across a yield: grad mode is thread-global and the caller runs between yields
    with torch.no_grad():
        logits, state = prefill(model, prompts)
    yield from _decode_loop(model, state, logits, sampling, use_graph)


def check_decoding(model: TransNormerLLM, sampling: SamplingConfig, cuda_graph: Optional[bool]) -> bool:
    """A ValueError for a setting the loop cannot run with; returns whether it decodes through a CUDA graph."""
    if model.training and model.cfg.dropout > 0:
        raise ValueError("the model is in training mode with dropout: call model.eval() before generating")
    if getattr(model, "vocab_parallel", False):      # its LM head gives each rank a slice of the vocabulary
        raise ValueError("this model's LM head is a vocab-parallel shard (tnllm_plugin.parallel): tokens chosen from "
                         "a shard of the logits would be wrong; generate with the whole model, or through fairseq's "
                         "generator, which gathers the logits")
    sampling.validate(model.cfg.vocab_size)
    device = model.lm_head.weight.device
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
    return device.type == "cuda" if cuda_graph is None else bool(cuda_graph)


def decode_from(model, state: DecodeState, logits: torch.Tensor, sampling: SamplingConfig,
                cuda_graph: Optional[bool] = None) -> Iterator[DecodeStep]:
    """Decoding from a prefill's state (with per-row positions) and its last logits [B, vocab]; ``state`` is the
    loop's from then on. Rows that ended keep decoding (their tokens are ignored) so that the batch shape, and a
    CUDA graph, stay fixed; the loop stops when every row has ended or after max_new_tokens.

    On CUDA (runs_ahead), once the decoder exists, step i + 1 is queued on the device before the host waits for
    step i's tokens (they come back through pinned memory), so the host's work between steps (launches, the stop
    check, the caller's code) runs while the device computes. On a stop the step queued ahead is dropped: the same
    tokens as waiting at every step, one step of device work more."""
    model = unwrap_model(model)
    use_graph = check_decoding(model, sampling, cuda_graph)
    if logits.dim() != 2 or logits.shape[1] != model.cfg.vocab_size:
        raise ValueError(f"logits must be [batch, vocab={model.cfg.vocab_size}] (a prefill's last), got "
                         f"{tuple(logits.shape)}")
    yield from _decode_loop(model, state, logits, sampling, use_graph)


def _decode_loop(model: TransNormerLLM, state: DecodeState, logits: torch.Tensor, sampling: SamplingConfig,
                 use_graph: bool) -> Iterator[DecodeStep]:
    """decode_from's loop, on arguments decode_from or decode_steps has checked."""
    device = logits.device
    generator = make_generator(sampling.seed, device)
    stop = {int(t) for t in sampling.stop_tokens}
    ended = [False] * logits.shape[0]
    to_host = TokensToHost(logits.shape[0], device)
    run_ahead = runs_ahead(device)
    decoder = None

    def next_step(chosen_t):
        """The next step's (logits, chosen tokens), queued."""
        nonlocal decoder
        with torch.no_grad():
            if decoder is None:
                decoder = CudaGraphDecoder(model, state) if use_graph else EagerDecoder(model, state)
            logits = decoder(chosen_t)
            return logits, choose_next(logits, sampling, generator)

    with torch.no_grad():
        chosen_t = choose_next(logits, sampling, generator)
    for i in range(sampling.max_new_tokens):
        last = i + 1 == sampling.max_new_tokens
        to_host.send(chosen_t)
        # ahead only once the decoder exists: a loop that ends at its first token never builds (captures) one
        ahead = next_step(chosen_t) if run_ahead and decoder is not None and not last else None
        chosen = to_host.receive()
        emitted = []
        for r, token in enumerate(chosen):
            ended[r] = ended[r] or token in stop
            emitted.append(not ended[r])
        yield DecodeStep(chosen, emitted, logits)
        if all(ended) or last:
            return
        logits, chosen_t = ahead if ahead is not None else next_step(chosen_t)


def generate(model, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
             on_token: Optional[Callable[[int, int], None]] = None, cuda_graph: Optional[bool] = None
             ) -> List[List[int]]:
    """The new tokens of each prompt (a stop token ends its row and is not included). ``on_token(row, token_id)``
    is called as each token is produced, rows in order within a step. ``cuda_graph``: None = on CUDA devices."""
    out: List[List[int]] = [[] for _ in prompts]
    for step in decode_steps(model, prompts, sampling, cuda_graph):
        for r, (token, keep) in enumerate(zip(step.chosen, step.emitted)):
            if keep:
                out[r].append(token)
                if on_token is not None:
                    on_token(r, token)
    return out


def stream(model, prompt: Sequence[int], sampling: SamplingConfig, cuda_graph: Optional[bool] = None
           ) -> Iterator[int]:
    """The new tokens of one prompt, each as soon as it is produced."""
    for step in decode_steps(model, [prompt], sampling, cuda_graph):
        if step.emitted[0]:
            yield step.chosen[0]


# ---------------------------------------------------------------------------------------------------------
# Text <-> ids

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")       # fairseq Dictionary's first four ids, in this order


def read_fairseq_dict(path) -> List[str]:
    """The symbols of a fairseq dict.txt by id: the four specials, then one symbol per line ("symbol count", an
    optional trailing "#fairseq:overwrite" allows a repeat, whose later id wins, as fairseq does)."""
    symbols = list(SPECIALS)
    seen = set(SPECIALS)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            fields = line.rsplit(" ", 1)
            overwrite = len(fields) == 2 and fields[1] == "#fairseq:overwrite"
            if overwrite:
                fields = fields[0].rsplit(" ", 1)
            if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
                raise ValueError(f"{path}:{lineno}: expected '<symbol> <count>', got {line!r}")
            word = fields[0]
            if word in seen and not overwrite:
                raise ValueError(f"{path}:{lineno}: duplicate symbol {word!r} (fairseq needs #fairseq:overwrite)")
            seen.add(word)
            symbols.append(word)
    return symbols


class TextCodec:
    """Text <-> model token ids through a sentencepiece model. With a fairseq dict.txt (checkpoints trained by
    fairseq on sentencepiece pieces, e.g. examples/quickstart.py) a piece's id is its fairseq Dictionary index
    (<s>=0, <pad>=1, </s>=2, <unk>=3, then dict.txt's lines); pieces missing from it are <unk>. Without one,
    sentencepiece's own ids are the model's ids (the released checkpoints)."""

    def __init__(self, spm_model: str, dict_path: Optional[str] = None):
        import sentencepiece as spm          # only text generation needs it
        self.sp = spm.SentencePieceProcessor(model_file=str(spm_model))
        symbols = read_fairseq_dict(dict_path) if dict_path else None
        # a dict.txt whose symbols are the ids themselves ("4", "5", ...: what tnllm_plugin.convert writes beside
        # a checkpoint converted from the released layout) names no pieces: the ids are sentencepiece's own
        if symbols is not None and symbols[len(SPECIALS):] == [str(i) for i in range(len(SPECIALS), len(symbols))]:
            symbols = None
        self.symbols = symbols
        if self.symbols is not None:
            self.index = {word: i for i, word in enumerate(self.symbols)}   # later repeats win (overwrite)
            self.bos_id, self.pad_id, self.eos_id, self.unk_id = range(4)
        else:
            self.bos_id, self.pad_id = self.sp.bos_id(), self.sp.pad_id()
            self.eos_id, self.unk_id = self.sp.eos_id(), self.sp.unk_id()

    @property
    def vocab_size(self) -> int:
        return len(self.symbols) if self.symbols is not None else self.sp.get_piece_size()

    def encode(self, text: str) -> List[int]:
        if self.symbols is None:
            return list(self.sp.encode(text))
        return [self.index.get(piece, self.unk_id) for piece in self.sp.encode(text, out_type=str)]

    def decode(self, ids: Sequence[int]) -> str:
        """Specials (bos, pad, eos) vanish; with a dict, <unk> reads as sentencepiece's unknown mark."""
        if self.symbols is None:
            return self.sp.decode([int(i) for i in ids])
        pieces = []
        for i in ids:
            if i == self.unk_id:
                pieces.append(self.sp.id_to_piece(self.sp.unk_id()))
            elif 0 <= i < len(self.symbols) and i >= len(SPECIALS):
                pieces.append(self.symbols[i])
        return self.sp.decode(pieces)

    def token_id(self, text: str) -> int:
        """The one id that ``text`` stands for: a special's or piece's name ("</s>", "fox" or "▁fox": a word is
        looked up as it is and as the word-initial piece), or a text that encodes to one token."""
        piece = text.replace(" ", "\u2581")
        for name in (text, piece, "\u2581" + piece):
            if self.symbols is not None and name in self.index:
                return self.index[name]
            if self.symbols is None and self.sp.piece_to_id(name) != self.sp.unk_id():
                return self.sp.piece_to_id(name)
        ids = self.encode(text)
        if len(ids) != 1:
            raise ValueError(f"{text!r} is {len(ids)} tokens ({ids}); a stop token must be a single token")
        return ids[0]


def info_field(info, key: str):
    """A field of tnllm_plugin.convert.load_model's info (a CheckpointInfo, or a dict); None when absent."""
    if info is None:
        return None
    return info.get(key) if isinstance(info, Mapping) else getattr(info, key, None)


def prompt_special_ids(tokenizer, info, cfg) -> Tuple[int, int]:
    """(the id a prompt starts with, the eos id). With a fairseq dictionary both are its </s> (fairseq's
    language-model data is a stream of lines each ended by </s>, and its generator starts from it); otherwise the
    ids the checkpoint was trained with (load_model's info), else the tokenizer's, else the model config's.
    Negative ids (sentencepiece's mark of a disabled special) are skipped."""
    def first_valid(*candidates) -> int:
        for c in candidates:
            if c is not None and int(c) >= 0:
                return int(c)
        raise ValueError("no usable special token id")
    if getattr(tokenizer, "symbols", None) is not None:
        eos = first_valid(tokenizer.eos_id)
        return eos, eos
    eos = first_valid(info_field(info, "eos_id"), getattr(tokenizer, "eos_id", None), cfg.eos_id)
    start = first_valid(info_field(info, "bos_id"), getattr(tokenizer, "bos_id", None), cfg.bos_id)
    return start, eos


class TextStream:
    """Turns ids arriving one at a time into text deltas: decodes the whole sequence (prompt included, so that a
    leading space survives) and returns what is new; holds back an incomplete UTF-8 character (byte pieces)."""

    def __init__(self, codec: TextCodec, prompt_ids: Sequence[int]):
        self.codec, self.ids = codec, list(prompt_ids)
        self.shown = len(codec.decode(self.ids))

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.codec.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self.shown = text[self.shown:], max(self.shown, len(text))
        return delta

    def flush(self) -> str:
        """Whatever was held back (at the end of generation an incomplete character is shown as it is)."""
        text = self.codec.decode(self.ids)
        delta, self.shown = text[self.shown:], max(self.shown, len(text))
        return delta
