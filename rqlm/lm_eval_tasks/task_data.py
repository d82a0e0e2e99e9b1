"""The data of the local lm-eval tasks, built deterministically from the embedded corpus's held-out split.

    validation documents -> rqlm_heldout_text.jsonl      {"text"}: each document's first lines (perplexity)
                         -> rqlm_next_paragraph.jsonl    {"context", "choices", "label"}: the paragraph that
                            follows a held-out context, among 4 (3 distractors from other documents)

The files are written once under `$RQLM_CACHE/lm_eval_tasks/` (default `~/.cache/rqlm/`) and read back
with `datasets.load_dataset("json", ...)`. The task YAMLs reach them through `custom_dataset: !function
task_data.<name>_dataset` rather than `dataset_path: json` + `data_files`: `datasets` resolves a relative
`data_files` path against the current directory, not the YAML's, so a YAML shipped in the package could
not name its file portably; the function builds it on demand, for `rqlm lm-eval` and plain `lm_eval
--include_path rqlm/lm_eval_tasks` alike.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

TASK_FILES = {"rqlm_heldout_text": "rqlm_heldout_text.jsonl", "rqlm_next_paragraph": "rqlm_next_paragraph.jsonl"}
TEXT_CHARS = 1200  # each held-out document is cut to its first lines within this many characters
CONTEXT_CHARS = 400  # the multiple-choice context: the last characters before the true paragraph
CHOICE_CHARS = 160  # each choice: the first characters of a paragraph, cut at a word
MIN_PARAGRAPH_CHARS = 40  # shorter paragraphs (titles, rules of ****) are neither answers nor distractors
NUM_CHOICES = 4
SEED = 0


def task_data_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder the task files are written to: `<cache>/lm_eval_tasks`."""
    from rqlm.data.corpus import default_cache_dir

    return Path(cache_dir or default_cache_dir()) / "lm_eval_tasks"


def _cut_at_line(text: str, limit: int) -> str:
    """The first lines of `text` that fit in `limit` characters (at least the first `limit` characters)."""
    if len(text) <= limit:
        return text
    cut = text.rfind("\n", 0, limit)
    return text[: cut if cut > 0 else limit].rstrip()


def _cut_at_word(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    return text[: cut if cut > 0 else limit]


def heldout_text_docs(documents: list[str]) -> list[dict]:
    """One {"text"} per held-out document: its first lines, up to TEXT_CHARS characters."""
    return [{"text": _cut_at_line(doc.strip(), TEXT_CHARS)} for doc in documents if doc.strip()]


def next_paragraph_docs(documents: list[str], seed: int = SEED) -> list[dict]:
    """One 4-way question per document with a paragraph after its first: which paragraph comes next?

    The context is the document up to the chosen paragraph (its last CONTEXT_CHARS characters, from a
    line start); the choices are that paragraph and 3 paragraphs of other documents, each cut to
    CHOICE_CHARS characters, in a seeded order.
    """
    rng = random.Random(seed)
    paragraphs = [[p.strip() for p in doc.split("\n\n") if len(p.strip()) >= MIN_PARAGRAPH_CHARS] for doc in documents]
    questions = []
    for i, doc in enumerate(documents):
        candidates = [p for p in paragraphs[i] if doc.find(p) > 0]
        if not candidates:
            continue
        answer = rng.choice(candidates)
        before = doc[: doc.find(answer)].rstrip()
        context = before[-CONTEXT_CHARS:]
        if len(before) > CONTEXT_CHARS and "\n" in context:
            context = context[context.find("\n") + 1 :]
        others = [p for j, ps in enumerate(paragraphs) if j != i for p in ps]
        if len(others) < NUM_CHOICES - 1 or not context.strip():
            continue
        choices = [_cut_at_word(p, CHOICE_CHARS) for p in [answer, *rng.sample(others, NUM_CHOICES - 1)]]
        order = list(range(NUM_CHOICES))
        rng.shuffle(order)
        questions.append({"context": context, "choices": [choices[k] for k in order], "label": order.index(0)})
    return questions


def build_task_data(cache_dir: str | os.PathLike | None = None, rebuild: bool = False) -> dict[str, Path]:
    """Write the local tasks' jsonl files (once) from the embedded corpus's held-out split -> {task: path}."""
    from rqlm.data import build_embedded_corpus

    folder = task_data_dir(cache_dir)
    paths = {task: folder / name for task, name in TASK_FILES.items()}
    if not rebuild and all(p.is_file() for p in paths.values()):
        return paths
    documents = list(build_embedded_corpus()["validation"]["text"])
    rows = {"rqlm_heldout_text": heldout_text_docs(documents), "rqlm_next_paragraph": next_paragraph_docs(documents)}
    folder.mkdir(parents=True, exist_ok=True)
    for task, path in paths.items():
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows[task]), encoding="utf-8")
        tmp.replace(path)
    return paths


def _load(task: str):
    from datasets import load_dataset

    return load_dataset("json", data_files={"test": str(build_task_data()[task])})


def heldout_text_dataset(**_metadata):
    """`custom_dataset` of rqlm_heldout_text: a DatasetDict with a test split of {"text"}."""
    return _load("rqlm_heldout_text")


def next_paragraph_dataset(**_metadata):
    """`custom_dataset` of rqlm_next_paragraph: a DatasetDict with a test split of {"context", "choices", "label"}."""
    return _load("rqlm_next_paragraph")
