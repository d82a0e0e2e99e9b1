"""The latent LM's perplexity bound, term by term.

For any code sequence z, -log p(x) <= -log p(z) - log p(x | z). With z the frozen VAE
encoder's codes of x, the right side is the LM's code NLL plus the VAE decoder's
reconstruction NLL, so

    perplexity_bound = exp((NLL_codes(z) + NLL_recon(x | z)) / num_tokens)

is an upper bound on the RQ model's perplexity, comparable with a token LM's perplexity on
the same tokens. `bound_terms` returns the summed terms of one batch (so batches and ranks
add up); `perplexity_bound` turns summed terms into the figure.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rqlm.modeling.modeling_rq_vae import IGNORE_INDEX


@torch.no_grad()
def bound_terms(
    model, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, codes: torch.LongTensor | None = None
) -> dict[str, torch.Tensor]:
    """Summed NLL terms of the bound for tokens (B, T) under an `RQTransformerForCausalLM` (not DDP-wrapped).

    Returns float64 tensors, all sums over the batch (nats):
      'nll_codes'        ()   code NLL, summed over positions and depths
      'nll_recon'        ()   reconstruction NLL of the tokens given their codes
      'num_tokens'       ()   tokens scored (attention_mask 1)
      'nll_codes_depth'  (D,) code NLL of each depth
      'correct_depth'    (D,) codes predicted right (argmax) at each depth
      'num_codes_depth'  (D,) codes scored at each depth
    `codes` (B, L, D) may be passed when already computed by the same VAE (`rqlm encode`); padding
    (mask 0 or code -1) is left out of every term.
    """
    was_training = model.training
    model.eval()
    out = model(input_ids=input_ids, attention_mask=attention_mask, codes=codes)
    model.train(was_training)
    num_codes = out.num_codes.double()  # (D,)
    vae = model.vae
    decoder_tokens = input_ids if vae.config.decoder_sees_previous_tokens else None
    logits = vae.decode(out.codes.clamp(min=0), input_ids=decoder_tokens, attention_mask=attention_mask)  # (B, T, V)
    targets = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    nll_recon = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return {
        "nll_codes": (out.depth_nll.double() * num_codes).sum(),
        "nll_recon": nll_recon.double(),
        "num_tokens": (targets != IGNORE_INDEX).sum().double(),
        "nll_codes_depth": out.depth_nll.double() * num_codes,
        "correct_depth": out.depth_accuracy.double() * num_codes,
        "num_codes_depth": num_codes,
    }


def perplexity_bound(terms: dict[str, torch.Tensor | float]) -> float:
    """exp((nll_codes + nll_recon) / num_tokens) of summed `bound_terms` (inf when it overflows)."""
    nats = (float(terms["nll_codes"]) + float(terms["nll_recon"])) / max(float(terms["num_tokens"]), 1.0)
    return math.exp(nats) if nats < 700 else float("inf")


__all__ = ["bound_terms", "perplexity_bound"]
