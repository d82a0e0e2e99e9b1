"""The `evaluate` metric modules load offline from their local folders into a tmp cache, and give the numbers
of the one implementation in rqlm/evaluation on the same inputs."""

from __future__ import annotations

import math
import os

import evaluate
import pytest
import torch

import rqlm.metrics
from rqlm.evaluation.bound import perplexity_bound
from rqlm.evaluation.brier import brier_lm_from_samples
from rqlm.evaluation.reconstruction import accuracy_figures, codebook_usage_figures, position_accuracy_counts


@pytest.fixture(scope="module")
def load(tmp_path_factory):
    """`evaluate.load` with evaluate's module and metric caches in a tmp folder, offline."""
    cache = tmp_path_factory.mktemp("evaluate_cache")
    default_modules = evaluate.config.HF_MODULES_CACHE
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_EVALUATE_OFFLINE", "1")
        patch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
        patch.setattr(evaluate.config, "HF_MODULES_CACHE", cache / "modules")
        patch.setattr(evaluate.config, "HF_METRICS_CACHE", cache / "metrics")
        before = _files(default_modules)
        yield lambda name: evaluate.load(rqlm.metrics.path(name), cache_dir=str(cache / "metrics"))
        assert _files(default_modules) == before  # nothing written to the user's cache
    assert any(name in str(p) for p in (cache / "modules").rglob("*.py") for name in rqlm.metrics.METRICS)


def _files(folder) -> set[str]:
    return {str(p) for p in folder.rglob("*")} if os.path.isdir(folder) else set()


def test_path_names_each_metric_folder_and_refuses_others():
    for name in rqlm.metrics.METRICS:
        assert os.path.isfile(os.path.join(rqlm.metrics.path(name), f"{name}.py"))
    with pytest.raises(ValueError, match="unknown rqlm metric 'bleu'"):
        rqlm.metrics.path("bleu")


def test_position_accuracy_counts_by_hand():
    references = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    predictions = torch.tensor([[1, 0, 3, 4], [5, 6, 0, 0]])
    valid = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    counts = position_accuracy_counts(predictions, references, valid, 2)  # chunks of 2: positions 0, 1
    assert counts.tolist() == [[2, 1], [3, 3]]  # right at position 0: 1, 3; at 1: 4 (6 is masked)
    figures = accuracy_figures(counts)
    assert figures == {"accuracy": 0.5, "accuracy_pos0": 2 / 3, "accuracy_pos1": 1 / 3}
    with pytest.raises(ValueError, match="multiple of compression 3"):
        position_accuracy_counts(predictions, references, None, 3)


def test_reconstruction_accuracy_module(load):
    g = torch.Generator().manual_seed(0)
    references = torch.randint(0, 5, (6, 8), generator=g)
    predictions = torch.where(torch.rand(6, 8, generator=g) < 0.7, references, torch.randint(0, 5, (6, 8), generator=g))
    references[0, :4] = -100  # padding
    direct = accuracy_figures(position_accuracy_counts(predictions, references, references >= 0, 4))
    module = load("reconstruction_accuracy")
    # texts of different lengths go in one at a time, as from a ragged evaluation loop
    module.add_batch(predictions=predictions[:3].tolist(), references=references[:3].tolist())
    module.add_batch(predictions=[p[:4] for p in predictions[3:].tolist()], references=[r[:4] for r in references[3:].tolist()])
    short = position_accuracy_counts(predictions[3:, :4], references[3:, :4], None, 4)
    ragged = position_accuracy_counts(predictions[:3], references[:3], references[:3] >= 0, 4) + short
    assert module.compute(compression_factor=4) == pytest.approx(accuracy_figures(ragged))
    assert load("reconstruction_accuracy").compute(
        predictions=predictions.tolist(), references=references.tolist(), compression_factor=4
    ) == pytest.approx(direct)


def test_codebook_usage_module(load):
    codes = torch.randint(0, 16, (4, 5, 3), generator=torch.Generator().manual_seed(1))  # (texts, L, D)
    codes[0, 0] = -1  # padding
    result = load("codebook_usage").compute(codes=codes.tolist(), codebook_size=16)
    assert result == pytest.approx(codebook_usage_figures(codes, 16))
    assert set(result) >= {"usage_perplexity_d2", "dead_fraction_d2", "usage_perplexity_mean"}


def test_perplexity_bound_module(load):
    terms = {"nll_codes": [10.0, 4.5], "nll_recon": [2.0, 1.0], "num_tokens": [8.0, 4.0]}
    result = load("perplexity_bound").compute(**terms)
    direct = perplexity_bound({name: sum(values) for name, values in terms.items()})
    assert result == {"perplexity_bound": pytest.approx(direct)}
    assert direct == pytest.approx(math.exp(17.5 / 12))


def test_brier_lm_module(load):
    g = torch.Generator().manual_seed(2)
    samples_a, samples_b, references = (torch.randint(0, 3, (50, 4), generator=g) for _ in range(3))
    result = load("brier_lm").compute(samples_a=samples_a.tolist(), samples_b=samples_b.tolist(),
                                      references=references.tolist())
    assert result == pytest.approx(brier_lm_from_samples(samples_a, samples_b, references))
    assert 0 < result["brier_lm"] < 100
