"""Grouped prefill (core.batch_prefill, generate_grouped) on a tiny random Llama with two random
LoRA adapters: no weights are read, so these run in the fast suite. Greedy answers of a mixed batch
must equal each row answered alone, and the short prompts' first tokens must come first."""
from __future__ import annotations

import threading

import pytest
import torch

from core.batch_prefill import distinct_rows, join, joinable, length_groups, prefill_group
from core.generation import GenParams, generate_batch, generate_grouped
from core.kv_slab import SlabLayer
from core.prefix_cache import batch_inputs, prefill
from core.systems import BASE

VOCAB, PAD = 96, 0


class Tokens:
    """A stand-in tokenizer: a text is its ids, space-separated."""

    pad_token_id = PAD

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


@pytest.fixture(scope="module")
def model():
    return tiny_lora_llama()


def tiny_lora_llama():
    """A 2-layer random Llama with two random LoRA adapters, a1 and a2."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=PAD))
    lora = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(base, LoraConfig(**lora), adapter_name="a1")
    peft_model.add_adapter("a2", LoraConfig(**lora))
    return peft_model.eval()


def prompts(lengths, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def alone(model, ids, adapter, eos, params):
    enc = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones((1, len(ids)), dtype=torch.long)}
    return generate_batch(model, Tokens(), enc, eos, params, {"adapter_names": [adapter]}, None,
                          threading.Event())[0]


def test_length_groups_pad_little_and_put_short_prompts_first():
    assert length_groups([600, 40, 620, 41]) == [[1, 3], [0, 2]]
    assert length_groups([10, 10, 10]) == [[0, 1, 2]]
    assert length_groups([10, 20]) == [[0], [1]]
    assert length_groups([]) == []


def test_distinct_rows_share_a_prefill_only_for_the_same_prompt_and_adapter():
    ids = [[1, 2], [1, 2], [1, 2], [3]]
    assert distinct_rows(ids, {"adapter_names": [BASE, BASE, "a1", BASE]}) == [0, 0, 2, 3]
    assert distinct_rows(ids, {}) == [0, 0, 0, 3]


def test_grouped_batch_answers_each_row_as_alone_and_short_rows_first(model):
    ids = prompts([5, 40, 5, 38, 12, 40])
    ids[2] = ids[0]  # the same prompt under another adapter, and one exact duplicate row
    ids[5] = ids[1]
    adapters = [BASE, BASE, "a1", "a2", "a1", BASE]
    params = GenParams(max_new_tokens=6)
    snapshots = []
    got = generate_grouped(model, Tokens(), ids, [], params, {"adapter_names": adapters},
                           snapshots.append, threading.Event(), torch.device("cpu"))
    expected = [alone(model, row, a, [], params) for row, a in zip(ids, adapters)]
    assert [g.text for g in got] == [e.text for e in expected]
    assert all(g.new_tokens == 6 and g.prompt_tokens == len(row) for g, row in zip(got, ids))
    # The first update comes from the short prompts' prefill, before the long ones are read.
    assert [bool(t) for t in snapshots[0]] == [True, False, True, False, False, False]
    assert max(got[i].first_token_seconds for i in (0, 2)) < min(got[i].first_token_seconds
                                                                 for i in (1, 3, 5))


def test_a_row_ending_at_its_first_token_stops_there_and_the_rest_go_on(model):
    ids = prompts([6, 30, 31], seed=2)
    adapters = [BASE, "a1", BASE]
    params = GenParams(max_new_tokens=5)
    eos = [int(alone(model, ids[0], BASE, [], GenParams(max_new_tokens=1)).text)]
    got = generate_grouped(model, Tokens(), ids, eos, params, {"adapter_names": adapters}, None,
                           threading.Event(), torch.device("cpu"))
    expected = [alone(model, row, a, eos, params) for row, a in zip(ids, adapters)]
    assert got[0].new_tokens == 1 and got[0].text == str(eos[0])
    assert [(g.text, g.new_tokens) for g in got] == [(e.text, e.new_tokens) for e in expected]


def test_seeded_sampling_repeats(model):
    ids = prompts([7, 33], seed=3)
    params = GenParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=5)

    def run():
        return [g.text for g in generate_grouped(model, Tokens(), ids, [], params,
                                                 {"adapter_names": [BASE, "a2"]}, None,
                                                 threading.Event(), torch.device("cpu"))]
    assert run() == run()


def test_a_cancelled_batch_stops_after_its_first_group(model):
    cancel = threading.Event()
    got = generate_grouped(model, Tokens(), prompts([4, 30]), [], GenParams(max_new_tokens=8),
                           {"adapter_names": [BASE, BASE]}, lambda texts: cancel.set(), cancel,
                           torch.device("cpu"))
    assert [g.new_tokens for g in got] == [1, 0]


def joined(model, ids, adapters, room):
    """join's generate inputs for these rows, prefilled in two groups (short, long)."""
    short = [i for i, row in enumerate(ids) if len(row) < 20]
    parts = [prefill_group(model, ids, rows, PAD, torch.device("cpu"),
                           {"adapter_names": [adapters[r] for r in rows]})
             for rows in (short, [i for i in range(len(ids)) if i not in short])]
    first = {r: int(t) for p in parts for r, t in zip(p.rows, p.logits.argmax(-1))}
    return join(parts, list(range(len(ids))), ids, [first[i] for i in range(len(ids))], PAD,
                torch.device("cpu"), room)


@pytest.mark.parametrize("stop_early", [False, True])
def test_the_joined_cache_decodes_as_a_dynamic_cache_in_place(model, stop_early):
    from transformers import DynamicCache

    ids = prompts([4, 6, 35, 40], seed=4)
    adapters = [BASE, "a1", BASE, "a2"]
    steps = 7

    def decode(eos, cache_of):
        enc = joined(model, ids, adapters, steps)
        enc["past_key_values"] = cache_of(enc["past_key_values"])
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=steps, do_sample=False, pad_token_id=PAD,
                                 eos_token_id=eos, adapter_names=adapters, output_logits=True,
                                 return_dict_in_generate=True)
        return out, enc["past_key_values"]

    eos = []
    if stop_early:  # the short base row's third decoded token ends it; the others run on
        eos = [int(decode([], lambda cache: cache)[0].sequences[0, 2 - steps])]
    slab, cache = decode(eos, lambda cache: cache)
    dynamic, _ = decode(eos, lambda cache: DynamicCache([(layer.keys, layer.values) for layer in cache.layers]))
    assert torch.equal(slab.sequences, dynamic.sequences)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=0) for a, b in zip(slab.logits, dynamic.logits))
    finished = (slab.sequences[:, -steps:] == eos[0]).any(1) if eos else torch.zeros(4, dtype=torch.bool)
    assert finished.tolist() == [stop_early, False, False, False]
    assert len(slab.logits) == steps  # a row still running: every step was taken
    # The decode filled the buffers exactly (it writes the fed first token and steps - 1 decoded
    # ones; the last decoded token is never fed back) and never fell back to concatenation.
    width = max(map(len, ids))
    for layer in cache.layers:
        assert isinstance(layer, SlabLayer) and layer.in_place()
        assert (layer.keys.shape[2], layer.capacity) == (width + steps, width + steps)


def test_a_batch_on_a_cached_prefix_decodes_in_place_as_on_a_dynamic_cache(model):
    from transformers import DynamicCache

    head, suffixes, steps = prompts([12])[0], prompts([3, 9, 5], seed=5), 6
    with torch.inference_mode():
        prefix = prefill(model, head, torch.device("cpu"), {"adapter_names": [BASE]})
        outs = []
        for on_slab in (True, False):
            enc = batch_inputs(prefix, head, suffixes, PAD, torch.device("cpu"), full_ids=True,
                               room=steps - 1)
            cache = enc["past_key_values"]
            if not on_slab:
                enc["past_key_values"] = DynamicCache([(layer.keys, layer.values) for layer in cache.layers])
            outs.append(model.generate(**enc, max_new_tokens=steps, do_sample=False, pad_token_id=PAD,
                                       adapter_names=[BASE] * 3, output_logits=True,
                                       return_dict_in_generate=True))
            if on_slab:
                assert all(layer.in_place() and layer.keys.shape[2] == layer.capacity == 12 + 9 + steps - 1
                           for layer in cache.layers)
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=0) for a, b in zip(outs[0].logits, outs[1].logits))


def test_a_slab_layer_writes_in_place_and_falls_back_when_full():
    keys, values = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    layer = SlabLayer(keys.clone(), values.clone(), 2)
    steps = [(torch.randn(2, 3, n, 4), torch.randn(2, 3, n, 4)) for n in (1, 2, 1)]
    for n, (k, v) in enumerate(steps):
        got_k, got_v = layer.update(k, v)
        assert layer.in_place() == (n < 2)  # 2 + 1 + 2 slots fit; the last step overflows
    assert torch.equal(got_k, torch.cat([keys[:, :, :2], *(k for k, _ in steps)], 2))
    assert torch.equal(got_v, torch.cat([values[:, :, :2], *(v for _, v in steps)], 2))


def test_only_plain_attention_caches_are_joined(model):
    from transformers import MistralConfig

    assert joinable(model.config)
    assert not joinable(MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      sliding_window=16))
