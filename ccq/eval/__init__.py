"""Evaluation of a compressed model against its 16-bit source: perplexity/KL and ChartQA drift."""

from .chartqa import generate_answers, score
from .loading import EvalModel, load_for_eval
from .metrics import relaxed_match
from .perplexity import evaluate_perplexity, make_windows
from .runs import run_chartqa, run_ppl

__all__ = ["EvalModel", "evaluate_perplexity", "generate_answers", "load_for_eval", "make_windows",
           "relaxed_match", "run_chartqa", "run_ppl", "score"]
