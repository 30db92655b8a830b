"""Calibration without user data (`calibration="synthetic"`).

The Hessians need activations with the model's own per-channel scales and correlations; text
that looks like language to the model gives them far better than uniformly random token ids
(which are mostly subword pieces, unused slots and rare scripts). Two sources, both seeded:

- `word_batches` (any model with a tokenizer): sequences of whole-word vocabulary tokens (no
  special, added, unused or subword-continuation tokens), drawn with a Zipf-like preference for
  low ids (vocabularies are built roughly in frequency order), framed with the special tokens the
  tokenizer's own template adds ([CLS] ... [SEP], <s> ...).
- `sampled_batches` (a causal LM in memory): text sampled from the 16-bit model itself, each
  sample started from the template's prefix and one drawn word.
"""

from __future__ import annotations

import torch

SYNTHETIC = "synthetic"
SYNTHETIC_DAMP = 0.1  # quantize_model's Hessian damping for synthetic inputs (the codec default is 0.01)
MARKERS = ("\u0120", "\u2581")  # word-start markers of byte-level BPE and SentencePiece vocabularies


def load_tokenizer(model_dir):
    """The model dir's tokenizer (a one-line ValueError if it has none)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:
        raise ValueError(f"{model_dir}: synthetic calibration needs the model's tokenizer, which does not "
                         f"load: {str(e).splitlines()[0]}") from None


def word_ids(tok) -> torch.Tensor:
    """Ids of the tokens that start a whole word of letters or digits, in id order.

    WordPiece vocabularies mark continuations (`##ing`), byte-level BPE and SentencePiece ones mark
    word starts (a leading space marker); a token counts only when its decoded text is alphanumeric."""
    vocab = tok.get_vocab()
    skip = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}) or {})
    cont = getattr(getattr(getattr(tok, "backend_tokenizer", None), "model", None), "continuing_subword_prefix", None)
    if cont:
        cand = [i for t, i in vocab.items() if not t.startswith(cont)]
    else:
        cand = [i for t, i in vocab.items() if t.startswith(MARKERS)]
    cand = sorted(i for i in cand if i not in skip)
    texts = tok.batch_decode([[i] for i in cand]) if cand else []
    ids = [i for i, s in zip(cand, texts) if _wordlike(s.strip())]
    return torch.tensor(ids, dtype=torch.long)


def _wordlike(s: str) -> bool:
    """Letters or digits; a single character only when it is ASCII (`a`, `7`, not a lone CJK or
    Cyrillic character, which byte-level and WordPiece vocabularies list by the thousand)."""
    return s.isalnum() and (len(s) > 1 or s.isascii())


def template(tok) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer's template puts before and after a text."""
    plain = tok("word", add_special_tokens=False)["input_ids"]
    full = tok("word")["input_ids"]
    for s in range(len(full) - len(plain) + 1):
        if full[s:s + len(plain)] == plain:
            return full[:s], full[s + len(plain):]
    return [], []


def _draw(words: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """n word ids, rank r drawn with weight 1 / (r + 100) (a flattened Zipf law)."""
    w = 1.0 / (torch.arange(len(words), dtype=torch.float64) + 100.0)
    return words[torch.multinomial(w, n, replacement=True, generator=g)]


def _words(tok, where) -> torch.Tensor:
    words = word_ids(tok)
    if len(words) == 0:
        raise ValueError(f"{where}: the tokenizer has no whole-word tokens to draw synthetic calibration from")
    return words


def word_batches(tok, samples: int, seq_len: int, seed: int = 0, where: str = "model",
                 min_len: int | None = None) -> list[dict]:
    """`samples` input dicts of `seq_len` tokens (at most the tokenizer's `model_max_length`, which
    an encoder's position embeddings bound): the template's specials around drawn words.

    min_len: each sample's length is drawn uniformly from min_len..seq_len tokens (None: all
    seq_len). Mixed lengths put the specials and the early positions in the proportions of real
    sentences of mixed length (on MiniLM, 10..50 tokens calibrated better than a fixed 32)."""
    words = _words(tok, where)
    limit = getattr(tok, "model_max_length", None)
    if isinstance(limit, int) and limit < 10**6:  # tokenizers without a limit store a huge sentinel
        seq_len = min(seq_len, limit)
    pre, post = template(tok)
    n = seq_len - len(pre) - len(post)
    if n < 1:
        raise ValueError(f"synthetic calibration: seq_len {seq_len} leaves no room inside the template's "
                         f"{len(pre) + len(post)} special tokens")
    lo = n if min_len is None else min(n, min_len - len(pre) - len(post))
    if lo < 1:
        raise ValueError(f"synthetic calibration: min_len {min_len} leaves no room inside the template's "
                         f"{len(pre) + len(post)} special tokens")
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(samples):
        k = n if lo == n else int(torch.randint(lo, n + 1, (1,), generator=g))
        ids = torch.cat([torch.tensor(pre, dtype=torch.long), _draw(words, k, g), torch.tensor(post, dtype=torch.long)])
        out.append({"input_ids": ids[None]})
    return out


@torch.no_grad()
def sampled_batches(model, tok, samples: int, seq_len: int, seed: int = 0, batch_size: int = 8) -> list[dict]:
    """`samples` sequences of `seq_len` tokens sampled from the causal LM `model` (temperature 1,
    top-k 50), each started from the template's prefix and one drawn word; seeded."""
    words = _words(tok, type(model).__name__)
    pre, _ = template(tok)
    if seq_len <= len(pre) + 1:
        raise ValueError(f"synthetic calibration: seq_len {seq_len} leaves no room to sample after the prompt")
    g = torch.Generator().manual_seed(seed)
    dev = next(p.device for p in model.parameters())
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = []
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, samples, batch_size):
            b = min(batch_size, samples - start)
            prompt = torch.cat([torch.tensor(pre, dtype=torch.long).expand(b, -1), _draw(words, b, g)[:, None]], 1)
            ids = model.generate(input_ids=prompt.to(dev), attention_mask=torch.ones_like(prompt, device=dev),
                                 do_sample=True, temperature=1.0, top_k=50, top_p=1.0,
                                 max_new_tokens=seq_len - prompt.shape[1], min_new_tokens=seq_len - prompt.shape[1],
                                 pad_token_id=pad)
            out += [{"input_ids": row[None, :seq_len].cpu()} for row in ids]
    return out
