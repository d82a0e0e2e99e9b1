"""A token LM's perplexity on the blocks the RQ bound is measured on, and the judged quality of free generation.

Baseline perplexity: every token of a block is scored, the first one too, so the count matches
the bound's `num_tokens`. The block is read from its start, like the RQ model reads it (its first
position comes from a learned start vector): the token LM gets the document separator (EOS, what
packing puts between documents) as its only context for the first token.

Judged quality: a judge LM (the baseline) scores continuations that a model sampled from held-out
prompts; the lower the judge's perplexity, the more the samples read like the text the judge
learned. The judge scoring its own samples gives the reference figure.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import set_seed


def safe_exp(nats: float) -> float:
    """exp(nats), inf instead of an overflow."""
    return math.exp(nats) if nats < 700 else float("inf")


@torch.no_grad()
def block_nll(model, input_ids: torch.LongTensor, separator_id: int) -> dict[str, torch.Tensor]:
    """Summed NLL (nats, float64) of every token of blocks (B, T) under a causal token LM, each block read from
    its start after one separator token -> {'nll', 'num_tokens'}."""
    separator = input_ids.new_full((input_ids.shape[0], 1), separator_id)
    logits = model(input_ids=torch.cat([separator, input_ids], dim=1)).logits[:, :-1]  # (B, T, V)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), input_ids.flatten(), reduction="sum")
    return {"nll": nll.double(), "num_tokens": torch.tensor(float(input_ids.numel()), dtype=torch.float64)}


def until_first_eos(tokens: torch.LongTensor, eos_token_id) -> torch.BoolTensor:
    """Tokens (B, N) -> mask (B, N) of each row's tokens up to and including its first EOS (all of a row without one).

    `eos_token_id`: one id, a list or tensor of ids, or None (no EOS: every token is kept). What follows a row's
    first EOS is what `generate` pads a finished row with: evaluation scores and counts only the masked tokens, and
    drafting cuts a draft there.
    """
    if eos_token_id is None:
        return torch.ones_like(tokens, dtype=torch.bool)
    eos = torch.as_tensor(eos_token_id, dtype=tokens.dtype, device=tokens.device).reshape(-1)
    is_eos = torch.isin(tokens, eos).long()
    return (is_eos.cumsum(1) - is_eos) == 0  # no EOS strictly before the position


@torch.no_grad()
def continuation_nll(
    judge, prompts: torch.LongTensor, continuations: torch.LongTensor, eos_token_id: int | None
) -> dict[str, torch.Tensor]:
    """Summed NLL (float64) of continuations (B, N) given their prompts (B, P) under a causal token LM;
    tokens after a row's first EOS are padding and are not scored -> {'nll', 'num_tokens'}."""
    mask = until_first_eos(continuations, eos_token_id)
    logits = judge(input_ids=torch.cat([prompts, continuations], dim=1)).logits  # (B, P + N, V)
    logits = logits[:, prompts.shape[1] - 1 : -1]  # (B, N, V): the predictions of the continuation
    nll = F.cross_entropy(logits.flatten(0, 1).float(), continuations.flatten(), reduction="none")
    return {"nll": (nll * mask.flatten()).sum().double(), "num_tokens": mask.sum().double()}


@torch.no_grad()
def sample_continuations(
    model,
    prompts: torch.LongTensor,
    max_new_tokens: int,
    seed: int,
    eos_token_id: int | None,
    pad_token_id: int | None,
    **sampling,
) -> torch.LongTensor:
    """`model.generate` from prompts (B, P) (no padding) with a fixed seed -> continuations (B, <= max_new_tokens)."""
    set_seed(seed)
    sequences = model.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        **sampling,
    )
    return sequences[:, prompts.shape[1] :]


def judged_perplexity(
    judge,
    model,
    prompts: torch.LongTensor,
    max_new_tokens: int,
    seed: int,
    eos_token_id: int | None,
    pad_token_id: int | None,
    batch_size: int = 16,
    **sampling,
) -> dict[str, float]:
    """The judge's perplexity on `model`'s sampled continuations of prompts (B, P) ->
    {'perplexity', 'num_tokens', 'mean_length'} (length: continuation tokens up to the first EOS)."""
    nll, tokens, texts = 0.0, 0.0, []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        continuations = sample_continuations(
            model, batch, max_new_tokens, seed + start, eos_token_id, pad_token_id, **sampling
        )
        terms = continuation_nll(judge, batch, continuations, eos_token_id)
        nll += float(terms["nll"])
        tokens += float(terms["num_tokens"])
        mask = until_first_eos(continuations, eos_token_id)
        texts += [row[keep].tolist() for row, keep in zip(continuations, mask)]
    return {
        "perplexity": safe_exp(nll / max(tokens, 1.0)),
        "num_tokens": tokens,
        "mean_length": tokens / max(len(prompts), 1),
        **diversity(texts),
    }


def diversity(texts: list[list[int]]) -> dict[str, float]:
    """Token id sequences -> distinct-2 and distinct-3 (unique n-grams / n-grams over all sequences, Li et al.
    2016) and the repeated 3-gram rate (the share of each sequence's 3-grams seen earlier in the same
    sequence): the judged perplexity rewards repetition, these say how much of it there is."""
    figures = {}
    for n in (2, 3):
        grams = [tuple(t[i : i + n]) for t in texts for i in range(len(t) - n + 1)]
        figures[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else 0.0
    repeated = total = 0
    for t in texts:
        seen = set()
        for i in range(len(t) - 2):
            gram = tuple(t[i : i + 3])
            repeated += gram in seen
            total += 1
            seen.add(gram)
    figures["repeated_3gram_rate"] = repeated / total if total else 0.0
    return figures


__all__ = ["block_nll", "continuation_nll", "diversity", "judged_perplexity", "safe_exp", "sample_continuations",
           "until_first_eos"]
