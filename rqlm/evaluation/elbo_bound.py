"""The continuous latent LM's perplexity bound (GIVT, Gaussian head): an ELBO on the tokens.

With continuous latents the model's probability of a text is p(x) = integral p(x|z) p_LM(z) dz, where
p_LM(z) = prod_l p(z_l | z_<l) is the Gaussian (mixture) head's density and p(x|z) the frozen VAE decoder's
softmax. For the VAE posterior q(z|x) = prod_l N(z_l; mean_l(x), diag var_l(x)), Jensen's inequality gives

    -log p(x) <= E_q[-log p(x|z)] + KL(q(z|x) || p_LM(z))
              =  E_q[-log p(x|z)] + sum_l E_{q(z_<l)}[ KL(q(z_l|x) || p_LM(z_l | z_<l)) ]

(the second line because q factorises over positions). The discrete bound of bound.py is the special case
of a point-mass q (its KL term becomes the code NLL). `elbo_terms` estimates the right side with
`num_samples` draws z ~ q:

  - the reconstruction term -log p(x|z) is exact for each draw (the decoder's cross-entropy);
  - with one Gaussian per position (num_mixtures = 1) the KL of each position is exact in closed form given
    the drawn prefix z_<l; only the expectation over the prefix is Monte Carlo;
  - with a mixture (k > 1) the KL has no closed form and is estimated by log q(z_l|x) - log p_LM(z_l | z_<l)
    at the drawn z_l.

Every term is then an unbiased estimate of its expectation, so the summed nats are an unbiased estimate of an
upper bound on the tokens' NLL (exp of it, the perplexity bound, is biased by Jensen only through the noise of
the estimate, small over many tokens). Keys match bound.py's ('nll_codes' is the latent KL term) so
`perplexity_bound` applies unchanged. The energy head has no density: no bound, BrierLM only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rqlm.modeling.gaussian_posterior import gaussian_log_density
from rqlm.modeling.modeling_rq_vae import IGNORE_INDEX


def gaussian_kl(mean_q, logvar_q, mean_p, log_scale_p) -> torch.Tensor:
    """KL(N(mean_q, exp(logvar_q)) || N(mean_p, exp(2 log_scale_p))) per dimension, elementwise."""
    return log_scale_p - 0.5 * logvar_q + (logvar_q.exp() + (mean_q - mean_p).square()) / (2 * torch.exp(2 * log_scale_p)) - 0.5


@torch.no_grad()
def elbo_terms(
    model, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, num_samples: int = 1
) -> dict[str, torch.Tensor]:
    """Summed terms of the ELBO bound for tokens (B, T) under a Gaussian-head `GIVTForCausalLM` (not DDP-wrapped).

    Returns float64 sums over the batch, averaged over `num_samples` draws z ~ q(z|x) (nats):
      'nll_codes'   ()  the latent term, sum over positions of KL(q(z_l|x) || p_LM(z_l | z_<l))
      'nll_recon'   ()  -log p(x|z), the decoder's cross-entropy of the tokens
      'num_tokens'  ()  tokens scored (attention_mask 1)
      'num_latents' ()  latent positions scored
    A left-padded row scores what it scores alone (`padded_spatial_forward`, inside the model's forward).
    """
    if model.config.head != "gaussian":
        raise ValueError("the energy head is likelihood-free: it has no perplexity bound (BrierLM compares it)")
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    was_training = model.training
    model.eval()
    mean, logvar, latent_mask = model.posterior(input_ids, attention_mask)  # (B, L, d) x2, (B, L) or None
    valid = torch.ones(mean.shape[:2], dtype=torch.bool, device=mean.device) if latent_mask is None else latent_mask.bool()
    vae, head = model.vae, model.head
    decoder_tokens = input_ids if vae.config.decoder_sees_previous_tokens else None
    targets = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    latent_nats = recon_nats = torch.zeros((), dtype=torch.float64, device=mean.device)
    for _ in range(num_samples):
        z = (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)).masked_fill(~valid[..., None], 0.0)
        hidden = model(latents=z, latent_mask=latent_mask).hidden_states  # (B, L, H), padding masked
        if head.num_mixtures == 1:
            _, mean_p, log_scale_p = head.parameters_of(hidden)  # (B, L, 1, d)
            kl = gaussian_kl(mean, logvar, mean_p[..., 0, :], log_scale_p[..., 0, :]).sum(-1)  # (B, L)
        else:
            kl = gaussian_log_density(z, mean, logvar).sum(-1) + head.nll(hidden, z)  # log q - log p
        latent_nats = latent_nats + (kl * valid).sum().double()
        logits = vae.decode(z, input_ids=decoder_tokens, attention_mask=attention_mask)  # (B, T, V)
        recon = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        recon_nats = recon_nats + recon.double()
    model.train(was_training)
    return {
        "nll_codes": latent_nats / num_samples,
        "nll_recon": recon_nats / num_samples,
        "num_tokens": (targets != IGNORE_INDEX).sum().double(),
        "num_latents": valid.sum().double(),
    }


__all__ = ["elbo_terms", "gaussian_kl"]
