"""rqlm's figures as Hugging Face `evaluate` modules, each a thin wrapper over its one implementation in
rqlm/evaluation:

    import evaluate, rqlm.metrics
    brier = evaluate.load(rqlm.metrics.path("brier_lm"))
    brier.compute(samples_a=..., samples_b=..., references=...)

reconstruction_accuracy  token accuracy overall and per position in a chunk (rqlm.evaluation.reconstruction)
codebook_usage           per-depth code perplexity and dead fraction (rqlm.evaluation.reconstruction)
perplexity_bound         exp((code NLL + reconstruction NLL) / tokens) (rqlm.evaluation.bound)
brier_lm                 CALM's likelihood-free BrierLM from two samples per prefix (rqlm.evaluation.brier)
"""

from __future__ import annotations

from pathlib import Path

METRICS = ("reconstruction_accuracy", "codebook_usage", "perplexity_bound", "brier_lm")


def path(name: str) -> str:
    """The folder of metric `name` (holding `<name>/<name>.py`), to pass to `evaluate.load`."""
    if name not in METRICS:
        raise ValueError(f"unknown rqlm metric {name!r}; choose one of {', '.join(METRICS)}")
    return str(Path(__file__).parent / name)


__all__ = ["METRICS", "path"]
