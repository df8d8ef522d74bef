"""Greedy decoding of a joined batch (core.batch_prefill) in which finished rows leave the batch.

transformers' `generate` keeps every row in the batch until the last one ends: a finished row is
fed padding and costs a full row of every decode step. On the Compare tab's 2x2 with 64 new
tokens three rows ended after 20-28 tokens and one ran to 64, so the batch decoded 4 x 63
row-steps where the answers needed 133, and batching saved nothing over four runs one after
another (here: the batch's CPU seconds 13.05 -> 10.59, README Benchmarks).

`decode` runs the same steps as greedy `generate` on the joined inputs, one forward over the live
rows per step: the same input token, 2D attention mask, position ids (cumsum of the mask - 1,
then one more per step), cache and per-row model kwargs (peft's adapter_names), and the argmax
of the float32 logits. When rows end (an eos id), they are dropped from the cache, the mask, the
positions and the kwargs before the next step. The cache compacts its live rows in place
(core.kv_slab), copying only the rows after the first dead one: at most ~10 ms for the 2x2 (3
rows of 600 slots, 30 layers, one thread) against ~140 ms for a 4-row decode step, so every
finished row leaves at once rather than waiting for company.

Only plain argmax is identical to `generate` here: `plain_greedy` says whether the model's
generation config adds logits processors (a repetition penalty, say) to greedy decoding; such
models, and sampling, keep `generate`.
"""
from __future__ import annotations

import copy
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch


def plain_greedy(model: Any) -> bool:
    """Whether greedy `generate` on this model is the argmax of the logits (no processors)."""
    config = copy.deepcopy(model.generation_config)
    config.do_sample = False
    return not model._get_logits_processor(generation_config=config, input_ids_seq_length=1,
                                           device="cpu", model_kwargs={})


def decode(model: Any, enc: dict[str, Any], steps: int, row_kwargs: dict[str, list],
           add: Callable[[dict[int, int]], None], finished: Callable[[int], bool],
           cancel: threading.Event) -> None:
    """Decode up to `steps` tokens per row from join's inputs (each row's last input token is the
    one its cache does not hold yet). `add` receives each step's {row: token}; `finished(row)`
    says whether a row has ended (it is then dropped). Stops early once every row has ended or
    `cancel` is set (checked before each step)."""
    cache, mask = enc["past_key_values"], enc["attention_mask"]
    tokens = enc["input_ids"][:, -1:]
    positions = mask.sum(1, keepdim=True) - 1  # generate's cumsum(mask) - 1 at the last slot
    rows = list(range(tokens.shape[0]))
    step = 0
    while step < steps:
        live = [j for j, row in enumerate(rows) if not finished(row)]
        if not live or cancel.is_set():
            return
        if len(live) < len(rows):
            rows = [rows[j] for j in live]
            index = torch.tensor(live, device=tokens.device)
            cache.batch_select_indices(index)
            tokens, mask, positions = tokens[index], mask[index], positions[index]
        with _per_row(model, {k: [v[r] for r in rows] for k, v in row_kwargs.items()}) as kwargs:
            while step < steps and not cancel.is_set() and not any(map(finished, rows)):
                out = model(input_ids=tokens, attention_mask=mask, position_ids=positions,
                            past_key_values=cache, use_cache=True, logits_to_keep=1, **kwargs)
                tokens = out.logits[:, -1].float().argmax(-1, keepdim=True)
                add(dict(zip(rows, tokens.reshape(-1).tolist())))
                mask = torch.cat([mask, mask.new_ones((len(rows), 1))], 1)
                positions = positions + 1
                step += 1


@contextmanager
def _per_row(model: Any, kwargs: dict[str, list]) -> Iterator[dict[str, list]]:
    """The forward kwargs for these rows. A peft model gets its per-row kwargs (adapter_names) as
    `generate` gives them: its forward hooks registered once while the rows stay the same, since
    registering them on every forward walks all modules (~10 ms of a ~90 ms one-row step)."""
    enable = getattr(model, "_enable_peft_forward_hooks", None)
    if enable is None or not kwargs:
        yield kwargs
    else:
        with enable(**kwargs):
            yield {}
