"""Local lm-eval tasks that run offline: held-out text perplexity and next-paragraph multiple choice.

Pass this folder to lm-eval with `--include_path` (`rqlm lm-eval` adds it when no `--include_path` is
given); the tasks' data are built from the embedded corpus on first use (task_data.py).
"""

from pathlib import Path

from .task_data import build_task_data

TASKS_DIR = Path(__file__).parent
TASK_NAMES = ("rqlm_heldout_text", "rqlm_next_paragraph")

__all__ = ["TASKS_DIR", "TASK_NAMES", "build_task_data"]
