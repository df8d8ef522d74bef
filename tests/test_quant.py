"""MODEL_QUANT (core.quant): the setting and its one-line refusal; on a tiny random Llama, fp16
logits against fp32, LoRA adapters attached to the quantized layers (peft's forward and the per-row
path), the refusals (training through fp16, quantizing a peft model); on the real 135M model, the
same answers as float32, mixed-adapter batches equal solo answers, and the trainer's fp32 model.

Tolerance: fp16 rounds each weight to 11 significant bits (relative error <= 2**-11); with fp32
accumulation the 135M model's logits moved by at most ~0.03 (of values up to ~40) when measured.
The tests allow 0.1 there and 1e-2 on the tiny model (logits near 1), and ask for the same argmax."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from core import quant
from core.generation import GenParams
from core.mixed_lora import install, uninstall
from core.models import ModelHub
from core.systems import BASE
from tests.test_mixed_lora import PAD, VOCAB, batch, lora

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- the setting (no model)


def test_model_quant_parses_and_refuses_unknown_values():
    assert quant.mode({}) == "none" and quant.mode({"MODEL_QUANT": " FP16 "}) == "fp16"
    for bad in ("int8", "fp8", "yes"):
        with pytest.raises(ValueError, match=f"MODEL_QUANT must be one of none, fp16, not '{bad}'"):
            quant.mode({"MODEL_QUANT": bad})
    with pytest.raises(ValueError, match="MODEL_QUANT must be one of"):
        ModelHub(quantization="int4")


def test_app_start_with_a_bad_model_quant_is_one_line():
    env = {**os.environ, "MODEL_QUANT": "int4"}
    done = subprocess.run([sys.executable, "app.py"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == "MODEL_QUANT must be one of none, fp16, not 'int4'."


# ---------------------------------------------------------------- a tiny random Llama (no weights)


def tiny(seed: int = 0) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=PAD)).eval()


def with_adapters(model: nn.Module) -> nn.Module:
    from peft import get_peft_model

    torch.manual_seed(1)
    peft_model = get_peft_model(model, lora(2, ["q_proj", "v_proj"]), adapter_name="r2")
    peft_model.add_adapter("r8", lora(8, ["v_proj", "up_proj", "down_proj"]))
    return peft_model.eval()


def logits(model, inputs, **kwargs):
    with torch.inference_mode():
        return model(**inputs, **kwargs).logits


def test_fp16_logits_are_close_to_fp32():
    fp32, fp16 = tiny(), tiny()
    assert quant.quantize(fp16) == 2 * 7 + 1  # q k v o gate up down per block, and the LM head
    inputs = batch([5, 9, 3])
    want, got = logits(fp32, inputs), logits(fp16, inputs)
    assert 0 < (want - got).abs().max() < 1e-2  # changed (fp16 weights), but only by rounding
    assert torch.equal(want.argmax(-1), got.argmax(-1))
    assert fp16.model.embed_tokens.weight.dtype == torch.float32


def test_adapters_on_fp16_layers_stay_fp32_and_mixed_rows_equal_solo():
    fp32, fp16 = with_adapters(tiny()), tiny()
    quant.quantize(fp16)
    fp16 = with_adapters(fp16)  # the order ModelHub uses: quantize at load, adapters afterwards
    layer = fp16.base_model.model.model.layers[0].self_attn.v_proj
    assert isinstance(layer.base_layer, quant.Fp16Linear)
    assert {layer.lora_A[n].weight.dtype for n in ("r2", "r8")} == {torch.float32}
    assert install(fp16) == 2 * 4  # every LoRA layer (q, v, up, down) takes the per-row path
    inputs, rows = batch([4, 7, 2, 6]), [BASE, "r2", "r8", "r2"]
    mixed = logits(fp16, inputs, adapter_names=rows)
    for i, name in enumerate(rows):
        one = {k: v[i:i + 1] for k, v in inputs.items()}
        solo = logits(fp16, one, adapter_names=[name])
        assert torch.allclose(mixed[i], solo[0], atol=1e-5)
        assert torch.equal(mixed[i].argmax(-1), logits(fp32, one, adapter_names=[name])[0].argmax(-1))
    uninstall(fp16)
    assert torch.allclose(logits(fp16, inputs, adapter_names=rows), mixed, atol=1e-5)  # peft's loop
    assert not torch.allclose(mixed[1], mixed[2], atol=1e-3)  # the adapters do change the rows


def test_training_through_fp16_layers_and_quantizing_a_peft_model_are_refused():
    model = tiny()
    quant.quantize(model)
    from peft import get_peft_model

    trainable = get_peft_model(model, lora(4, ["q_proj"]))
    trainable.train()
    with pytest.raises(RuntimeError, match="cannot be trained"):
        trainable(**batch([5]))
    with pytest.raises(ValueError, match="before attaching LoRA adapters"):
        quant.quantize(with_adapters(tiny()))


def test_apply_skips_cuda_with_a_log_line(caplog):
    model = tiny()
    with caplog.at_level(logging.INFO, logger="core.quant"):
        assert quant.apply(model, "fp16", torch.device("cuda"), "tiny") == "none"
    assert "MODEL_QUANT=fp16 ignored for tiny" in caplog.text
    assert not any(isinstance(m, quant.Fp16Linear) for m in model.modules())
    assert quant.apply(model, "none", torch.device("cpu"), "tiny") == "none"


# ---------------------------------------------------------------- the real 135M model

PROMPTS = [
    "Answer the question using the context.\n\nContext: The Eiffel Tower is a wrought-iron lattice "
    "tower in Paris. It was completed in 1889 for the World's Fair.\n\nQuestion: When was the "
    "Eiffel Tower completed?",
    "What is the capital of France?",
    "Write a short story about a lighthouse keeper.",
]
SHORT = GenParams(max_new_tokens=24)


@pytest.fixture(scope="module")
def hubs():
    from core.model_files import SMOLLM2

    made = {q: ModelHub(batch_window_ms=0, quantization=q) for q in ("none", "fp16")}
    for hub in made.values():
        hub.load(SMOLLM2)
    return made


@pytest.mark.integration
def test_fp16_model_logits_and_greedy_answers_match_fp32(hubs):
    from core.model_files import SMOLLM2

    fp32, fp16 = hubs["none"].load(SMOLLM2), hubs["fp16"].load(SMOLLM2)
    assert fp32.quantization == "none" and fp16.quantization == "fp16"
    assert isinstance(fp16.model.lm_head, quant.Fp16Linear)
    ids = torch.tensor([fp32.tokenizer(PROMPTS[0])["input_ids"]])
    want, got = logits(fp32.model, {"input_ids": ids}), logits(fp16.model, {"input_ids": ids})
    assert 0 < (want - got).abs().max() < 0.1
    assert torch.equal(want.argmax(-1), got.argmax(-1))
    answers = {q: [g.text for g in hub.generate(SMOLLM2, PROMPTS, params=SHORT)] for q, hub in hubs.items()}
    assert answers["fp16"] == answers["none"]
    assert "1889" in answers["fp16"][0]


@pytest.mark.integration
def test_adapters_attach_to_the_fp16_model_and_mixed_rows_equal_solo(hubs, tmp_path):
    from core.model_files import SMOLLM2
    from tests.servers import make_lora_adapters

    folders = make_lora_adapters(tmp_path, ["a1", "a2"])
    hub = hubs["fp16"]
    for name, folder in folders.items():
        hub.load_adapter(SMOLLM2, str(folder), name=name)
    rows = [BASE, "a1", BASE, "a2"]
    mixed = [g.text for g in hub.generate(SMOLLM2, [PROMPTS[0]] * 4, rows, SHORT)]
    solo = [hub.generate(SMOLLM2, [PROMPTS[0]], [name], SHORT)[0].text for name in rows]
    assert mixed == solo
    assert mixed[0] != mixed[1] and mixed[1] != mixed[3]  # the adapters change the answers


@pytest.mark.integration
def test_the_trainer_loads_fp32_weights_whatever_model_quant_says(monkeypatch):
    from core.model_files import SMOLLM2, model_path
    from jobs.finetune import load_lora_model
    from jobs.finetune_data import FinetuneSpec

    monkeypatch.setenv("MODEL_QUANT", "fp16")
    model = load_lora_model(FinetuneSpec(base_model=SMOLLM2), model_path(SMOLLM2), torch.device("cpu"), 0)
    assert not any(isinstance(m, quant.Fp16Linear) for m in model.modules())
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model.train()
    model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
