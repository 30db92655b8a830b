"""The two evals end to end: check the inputs, load, evaluate, write the reports (what `ccq eval` runs)."""

from __future__ import annotations

import gc
from pathlib import Path

from .chartqa import DEFAULT_PROMPT_SUFFIX, generate_answers, score, template_kwargs
from .data import load_chartqa, load_text
from .loading import load_for_eval, load_processor, read_model_config
from .perplexity import check_window_args, evaluate_perplexity
from .report import chartqa_markdown, chartqa_plots, ppl_markdown, ppl_plots, write_report

RELAXED_METRIC = ("Relaxed accuracy: numeric answers within 5% of a gold label (a trailing % divides by 100), "
                  "otherwise a case-insensitive exact match; best over gold labels.")


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_ppl(model: str, data: str, out: str, reference: str | None = None, seq_len: int = 2048,
            stride: int | None = None, limit: int | None = None, batch_size: int = 1, device: str = "cpu",
            reference_device: str | None = None, dtype: str = "auto", text_column: str = "text",
            progress: bool = True) -> tuple[dict, list[Path]]:
    """Perplexity (and KL/agreement against `reference`) on a local text dataset; writes ppl.{json,md,png}."""
    check_window_args(seq_len, seq_len if stride is None else stride)
    text, joined = load_text(data, text_column)
    read_model_config(model)
    if reference is not None:
        read_model_config(reference)
    m = load_for_eval(model, device=device, dtype=dtype)
    ref = load_for_eval(reference, device=reference_device or device, dtype=dtype) if reference else None
    result = evaluate_perplexity(m, text, reference=ref, seq_len=seq_len, stride=stride, limit=limit,
                                 batch_size=batch_size, joined=joined, progress=progress)
    result["data"] = str(data)
    md = ppl_markdown(result)
    return result, write_report(out, "ppl", result, md, ppl_plots(result))


def run_chartqa(model: str, data: str, out: str, reference: str | None = None, limit: int | None = None,
                max_new_tokens: int = 32, batch_size: int = 8, device: str = "cpu", dtype: str = "auto",
                prompt_suffix: str = DEFAULT_PROMPT_SUFFIX, progress: bool = True) -> tuple[dict, list[Path]]:
    """ChartQA answers of the model (and reference), relaxed accuracy per split, drift and agreement.

    The models are loaded one after the other, so only one has to fit in memory.
    """
    rows = load_chartqa(data, limit)
    names = {"model": model} if reference is None else {"reference": reference, "model": model}
    for path in names.values():  # every check before the first (long) model load
        read_model_config(path)
        template_kwargs(load_processor(path), path)
    answers = {}
    for name, path in names.items():
        em = load_for_eval(path, device=device, dtype=dtype, need_processor=True)
        answers[name] = generate_answers(em, rows, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                         prompt_suffix=prompt_suffix, progress=progress, desc=f"chartqa {name}")
        del em
        _free()
    scored = score(rows, answers)
    result = {"data": str(data), "rows": len(rows), "model": str(model),
              "reference": None if reference is None else str(reference), "metric": RELAXED_METRIC,
              "prompt": {"suffix": prompt_suffix, "decoding": "greedy", "max_new_tokens": max_new_tokens,
                         "chat_template": "the model's own, generation prompt on, thinking off where switchable"},
              "splits": scored["splits"]}
    md = chartqa_markdown(result)
    return result, write_report(out, "chartqa", result, md, chartqa_plots(result), jsonl=scored["rows"])
