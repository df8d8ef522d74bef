"""MODEL_QUANT: an opt-in reduced-precision base model for CPU decode.

Batch-1 decode on CPU is bound by reading the weights: every step reads every Linear's weight
once. `fp16` stores each base nn.Linear of a model loaded on CPU (attention and MLP projections,
and the LM head, which for SmolLM2-135M is a third of the bytes a step reads) as fbgemm's packed
fp16 matrix, half the bytes, and multiplies it with fp32 activations, accumulating in fp32
(`torch.fbgemm_linear_fp16_weight`). The embeddings, norms and LoRA A/B matrices stay fp32.
README "Benchmarks" has the speed and the answers it changes; int8 was measured and dropped.

`Fp16Linear` subclasses nn.Linear so peft wraps it like any Linear (a lora.Linear whose
`base_layer` it is), and core.mixed_lora's per-row path calls it as the base layer. fbgemm's packed
matrix cannot be read back, so the layer also keeps its weight as a plain fp16 tensor (`weight`,
never used for the matmul): peft reads a base layer's weight for its shape, device and dtype, and
`compute_dtype` (the bitsandbytes convention peft follows) tells it to keep the LoRA matrices fp32.
Memory is therefore about what float32 took (2 + 2 bytes per weight, plus a tied LM head now held
apart from its fp32 embedding); a decode step reads half of it.
The order is fixed: a model is quantized when ModelHub loads it, before any adapter is attached
(`quantize` refuses a peft model), and adapters attach to the quantized layers afterwards.

fbgemm's fp16 GEMM has no backward: fine-tuning (jobs/finetune.py) loads its own fp32 model and
never comes here, and a forward that would need gradients through these weights is refused.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Mapping

import torch
from torch import nn

logger = logging.getLogger(__name__)

MODES = ("none", "fp16")

# torch 2.13 marks these two ops deprecated (a one-time warning) without a replacement of the same
# speed: torch.ops.quantized.linear_dynamic_fp16 computes the same but costs ~20 us more per call
# (210 calls per decode step here). The warning would only repeat this.
warnings.filterwarnings("ignore", message=r"fbgemm_(pack_gemm_matrix_fp16|linear_fp16_weight"
                                          r"_fp32_activation) is deprecated")


def mode(env: Mapping[str, str] = os.environ) -> str:
    """MODEL_QUANT: `none` (default) or `fp16`."""
    value = env.get("MODEL_QUANT", "").strip().lower() or "none"
    if value not in MODES:
        raise ValueError(f"MODEL_QUANT must be one of {', '.join(MODES)}, not '{env['MODEL_QUANT']}'.")
    return value


class Fp16Linear(nn.Linear):
    """An inference-only Linear over fbgemm's packed fp16 copy of a Linear's weight."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = torch.float32  # activations, and the LoRA matrices peft attaches
        weight = linear.weight.detach().float().contiguous()
        self.weight = nn.Parameter(weight.half(), requires_grad=False)
        # An opaque handle (a uint8 tensor owning fbgemm's packed matrix), not module state: it
        # stays out of state_dict, and copying its bytes would copy a pointer (see __deepcopy__).
        self._packed = torch.fbgemm_pack_gemm_matrix_fp16(weight)
        self.bias = linear.bias
        zeros = torch.zeros(self.out_features)  # fbgemm takes a bias tensor, never None
        self._bias = zeros if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("A model quantized with MODEL_QUANT=fp16 cannot be trained (fbgemm's "
                               "fp16 matmul has no backward): fine-tune on the float32 model.")
        return torch.fbgemm_linear_fp16_weight(x.float().contiguous(), self._packed, self._bias)

    def __deepcopy__(self, memo: dict) -> Any:
        raise TypeError("An Fp16Linear holds a pointer to fbgemm's packed weight and cannot be "
                        "copied: load the model again.")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight=fp16 (fbgemm packed)"


def quantize(model: nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Replace the model's nn.Linear layers by Fp16Linear, in place, except those whose qualified
    name is in `skip`; returns how many. A model must be quantized before adapters are attached."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError("Quantize the base model before attaching LoRA adapters.")
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and name not in skip]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, Fp16Linear(linear))
    return len(targets)


def apply(model: nn.Module, quantization: str, device: torch.device, ref: str) -> str:
    """Quantize a freshly loaded base model as `quantization` says where it applies; returns what
    was applied ("none" or "fp16"). CUDA models keep their dtype (bf16 there), and a torch
    without fbgemm (e.g. an ARM build) cannot pack fp16: both are logged and skipped."""
    if quantization == "none":
        return "none"
    if device.type != "cpu":
        logger.info("MODEL_QUANT=%s ignored for %s: it is a CPU path (the model is on %s)",
                    quantization, ref, device.type)
        return "none"
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        logger.info("MODEL_QUANT=%s ignored for %s: this torch build has no fbgemm", quantization, ref)
        return "none"
    count = quantize(model)
    logger.info("MODEL_QUANT=%s: %d Linear layers of %s packed as fp16", quantization, count, ref)
    return quantization
