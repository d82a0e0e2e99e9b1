"""The latent LM's perplexity bound, term by term.

For any code sequence z, -log p(x) <= -log p(z) - log p(x | z). With z the frozen VAE
encoder's codes of x, the right side is the LM's code NLL plus the VAE decoder's
reconstruction NLL, so

    perplexity_bound = exp((NLL_codes(z) + NLL_recon(x | z)) / num_tokens)

is an upper bound on the RQ model's perplexity, comparable with a token LM's perplexity on
the same tokens. The model is p(x) = sum_z p(z) p_dec(x | z); the sampler that draws from it
samples the codes and the decoder's tokens, both at temperature 1 with no truncation:
`generate(do_sample=True, top_k=0, decoder_do_sample=True)` (the default decoder argmax is
another sampler, which the bound does not describe). With `depth_output="codes_then_tokens"` the same
bound reads p(x | z) from the model's own token decoder (given the codes and the text before), and
`generate(do_sample=True, top_k=0)` draws from its joint. `bound_terms` returns the summed terms
of one batch (so batches and ranks add up); `perplexity_bound` turns summed terms into the figure.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from rqlm.evaluation.perplexity import safe_exp
from rqlm.modeling.modeling_rq_vae import IGNORE_INDEX


@torch.no_grad()
def bound_terms(
    model, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, codes: torch.LongTensor | None = None
) -> dict[str, torch.Tensor]:
    """Summed NLL terms of the bound for tokens (B, T) under an `RQTransformerForCausalLM` (not DDP-wrapped).

    Returns float64 tensors, all sums over the batch (nats):
      'nll_codes'        ()   code NLL, summed over positions and depths
      'nll_recon'        ()   reconstruction NLL of the tokens given their codes (the VAE decoder's, or with
                              codes_then_tokens the token decoder's)
      'num_tokens'       ()   tokens scored (attention_mask 1)
      'nll_codes_depth'  (D,) code NLL of each depth
      'correct_depth'    (D,) codes predicted right (argmax) at each depth
      'num_codes_depth'  (D,) codes scored at each depth
    `codes` (B, L, D) may be passed when already computed by the same VAE (`rqlm encode`); padding
    (mask 0 or code -1) is left out of every term, and a left-padded row scores what it scores alone.
    """
    if getattr(model.config, "depth_output", "codes") == "tokens":
        raise ValueError("a depth_output='tokens' model has an exact likelihood: score it with its forward's loss, "
                         "not the bound")
    was_training = model.training
    model.eval()
    planned = getattr(model.config, "depth_output", "codes") == "codes_then_tokens"
    if codes is None and not planned:
        codes = model.encode(input_ids, attention_mask)  # (B, L, D), -1 on chunks of padding only
    # through forward (padding masked there), so wrappers that act on forward (FSDP's unsharding) see the call
    out = model(input_ids=input_ids, attention_mask=attention_mask, codes=codes)
    model.train(was_training)
    if planned:  # codes per chunk from each row's first real token; the token decoder's NLL given them
        codes, code_logits = out.codes, out.code_logits.float()  # (B, L, D), (B, L, D, K)
        nll_recon = (out.token_loss * out.num_tokens).double()
    else:
        code_logits = out.logits.float()  # (B, L, D, K)
    valid = codes >= 0  # (B, L, D)
    nll = F.cross_entropy(
        rearrange(code_logits, "b l d k -> b k l d"), codes.masked_fill(~valid, IGNORE_INDEX),
        ignore_index=IGNORE_INDEX, reduction="none",
    )  # (B, L, D), 0 on padding
    correct = (code_logits.argmax(-1) == codes) & valid  # (B, L, D)
    targets = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    if not planned:
        vae = model.vae
        decoder_tokens = input_ids if vae.config.decoder_sees_previous_tokens else None
        logits = vae.decode(codes.clamp(min=0), input_ids=decoder_tokens, attention_mask=attention_mask)  # (B, T, V)
        nll_recon = F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
    nll_codes_depth = nll.sum(dim=(0, 1)).double()  # (D,)
    return {
        "nll_codes": nll_codes_depth.sum(),
        "nll_recon": nll_recon.double(),
        "num_tokens": (targets != IGNORE_INDEX).sum().double(),
        "nll_codes_depth": nll_codes_depth,
        "correct_depth": correct.sum(dim=(0, 1)).double(),
        "num_codes_depth": valid.sum(dim=(0, 1)).double(),
    }


def perplexity_bound(terms: dict[str, torch.Tensor | float]) -> float:
    """exp((nll_codes + nll_recon) / num_tokens) of summed `bound_terms` (inf when it overflows)."""
    nats = (float(terms["nll_codes"]) + float(terms["nll_recon"])) / max(float(terms["num_tokens"]), 1.0)
    return safe_exp(nats)


__all__ = ["bound_terms", "perplexity_bound"]
