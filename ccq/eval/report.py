"""Eval reports: JSON (everything), a short markdown summary and PNG plots, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .draw import bar_chart, line_chart


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(out_dir: str | Path, stem: str, data: dict, markdown: str, images: dict | None = None,
                 jsonl: list[dict] | None = None) -> list[Path]:
    """Write {stem}.json, {stem}.md, {stem}_{name}.png and optional {stem}_rows.jsonl; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    def put(name, write):
        p = out / name
        _atomic_write(p, write)
        paths.append(p)

    put(f"{stem}.json", lambda t: Path(t).write_text(json.dumps(data, indent=2) + "\n"))
    put(f"{stem}.md", lambda t: Path(t).write_text(markdown))
    for name, img in (images or {}).items():
        put(f"{stem}_{name}.png", lambda t, img=img: img.save(t, format="PNG"))
    if jsonl is not None:
        put(f"{stem}_rows.jsonl", lambda t: Path(t).write_text("".join(json.dumps(r) + "\n" for r in jsonl)))
    return paths


def _f(v: float, digits: int = 4) -> str:
    return f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{digits}f}"


def ppl_markdown(r: dict) -> str:
    lines = ["# Perplexity", "", f"Convention: {r['convention']}.", "",
             f"Windows: {r['windows']}, scored tokens: {r['scored_tokens']} (text: {r['text_tokens']} tokens).", "",
             "| model | path | perplexity |", "| --- | --- | --- |",
             f"| model | `{r['model']['path']}` | {r['model']['perplexity']:.4f} |"]
    if "reference" in r:
        lines.append(f"| reference | `{r['reference']['path']}` | {r['reference']['perplexity']:.4f} |")
        lines += ["", f"- perplexity ratio (model / reference): {r['perplexity_ratio']:.4f}",
                  f"- KL(reference || model) per token: mean {_f(r['kl']['mean'])}, p99 {_f(r['kl']['p99'])}, "
                  f"max {_f(r['kl']['max'])} nats",
                  f"- top-1 agreement: {100 * r['top1_agreement']:.2f}%"]
    return "\n".join(lines) + "\n"


def ppl_plots(r: dict) -> dict:
    if "kl_by_position" not in r or not r["kl_by_position"]:
        return {}
    bins = r["kl_by_position"]
    step = max(1, len(bins) // 8)
    img = line_chart("Mean KL(reference || model) by position in the window", [str(b["from"]) for b in bins],
                     {"KL": [b["mean_kl"] for b in bins]}, size=(640, 360), y_label="nats", label_every=step)
    return {"kl_by_position": img}


def chartqa_markdown(r: dict) -> str:
    has_ref = r.get("reference") is not None
    lines = ["# ChartQA relaxed accuracy", "", f"Data: `{r['data']}` ({r['rows']} rows). {r['metric']}", "",
             f"Model: `{r['model']}`" + (f"; reference: `{r['reference']}`" if has_ref else ""), ""]
    head = "| split | n | model |" + (" reference | drift | agreement | lost | gained |" if has_ref else "")
    lines += [head, "|" + " --- |" * (head.count("|") - 1)]
    for split, s in r["splits"].items():
        row = f"| {split} | {s['n']} | {100 * s['model_accuracy']:.2f}% |"
        if has_ref:
            row += (f" {100 * s['reference_accuracy']:.2f}% | {100 * s['drift']:+.2f} pt |"
                    f" {100 * s['agreement']:.2f}% | {s['lost']} | {s['gained']} |")
        lines.append(row)
    if has_ref:
        lines += ["", "drift = model - reference accuracy; agreement = identical answers; lost/gained = rows the "
                  "model gets wrong/right where the reference got them right/wrong."]
    return "\n".join(lines) + "\n"


def chartqa_plots(r: dict) -> dict:
    names = ["model"] + (["reference"] if r.get("reference") is not None else [])
    splits = list(r["splits"])
    series = {n: [round(100 * r["splits"][s][f"{n}_accuracy"], 1) for s in splits] for n in names}
    return {"accuracy": bar_chart("ChartQA relaxed accuracy (%) by split", splits, series, size=(480, 320),
                                  y_label="%", value_labels=True, y_max=100.0)}
