"""A shared prompt prefix prefilled once: its key/value states (transformers' DynamicCache layers)
are kept per loaded model and copied into every batch whose prompts all start with the same
tokens, so a forward pass only prefills each row's own suffix. G-Eval's form prompts share their
instructions, criteria and evaluation steps (~190 tokens) across every item of a metric.

A batch on top of a P-token prefix: the suffixes are LEFT-padded to one length, so every row's
last positions line up (the caller reads them with logits_to_keep); the attention mask is 1 over
the prefix, 0 over a row's padding and 1 over its suffix; position ids continue from P at each
row's first real token. The padding in the middle is masked out, so each row sees exactly the
prefix and its own suffix, as if it ran alone. `generate` accepts the same layout (it derives
position ids from the mask) and decodes on from it.

A prefix is used only where its ids are a token-exact prefix of a row's ids (a tokenizer may merge
tokens across the boundary); other rows run uncached. A model whose cache is not all plain
full-attention layers (sliding windows, linear attention) gets no prefix.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Hashable

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from core.kv_slab import SlabCache

# One tensor pair (keys, values) per layer, batch 1: [1, kv_heads, P, head_dim].
KV = tuple[tuple[torch.Tensor, torch.Tensor], ...]
PREFIXES_PER_MODEL = 4  # a few metrics x judges at once; 135M: ~6 MB per 135-token prefix


class PrefixCache:
    """The most recently used prefixes of one loaded model, keyed by what determines their states
    (adapter, its files, the prefix ids). Guarded by the model's lock."""

    def __init__(self, size: int = PREFIXES_PER_MODEL) -> None:
        self._size = size
        self._entries: OrderedDict[Hashable, KV | None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, compute: Any) -> KV | None:
        """The states for `key`, computed by `compute()` on a miss (None: this model cannot cache)."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        kv = self._entries[key] = compute()
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return kv


def shared_ids(tokenizer: Any, texts: list[str], shared: str) -> list[int] | None:
    """The ids of the first text up to and including its first `shared`, if every text starts
    with that same text; else None."""
    end = texts[0].find(shared) if shared else -1
    if end < 0:
        return None
    head = texts[0][:end + len(shared)]
    if not all(t.startswith(head) for t in texts):
        return None
    return tokenizer(head, add_special_tokens=False)["input_ids"] or None


def usable(ids: list[int], head: list[int], min_suffix: int) -> bool:
    """Whether `head` is a token-exact prefix of `ids` with at least `min_suffix` ids after it."""
    return len(ids) - len(head) >= min_suffix and ids[:len(head)] == head


def plain_layers(cache: DynamicCache) -> bool:
    """Whether every layer of this cache is plain full attention (states that simply extend)."""
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


def prefill(model: Any, ids: list[int], device: torch.device, model_kwargs: dict[str, Any]) -> KV | None:
    """The prefix's states from one forward pass, or None when the model's cache has layers
    that are not plain full attention (their states cannot simply be extended)."""
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([ids], device=device), past_key_values=cache, use_cache=True,
          logits_to_keep=1, **model_kwargs)
    if not plain_layers(cache):
        return None
    return tuple((layer.keys, layer.values) for layer in cache.layers)


def batch_inputs(prefix: KV, head: list[int], suffixes: list[list[int]], pad_id: int,
                 device: torch.device, full_ids: bool, room: int = 0) -> dict[str, Any]:
    """Inputs for a forward pass (full_ids False: the suffixes only, with position ids) or for
    `generate` (full_ids True: prefix ids in front, position ids left to generate) over the
    left-padded suffixes, with the prefix states copied once per row into a SlabCache that has
    room for the suffixes and `room` more slots (generate's new tokens but its last)."""
    rows, width, p = len(suffixes), max(map(len, suffixes)), len(head)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, p + width), dtype=torch.long)
    mask[:, :p] = 1
    positions = torch.zeros((rows, width), dtype=torch.long)
    for row, suffix in enumerate(suffixes):
        start = width - len(suffix)
        ids[row, start:] = torch.tensor(suffix)
        mask[row, p + start:] = 1
        positions[row, start:] = torch.arange(p, p + len(suffix))
    # The stored prefix is copied into each row's buffer, never written to.
    cache = SlabCache([(_with_room(k, rows, width + room), _with_room(v, rows, width + room))
                       for k, v in prefix], p)
    inputs: dict[str, Any] = {"attention_mask": mask.to(device), "past_key_values": cache}
    if full_ids:
        inputs["input_ids"] = torch.cat([torch.tensor([head] * rows, dtype=torch.long), ids], 1).to(device)
    else:
        inputs.update(input_ids=ids.to(device), position_ids=positions.to(device), use_cache=True)
    return inputs


def _with_room(states: torch.Tensor, rows: int, extra: int) -> torch.Tensor:
    """A [rows, heads, P + extra, dim] buffer whose first P slots hold the [1, heads, P, dim] states."""
    out = states.new_empty((rows, states.shape[1], states.shape[2] + extra, states.shape[3]))
    out[:, :, :states.shape[2]] = states
    return out
