"""The frozen code prior of joint rate-distortion training (`rqlm train-vae --rate_prior`).

    codes (B, L, D) -> a codes-mode latent LM, teacher-forced -> log p(code | codes before it)   (B, L, D, K)

Kaiser et al. (2018) and Roy et al. (2018) train the discrete autoencoder against the rate its prior assigns
to the codes; here the prior is a `depth_output="codes"` RQ-Transformer trained on this VAE's codes (the
warm-up), frozen. It lives outside the RQ-VAE: the training loop calls it on each batch's own codes inside the
VAE's forward (`forward(code_log_prior=)`), under no_grad, and it never enters the VAE's optimizer or checkpoint.
"""

from __future__ import annotations

import torch


class CodePrior:
    """`prior(codes (B, L, D)) -> log-probabilities (B, L, D, K)` of each code given the codes before it (fp32)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(cls, path: str, vae) -> CodePrior:
        """Load a codes-mode `RQTransformerForCausalLM` folder; one-line errors when it is missing, of another
        mode, or models codes of another shape than `vae`'s."""
        from pathlib import Path

        from rqlm import RQTransformerForCausalLM

        if not Path(path).is_dir():
            raise FileNotFoundError(f"--rate_prior {path!r} is not a folder; pass a `rqlm train-lm --depth_output codes` output")
        model = RQTransformerForCausalLM.from_pretrained(path, dtype=torch.float32)
        if model.config.depth_output != "codes":
            raise ValueError(f"--rate_prior {path!r} is a depth_output={model.config.depth_output!r} model; the rate "
                             "needs a prior over codes (depth_output='codes')")
        if (model.config.num_quantizers, model.config.codebook_size) != (vae.quantizer_depth, vae.quantizer_size):
            raise ValueError(
                f"--rate_prior {path!r} models D={model.config.num_quantizers} codes of K={model.config.codebook_size}; "
                f"this VAE gives D={vae.quantizer_depth} of K={vae.quantizer_size}"
            )
        return cls(model)

    @torch.no_grad()
    def __call__(self, codes: torch.LongTensor) -> torch.FloatTensor:
        if next(self.model.parameters()).device != codes.device:
            self.model.to(codes.device)
        return self.model(codes=codes).logits.float().log_softmax(-1)


__all__ = ["CodePrior"]
