"""The per-row LoRA path (core.mixed_lora) against peft's own mixed-adapter loop, on a tiny random
Llama with random adapters of different ranks and target modules: no weights are read, so these
run in the fast suite."""
from __future__ import annotations

import threading

import pytest
import torch
from peft.tuners.lora import LoraLayer

from core.generation import GenParams, generate_batch, generate_grouped
from core.mixed_lora import install, uninstall
from core.systems import BASE

VOCAB, PAD = 96, 0
ROWS = [BASE, "r2", "r4", BASE, "r8", "r4"]
LAYERS = 2 * 6  # 2 blocks x the union of the adapters' targets: q, k, v, o, up, down


class Tokens:
    """A stand-in tokenizer: a text is its ids, space-separated."""

    pad_token_id = PAD

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def lora(r, targets, **extra):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False, target_modules=targets, **extra)


@pytest.fixture
def model():
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=PAD))
    peft_model = get_peft_model(base, lora(2, ["q_proj", "v_proj"]), adapter_name="r2")
    peft_model.add_adapter("r4", lora(4, ["q_proj", "k_proj", "v_proj", "o_proj"]))
    peft_model.add_adapter("r8", lora(8, ["v_proj", "up_proj", "down_proj"], use_rslora=True))
    return peft_model.eval()


@pytest.fixture
def peft_loops(monkeypatch):
    """How many layer calls went through peft's own loop."""
    calls = []
    loop = LoraLayer._mixed_batch_forward

    def counted(self, *args, **kwargs):
        calls.append(self)
        return loop(self, *args, **kwargs)

    monkeypatch.setattr(LoraLayer, "_mixed_batch_forward", counted)
    return calls


def batch(lengths, seed=1):
    """Left-padded random prompts."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(1, VOCAB, (n,), generator=generator)
        mask[i, width - n:] = 1
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, inputs, rows):
    with torch.inference_mode():
        return model(**inputs, adapter_names=rows).logits


def test_per_row_logits_equal_peft_mixed_forward(model, peft_loops):
    inputs = batch([9, 4, 9, 7, 2, 9])
    expected = logits(model, inputs, ROWS)
    assert len(peft_loops) == LAYERS  # peft looped in every LoRA layer
    assert install(model) == LAYERS
    peft_loops.clear()
    got = logits(model, inputs, ROWS)
    assert peft_loops == []
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # The adapters change the logits, and base rows are the plain model's.
    with model.disable_adapter(), torch.inference_mode():
        plain = model(**inputs).logits
    assert (got[0] - plain[0]).abs().max() == 0 and (got[3] - plain[3]).abs().max() == 0
    assert all((got[i] - plain[i]).abs().max() > 1e-3 for i in (1, 2, 4, 5))


def test_greedy_mixed_batch_answers_each_row_as_alone_and_as_peft(model):
    generator = torch.Generator().manual_seed(2)
    ids = [torch.randint(1, VOCAB, (n,), generator=generator).tolist() for n in (5, 30, 5, 28, 12, 30)]
    params = GenParams(max_new_tokens=6)

    def grouped():
        return [g.text for g in generate_grouped(model, Tokens(), ids, [], params,
                                                 {"adapter_names": ROWS}, None, threading.Event(),
                                                 torch.device("cpu"))]

    peft_texts = grouped()
    install(model)
    texts = grouped()
    alone = []
    for row, name in zip(ids, ROWS):
        enc = {"input_ids": torch.tensor([row]), "attention_mask": torch.ones((1, len(row)), dtype=torch.long)}
        alone.append(generate_batch(model, Tokens(), enc, [], params, {"adapter_names": [name]}, None,
                                    threading.Event())[0].text)
    assert texts == alone == peft_texts
    assert len(set(texts)) > 1


def test_a_replaced_adapter_is_used_after_install(model, peft_loops):
    inputs = batch([6, 6, 6])
    install(model)
    before = logits(model, inputs, [BASE, "r4", "r2"])
    model.delete_adapter("r4")
    torch.manual_seed(7)
    model.add_adapter("r4", lora(4, ["q_proj", "v_proj"]))
    model.eval()
    install(model)
    after = logits(model, inputs, [BASE, "r4", "r2"])
    assert peft_loops == []
    uninstall(model)
    torch.testing.assert_close(after, logits(model, inputs, [BASE, "r4", "r2"]), atol=1e-5, rtol=0)
    assert (after[1] - before[1]).abs().max() > 1e-3
    torch.testing.assert_close(after[2], before[2], atol=1e-5, rtol=0)


def test_what_the_path_does_not_cover_runs_peft_loop(model, peft_loops):
    model.add_adapter("biased", lora(4, ["q_proj"], lora_bias=True))
    model.eval()
    install(model)
    inputs = batch([5, 5, 5])
    rows = [BASE, "biased", "r2"]
    got = logits(model, inputs, rows)
    assert len(peft_loops) == 2  # only the q_proj layers, where a row names the biased adapter
    logits(model, inputs, [BASE, "r2", "r4"])
    assert len(peft_loops) == 2
    with torch.enable_grad():  # gradients on: peft's loop everywhere
        model(**inputs, adapter_names=[BASE, "r2", "r4"])
    assert len(peft_loops) == 2 + LAYERS
    uninstall(model)
    torch.testing.assert_close(got, logits(model, inputs, rows), atol=1e-5, rtol=0)
