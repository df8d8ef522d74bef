"""A key/value cache that decodes without copying itself every step.

transformers' DynamicLayer appends each step's keys and values with `torch.cat`, which allocates
and fills a new tensor holding the whole cache: for the Compare tab's joined 2x2 batch (4 rows x
~600 slots x 30 layers, ~110 MB) that is a full copy of the cache per decoded token (measured:
~5% of a 4-row decode step on the 135M model, growing with rows x cached length). A SlabLayer
holds its states in one buffer with room for every slot the decode will need (prompt width + new
tokens), writes each step's states into the next free slots in place, and hands attention views
of the filled part: the same values, shapes and masks a DynamicLayer would give (SDPA reads the
strided views as they are), so greedy outputs do not change. transformers' StaticCache pre-allocates too, but attends over all of its slots and
builds its masks for them; here nothing downstream of the layer sees a difference.

Rows leaving the batch (`batch_select_indices` with ascending indices, as core.greedy_decode
drops finished rows) are compacted in place: each kept row's filled slots move down to its new
index, the buffers' room stays. A step that would overflow the buffer, or a layer whose states
were replaced by something else (crop, reordering, beam search), falls back to DynamicLayer's
concatenation.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer


class SlabLayer(DynamicLayer):
    """A DynamicLayer whose states are the first `length` slots of two pre-allocated buffers
    [batch, heads, capacity, dim]; the slots after them are free for the decode."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self._keys, self._values = keys, values
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.in_place() or self.keys.shape[2] + key_states.shape[2] > self.capacity:
            return super().update(key_states, value_states, *args, **kwargs)
        start, end = self.keys.shape[2], self.keys.shape[2] + key_states.shape[2]
        self._keys[:, :, start:end] = key_states
        self._values[:, :, start:end] = value_states
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        order = indices.tolist()
        if not self.in_place() or order != sorted(set(order)):
            return super().batch_select_indices(indices)
        end = self.keys.shape[2]
        for buffer in (self._keys, self._values):
            for new, old in enumerate(order):  # new <= old: a row is read before it is overwritten
                if new != old:
                    buffer[new, :, :end] = buffer[old, :, :end]
        self._keys, self._values = self._keys[:len(order)], self._values[:len(order)]
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]

    @property
    def capacity(self) -> int:
        return self._keys.shape[2]

    def in_place(self) -> bool:
        """Whether keys/values are still views of the buffers (no fallback or other method
        replaced them, reset did not drop them)."""
        pairs = ((self.keys, self._keys), (self.values, self._values))
        return self.keys is not None and all(
            view.data_ptr() == buffer.data_ptr() and view.stride() == buffer.stride() for view, buffer in pairs)


class SlabCache(DynamicCache):
    """A DynamicCache of SlabLayers, from one (keys, values) buffer pair per model layer whose
    first `length` slots hold the states."""

    def __init__(self, buffers: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        Cache.__init__(self, layers=[SlabLayer(k, v, length) for k, v in buffers])
