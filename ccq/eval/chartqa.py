"""ChartQA with the model's own processor and chat template: greedy answers, relaxed accuracy, drift.

Prompt: one user turn holding the chart image and `query + prompt_suffix`, rendered by the processor's chat
template with the generation prompt and, when the template has an `enable_thinking` switch, thinking off.
Batches are left-padded; decoding is greedy. The answer is the generated text after the last `</think>` token
(if any), special tokens removed, surrounding whitespace stripped; relaxed_match then applies unchanged.
"""

from __future__ import annotations

from tqdm.auto import tqdm

from .data import as_labels, as_pil
from .loading import EvalModel
from .metrics import relaxed_match

DEFAULT_PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."
SPLITS = {"all": None, "human": 0, "augmented": 1}


def template_kwargs(processor, path) -> dict:
    """Extra chat-template variables: thinking off where the template has the switch."""
    template = processor.chat_template
    text = " ".join(template.values()) if isinstance(template, dict) else (template or "")
    if not text:
        raise ValueError(f"{path}: the processor has no chat template (chat_template.jinja)")
    return {"enable_thinking": False} if "enable_thinking" in text else {}


def _cut_after_think(ids: list[int], think_end: int | None) -> list[int]:
    if think_end is not None and think_end in ids:
        return ids[len(ids) - ids[::-1].index(think_end):]
    return ids


def generate_answers(em: EvalModel, rows, batch_size: int = 8, max_new_tokens: int = 32,
                     prompt_suffix: str = DEFAULT_PROMPT_SUFFIX, progress: bool = True, desc: str = "chartqa") -> list[str]:
    """Greedy answers of one model for every row (image, query)."""
    import torch
    from transformers import GenerationConfig

    processor, tok = em.processor, em.processor.tokenizer
    extra = template_kwargs(processor, em.path)
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    think_end = tok.convert_tokens_to_ids("</think>") if "</think>" in tok.get_vocab() else None
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                               eos_token_id=em.model.generation_config.eos_token_id or tok.eos_token_id)
    answers = []
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, disable=not progress, unit="batch"):
        batch = rows[start:start + batch_size]
        images = [as_pil(img) for img in batch["image"]]
        convs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q + prompt_suffix}]}]
                 for q in batch["query"]]
        texts = processor.apply_chat_template(convs, add_generation_prompt=True, tokenize=False, **extra)
        inputs = processor(text=texts, images=images, padding=True, return_tensors="pt").to(em.device)
        with torch.inference_mode():
            out = em.model.generate(**inputs, generation_config=gen_cfg)
        new = out[:, inputs["input_ids"].shape[1]:].tolist()
        answers += [tok.decode(_cut_after_think(ids, think_end), skip_special_tokens=True).strip() for ids in new]
    return answers


def score(rows, answers: dict[str, list[str]]) -> dict:
    """Relaxed accuracy per model and split, drift (model - reference), answer agreement, flips."""
    labels = [as_labels(x) for x in rows["label"]]
    hom = rows["human_or_machine"] if "human_or_machine" in rows.column_names else None
    correct = {name: [relaxed_match(a, g) for a, g in zip(ans, labels)] for name, ans in answers.items()}
    splits = {}
    for split, code in SPLITS.items():
        if code is not None and hom is None:
            continue
        idx = [i for i in range(len(labels)) if code is None or int(hom[i]) == code]
        if not idx:
            continue
        s = {"n": len(idx)}
        for name in answers:
            s[f"{name}_accuracy"] = sum(correct[name][i] for i in idx) / len(idx)
        if "reference" in answers:
            s["drift"] = s["model_accuracy"] - s["reference_accuracy"]
            s["agreement"] = sum(answers["model"][i] == answers["reference"][i] for i in idx) / len(idx)
            s["lost"] = sum(correct["reference"][i] and not correct["model"][i] for i in idx)
            s["gained"] = sum(correct["model"][i] and not correct["reference"][i] for i in idx)
        splits[split] = s
    queries = rows["query"]  # column access: no image decoding
    per_row = []
    for i in range(len(labels)):
        r = {"index": i, "query": queries[i], "labels": labels[i],
             "split": None if hom is None else ("human" if int(hom[i]) == 0 else "augmented")}
        for name in answers:
            r[f"{name}_answer"], r[f"{name}_correct"] = answers[name][i], correct[name][i]
        per_row.append(r)
    return {"splits": splits, "rows": per_row}
