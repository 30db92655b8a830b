"""Small generated datasets for tests and dry runs: text for perplexity, bar/line charts for ChartQA.

Real data (wikitext, the ChartQA test parquet) cannot be fetched on offline machines; these builders write
the same schemas so that every eval runs end to end. Everything is deterministic in `seed`.
"""

from __future__ import annotations

import random
from pathlib import Path

from .draw import bar_chart, line_chart

_SUBJECTS = ["the river", "a small town", "the old bridge", "the orchestra", "the northern valley", "a research team",
             "the harbour", "the museum", "a local farmer", "the railway company", "the new library", "the council"]
_VERBS = ["built", "reported", "measured", "opened", "described", "crossed", "restored", "studied", "visited", "sold"]
_OBJECTS = ["a stone tower", "the annual harvest", "twelve new stations", "the western road", "a long report",
            "the winter festival", "three hundred books", "the price of wheat", "a rare bird", "the city walls"]
_TAILS = ["in 1894", "during the war", "after the flood", "before the summer", "with great care", "for the first time",
          "near the coast", "in the following year", "at a high cost", "without much success"]

_CATEGORIES = [["Apples", "Pears", "Plums", "Grapes", "Cherries", "Lemons"],
               ["France", "Japan", "Brazil", "Kenya", "Canada", "India"],
               ["Rent", "Food", "Travel", "Energy", "Health", "Books"]]
_YEARS = [str(y) for y in range(2010, 2024)]
_UNITS = ["", "%"]


def generate_text(n_docs: int = 50, seed: int = 0, sentences_per_doc: tuple[int, int] = (4, 9)) -> list[str]:
    """Paragraphs of simple English sentences (wikitext-like enough to tokenize and score)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        n = rng.randint(*sentences_per_doc)
        sents = [f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
                 f"{rng.choice(_TAILS)}, and {rng.randint(2, 999)} people {rng.choice(_VERBS)} it." for _ in range(n)]
        docs.append(" ".join(sents))
    return docs


def write_text_dataset(path: str | Path, n_docs: int = 50, seed: int = 0) -> Path:
    """Write generated text as .parquet / .json / .jsonl (column `text`) or as a plain .txt file."""
    from datasets import Dataset

    path = Path(path)
    docs = generate_text(n_docs, seed)
    if path.suffix == ".txt":
        path.write_text("\n\n".join(docs) + "\n")
    elif path.suffix == ".parquet":
        Dataset.from_dict({"text": docs}).to_parquet(str(path))
    elif path.suffix in (".json", ".jsonl"):
        Dataset.from_dict({"text": docs}).to_json(str(path), lines=True)
    else:
        raise ValueError(f"{path}: unknown text dataset suffix (use .parquet, .json, .jsonl or .txt)")
    return path


def _chart_questions(rng: random.Random, labels: list[str], values: list[float], unit: str, kind: str):
    """(query, label list, human_or_machine) triples answerable from the chart."""
    fmt = (lambda v: f"{v:g}{unit}")
    i, j = rng.sample(range(len(labels)), 2)
    top = labels[max(range(len(values)), key=values.__getitem__)]
    where = "bar" if kind == "bar" else "point"
    return [
        (f"What is the value of {labels[i]}?", [fmt(values[i])], 1),
        (f"Which {where} has the highest value?", [top], 0),
        (f"What is the difference between {labels[i]} and {labels[j]}?", [f"{abs(values[i] - values[j]):g}"], 0),
        (f"Is the value of {labels[i]} greater than {labels[j]}?", ["Yes" if values[i] > values[j] else "No"], 1),
    ]


def chart_rows(n_charts: int = 4, seed: int = 0, size: tuple[int, int] = (224, 168)) -> list[dict]:
    """ChartQA-schema rows (image, query, label, human_or_machine): bar and line charts alternate."""
    rng = random.Random(seed)
    rows = []
    for c in range(n_charts):
        unit = rng.choice(_UNITS)
        if c % 2 == 0:
            kind, labels = "bar", rng.sample(rng.choice(_CATEGORIES), rng.randint(3, 5))
            values = [float(rng.randint(1, 90)) for _ in labels]
            image = bar_chart(f"Chart {c + 1}", labels, {"value": values}, size=size, y_label=unit, value_labels=True)
        else:
            start = rng.randint(0, len(_YEARS) - 5)
            kind, labels = "line", _YEARS[start:start + rng.randint(4, 5)]
            values = [round(rng.uniform(1, 60), 1) for _ in labels]
            image = line_chart(f"Chart {c + 1}", labels, {"value": values}, size=size, y_label=unit, value_labels=True)
        for query, label, hom in _chart_questions(rng, labels, values, unit, kind):
            rows.append({"image": image, "query": query, "label": label, "human_or_machine": hom})
    return rows


def write_chart_dataset(path: str | Path, n_charts: int = 4, seed: int = 0, size: tuple[int, int] = (224, 168)) -> Path:
    """Write chart rows as parquet with the ChartQA test split's features (the image stored as PNG bytes)."""
    from datasets import Dataset, Features, Image, Sequence, Value

    rows = chart_rows(n_charts, seed, size)
    features = Features({"image": Image(), "query": Value("string"), "label": Sequence(Value("string")),
                         "human_or_machine": Value("int64")})
    ds = Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)
    ds.to_parquet(str(path))
    return Path(path)


def tokenizer_corpus(seed: int = 0) -> list[str]:
    """Text that a tiny test tokenizer is trained on: generated prose, chart questions and answers, digits."""
    docs = generate_text(200, seed)
    for r in chart_rows(8, seed):
        docs.append(r["query"] + " " + " ".join(r["label"]))
    docs.append(" ".join(str(i) for i in range(200)) + " 0.5 12.5% 1,000 Yes No User: Assistant: Picture")
    return docs
