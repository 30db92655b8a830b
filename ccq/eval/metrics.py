"""ChartQA's relaxed accuracy, exactly as published (Methani et al. 2020; the pix2struct/ChartQA scorer).

No extra normalisation (no comma or unit stripping, no whitespace trimming beyond what Python's float()
accepts): numbers computed here compare with published ChartQA numbers.
"""

from __future__ import annotations

MAX_RELATIVE_CHANGE = 0.05


def _to_float(text: str) -> float | None:
    """A number, with a trailing '%' meaning 'divide by 100'; None when the text is not a number."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def _relaxed_correct(prediction: str, target: str) -> bool:
    pred = _to_float(prediction)
    gold = _to_float(target)
    if pred is not None and gold:  # a gold of 0 (or not a number) falls back to the string test
        return abs(pred - gold) / abs(gold) <= MAX_RELATIVE_CHANGE
    return prediction.lower() == target.lower()


def relaxed_match(prediction: str, targets: list[str]) -> bool:
    """True when the prediction is relaxed-correct against at least one gold label.

    Relaxed-correct: both parse as numbers (a trailing '%' divides by 100) and |pred - gold| / |gold| <= 5%;
    otherwise (or when gold is 0) the lower-cased strings are equal.
    """
    if isinstance(targets, str):
        raise TypeError(f"targets must be a list of strings, got the string {targets!r}")
    return any(_relaxed_correct(prediction, str(t)) for t in targets)
