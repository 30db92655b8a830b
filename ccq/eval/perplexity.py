"""Perplexity of a model on a text, and the token-level drift (KL, top-1 agreement) from a reference model.

Convention (stated in every report): the text is tokenized once without special tokens and cut into fixed
windows of `seq_len` tokens starting every `stride` tokens (stride <= seq_len); when the tokenizer has a BOS
token it is prepended to every window. Each token is scored once, in the first window that scores it: with
stride == seq_len the windows are disjoint; with a smaller stride only the tokens past the previous window's
end are scored, so each has at least seq_len - stride tokens of context (the usual sliding-window recipe).
Without BOS the very first token of a window with no earlier context cannot be scored.
KL is KL(reference || model) per scored token, sum over the vocabulary, in nats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .loading import EvalModel

KL_POSITION_BINS = 64


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) of the text go in; tokens [score_from, end) are scored."""

    begin: int
    end: int
    score_from: int


def check_window_args(seq_len: int, stride: int) -> None:
    if seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2, got {seq_len}")
    if not 1 <= stride <= seq_len:
        raise ValueError(f"--stride must be between 1 and --seq-len ({seq_len}), got {stride}")


def make_windows(n_tokens: int, seq_len: int, stride: int, with_bos: bool) -> list[Window]:
    """The fixed windows of the module's convention."""
    check_window_args(seq_len, stride)
    windows, begin, prev_end = [], 0, 0
    while begin < n_tokens:
        end = min(begin + seq_len, n_tokens)
        first = max(begin, prev_end) if with_bos else max(begin + 1, prev_end)
        if first < end:
            windows.append(Window(begin, end, first))
        if end == n_tokens:
            break
        prev_end, begin = end, begin + stride
    return windows


def convention_text(seq_len: int, stride: int, with_bos: bool, joined: str) -> str:
    bos = "a BOS token prepended to each window" if with_bos else "no BOS token (the tokenizer has none)"
    overlap = ("disjoint windows" if stride == seq_len
               else f"overlapping windows, only tokens past the previous window scored (>= {seq_len - stride} tokens of context)")
    return (f"fixed windows of {seq_len} tokens every {stride} tokens ({overlap}), {bos}; text: {joined}, "
            "tokenized once without special tokens; each token scored once; KL(reference || model) in nats")


def _batches(windows: list[Window], batch_size: int):
    for i in range(0, len(windows), batch_size):
        yield windows[i:i + batch_size]


def _logits(em: EvalModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return em.model(input_ids=ids.to(em.device), attention_mask=mask.to(em.device)).logits


def _check_same_tokenizer(model: EvalModel, reference: EvalModel) -> None:
    if model.tokenizer.get_vocab() != reference.tokenizer.get_vocab():
        raise ValueError(f"the tokenizers of {model.path} and {reference.path} differ: KL needs the same vocabulary")


def evaluate_perplexity(model: EvalModel, text: str, reference: EvalModel | None = None, seq_len: int = 2048,
                        stride: int | None = None, limit: int | None = None, batch_size: int = 1,
                        joined: str = "", progress: bool = True) -> dict:
    """Perplexity of `model` (and `reference`) over the windows of `text`, plus KL and top-1 agreement."""
    stride = seq_len if stride is None else stride
    if reference is not None:
        _check_same_tokenizer(model, reference)
    tok = model.tokenizer
    tokens = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    bos = tok.bos_token_id
    off = 1 if bos is not None else 0
    windows = make_windows(len(tokens), seq_len, stride, bos is not None)
    if limit is not None:
        windows = windows[:limit]
    if not windows:
        raise ValueError(f"the text has {len(tokens)} tokens: too short for one scored token")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    nll = {"model": 0.0, "reference": 0.0}
    kls, n_scored, agree = [], 0, 0
    kl_pos_sum = torch.zeros(seq_len, dtype=torch.float64)
    kl_pos_cnt = torch.zeros(seq_len, dtype=torch.float64)
    for batch in tqdm(list(_batches(windows, batch_size)), desc="ppl windows", disable=not progress, unit="batch"):
        width = max(w.end - w.begin for w in batch) + off
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, w in enumerate(batch):
            row = ([bos] if off else []) + tokens[w.begin:w.end]
            ids[b, :len(row)] = torch.tensor(row)
            mask[b, :len(row)] = 1
        logits = {"model": _logits(model, ids, mask)}
        if reference is not None:
            logits["reference"] = _logits(reference, ids, mask)
            if logits["reference"].shape[-1] != logits["model"].shape[-1]:
                raise ValueError(f"vocabulary sizes differ: {model.path} has {logits['model'].shape[-1]}, "
                                 f"{reference.path} has {logits['reference'].shape[-1]}")
        dev = logits["model"].device
        for b, w in enumerate(batch):
            target_pos = torch.arange(w.score_from - w.begin, w.end - w.begin)  # position in the window
            pred_idx = (target_pos + off - 1).to(dev)
            targets = ids[b, target_pos + off].to(dev)
            lp = {k: torch.log_softmax(v[b, pred_idx].float().to(dev), dim=-1) for k, v in logits.items()}
            for k, v in lp.items():
                nll[k] -= v.gather(-1, targets[:, None]).sum().item()
            n_scored += len(target_pos)
            if reference is not None:
                kl = (lp["reference"].exp() * (lp["reference"] - lp["model"])).sum(-1).clamp_min(0).cpu()
                kls.append(kl)
                agree += (lp["reference"].argmax(-1) == lp["model"].argmax(-1)).sum().item()
                kl_pos_sum.index_add_(0, target_pos, kl.double())
                kl_pos_cnt.index_add_(0, target_pos, torch.ones_like(kl, dtype=torch.float64))
        del logits

    result = {
        "convention": convention_text(seq_len, stride, bos is not None, joined or "as given"),
        "seq_len": seq_len, "stride": stride, "text_tokens": len(tokens), "windows": len(windows),
        "scored_tokens": n_scored,
        "model": {"path": str(model.path), "quantized": model.quantized, "nll": nll["model"] / n_scored,
                  "perplexity": math.exp(nll["model"] / n_scored)},
    }
    if reference is not None:
        kl_all = torch.cat(kls).double()
        ref_nll = nll["reference"] / n_scored
        result["reference"] = {"path": str(reference.path), "quantized": reference.quantized, "nll": ref_nll,
                               "perplexity": math.exp(ref_nll)}
        result["perplexity_ratio"] = result["model"]["perplexity"] / result["reference"]["perplexity"]
        result["kl"] = {"mean": kl_all.mean().item(), "p99": _quantile(kl_all, 0.99), "max": kl_all.max().item()}
        result["top1_agreement"] = agree / n_scored
        result["kl_by_position"] = _bin_positions(kl_pos_sum, kl_pos_cnt)
    return result


def _quantile(x: torch.Tensor, q: float) -> float:
    """Linear-interpolated quantile (torch.quantile refuses more than 16M elements)."""
    xs = x.sort().values
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return (xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)).item()


def _bin_positions(total: torch.Tensor, count: torch.Tensor) -> list[dict]:
    """Mean KL over contiguous position ranges of the window (at most KL_POSITION_BINS ranges)."""
    n = len(total)
    edges = sorted({round(i * n / KL_POSITION_BINS) for i in range(KL_POSITION_BINS + 1)})
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        c = count[lo:hi].sum().item()
        if c > 0:
            out.append({"from": lo, "to": hi - 1, "tokens": int(c), "mean_kl": total[lo:hi].sum().item() / c})
    return out
