"""BrierLM (CALM, Shao et al. 2025, arXiv 2510.27688): a likelihood-free quality figure for any sampler.

The Brier score of a predictive distribution P for the outcome y is

    Brier(P, y) = 2 P(y) - sum_x P(x)^2        (in [-1, 1]; 1 for a point mass on y; higher is better)

and with two independent samples x1, x2 from P,  I[x1 = y] + I[x2 = y] - I[x1 = x2]  is an unbiased
estimate of it, so a model that can only sample (no likelihood) can be scored. Brier-n takes the next
n tokens after a prefix as one outcome (an n-gram: the indicators compare whole n-grams).

As in CALM's evaluation code (`compute_metrics` of train_ar.py / train_calm.py):
  - each Brier-n is the mean of the per-prefix estimates over the whole corpus of prefixes, BEFORE the
    geometric mean: BrierLM = 100 * (Brier-1 * Brier-2 * Brier-3 * Brier-4) ** (1/4);
  - a negative figure has no geometric mean: CALM takes max(product, 0). Here each corpus mean is
    clamped at 0 before the product, which is the same whenever an odd number of the four (or none)
    is negative, and gives 0 instead of a meaningless positive value when two or four are.
  - every figure is reported on the 100 scale: 'brier_n' = 100 * Brier-n (unclamped, in [-100, 100],
    negative for a model that is confidently wrong), 'brier_lm' in [0, 100]; 'brier_n_stderr' is the standard
    error of 'brier_n' over the prefixes (their estimates' standard deviation / sqrt(N)).

Brier-n is small for a weak model and its two-sample estimate is noisy: a sampled n-gram must match the
reference (or the other sample) exactly, so a model that rarely does scores 0 on a few dozen prefixes. Read
'brier_n' against its standard error, and use many prefixes (thousands) to separate two models.

An ended sample (the model emitted EOS) is the n-gram up to its EOS: positions after it hold -1 in
samples and references alike, so two samples that end at the same place agree there.
"""

from __future__ import annotations

import math

import torch

from rqlm.evaluation.perplexity import until_first_eos

BRIER_ORDERS = 4  # Brier-1 .. Brier-4
ENDED = -1  # a position after a sample's (or the reference's) first EOS


def brier_estimates(samples_a: torch.LongTensor, samples_b: torch.LongTensor, references: torch.LongTensor) -> torch.Tensor:
    """Per-prefix unbiased Brier-n estimates I[a=y] + I[b=y] - I[a=b] over n-grams: (N, n_max) x 3 -> (N, n_max)."""
    if not samples_a.shape == samples_b.shape == references.shape or samples_a.dim() != 2:
        raise ValueError(f"samples_a, samples_b and references must be (N, n) of one shape, got "
                         f"{tuple(samples_a.shape)}, {tuple(samples_b.shape)}, {tuple(references.shape)}")
    a_hits = (samples_a == references).double().cumprod(-1)  # the first n tokens all agree
    b_hits = (samples_b == references).double().cumprod(-1)
    collisions = (samples_a == samples_b).double().cumprod(-1)
    return a_hits + b_hits - collisions


def brier_lm_from_samples(
    samples_a: torch.LongTensor, samples_b: torch.LongTensor, references: torch.LongTensor
) -> dict[str, float]:
    """Two independent samples and the reference of the next tokens per prefix, (N, n_max >= 4) each ->
    {'brier_lm', 'brier_1'..'brier_4', 'brier_1_stderr'..'brier_4_stderr', 'num_prefixes'} (100 scale; see the
    module docstring)."""
    if samples_a.dim() == 2 and samples_a.shape[1] < BRIER_ORDERS:
        raise ValueError(f"BrierLM needs the next {BRIER_ORDERS} tokens of each prefix, got {samples_a.shape[1]}; "
                         f"sample and keep at least {BRIER_ORDERS} new tokens")
    if len(samples_a) == 0:
        raise ValueError("BrierLM needs at least one prefix, got none")
    estimates = brier_estimates(samples_a, samples_b, references)[:, :BRIER_ORDERS]  # (N, 4)
    briers = estimates.mean(0).tolist()  # corpus means, then the geometric mean
    figures = {f"brier_{n + 1}": 100 * value for n, value in enumerate(briers)}
    spread = estimates.std(0, correction=1) if len(estimates) > 1 else torch.zeros(BRIER_ORDERS)
    for n, value in enumerate((100 * spread / math.sqrt(len(estimates))).tolist()):
        figures[f"brier_{n + 1}_stderr"] = value
    figures["brier_lm"] = 100 * math.prod(max(value, 0.0) for value in briers) ** (1 / BRIER_ORDERS)
    figures["num_prefixes"] = float(len(estimates))
    return figures


def mark_ended(tokens: torch.LongTensor, eos_token_id: int | None) -> torch.LongTensor:
    """Tokens (N, n) with every position after the first EOS set to ENDED (-1); unchanged without an EOS id."""
    return tokens.masked_fill(~until_first_eos(tokens, eos_token_id), ENDED)


@torch.no_grad()
def sample_pairs(
    model,
    prefixes: torch.LongTensor,
    *,
    num_tokens: int = BRIER_ORDERS,
    batch_size: int = 8,
    temperature: float = 1.0,
    seed: int = 0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Two independent samples of `num_tokens` new tokens after each prefix (N, P) -> (N, num_tokens) twice, on CPU.

    Pure ancestral sampling (top_k 0, top_p 1) through the model's own `generate`; each batch and draw has
    its own seed (seed + 2 * batch + draw), so the pair is reproducible for a fixed seed. The prefixes are
    unpadded rows of one length P (a P that is not a multiple of the RQ model's C is its `generate`'s to handle).
    Positions after a sample's EOS (or past an early stop) hold ENDED."""
    from rqlm.evaluation.perplexity import sample_continuations

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    was_training = model.training
    model.eval()
    device = getattr(model, "device", prefixes.device)
    draws: list[list[torch.Tensor]] = [[], []]
    for index, start in enumerate(range(0, len(prefixes), batch_size)):
        batch = prefixes[start : start + batch_size].to(device)
        for draw in range(2):
            new = sample_continuations(
                model, batch, num_tokens, seed + 2 * index + draw, eos_token_id, pad_token_id,
                do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
            )  # (b, <= num_tokens): generate stops early once every row has ended
            new = torch.nn.functional.pad(new, (0, num_tokens - new.shape[1]), value=ENDED)
            draws[draw].append(mark_ended(new, eos_token_id).cpu())
    model.train(was_training)
    return torch.cat(draws[0]), torch.cat(draws[1])


def brier_lm_from_generate(
    model,
    prefixes: torch.LongTensor,
    references: torch.LongTensor,
    *,
    batch_size: int = 8,
    temperature: float = 1.0,
    seed: int = 0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> dict[str, float]:
    """BrierLM of any model with HF's `generate` (Qwen3ForCausalLM, RQTransformerForCausalLM): prefixes (N, P),
    references (N, 4) = the tokens that followed them -> `brier_lm_from_samples`'s figures."""
    if prefixes.dim() != 2 or references.dim() != 2 or len(prefixes) != len(references):
        raise ValueError(f"prefixes (N, P) and references (N, {BRIER_ORDERS}) must have one row per prefix, got "
                         f"{tuple(prefixes.shape)} and {tuple(references.shape)}")
    samples_a, samples_b = sample_pairs(
        model, prefixes, num_tokens=references.shape[1], batch_size=batch_size, temperature=temperature, seed=seed,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )
    return brier_lm_from_samples(samples_a, samples_b, mark_ended(references.cpu(), eos_token_id))


__all__ = ["BRIER_ORDERS", "ENDED", "brier_estimates", "brier_lm_from_generate", "brier_lm_from_samples",
           "mark_ended", "sample_pairs"]
