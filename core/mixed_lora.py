"""One batch, a different LoRA adapter per row, without peft's per-adapter loop.

peft answers such a batch (`adapter_names=[...]`, "__base__" for the plain model) in every LoRA
layer by looping over the batch's adapters: gather each adapter's rows, run its A and B, scatter
the result back (`LoraLayer._mixed_batch_forward`). On the 135M model that is ~1400 small ops per
decode step, ~45 ms of a ~100 ms step on this CPU. Here (the Punica/S-LoRA idea) each layer keeps
its adapters stacked: A as [n + 1, in, r_max] and B as [n + 1, r_max, out], slot 0 all zeros for
base rows, smaller ranks zero-padded, peft's scaling folded into B. A batch gathers every row's
A and B by its slot and adds x @ A_row @ B_row with two batched matmuls: a handful of ops per
layer whatever the mix of adapters. Zero slots and zero padding add exact zeros.

`install` puts this in place of `_mixed_batch_forward` on a model's LoRA Linear layers, which
peft calls only for a batch with `adapter_names`; every other forward (a single active adapter,
training, disable_adapter) stays peft's own. A call this path does not cover goes to peft's loop:
gradients enabled or training mode, a LoRA variant (DoRA and the like), a LoRA bias, an adapter
of another dtype or device, variant arguments (aLoRA offsets), inputs that are not [batch, seq,
features]. Layers whose class has its own forward (bitsandbytes and other quantized wrappers)
are left to peft; torchao's int8 wrapper keeps peft's Linear forward and is covered.

The stacks are built on a layer's first mixed batch and dropped by `install`: call it again
after any adapter is attached, replaced or deleted (ModelHub does, in core.models._attach).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from core.systems import BASE

_PEFT = object()  # a batch this module leaves to peft's loop
_MAX_BATCH_KEYS = 64  # remembered row-slot tensors per layer (distinct adapter_names lists)


class _Stack:
    """One layer's covered adapters, stacked: slot per adapter name (0 = no LoRA)."""

    def __init__(self, layer: nn.Module) -> None:
        names = [n for n in layer.lora_A if n != BASE]
        first = layer.lora_A[names[0]].weight if names else None
        covered = [n for n in names if _covered(layer, n, first)]
        self.uncovered = frozenset(names) - frozenset(covered)
        self.slots = {name: slot for slot, name in enumerate(covered, 1)}
        self.a = self.b = None
        if covered:
            rank = max(layer.lora_A[n].weight.shape[0] for n in covered)
            a_in, b_out = first.shape[1], layer.lora_B[covered[0]].weight.shape[0]
            self.a = first.new_zeros((len(covered) + 1, a_in, rank))
            self.b = first.new_zeros((len(covered) + 1, rank, b_out))
            for slot, name in enumerate(covered, 1):
                a, b = layer.lora_A[name].weight, layer.lora_B[name].weight  # [r, in], [out, r]
                self.a[slot, :, :a.shape[0]] = a.T
                self.b[slot, :b.shape[1], :] = b.T * layer.scaling[name]

    def rows(self, names: tuple[str, ...]) -> Any:
        """Each row's slot, None when no row has LoRA here, or _PEFT when a row needs peft."""
        if not self.uncovered.isdisjoint(names):
            return _PEFT
        slots = [self.slots.get(n, 0) for n in names]  # an adapter without this layer: none here
        return torch.tensor(slots, device=self.a.device) if any(slots) else None


def _covered(layer: nn.Module, name: str, first: torch.Tensor) -> bool:
    a, b = layer.lora_A[name], layer.lora_B[name]
    return (name not in layer.lora_variant and isinstance(a, nn.Linear) and isinstance(b, nn.Linear)
            and b.bias is None and a.bias is None
            and all(w.dtype == first.dtype and w.device == first.device for w in (a.weight, b.weight)))


class _PerRow:
    """A layer's `_mixed_batch_forward`, same signature and result as peft's."""

    def __init__(self, layer: nn.Module, variant_keys: list[str]) -> None:
        self.layer, self.variant_keys = layer, variant_keys  # variant_keys: peft's, e.g. aLoRA offsets
        self.stack: _Stack | None = None
        self.batches: dict[tuple[str, ...], Any] = {}  # adapter_names -> _Stack.rows

    def __call__(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any) -> torch.Tensor:
        layer = self.layer
        rows = _PEFT
        if (x.dim() == 3 and not layer.training and not torch.is_grad_enabled()
                and all(kwargs.get(k) is None for k in self.variant_keys)):
            rows = self._rows(tuple(adapter_names))
        if rows is _PEFT:
            return type(layer)._mixed_batch_forward(layer, x, *args, adapter_names=adapter_names, **kwargs)
        for key in self.variant_keys:  # peft passes them as None; never the base layer's
            kwargs.pop(key, None)
        result = layer.base_layer(x, *args, **kwargs)
        if rows is None:
            return result
        a, b = self.stack.a.index_select(0, rows), self.stack.b.index_select(0, rows)
        h = torch.bmm(x.to(a.dtype), a)
        if result.dtype == b.dtype:
            return torch.baddbmm(result, h, b)
        return result + torch.bmm(h, b).to(result.dtype)

    def _rows(self, names: tuple[str, ...]) -> Any:
        rows = self.batches.get(names)
        if rows is None and names not in self.batches:
            if self.stack is None:
                self.stack = _Stack(self.layer)
            if len(self.batches) >= _MAX_BATCH_KEYS:
                self.batches.clear()
            rows = self.batches[names] = self.stack.rows(names)
        return rows


def _lora_linears(model: nn.Module) -> list[nn.Module]:
    """The model's LoRA layers whose forward is peft's plain Linear forward."""
    from peft.tuners.lora import Linear, LoraLayer

    return [m for m in model.modules() if isinstance(m, Linear) and type(m).forward is Linear.forward
            and type(m)._mixed_batch_forward is LoraLayer._mixed_batch_forward]


def install(model: nn.Module) -> int:
    """Answer `model`'s mixed-adapter batches by the per-row path, with fresh (lazily built)
    stacks; returns how many layers it covers. Call after every change to the adapters."""
    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

    layers = _lora_linears(model)
    for layer in layers:
        layer._mixed_batch_forward = _PerRow(layer, VARIANT_KWARG_KEYS)
    return len(layers)


def uninstall(model: nn.Module) -> None:
    """Back to peft's loop for every layer (for comparisons: bench.generate, tests)."""
    for layer in _lora_linears(model):
        layer.__dict__.pop("_mixed_batch_forward", None)
