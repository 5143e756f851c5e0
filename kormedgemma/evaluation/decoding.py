"""Greedy decoding for evaluation: a batch that shrinks as its rows finish.

`model.generate` keeps every row of a batch in every decoding step until the last row stops:
under lm-evaluation-harness's 1,024-token cap one rambling answer makes seven finished rows
decode (and pad) up to a thousand more tokens each. Here a row leaves the batch, and its slice
of the KV cache, the step it finishes (end-of-sequence token, a stop string in its decoded
text, or the token cap), so the work done is the tokens actually kept.

The token choices are those of `generate` with greedy search (same positions from the left
padding, same argmax), and the harness's rules for what the model sees: a prompt longer than
`max_length - max_new_tokens` tokens keeps its last tokens (its `tok_batch_encode`
left-truncation), counted so reports can say how many prompts were cut.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

logger = logging.getLogger(__name__)
# lm-evaluation-harness's fallback when neither config nor tokenizer names a context length.
DEFAULT_MAX_LENGTH = 2048
_TOKENIZER_INFINITY = 1000000000000000019884624838656


@dataclass
class Generated:
    """Decoded continuations in prompt order, and what it took to make them."""

    texts: list[str]
    tokens: list[list[int]]  # generated ids, the end-of-sequence token included when one ended the row
    truncated: list[int] = field(default_factory=list)  # prompt indices cut to fit the context
    prompt_tokens: int = 0


def stop_token_ids(tokenizer: Any) -> list[int]:
    """End-of-sequence ids: `<eos>` and, for chat models, `<end_of_turn>` (Gemma's turn end)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    turn_end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    if isinstance(turn_end, int) and turn_end != tokenizer.unk_token_id and turn_end not in ids:
        ids.append(turn_end)
    return ids


def context_limit(model: Any, tokenizer: Any, default: int = DEFAULT_MAX_LENGTH) -> int:
    """The model's context length as the harness resolves it: the text config's `n_positions`,
    `max_position_embeddings` or `n_ctx`, then the tokenizer's `model_max_length`, then 2048."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    length = getattr(tokenizer, "model_max_length", None)
    if length is not None and length != _TOKENIZER_INFINITY:
        return int(length)
    return default


def fit_context(ids: list[int], max_length: int, max_new_tokens: int) -> tuple[list[int], bool]:
    """The harness's rule: keep the last `max_length - max_new_tokens` tokens of a prompt."""
    room = max_length - max_new_tokens
    if room <= 0:
        raise ValueError(f"no room for a prompt: {max_new_tokens} new tokens need a context longer than the "
                         f"model's {max_length}; lower the generation cap")
    return (ids[-room:], True) if len(ids) > room else (ids, False)


def varying_shape_attention(device: Any):
    """A context in which attention skips cuDNN's SDPA kernel on CUDA.

    cuDNN builds an execution plan for every new (batch, key length) shape, ~55 ms each on an
    H100, and decoding meets a new shape at every step: measured on the tiny model, 64 ms a step
    with it and 8 ms without, same tokens (benchmarks/results/eval_generation_gpu_h100.json has the
    4B-shape figures). Flash / memory-efficient / math kernels need no plan. Training, with one
    sequence length, keeps cuDNN."""
    from contextlib import nullcontext

    if getattr(device, "type", device) != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class MaskRowsPast:
    """Logits processor for `model.generate` callers (the serving backend): rows past the
    tokenizer (the embedding matrix is padded to a multiple of 64) are never generated, since no
    text decodes from them. `greedy_generate` applies the same slice itself."""

    def __init__(self, first_unused: int) -> None:
        self.first_unused = first_unused

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[-1] > self.first_unused:
            scores[:, self.first_unused:] = -math.inf
        return scores


class _Stops:
    """Whether a row has finished: its newest token ends the sequence, or its decoded text now
    holds a stop string.

    The whole generated text is decoded, not a window of recent tokens: with byte fallback, a
    run of byte tokens decodes differently once cut (an invalid run becomes one U+FFFD per
    byte), so a window can both invent and hide a stop string. Decoding is skipped when the new
    token cannot have completed one: a stop string that is new in the text ends inside the new
    token's own text, so a token whose text holds no stop string's last character (and that is
    not a byte-like piece, whose effect on the text is not its own) changes nothing."""

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str], eos_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.strings = [s for s in stop_strings if s]
        self.eos = set(eos_ids)
        self.may_complete: Optional[torch.Tensor] = None
        if self.strings:
            last = {s[-1] for s in self.strings}
            texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
            self.may_complete = torch.tensor([bool(last & set(t)) or "\ufffd" in t for t in texts])

    def hit(self, tokens: list[int]) -> bool:
        token = tokens[-1]
        if token in self.eos:
            return True
        if self.may_complete is None or (token < len(self.may_complete) and not self.may_complete[token]):
            return False
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return any(s in text for s in self.strings)


class _Batch:
    """The rows being decoded: their KV cache, left-padded attention mask, next positions and
    last chosen tokens. Rows leave (`keep`) and join (`join`) between steps; columns that are
    padding for every row left are dropped (`trim`), so a finished long answer does not make
    the rows after it attend over its length."""

    def __init__(self, model: Any, prompts: list[list[int]], pad: int, device: Any) -> None:
        from transformers import DynamicCache

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        self.mask = mask.to(device)
        positions = (self.mask.cumsum(-1) - 1).masked_fill(self.mask == 0, 0)
        self.cache = DynamicCache(config=model.config)
        self.logits = model(input_ids=ids.to(device), attention_mask=self.mask, position_ids=positions,
                            past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        self.position = positions[:, -1:]
        self.tokens = torch.zeros(len(prompts), dtype=torch.long, device=device)

    @property
    def joinable(self) -> bool:
        """Only attention caches whose layers are plain tensors can be padded and stacked."""
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        return all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in self.cache.layers)

    def keep(self, rows: list[int]) -> None:
        index = torch.tensor(rows, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.position, self.tokens = self.mask[index], self.position[index], self.tokens[index]

    def join(self, other: "_Batch") -> None:
        """Stack `other`'s rows under these, both right-aligned (left padding) to the longer."""
        import torch.nn.functional as F

        length = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            n = max(mine.keys.shape[-2], theirs.keys.shape[-2])
            mine.keys = torch.cat([F.pad(x, (0, 0, n - x.shape[-2], 0)) for x in (mine.keys, theirs.keys)])
            mine.values = torch.cat([F.pad(x, (0, 0, n - x.shape[-2], 0)) for x in (mine.values, theirs.values)])
            if hasattr(mine, "cumulative_length"):
                mine.cumulative_length = length
        self.mask = torch.cat([F.pad(m, (length - m.shape[1], 0)) for m in (self.mask, other.mask)])
        self.position = torch.cat([self.position, other.position])
        self.tokens = torch.cat([self.tokens, other.tokens])

    def trim(self) -> None:
        used = self.mask.any(0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start == 0:
            return
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            if hasattr(layer, "cumulative_length"):  # sliding window: holds the last window - 1 columns at most
                layer.cumulative_length -= start
                held = min(layer.cumulative_length, layer.keys.shape[-2])
                layer.keys, layer.values = layer.keys[:, :, -held:], layer.values[:, :, -held:]
            else:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]

    def step(self, model: Any) -> None:
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.tokens), 1))], dim=1)
        self.position = self.position + 1
        self.logits = model(input_ids=self.tokens[:, None], attention_mask=self.mask, position_ids=self.position,
                            past_key_values=self.cache, use_cache=True).logits[:, -1]


@torch.no_grad()
def greedy_generate(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                    stop_strings: Sequence[str] = (), batch_size: int = 8, add_special_tokens: bool = True,
                    max_length: Optional[int] = None, desc: str = "generate", progress: bool = True) -> Generated:
    """Greedy continuations of `prompts`, longest prompt first, in a left-padded batch of at most
    `batch_size` rows that finished rows leave and waiting prompts join (prefilled together, then
    stacked under the running rows), so every decoding step works on unfinished answers.

    Texts are decoded without special tokens; a caller that must cut at stop strings still does
    (a row stops at the step that completes one, and that step's token may run past it)."""
    from collections import deque

    from tqdm.auto import tqdm

    limit = max_length or context_limit(model, tokenizer)
    encoded, truncated = [], []
    for i, prompt in enumerate(prompts):
        ids, cut = fit_context(tokenizer.encode(prompt, add_special_tokens=add_special_tokens), limit, max_new_tokens)
        encoded.append(ids)
        if cut:
            truncated.append(i)
    if truncated:
        logger.warning("%d of %d prompts are longer than %d tokens (context %d - %d new): each keeps its last "
                       "%d tokens, as lm-evaluation-harness does", len(truncated), len(prompts),
                       limit - max_new_tokens, limit, max_new_tokens, limit - max_new_tokens)
    stops = _Stops(tokenizer, stop_strings, stop_token_ids(tokenizer))
    usable = len(tokenizer)  # embedding rows past the tokenizer (padding to a multiple of 64) decode to nothing
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    waiting = deque(sorted(range(len(prompts)), key=lambda i: -len(encoded[i])))
    outputs: list[list[int]] = [[] for _ in prompts]
    batch: Optional[_Batch] = None
    alive: list[int] = []

    def choose(rows: list[int], logits: torch.Tensor, into: _Batch) -> list[int]:
        """Append each row's greedy token; the positions (in `rows`) of the rows that go on."""
        into.tokens = MaskRowsPast(usable)(None, logits).argmax(-1)
        going = []
        for k, (i, token) in enumerate(zip(rows, into.tokens.tolist())):
            outputs[i].append(token)
            if not (stops.hit(outputs[i]) or len(outputs[i]) >= max_new_tokens):
                going.append(k)
        bar.update(len(rows) - len(going))
        return going

    with tqdm(total=len(prompts), desc=desc, unit="q", disable=not progress) as bar, varying_shape_attention(device):
        while waiting or alive:
            room = batch_size - len(alive)
            if waiting and room > 0 and (batch is None or not alive or batch.joinable):
                group = [waiting.popleft() for _ in range(min(room, len(waiting)))]
                fresh = _Batch(model, [encoded[i] for i in group], pad, device)
                going = choose(group, fresh.logits, fresh)
                if going:
                    if len(going) < len(group):
                        fresh.keep(going)
                    if alive and batch is not None:
                        batch.join(fresh)
                    else:
                        batch = fresh
                    alive += [group[k] for k in going]
                continue
            assert batch is not None
            batch.step(model)
            going = choose(alive, batch.logits, batch)
            if len(going) < len(alive):
                alive = [alive[k] for k in going]
                if alive:
                    batch.keep(going)
                    batch.trim()
    # As the harness decodes: every generated id, the one that ended the row included, without
    # special tokens (a tokenizer whose turn-end token is not special keeps it as text).
    texts = [tokenizer.decode(out, skip_special_tokens=True) for out in outputs]
    return Generated(texts=texts, tokens=outputs, truncated=truncated,
                     prompt_tokens=sum(len(e) for e in encoded))
