"""Load a model dir for evaluation: a 16-bit transformers checkpoint or a ccq-packed one.

Only local dirs (nothing is fetched from a hub). A dir whose config.json says
`quantization_config.quant_method == "ccq"` goes through `ccq.load`; anything else through transformers'
Auto classes (image-text-to-text first, plain causal LM for text-only models).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class EvalModel:
    """A model ready for forward/generate, with what tokenizes its inputs."""

    path: Path
    model: Any
    tokenizer: Any
    processor: Any | None
    quantized: bool

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' means bfloat16 on an accelerator and float32 on CPU (CPU bf16 matmuls are slow and coarse)."""
    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (choose auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def read_model_config(path: str | Path) -> dict:
    """config.json of a model dir, with one-line errors for a missing dir or file."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model dir {path} does not exist")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{cfg} not found: {path} is not a model dir")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg} is not valid JSON ({e})") from None


def load_processor(path: str | Path):
    """The model's multimodal processor; a ValueError naming the dir when it has none (or it cannot load)."""
    from transformers import AutoProcessor

    from transformers.utils import is_torchvision_available

    hint = ""
    if read_model_config(path).get("model_type", "").startswith("ernie4_5_vl") and not is_torchvision_available():
        hint = "; note that ERNIE-4.5-VL's processor needs torchvision, which is not installed"
    if not any((Path(path) / f).is_file() for f in ("processor_config.json", "preprocessor_config.json")):
        raise ValueError(f"{path} has no processor (processor_config.json / preprocessor_config.json): "
                         f"chartqa needs the model's own processor{hint}")
    try:
        processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, ImportError, KeyError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: cannot load the model's processor ({first}){hint}") from None
    if getattr(processor, "image_processor", None) is None:
        raise ValueError(f"{path} has no image processor (processor_config.json / preprocessor_config.json): "
                         "chartqa needs the model's own processor")
    return processor


def load_for_eval(path: str | Path, device: str = "cpu", dtype: str = "auto", need_processor: bool = False) -> EvalModel:
    """Load a model dir (16-bit or ccq-packed) with its tokenizer, and its processor when need_processor.

    device: 'cpu', 'cuda', 'cuda:N' or 'auto' (accelerate's device_map='auto' across the visible GPUs).
    """
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    path = Path(path)
    config = read_model_config(path)
    processor = load_processor(path) if need_processor else None
    try:
        tokenizer = processor.tokenizer if processor is not None else AutoTokenizer.from_pretrained(
            str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot load the tokenizer ({str(e).strip().splitlines()[0]})") from None
    torch_dtype = resolve_dtype(dtype, "cuda" if device == "auto" else device.split(":")[0])
    quantized = (config.get("quantization_config") or {}).get("quant_method") == "ccq"
    if quantized:
        from ..format import loader  # ccq.load

        if device == "auto":
            model = loader.load(str(path), dtype=torch_dtype, device_map="auto")
        else:
            model = loader.load(str(path), device=device, dtype=torch_dtype)
    else:
        auto_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        if type(auto_config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
            from transformers import AutoModelForImageTextToText as auto_cls
        else:
            from transformers import AutoModelForCausalLM as auto_cls
        model = auto_cls.from_pretrained(str(path), dtype=torch_dtype, device_map=device, local_files_only=True)
    model.eval()
    return EvalModel(path=path, model=model, tokenizer=tokenizer, processor=processor, quantized=quantized)
