"""BrierLM (CALM, Shao et al. 2025) as an `evaluate` metric: a wrapper over rqlm.evaluation.brier."""

import datasets
import evaluate
import torch

from rqlm.evaluation.brier import brier_lm_from_samples

_DESCRIPTION = """
BrierLM is a likelihood-free score for any language model that can sample: for each prefix, two independent
samples x1, x2 of the next tokens and the reference y give the unbiased Brier estimate
I[x1 = y] + I[x2 = y] - I[x1 = x2] of 2 P(y) - sum_x P(x)^2. Brier-n scores the next n tokens as one outcome;
each Brier-n is averaged over the prefixes, and BrierLM = 100 * (Brier-1 * Brier-2 * Brier-3 * Brier-4)^(1/4)
(a negative mean counts as 0). Higher is better; 100 for a model that always samples the reference.
"""

_KWARGS_DESCRIPTION = """
Args:
    samples_a (`list` of `list` of `int`): the first sample of the next n_max >= 4 tokens after each prefix.
    samples_b (`list` of `list` of `int`): an independent second sample, same shape.
    references (`list` of `list` of `int`): the tokens that really followed each prefix, same shape.
    Positions after a sample's end (EOS) hold -1, in samples and references alike.
Returns:
    brier_lm (`float`): 0..100. brier_1 .. brier_4 (`float`): 100 * Brier-n, in -100..100.
    num_prefixes (`float`): how many prefixes were scored.
Examples:
    >>> brier = evaluate.load(rqlm.metrics.path("brier_lm"))
    >>> brier.compute(samples_a=[[5, 6, 7, 8]], samples_b=[[5, 6, 7, 8]], references=[[5, 6, 7, 8]])["brier_lm"]
    100.0
"""

_CITATION = """
@article{shao2025calm,
  title={Continuous Autoregressive Language Models},
  author={Shao, Chenze and Li, Darren and Meng, Fandong and Zhou, Jie},
  journal={arXiv preprint arXiv:2510.27688},
  year={2025}
}
"""

_TOKENS = datasets.Sequence(datasets.Value("int64"))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class BrierLM(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"samples_a": _TOKENS, "samples_b": _TOKENS, "references": _TOKENS}),
            reference_urls=["https://arxiv.org/abs/2510.27688"],
        )

    def _compute(self, samples_a, samples_b, references):
        return brier_lm_from_samples(torch.tensor(samples_a), torch.tensor(samples_b), torch.tensor(references))
