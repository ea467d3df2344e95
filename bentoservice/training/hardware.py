"""Where training runs: the CPU, a CUDA GPU (bf16/fp16, QLoRA through bitsandbytes) or Intel Gaudi (optimum-habana).

bitsandbytes and optimum-habana are imported only on their own paths; neither is needed elsewhere.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from bentoservice.training.config import TrainingError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, Trainer, TrainerCallback

log = logging.getLogger(__name__)

Device = Literal["cpu", "cuda", "hpu"]


def detect_device() -> Device:
    # habana_frameworks ships only inside Habana's images: its presence means a Gaudi machine.
    if importlib.util.find_spec("habana_frameworks") is not None:
        return "hpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _cuda_half() -> torch.dtype:
    import torch

    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def precision(device: Device, args: dict[str, Any]) -> dict[str, bool]:
    """The fp16/bf16 flags that work on `device`, given what the user asked for."""
    fp16, bf16 = bool(args.get("fp16")), bool(args.get("bf16"))
    if device == "cpu":
        if fp16 or bf16:
            log.warning("fp16/bf16 mixed precision needs a GPU: training in fp32 on the CPU")
        return {"fp16": False, "bf16": False}
    if device == "hpu":
        if fp16:
            log.warning("Gaudi trains in bf16: ignoring fp16=True")
        return {"fp16": False, "bf16": True}
    import torch

    if fp16 and not bf16:
        return {"fp16": True, "bf16": False}
    bf16_ok = _cuda_half() == torch.bfloat16
    if bf16 and not bf16_ok:
        log.warning("this GPU has no bf16: training in fp16")
    return {"fp16": not bf16_ok, "bf16": bf16_ok}


def check_adapter_type(adapter_type: str, device: Device) -> None:
    if adapter_type != "qlora":
        return
    if device != "cuda":
        raise TrainingError(
            f"QLoRA needs a CUDA GPU (4-bit weights through bitsandbytes); this machine trains on "
            f"{device}: use adapter_type='lora'"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise TrainingError("QLoRA needs bitsandbytes: pip install bitsandbytes")


def load_model(path: Path, device: Device, adapter_type: str) -> PreTrainedModel:
    """The base model in the dtype (or 4-bit quantisation) that suits `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    check_adapter_type(adapter_type, device)
    if adapter_type == "qlora":
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=_cuda_half(),
        )
        return AutoModelForCausalLM.from_pretrained(
            path, quantization_config=quantization, dtype=_cuda_half(), device_map={"": 0}
        )
    if device == "hpu":
        # The Gaudi stack pins transformers 4.55, which calls this argument torch_dtype.
        return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16)
    dtype = _cuda_half() if device == "cuda" else torch.float32
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def gaudi_trainer(
    model: PreTrainedModel,
    args: dict[str, Any],
    train_dataset: Any,
    eval_dataset: Any,
    data_collator: Any,
    callbacks: list[TrainerCallback],
) -> Trainer:
    """A GaudiTrainer for tokenized rows with labels (optimum-habana's TRL wrappers lag TRL's API)."""
    from optimum.habana import GaudiConfig, GaudiTrainer, GaudiTrainingArguments

    gaudi_config = GaudiConfig(use_torch_autocast=True, use_fused_adam=True, use_fused_clip_norm=True)
    training_args = GaudiTrainingArguments(use_habana=True, use_lazy_mode=True, **args)
    return GaudiTrainer(
        model=model,
        gaudi_config=gaudi_config,
        args=training_args,
        data_collator=data_collator,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        callbacks=callbacks,
    )
