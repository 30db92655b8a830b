"""Local datasets for the evals, read through `datasets`, with one-line errors for bad files."""

from __future__ import annotations

import io
from pathlib import Path

_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".txt": "text", ".raw": "text"}
CHARTQA_COLUMNS = ("image", "query", "label")


def load_local_dataset(path: str | Path):
    """A local parquet / json / jsonl / text file as a `datasets.Dataset`; a plain text file is one document."""
    from datasets import load_dataset
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"{path}: unknown dataset type (use .parquet, .json, .jsonl, .txt or .raw)")
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    bars = is_progress_bar_enabled()
    disable_progress_bar()  # a local file loads in a moment: keep the terminal for the eval's own progress
    try:
        return load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # datasets raises many kinds on malformed files; report one line naming the file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: cannot read as {builder} ({first})") from None
    finally:
        if bars:
            enable_progress_bar()


def load_text(path: str | Path, column: str = "text") -> tuple[str, str]:
    """All text of a dataset as one string, and how it was joined (stated in the report).

    Rows of a table are joined with a blank line (the usual wikitext convention); a text file is read whole.
    """
    ds = load_local_dataset(path)
    if column not in ds.column_names:
        raise ValueError(f"{path}: no column {column!r} (columns: {', '.join(ds.column_names)})")
    texts = [t for t in ds[column] if t is not None]
    if Path(path).suffix.lower() in (".txt", ".raw"):
        return "".join(texts), "the whole file as one document"
    return "\n\n".join(texts), f"rows of column {column!r} joined with a blank line"


def load_chartqa(path: str | Path, limit: int | None = None):
    """ChartQA rows (image, query, label, optional human_or_machine), checked and cut to `limit`."""
    ds = load_local_dataset(path)
    missing = [c for c in CHARTQA_COLUMNS if c not in ds.column_names]
    if missing:
        raise ValueError(f"{path}: missing ChartQA column(s) {', '.join(missing)} "
                         f"(columns: {', '.join(ds.column_names)})")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    if len(ds) == 0:
        raise ValueError(f"{path}: no rows")
    return ds


def as_pil(image):
    """A dataset image cell (PIL image, or the {bytes, path} struct of an undecoded parquet) as RGB PIL."""
    from PIL import Image

    if isinstance(image, dict):
        if image.get("bytes"):
            image = Image.open(io.BytesIO(image["bytes"]))
        elif image.get("path"):
            image = Image.open(image["path"])
        else:
            raise ValueError("an image cell has neither bytes nor path")
    if not hasattr(image, "convert"):
        raise ValueError(f"an image cell is a {type(image).__name__}, not an image")
    return image.convert("RGB")


def as_labels(label) -> list[str]:
    """Gold labels as a list of strings (a single string becomes a one-item list)."""
    if isinstance(label, str):
        return [label]
    return [str(x) for x in label]
