"""Calibration samples from a local dataset, read through `datasets`.

Text rows (column `text`, else the first string column) are joined and cut into windows
of `seq_len` tokens. Rows with an image (column `image`: a PIL image, a path, or
{"bytes": ...}) become image+text samples for vision-language families: the image processor
from model_dir gives the patches and the family's adapter lays out the tokens
(`Adapter.image_sample`). At most `samples` samples in all: image samples take up to half when
both kinds are present.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text",
            ".arrow": "arrow"}


def load_rows(path):
    """A `datasets.Dataset` from a local file or folder (saved dataset or data files)."""
    import datasets

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"calibration dataset {p} not found")
    try:
        if p.is_dir():
            if (p / "dataset_info.json").exists() or (p / "state.json").exists() or (p / "dataset_dict.json").exists():
                ds = datasets.load_from_disk(str(p))
            else:
                ds = datasets.load_dataset(str(p), split="train")
        else:
            builder = BUILDERS.get(p.suffix.lower())
            if builder is None:
                raise ValueError(f"calibration dataset {p}: unsupported file type {p.suffix!r} "
                                 f"(use {', '.join(sorted(BUILDERS))} or a saved dataset folder)")
            ds = datasets.load_dataset(builder, data_files=str(p), split="train")
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:  # datasets raises many types for unreadable files
        raise ValueError(f"calibration dataset {p} is not readable: {str(e).splitlines()[0]}") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    return ds


def _text_column(ds) -> str | None:
    if "text" in ds.column_names:
        return "text"
    for name, feat in ds.features.items():
        if getattr(feat, "dtype", None) == "string":
            return name
    return None


def _image(v):
    from PIL import Image

    if isinstance(v, dict) and v.get("bytes") is not None:
        v = Image.open(io.BytesIO(v["bytes"]))
    elif isinstance(v, dict) and v.get("path"):
        v = Image.open(v["path"])
    elif isinstance(v, str):
        v = Image.open(v)
    return v.convert("RGB")


def calibration_batches(path, model_dir, config, samples: int, seq_len: int, adapter) -> list[dict]:
    """Model input dicts (batch of 1 each), deterministic for the same inputs."""
    from transformers import AutoTokenizer

    ds = load_rows(path)
    text_col = _text_column(ds)
    img_col = "image" if "image" in ds.column_names and adapter.takes_images else None
    if text_col is None and img_col is None:
        raise ValueError(f"calibration dataset {path} has no text or image column (columns: {ds.column_names})")
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:
        raise ValueError(f"{model_dir}: cannot load the tokenizer for calibration: {str(e).splitlines()[0]}") from None
    texts, images = [], []
    for row in ds:
        t = row.get(text_col) if text_col else None
        if img_col and row.get(img_col) is not None:
            images.append((row[img_col], t or ""))
        elif isinstance(t, str) and t.strip():
            texts.append(t)
    n_img = min(len(images), samples // 2 if texts else samples)
    proc = load_image_processor(model_dir) if n_img else None
    out = [image_sample(img, t, tok, proc, config, seq_len, adapter) for img, t in images[:n_img]]
    if texts:
        ids = tok("\n\n".join(texts), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        for start in range(0, len(ids), seq_len):
            if len(out) >= samples:
                break
            out.append({"input_ids": ids[start:start + seq_len][None]})
    if not out:
        raise ValueError(f"calibration dataset {path} gave no usable samples")
    return out


def load_image_processor(model_dir):
    """The model dir's own image processor (a one-line ValueError if it has none)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(str(model_dir))
    except Exception as e:
        raise ValueError(f"{model_dir}: cannot load the image processor for the calibration images: "
                         f"{str(e).splitlines()[0]}") from None


def image_sample(img, text, tok, proc, config, seq_len, adapter) -> dict:
    """One image followed by text as a forward batch, the tokens laid out by the family's adapter."""
    pixels = proc(images=[_image(img)], return_tensors="pt")
    text_ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0][:seq_len]
    return adapter.image_sample(pixels, text_ids, config)


def model_dir_samples(calibration, model_dir, config, samples: int, seq_len: int, adapter, seed: int = 0):
    """The calibration samples of a model folder run: None (data-free) -> None; "synthetic" ->
    whole-word sequences from model_dir's tokenizer (`synthetic.word_batches`); else a dataset path
    -> `calibration_batches`."""
    from .synthetic import SYNTHETIC, load_tokenizer, word_batches

    if calibration is None:
        return None
    if calibration == SYNTHETIC:
        return word_batches(load_tokenizer(model_dir), samples, seq_len, seed, where=str(model_dir))
    return calibration_batches(calibration, model_dir, config, samples, seq_len, adapter)
