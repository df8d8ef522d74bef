"""Greedy decoding in which finished rows leave the batch (core.greedy_decode, via
generate_grouped), on test_batch_prefill's tiny random Llama with two random LoRA adapters: the
tokens must equal each row answered alone and the old `generate` decode of the same joined inputs
(logits within float tolerance), and finished rows must stop being computed."""
from __future__ import annotations

import threading

import pytest
import torch

from core.generation import GenParams, generate_grouped
from core.greedy_decode import plain_greedy
from core.kv_slab import SlabLayer
from core.systems import BASE
from tests.test_batch_prefill import PAD, Tokens, alone, joined, prompts, tiny_lora_llama

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    return tiny_lora_llama()


class Forwards:
    """Records every forward of the model: decode steps (one input token per row) apart from
    prefills, with each decode step's last-position logits."""

    def __init__(self, model):
        self.sizes, self.logits, self.prefills = [], [], 0
        self._handle = model.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs, out):
        if kwargs["input_ids"].shape[1] == 1:
            self.sizes.append(kwargs["input_ids"].shape[0])
            self.logits.append(out.logits[:, -1].float())
        else:
            self.prefills += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def grouped(tiny, ids, adapters, eos, params, on_update=None, cancel=None):
    with Forwards(tiny) as forwards:
        got = generate_grouped(tiny, Tokens(), ids, eos, params, {"adapter_names": adapters},
                               on_update, cancel or threading.Event(), CPU)
    return got, forwards


def test_rows_that_finish_leave_the_batch_and_answer_as_alone_and_as_generate(tiny):
    ids = prompts([5, 6, 30, 33], seed=7)
    adapters = [BASE, "a1", "a2", BASE]
    steps = 8
    free = [alone(tiny, row, a, [], GenParams(max_new_tokens=steps)).text.split()
            for row, a in zip(ids, adapters)]
    eos = sorted({int(free[0][2]), int(free[2][4])})  # rows 0 and 2 end early, at different steps
    params = GenParams(max_new_tokens=steps)
    got, forwards = grouped(tiny, ids, adapters, eos, params)

    expected = [alone(tiny, row, a, eos, params) for row, a in zip(ids, adapters)]
    assert [(g.text, g.new_tokens) for g in got] == [(e.text, e.new_tokens) for e in expected]
    lengths = [g.new_tokens for g in got]
    assert len(set(lengths)) >= 3 and max(lengths) == steps  # rows really end at different steps

    # One decode step per token after the first; a row is in the step for its token t + 1 only
    # while it has not ended, so the batch shrinks as rows finish.
    live = [[r for r in range(4) if lengths[r] > t + 1] for t in range(steps - 1)]
    assert forwards.sizes == [len(rows) for rows in live]
    assert forwards.sizes[0] == 4 and forwards.sizes[-1] < 4

    # The old path: generate over the same joined inputs, every row to the end.
    enc = joined(tiny, ids, adapters, steps - 1)
    with torch.inference_mode():
        old = tiny.generate(**enc, max_new_tokens=steps - 1, do_sample=False, pad_token_id=PAD,
                             eos_token_id=eos, adapter_names=adapters, output_logits=True,
                             return_dict_in_generate=True)
    for r in range(4):
        assert old.sequences[r, -(steps - 1):][:lengths[r] - 1].tolist() == \
            [int(t) for t in got[r].text.split()[1:]]
    for t, rows in enumerate(live):
        assert torch.allclose(forwards.logits[t], old.logits[t][rows], atol=1e-5, rtol=0)


def test_a_row_whose_first_token_is_eos_never_enters_the_decode(tiny):
    ids = prompts([6, 30, 31], seed=2)
    adapters = [BASE, "a1", BASE]
    eos = [int(alone(tiny, ids[0], BASE, [], GenParams(max_new_tokens=1)).text)]
    got, forwards = grouped(tiny, ids, adapters, eos, GenParams(max_new_tokens=4))
    assert got[0].new_tokens == 1 and got[0].text == str(eos[0])
    assert forwards.sizes and set(forwards.sizes) <= {1, 2}


@pytest.mark.parametrize("new_tokens", [1, 2])
def test_one_or_two_new_tokens(tiny, new_tokens):
    ids = prompts([5, 31], seed=8)
    adapters = ["a2", BASE]
    params = GenParams(max_new_tokens=new_tokens)
    got, forwards = grouped(tiny, ids, adapters, [], params)
    expected = [alone(tiny, row, a, [], params) for row, a in zip(ids, adapters)]
    assert [(g.text, g.new_tokens) for g in got] == [(e.text, new_tokens) for e in expected]
    assert forwards.sizes == [2] * (new_tokens - 1)


def test_cancel_mid_decode_stops_before_the_next_step(tiny):
    ids = prompts([9, 9, 9], seed=9)  # one prefill group: its update, then one per decode step
    cancel, updates = threading.Event(), []

    def on_update(texts):
        updates.append(texts)
        if len(updates) == 3:
            cancel.set()
    got, forwards = grouped(tiny, ids, [BASE, "a1", "a2"], [], GenParams(max_new_tokens=10),
                            on_update, cancel)
    assert [g.new_tokens for g in got] == [3, 3, 3]
    assert forwards.sizes == [3, 3]


def test_plain_greedy_only_without_logits_processors(tiny):
    assert plain_greedy(tiny)
    config = tiny.generation_config
    config.repetition_penalty = 1.3
    try:
        assert not plain_greedy(tiny)
    finally:
        config.repetition_penalty = 1.0


def test_a_slab_layer_drops_rows_in_place_and_keeps_its_room():
    keys, values = torch.randn(4, 2, 6, 3), torch.randn(4, 2, 6, 3)
    layer = SlabLayer(keys.clone(), values.clone(), 3)
    layer.batch_select_indices(torch.tensor([1, 3]))
    assert layer.in_place() and layer.capacity == 6
    assert torch.equal(layer.keys, keys[[1, 3], :, :3]) and torch.equal(layer.values, values[[1, 3], :, :3])
    k, v = torch.randn(2, 2, 1, 3), torch.randn(2, 2, 1, 3)
    got_k, got_v = layer.update(k, v)
    assert layer.in_place() and torch.equal(got_k, torch.cat([keys[[1, 3], :, :3], k], 2))
    assert torch.equal(got_v, torch.cat([values[[1, 3], :, :3], v], 2))
    layer.batch_select_indices(torch.tensor([1, 0]))  # not a removal: DynamicLayer's selection
    assert not layer.in_place() and torch.equal(layer.keys, got_k[[1, 0]])
