"""Training FLOPs (`params_per_token`, `training_flops`): the usual 6 N per token for a trained weight
(forward 2 N, backward 4 N) and 2 N per token for a frozen forward, where N counts every weight matrix
as many times as it is applied per text token. One forward pass of a block, with hooks on every
nn.Linear / nn.Conv1d / nn.ConvTranspose1d, counts the applications (a hook sees how many vectors
went through): the baseline's layers and LM head apply once per token (6 N D as usual); the
RQ-Transformer's spatial layers once per C tokens, its depth transformer D times per C tokens; the
frozen VAE's encoder path (inside the LM's forward on tokens) counts 2 N. Embedding lookups, norms,
attention scores (context-length dependent) and codebook distance computations count 0. So:
    baseline(t)      = 6 N_baseline t
    RQ system(t)     = 6 N_vae t_vae  +  (6 N_lm + 2 N_encoder) t
where t is the tokens the run has seen, t_vae the VAE run's tokens (its whole training, paid once).
The encoder term charges encoding per token seen (as train-lm does without `--codes`); with
`rqlm encode` it is paid once per dataset token, so this slightly over-counts a multi-epoch LM.
A frozen-then-unfrozen backbone counts 6 N throughout (an over-count of at most 2 N per frozen step).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

FLOPS_PER_TRAINED_PARAM = 6  # forward 2 + backward 4, per application
FLOPS_PER_FROZEN_PARAM = 2  # forward only
COUNTED_MODULES = (nn.Linear, nn.Conv1d, nn.ConvTranspose1d)


def _applications(module: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    """How many times a module's whole weight was applied: vectors in (Linear, ConvTranspose1d) or out (Conv1d)."""
    if isinstance(module, nn.Linear):
        return inputs[0].numel() // module.in_features
    if isinstance(module, nn.ConvTranspose1d):
        return inputs[0].numel() // module.in_channels
    return output.numel() // module.out_channels


@torch.no_grad()
def params_per_token(model: nn.Module, input_ids: torch.LongTensor, frozen_prefixes=None,
                     **forward_kwargs) -> tuple[float, float]:
    """(trained, frozen) weights applied per token of `input_ids` (B, T) in one forward pass of `model`.

    A module counts as frozen when its name starts with one of `frozen_prefixes` (default: the modules
    of `model._ddp_params_and_buffers_to_ignore`, the RQ LM's frozen VAE)."""
    if frozen_prefixes is None:
        ignored = getattr(model, "_ddp_params_and_buffers_to_ignore", ())
        frozen_prefixes = tuple(sorted({name.split(".")[0] + "." for name in ignored}))
    counts = {"trained": 0, "frozen": 0}
    handles = []
    for name, module in model.named_modules():
        if not isinstance(module, COUNTED_MODULES):
            continue
        weights = sum(p.numel() for p in module.parameters(recurse=False))
        side = "frozen" if f"{name}.".startswith(tuple(frozen_prefixes)) else "trained"

        def hook(module, inputs, output, weights=weights, side=side):
            counts[side] += weights * _applications(module, inputs, output)

        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(input_ids=input_ids, **forward_kwargs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    tokens = input_ids.numel()
    return counts["trained"] / tokens, counts["frozen"] / tokens


def training_flops(trained_per_token: float, frozen_per_token: float, tokens: float) -> float:
    """6 N_trained + 2 N_frozen FLOPs per token, times the tokens seen."""
    return (FLOPS_PER_TRAINED_PARAM * trained_per_token + FLOPS_PER_FROZEN_PARAM * frozen_per_token) * tokens


def _probe_ids(vocab_size: int, block_size: int) -> torch.LongTensor:
    """One block of token ids (1, block_size) for counting: any ids do, the count depends only on shapes."""
    return (torch.arange(block_size) % vocab_size).unsqueeze(0)


def baseline_flops_per_token(baseline_dir: Path, block_size: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(baseline_dir)
    trained, frozen = params_per_token(model, _probe_ids(model.config.vocab_size, block_size), frozen_prefixes=())
    return training_flops(trained, frozen, 1)


def rq_flops(lm_dir: Path, block_size: int) -> dict[str, float]:
    """The RQ system's FLOPs per token: the VAE's training, and the LM's (6 N_lm + 2 N_encoder)."""
    from rqlm import RQTransformerForCausalLM

    model = RQTransformerForCausalLM.from_pretrained(lm_dir)
    ids = _probe_ids(model.config.vae_config.backbone_config.vocab_size, block_size)
    lm_trained, encoder = params_per_token(model, ids)
    vae, _ = params_per_token(model.vae, ids, frozen_prefixes=())  # the VAE trained all of itself
    return {
        "vae_flops_per_token": training_flops(vae, 0, 1),
        "lm_flops_per_token": training_flops(lm_trained, encoder, 1),
        "lm_params_per_token": lm_trained,
        "encoder_params_per_token": encoder,
    }
