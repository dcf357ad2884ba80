"""``longbench``: NarrativeQA, Qasper and MultiFieldQA-en from LongBench (Bai et al., 2023), QA F1.

Prompts, generation lengths, middle truncation and F1 follow LongBench's ``pred.py``,
``config/dataset2prompt.json``, ``config/dataset2maxlen.json`` and ``metrics.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from ..data import hub_reachable, offline
from ..errors import DataError
from ..metrics import longbench_qa_f1
from ..task import TaskContext
from .common import mean
from .prompts import split_prompt
from .retrieval import COMPRESS_MODES, answer

_NO_EXPLAIN = "using a single phrase if possible. Do not provide any explanation."
_QASPER_RULES = (
    "as concisely as you can, using a single phrase or sentence if possible. If the question cannot be "
    "answered based on the information in the article, write \"unanswerable\". If the question is a yes/no "
    "question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation."
)
PROMPTS = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the "
        f"question asconcisely as you can, {_NO_EXPLAIN}\n\nStory: {{context}}\n\nNow, answer the question "
        f"based on the story asconcisely as you can, {_NO_EXPLAIN}\n\nQuestion: {{input}}\n\nAnswer:"
    ),
    "qasper": (
        f"You are given a scientific article and a question. Answer the question {_QASPER_RULES}\n\n"
        f"Article: {{context}}\n\n Answer the question based on the above article {_QASPER_RULES}\n\n"
        "Question: {input}\n\nAnswer:"
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question "
        "based on the above text, only give me the answer and do not output any other words.\n\n"
        "Question: {input}\nAnswer:"
    ),
}
MAX_NEW = {"narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64}


def _from_hub(name: str, limit: int) -> list[dict[str, Any]]:
    """THUDM/LongBench through ``datasets``; where the loading script is refused, its ``data.zip``."""
    from datasets import load_dataset

    try:
        ds = load_dataset("THUDM/LongBench", name, split="test")
        return [ds[i] for i in range(min(limit, len(ds)))]
    except Exception:  # noqa: BLE001 - datasets >= 4 no longer runs loading scripts
        import zipfile

        from huggingface_hub import hf_hub_download

        archive = hf_hub_download("THUDM/LongBench", "data.zip", repo_type="dataset")
        with zipfile.ZipFile(archive) as zf:
            lines = zf.read(f"data/{name}.jsonl").decode("utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()][:limit]


def load_samples(name: str, path: str, limit: int) -> list[dict[str, Any]]:
    """First ``limit`` samples of a LongBench subset: ``<path>/<name>.jsonl`` or THUDM/LongBench via datasets."""
    if path:
        file = Path(path).expanduser() / f"{name}.jsonl"
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
            rows = [json.loads(line) for line in lines if line.strip()][:limit]
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"--param longbench.path: cannot read {str(file)!r}: {exc}") from exc
    else:
        if offline() or not hub_reachable():
            raise DataError("longbench: THUDM/LongBench is unreachable (offline); pass "
                            "--param longbench.path=DIR holding narrativeqa.jsonl, qasper.jsonl, "
                            "multifieldqa_en.jsonl")
        try:
            rows = _from_hub(name, limit)
        except Exception as exc:
            raise DataError(f"longbench: loading THUDM/LongBench {name!r} failed: "
                            f"{type(exc).__name__}: {exc}") from exc
    for i, row in enumerate(rows):
        missing = [k for k in ("context", "input", "answers") if k not in row]
        if missing:
            raise DataError(f"longbench {name} sample {i}: missing field(s) {', '.join(missing)}")
    return rows


def build_prompt(tokenizer: Any, name: str, row: dict[str, Any], max_length: int) -> tuple[str, str]:
    """LongBench's prompt with its context truncated in the middle so the whole prompt fits ``max_length``
    tokens, and the question that ends it (the template's text after the context, kept whole).

    LongBench cuts the middle of the whole prompt; cutting the middle of the context instead keeps the same
    text whenever the instructions and the question are shorter than half the length (always, at LongBench's
    lengths) and keeps the question whole, which ``--compress context`` needs.
    """
    head_t, tail_t = PROMPTS[name].split("{context}", 1)
    head, question = head_t.format(input=row["input"]), tail_t.format(input=row["input"])
    room = max_length - len(tokenizer(head + question, add_special_tokens=False).input_ids)
    if room < 2:
        raise DataError(f"longbench {name}: --length {max_length} leaves no room for the context after the "
                        f"instructions and the question; allowed: a longer --length")
    ids = tokenizer(row["context"], add_special_tokens=False).input_ids
    context = row["context"]
    if len(ids) > room:
        half = room // 2
        context = tokenizer.decode(ids[:half], skip_special_tokens=True) + \
            tokenizer.decode(ids[-(room - half):], skip_special_tokens=True)
    return head + context + question, question


class LongBenchTask:
    """LongBench single-document QA (NarrativeQA, Qasper, MultiFieldQA-en): F1 (0-100) as LongBench scores it."""

    name = "longbench"
    primary = "f1"
    higher_is_better = True
    default_lengths = (1024, 2048)
    defaults: ClassVar[dict[str, Any]] = {"subsets": ("narrativeqa", "qasper", "multifieldqa_en"), "samples": 5,
                                "path": "", "chat": True, "max_new_tokens": 0}
    limits: ClassVar[dict[str, tuple]] = {"samples": (1, None), "max_new_tokens": (0, None)}
    compress_modes = COMPRESS_MODES
    labels: ClassVar[dict[str, str]] = {"f1": "QA F1 (0-100)"}

    def run(self, ctx: TaskContext) -> dict[str, Any]:
        """Greedy answers to the first ``samples`` questions of each subset, prompts cut to ``length``."""
        scores: dict[str, float] = {}
        kv = []
        for name in ctx.params["subsets"]:
            if name not in PROMPTS:
                raise DataError(f"--param longbench.subsets: got {name!r}; allowed: {', '.join(PROMPTS)}")
            rows = load_samples(name, str(ctx.params["path"]), int(ctx.params["samples"]))
            new = int(ctx.params["max_new_tokens"]) or MAX_NEW[name]
            f1s = []
            for row in rows:
                text, question = build_prompt(ctx.tokenizer, name, row, ctx.length)
                prompt = split_prompt(ctx.tokenizer, text, question, ctx.device, chat=bool(ctx.params["chat"]) and
                                      getattr(ctx.tokenizer, "chat_template", None) is not None)
                tokens, held = answer(ctx, prompt, new, eos_token_id=ctx.tokenizer.eos_token_id)
                reply = ctx.tokenizer.decode(tokens, skip_special_tokens=True)
                f1s.append(longbench_qa_f1(reply, row["answers"]))
                kv.append(held["kv_bytes"])
            scores[name] = 100 * (mean(f1s) or 0.0)
        return {"f1": mean(list(scores.values())), "by_subset": scores, "kv_bytes": max(kv) if kv else 0}
