"""The static view of the last race: its text and speeds kept as JSON, shown on the page without running anything.

On a machine too slow to race live, the page still shows what the last finished race made and how fast.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from .race import Column, Settings, identical


def save_last_run(path: str | Path, prompt: str, settings: Settings, columns: list[Column]) -> None:
    """Write a finished race to `path` (replaced whole, never half-written)."""
    path = Path(path)
    record = {
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "prompt": prompt,
        "settings": asdict(settings),
        "threads": _threads(),
        "identical": identical(columns, settings),
        "columns": [c.record() for c in columns],
    }
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record, indent=1))
    os.replace(partial, path)


def load_last_run(path: str | Path) -> dict | None:
    """The last race written to `path`, or None when there is none (or it cannot be read)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def last_run_markdown(record: dict | None) -> str:
    """The static view: settings, then a table of each column's speed, then each column's text."""
    if record is None:
        return "No finished race yet: start one above, and its text and speeds are kept here."
    s = record["settings"]
    decoding = "greedy" if not s["do_sample"] else f"sampling (temperature {s['temperature']:g}, top-k {s['top_k']})"
    marker = {True: "identical to the baseline's", False: "**DIFFERENT from the baseline's (a bug)**",
              None: "not compared"}[record["identical"]]
    lines = [
        (f"Finished {record['finished']}: {s['max_new_tokens']} max new tokens, {decoding}, seed {s['seed']}, "
         f"{record['threads']} threads. Drafted text: {marker}."),
        "",
        f"Prompt: {record['prompt']!r}",
        "",
        "| column | new tokens | tokens/s | time to first token (ms) | acceptance (tokens/step) |",
        "|---|---:|---:|---:|---:|",
    ]
    for c in record["columns"]:
        first = "–" if c["first_token_seconds"] is None else f"{1000 * c['first_token_seconds']:,.1f}"
        acceptance = "–" if c["acceptance"] is None else f"{c['acceptance']:.2f}"
        lines.append(f"| {c['name']} | {c['new_tokens']} | {c['tokens_per_second']:,.1f} | {first} | {acceptance} |")
    for c in record["columns"]:
        lines += ["", f"**{c['name']}:**", "", "```text", c["text"] if c["error"] is None else f"error: {c['error']}", "```"]
    return "\n".join(lines)


def _threads() -> int:
    import torch

    return torch.get_num_threads()
