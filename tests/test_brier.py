"""BrierLM: the two-sample estimate against the closed form 2 P(y) - sum P^2, and sampling through `generate`."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_qwen3_config
from test_rq_transformer import make_lm
from transformers import Qwen3ForCausalLM

from rqlm.evaluation.brier import (
    ENDED,
    brier_lm_from_generate,
    brier_lm_from_samples,
    mark_ended,
    sample_pairs,
)

SIGMAS = 5  # tolerance in standard errors of the mean; the draws are seeded, so a test never flakes


def closed_form(q: float, s: float) -> tuple[float, float]:
    """Brier(P, y) = 2q - s for q = P(y), s = sum P^2, and the variance of one two-sample estimate
    e = A + B - S (A = I[x1=y], B = I[x2=y], S = I[x1=x2]): E[e^2] = 2q + s - 2q^2 (AB, AS, BS all mean q^2)."""
    mean = 2 * q - s
    return mean, 2 * q + s - 2 * q * q - mean * mean


def independent_ngrams(probs: torch.Tensor, count: int, generator: torch.Generator) -> torch.LongTensor:
    """`count` 4-grams whose tokens are independent draws from `probs` (V,) -> (count, 4)."""
    return torch.multinomial(probs, count * 4, replacement=True, generator=generator).view(count, 4)


def test_the_estimate_equals_the_closed_form_on_a_toy_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    reference = torch.tensor([0, 0, 1, 0])
    count = 100_000
    g = torch.Generator().manual_seed(0)
    samples_a, samples_b = independent_ngrams(probs, count, g), independent_ngrams(probs, count, g)
    figures = brier_lm_from_samples(samples_a, samples_b, reference.expand(count, -1))
    s = float((probs**2).sum())
    for n in range(1, 5):
        q = float(probs[reference[:n]].prod())  # P(y_1..n) of independent tokens
        mean, variance = closed_form(q, s**n)  # sum over n-grams of P^2 = (sum P^2)^n
        tolerance = SIGMAS * math.sqrt(variance / count)
        assert figures[f"brier_{n}"] / 100 == pytest.approx(mean, abs=tolerance), n
        # the reported standard error estimates the closed-form one (its own relative error ~ 1/sqrt(2 count))
        assert figures[f"brier_{n}_stderr"] / 100 == pytest.approx(math.sqrt(variance / count), rel=0.05), n
        assert s**n > 2 * tolerance  # dropping the collision term would be caught at every n
    assert figures["num_prefixes"] == count
    assert figures["brier_lm"] == pytest.approx(100 * math.prod(figures[f"brier_{n}"] / 100 for n in range(1, 5)) ** 0.25)


def test_a_sampler_that_always_gives_the_reference_scores_100():
    references = torch.randint(0, 50, (7, 4), generator=torch.Generator().manual_seed(0))
    figures = brier_lm_from_samples(references.clone(), references.clone(), references)
    assert figures == {"brier_1": 100.0, "brier_2": 100.0, "brier_3": 100.0, "brier_4": 100.0, "brier_lm": 100.0,
                       "num_prefixes": 7.0, **{f"brier_{n}_stderr": 0.0 for n in range(1, 5)}}


def test_negative_figures_give_zero_and_bad_shapes_are_one_line_errors():
    wrong = torch.zeros(5, 4, dtype=torch.long)  # both samples agree, never with the reference: every estimate -1
    figures = brier_lm_from_samples(wrong, wrong, torch.ones(5, 4, dtype=torch.long))
    assert figures["brier_1"] == -100.0 and figures["brier_lm"] == 0.0
    with pytest.raises(ValueError, match="next 4 tokens"):
        brier_lm_from_samples(wrong[:, :3], wrong[:, :3], wrong[:, :3])
    with pytest.raises(ValueError, match="one shape"):
        brier_lm_from_samples(wrong, wrong[:4], wrong)


class UniformSampler(torch.nn.Module):
    """A 'model' whose `generate` appends tokens drawn uniformly from V (global RNG, like HF's sampling)."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def generate(self, input_ids, max_new_tokens, **kwargs):
        assert kwargs["do_sample"] and kwargs["top_k"] == 0 and kwargs["top_p"] == 1.0
        new = torch.randint(0, self.vocab_size, (len(input_ids), max_new_tokens))
        return torch.cat([input_ids, new], dim=1)


def test_a_uniform_sampler_through_generate_gives_the_closed_form():
    vocab, count = 2, 40_000
    prefixes = torch.zeros(count, 3, dtype=torch.long)
    references = torch.randint(0, vocab, (count, 4), generator=torch.Generator().manual_seed(12345))  # not a draw's seed
    figures = brier_lm_from_generate(UniformSampler(vocab), prefixes, references, batch_size=4096, seed=0)
    relative = 0.0
    for n in range(1, 5):
        q = vocab**-n  # P(y) = sum P^2 = V^-n: Brier-n = V^-n
        mean, variance = closed_form(q, q)
        standard_error = math.sqrt(variance / count)
        assert figures[f"brier_{n}"] / 100 == pytest.approx(mean, abs=SIGMAS * standard_error), n
        relative += standard_error / mean
    # the geometric mean's relative error is at most the mean of the four relative errors (delta method)
    assert figures["brier_lm"] == pytest.approx(100 * vocab**-2.5, rel=SIGMAS * relative / 4)


def test_an_ended_sample_is_its_ngram_up_to_eos():
    eos = 1
    tokens = torch.tensor([[5, 1, 7, 8], [1, 1, 2, 2], [5, 6, 7, 8]])
    assert mark_ended(tokens, eos).tolist() == [[5, 1, ENDED, ENDED], [1, ENDED, ENDED, ENDED], [5, 6, 7, 8]]
    assert torch.equal(mark_ended(tokens, None), tokens)


@pytest.mark.parametrize("kind", ["qwen3", "rq_transformer"])
def test_brier_lm_from_generate_runs_on_both_model_kinds_and_is_seeded(kind):
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_qwen3_config(vocab_size=50)).eval() if kind == "qwen3" else make_lm()
    g = torch.Generator().manual_seed(0)
    prefixes = torch.randint(2, 50, (5, 6), generator=g)  # 6 tokens: not a multiple of the RQ model's C = 4
    references = torch.randint(2, 50, (5, 4), generator=g)
    settings = {"batch_size": 2, "seed": 3, "eos_token_id": 1, "pad_token_id": 0}
    first = sample_pairs(model, prefixes, **settings)
    assert first[0].shape == first[1].shape == (5, 4)
    assert not torch.equal(first[0], first[1])  # two independent draws
    assert all(torch.equal(x, y) for x, y in zip(first, sample_pairs(model, prefixes, **settings)))
    assert not torch.equal(first[0], sample_pairs(model, prefixes, **{**settings, "seed": 4})[0])
    figures = brier_lm_from_generate(model, prefixes, references, **settings)
    assert figures == brier_lm_from_samples(*first, references)
    assert set(figures) == {"brier_lm", "num_prefixes", *(f"brier_{n}{end}" for n in range(1, 5) for end in ("", "_stderr"))}
    assert 0 <= figures["brier_lm"] <= 100 and figures["num_prefixes"] == 5
