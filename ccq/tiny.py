"""Tiny random models with working tokenizers and processors, built offline in about a second.

Tests (and dry runs of the CLI) need real architectures loadable through transformers' Auto classes, but no
hub access: these builders write complete model dirs (config, safetensors, tokenizer, chat template,
processor) from transformers' own config classes. Deterministic in `seed`; all dims are multiples of 16.

- `build_tiny_ernie_vl`: ERNIE-4.5-VL (`ernie4_5_vl_moe`), 2 layers by default (dense, then MoE: 4 text and
  4 vision experts, top-2, one shared expert), a 1-block vision tower; `tiny_ernie_vl_config` is its config alone,
  `tiny_ernie_image_inputs` an image+text forward batch for it. Its `Ernie4_5_VLMoeProcessor` needs torchvision (a
  transformers requirement for the video processor); without torchvision the dir gets the tokenizer, chat
  template and image processor only (enough for calibration), and `ernie_processor_available()` says so.
- `build_tiny_model`: a tiny text model of any registered family (Qwen3-MoE, Mixtral, DeepSeek-V3, ...) from its
  adapter's `tiny_config`, saved in the family's checkpoint layout.
- `build_tiny_llava`: a LLaVA (CLIP + Llama) VLM whose processor needs no torchvision: the generic
  image-text path of the evals runs on any machine with it.
- `perturbed_copy`: the same model with relative Gaussian noise on its matrices, a stand-in for a lossy
  compressed copy (non-zero KL and drift without running the quantizer).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

ERNIE_SPECIAL_TOKENS = {
    "image_token": "<|IMAGE_PLACEHOLDER|>", "image_start_token": "<|IMAGE_START|>", "image_end_token": "<|IMAGE_END|>",
    "video_token": "<|VIDEO_PLACEHOLDER|>", "video_start_token": "<|VIDEO_START|>", "video_end_token": "<|VIDEO_END|>",
}
_BASE_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]
_EXTRA_SPECIAL = [*ERNIE_SPECIAL_TOKENS.values(), "<image>", "<think>", "</think>"]

# ERNIE-4.5-VL's prompt layout ("User: ... Picture 1:<|IMAGE_START|>...<|IMAGE_END|>\nAssistant: "), with the
# thinking switch: thinking off (the default) closes an empty <think></think> block in the generation prompt.
ERNIE_CHAT_TEMPLATE = (
    "{{- bos_token -}}{%- set ns = namespace(images=0) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{{- 'Assistant: ' -}}"
    "{%- else -%}{{- 'User: ' if message['role'] == 'user' else '' -}}{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] in ['image', 'image_url'] -%}{%- set ns.images = ns.images + 1 -%}"
    "Picture {{ ns.images }}:<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '</s>' if message['role'] == 'assistant' else '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant: ' -}}"
    "{%- if enable_thinking is defined and enable_thinking -%}<think>"
    "{%- else -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)

# A plain LLaVA-style template (no thinking switch).
LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}{{- message['role'].upper() + ': ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<image>\\n' -}}{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{- '\\n' -}}"
    "{%- endfor -%}{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)


def build_tiny_tokenizer(seed: int = 0, vocab_size: int = 496, named_tokens: dict[str, str] | None = None):
    """A byte-level BPE fast tokenizer trained on `ccq.eval.synthetic.tokenizer_corpus`.

    named_tokens become attributes (tokenizer.image_token, .image_token_id, ...): ERNIE's multimodal
    special tokens by default. The vocabulary is the same whatever the names.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .eval.synthetic import tokenizer_corpus

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_BASE_SPECIAL + _EXTRA_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(seed), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>",
                                   extra_special_tokens=dict(named_tokens or ERNIE_SPECIAL_TOKENS))


def _padded_vocab(tokenizer) -> int:
    return -(-len(tokenizer) // 16) * 16


def ernie_processor_available() -> bool:
    """Whether this environment can build `Ernie4_5_VLMoeProcessor` (its video processor needs torchvision)."""
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


def tiny_ernie_vl_config(layers: int = 2, patch_size: int = 14, tokenizer=None, initializer_range: float = 0.2):
    """The tiny ERNIE-4.5-VL config (`ccq.models.arch.ernie_vl`): layer 0 dense, the others MoE (4 text + 4 vision
    experts, top-2, one shared). Vocabulary size and special-token ids come from `tokenizer`
    (`build_tiny_tokenizer()` when None). The default `initializer_range` is wider than transformers' 0.02 so greedy
    answers vary; 0.02 gives the tamer logits that quantization-error comparisons want.
    """
    from .models.arch import ernie_vl

    tok = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    return ernie_vl.ADAPTER.tiny_config(tok, layers, patch_size=patch_size, initializer_range=initializer_range)


def build_tiny_model(family: str, out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                     layers: int = 2, max_shard_size: str | None = None, **overrides) -> Path:
    """Write a tiny random text model of a registered family (`ccq.models.arch.FAMILIES`) with a tokenizer,
    through transformers' `save_pretrained` (so in the checkpoint layout of the family, per-expert names
    included). transformers' 0.02 init. Returns the dir."""
    from transformers import AutoModelForCausalLM

    from .models.arch import FAMILIES

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(seed)
    config = FAMILIES[family].tiny_config(tok, layers, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tok.save_pretrained(out)
    return out


# The tiny ERNIE that the quantization pipeline tests and bench/pipeline.py quantize: 3 layers (2 MoE), transformers'
# 0.02 init (logits tame enough for quantization-error ratios), 4-px patches and 16x16..32x32-px images (image rows
# of a few dozen tokens).
PIPELINE_ERNIE_OPTIONS = dict(layers=3, patch_size=4, min_image_pixels=16 * 16, max_image_pixels=32 * 32,
                              initializer_range=0.02)


def build_tiny_ernie_vl(out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16, layers: int = 2,
                        patch_size: int = 14, min_image_pixels: int = 56 * 56, max_image_pixels: int = 112 * 112,
                        max_shard_size: str | None = None, initializer_range: float = 0.2) -> Path:
    """Write a tiny random ERNIE-4.5-VL model dir (16-bit weights, tokenizer, chat template, processor).

    The image processor resizes images to `min_image_pixels`..`max_image_pixels` (sides multiples of
    2 * patch_size), so a chart costs a few dozen image tokens; it is written even without torchvision
    (calibration needs only it). `max_shard_size` (e.g. "100KB") writes a sharded checkpoint with an index,
    with Baidu's per-expert tensor names like any `save_pretrained`. Returns the dir.
    """
    from transformers import Ernie4_5_VLMoeForConditionalGeneration
    from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeImageProcessorPil,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(seed)
    config = tiny_ernie_vl_config(layers, patch_size, tok, initializer_range)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Ernie4_5_VLMoeForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tok.chat_template = ERNIE_CHAT_TEMPLATE
    image_processor = Ernie4_5_VLMoeImageProcessorPil(
        patch_size=patch_size, merge_size=2, size={"shortest_edge": min_image_pixels, "longest_edge": max_image_pixels})
    if ernie_processor_available():
        from transformers import Ernie4_5_VLMoeProcessor, Ernie4_5_VLMoeVideoProcessor

        processor = Ernie4_5_VLMoeProcessor(
            image_processor=image_processor, tokenizer=tok,
            video_processor=Ernie4_5_VLMoeVideoProcessor(draw_on_frames=False), chat_template=ERNIE_CHAT_TEMPLATE)
        processor.save_pretrained(out)
    else:
        tok.save_pretrained(out)
        image_processor.save_pretrained(out)
    return out


def tiny_ernie_image_inputs(model_dir: str | Path, text: str = "what is the highest bar", seed: int = 0) -> dict:
    """A random 30x40 image + `text` as one ERNIE-4.5-VL forward batch, built as the calibration sampler builds it."""
    import numpy as np
    from PIL import Image
    from transformers import AutoConfig, AutoTokenizer

    from .calibration.data import image_sample, load_image_processor
    from .models.arch import ernie_vl

    img = Image.fromarray((np.random.default_rng(seed).random((30, 40, 3)) * 255).astype("uint8"))
    return image_sample(img, text, AutoTokenizer.from_pretrained(str(model_dir)), load_image_processor(model_dir),
                        AutoConfig.from_pretrained(str(model_dir)), 64, ernie_vl.ADAPTER)


def build_tiny_llava(out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                     image_size: int = 64) -> Path:
    """Write a tiny random LLaVA (CLIP vision + Llama text) dir with a `LlavaProcessor` (PIL image processor)."""
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(seed, named_tokens={"image_token": "<image>"})
    patch = 16
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=image_size, patch_size=patch),
        text_config=LlamaConfig(vocab_size=_padded_vocab(tok), hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                               vision_feature_select_strategy="default", chat_template=LLAVA_CHAT_TEMPLATE,
                               num_additional_image_tokens=1)
    processor.save_pretrained(out)
    return out


def perturbed_copy(src_dir: str | Path, dst_dir: str | Path, rel_noise: float = 0.05, seed: int = 0) -> Path:
    """Copy a model dir, adding N(0, (rel_noise * std(W))^2) noise to every matrix (>= 2-D floating tensor)."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(src_dir), Path(dst_dir)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for f in sorted(src.glob("*.safetensors")):
        tensors = load_file(f)
        for name in sorted(tensors):
            t = tensors[name]
            if t.is_floating_point() and t.dim() >= 2:
                w = t.float()
                noise = torch.randn(w.shape, generator=gen) * (rel_noise * w.std())
                tensors[name] = (w + noise).to(t.dtype)
        save_file(tensors, dst / f.name, metadata={"format": "pt"})
    return dst

