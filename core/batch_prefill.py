"""A batch prefilled without padding waste, then decoded together.

One padded batch prefills rows x its longest prompt: a 2x2 compare pads two ~40-token closed-book
prompts to the length of two ~600-token RAG prompts, and every column waits for all of it before
its first token. Here the rows are prefilled in groups of (nearly) equal prompt length, shortest
first, each distinct (prompt ids, per-row kwargs) once; every group yields its rows' first tokens
as soon as it is done. The groups' key/value states are then left-padded to one length and joined
into one cache with room for the new tokens (core.kv_slab), from which `generate` decodes all
rows together.

The joined cache is what a left-padded batch would hold: row i's states sit in the last L_i slots,
computed at positions 0..L_i-1, the slots before them are masked out, and generate derives each
row's next position from the attention mask. Only models whose cache layers are all plain full
attention can be joined this way (`joinable`); others keep the padded batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from core.kv_slab import SlabCache
from core.prefix_cache import KV, plain_layers

# At most this share of a group's prefilled tokens may be padding: CPU prefill is compute-bound,
# so every padded token costs as much as a real one.
PAD_SLACK = 0.1


def joinable(model_config: Any) -> bool:
    """Whether this model's cache layers can be prefilled apart and joined."""
    return plain_layers(DynamicCache(config=model_config))


def length_groups(lengths: list[int], slack: float = PAD_SLACK) -> list[list[int]]:
    """Indices into `lengths` in groups of similar length, shortest group first, each group
    padded to its longest by at most `slack` of its tokens."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if groups:
            group = groups[-1] + [i]  # i is the group's longest: the lengths are sorted
            if len(group) * lengths[i] <= (1 + slack) * sum(lengths[j] for j in group):
                groups[-1] = group
                continue
        groups.append([i])
    return groups


def distinct_rows(ids: list[list[int]], row_kwargs: dict[str, list]) -> list[int]:
    """For each row, the first row with the same prompt ids and the same per-row kwargs."""
    first: dict[Hashable, int] = {}
    return [first.setdefault((tuple(row), *(repr(v[i]) for v in row_kwargs.values())), i)
            for i, row in enumerate(ids)]


@dataclass
class Prefilled:
    """One group's prefill: its rows (indices into the batch), their states [G, H, Lg, D] per
    layer, the mask over those Lg slots, and the logits of each row's next token."""

    rows: list[int]
    layers: KV
    mask: torch.Tensor
    logits: torch.Tensor


def prefill_group(model: Any, ids: list[list[int]], rows: list[int], pad_id: int,
                  device: torch.device, model_kwargs: dict[str, Any]) -> Prefilled:
    """One forward pass over these rows' prompts, left-padded to the longest of them."""
    width = max(len(ids[r]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        input_ids[j, width - len(ids[r]):] = torch.tensor(ids[r])
        mask[j, width - len(ids[r]):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # as generate numbers a left-padded batch
    cache = DynamicCache(config=model.config)
    out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                position_ids=positions.to(device), past_key_values=cache, use_cache=True,
                logits_to_keep=1, **model_kwargs)
    layers = tuple((layer.keys, layer.values) for layer in cache.layers)
    return Prefilled(rows, layers, mask, out.logits[:, -1].float())


def join(parts: list[Prefilled], source: list[int], ids: list[list[int]], first: list[int],
         pad_id: int, device: torch.device, room: int) -> dict[str, Any]:
    """Inputs for `generate` to decode every row on from its first token: row i takes the states
    of row source[i] (its distinct twin), all left-padded to the longest prompt, in a SlabCache
    with `room` free slots after them (enough for the decode: it then never copies the cache);
    input_ids end with each row's first token, the one position the cache does not hold yet."""
    width = max(p.mask.shape[1] for p in parts)
    where = {r: (p, j) for p in parts for j, r in enumerate(p.rows)}
    rows = [where[s] for s in source]

    def padded(n: int, kv: int) -> torch.Tensor:
        """Layer n's keys (kv 0) or values (kv 1) of every row, in a buffer of width + room slots."""
        like = parts[0].layers[n][kv]
        out = like.new_empty((len(source), like.shape[1], width + room, like.shape[3]))
        for i, (part, j) in enumerate(rows):
            states = part.layers[n][kv][j]
            pad = width - states.shape[1]
            out[i, :, :pad] = 0  # masked out, but never garbage (0 x NaN would leak through)
            out[i, :, pad:width] = states
        return out

    buffers = [(padded(n, 0), padded(n, 1)) for n in range(len(parts[0].layers))]
    mask = torch.stack([F.pad(part.mask[j], (width - part.mask.shape[1], 0)) for part, j in rows])
    input_ids = torch.full((len(source), width + 1), pad_id, dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, width - len(row):width] = torch.tensor(row)
        input_ids[i, width] = first[i]
    mask = torch.cat([mask, torch.ones((len(source), 1), dtype=torch.long)], 1)
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device),
            "past_key_values": SlabCache(buffers, width)}
