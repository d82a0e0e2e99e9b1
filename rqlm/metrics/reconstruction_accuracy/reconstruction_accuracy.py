"""RQ-VAE reconstruction accuracy as an `evaluate` metric: a wrapper over rqlm.evaluation.reconstruction."""

import datasets
import evaluate
import torch

from rqlm.evaluation.reconstruction import accuracy_figures, position_accuracy_counts

_DESCRIPTION = """
Reconstruction accuracy of a chunk autoencoder (rqlm's RQ-VAE): the fraction of tokens its decoder gives back
(argmax) from the codes of their chunk, overall and at each position inside a chunk of C tokens.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int`): the decoded tokens of each text (a multiple of C long).
    references (`list` of `list` of `int`): the original tokens, same lengths; negative entries (-100: padding)
        are not counted.
    compression_factor (`int`): C, the tokens per chunk.
Returns:
    accuracy (`float`): 0..1 over all counted tokens. accuracy_pos{i} (`float`): at position i of a chunk.
Examples:
    >>> accuracy = evaluate.load(rqlm.metrics.path("reconstruction_accuracy"))
    >>> accuracy.compute(predictions=[[1, 2, 3, 9]], references=[[1, 2, 3, 4]], compression_factor=2)["accuracy"]
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

_TOKENS = datasets.Sequence(datasets.Value("int64"))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ReconstructionAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": _TOKENS, "references": _TOKENS}),
        )

    def _compute(self, predictions, references, compression_factor):
        counts = torch.zeros(2, compression_factor, dtype=torch.float64)
        for prediction, reference in zip(predictions, references):  # texts may differ in length
            prediction, reference = torch.tensor([prediction]), torch.tensor([reference])  # (1, T)
            counts += position_accuracy_counts(prediction, reference, reference >= 0, compression_factor)
        return accuracy_figures(counts)
