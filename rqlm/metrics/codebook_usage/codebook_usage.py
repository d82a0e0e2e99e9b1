"""Per-depth codebook usage as an `evaluate` metric: a wrapper over rqlm.evaluation.reconstruction."""

import datasets
import evaluate
import torch

from rqlm.evaluation.reconstruction import codebook_usage_figures

_DESCRIPTION = """
Codebook usage of a residual quantizer, per depth: the perplexity of the code frequencies (exp of their entropy,
1..K: how many codes are effectively used) and the fraction of the K codes that never occur.
"""

_KWARGS_DESCRIPTION = """
Args:
    codes (`list` of `list` of `list` of `int`): the codes of each text, (L, D) per text; negative: padding.
    codebook_size (`int`): K, the codes per depth.
Returns:
    usage_perplexity_d{j}, dead_fraction_d{j} (`float`): at depth j; usage_perplexity_mean, dead_fraction_mean.
Examples:
    >>> usage = evaluate.load(rqlm.metrics.path("codebook_usage"))
    >>> usage.compute(codes=[[[0, 1], [1, 1]]], codebook_size=4)["dead_fraction_d1"]
    0.75
"""

_CITATION = """
@inproceedings{lee2022autoregressive,
  title={Autoregressive Image Generation using Residual Quantization},
  author={Lee, Doyup and Kim, Chiheon and Kim, Saehoon and Cho, Minsu and Han, Wook-Shin},
  booktitle={CVPR},
  year={2022}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CodebookUsage(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"codes": datasets.Sequence(datasets.Sequence(datasets.Value("int64")))}),
        )

    def _compute(self, codes, codebook_size):
        flat = torch.cat([torch.tensor(text).reshape(-1, len(text[0])) for text in codes if text])  # (N, D)
        return codebook_usage_figures(flat, codebook_size)
