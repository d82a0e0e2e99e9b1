"""The latent LM's perplexity bound as an `evaluate` metric: a wrapper over rqlm.evaluation.bound."""

import datasets
import evaluate

from rqlm.evaluation.bound import perplexity_bound

_DESCRIPTION = """
An upper bound on the perplexity of a latent LM over a frozen autoencoder's codes z: since
-log p(x) <= -log p(z) - log p(x | z), exp((NLL_codes + NLL_recon) / tokens) bounds its perplexity and compares
with a token LM's perplexity on the same tokens. Inputs are summed NLL terms (nats) per text or batch, as
`rqlm.evaluation.bound.bound_terms` returns them; they are added up before the bound is taken.
"""

_KWARGS_DESCRIPTION = """
Args:
    nll_codes (`list` of `float`): the LM's code NLL of each text (nats, summed over positions and depths).
    nll_recon (`list` of `float`): the decoder's reconstruction NLL of each text given its codes (nats).
    num_tokens (`list` of `float`): the tokens of each text.
Returns:
    perplexity_bound (`float`): exp((sum nll_codes + sum nll_recon) / sum num_tokens).
Examples:
    >>> bound = evaluate.load(rqlm.metrics.path("perplexity_bound"))
    >>> round(bound.compute(nll_codes=[2.0], nll_recon=[0.0], num_tokens=[2.0])["perplexity_bound"], 4)
    2.7183
"""

_CITATION = """
@misc{rqlm,
  title={rqlm: a Qwen language model that generates text in a compressed, residual-quantized latent space},
  year={2025}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PerplexityBound(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({name: datasets.Value("float64")
                                        for name in ("nll_codes", "nll_recon", "num_tokens")}),
        )

    def _compute(self, nll_codes, nll_recon, num_tokens):
        terms = {"nll_codes": sum(nll_codes), "nll_recon": sum(nll_recon), "num_tokens": sum(num_tokens)}
        return {"perplexity_bound": perplexity_bound(terms)}
