"""RQ-VAE reconstruction figures: token accuracy (overall and per position inside a chunk),
reconstruction loss, and per-depth codebook usage over a held-out split.

A Gaussian VAE has no codebook: it reports instead its KL to N(0, I) and the accuracy when the decoder reads a
latent other than the posterior mean: a sample of q(z|x) (`accuracy_sampled`) and the mean plus isotropic
Gaussian noise of each std in `LATENT_NOISE_STDS` (`accuracy_noise{std}`), the robustness a latent LM's
imperfect predictions need.

The figures come from small pure functions over tensors (`position_accuracy_counts` -> `accuracy_figures`,
`codebook_usage_figures` / `usage_figures`), called both by the trainer's `evaluate_reconstruction` and by the
`evaluate` metric modules in rqlm/metrics, so each is computed in one place.
"""

from __future__ import annotations

import torch
from einops import reduce

from rqlm.modeling.quantizer_registry import codebook_stats
from rqlm.modeling.quantizer_utils import codebook_usage


def position_accuracy_counts(
    predictions: torch.LongTensor, references: torch.LongTensor, valid: torch.Tensor | None, compression_factor: int
) -> torch.Tensor:
    """Predicted and reference tokens (B, T), valid mask (B, T) or None -> (2, C) float64: tokens right and tokens
    counted at each position inside a chunk of C tokens (T a multiple of C)."""
    if predictions.shape != references.shape or predictions.shape[-1] % compression_factor:
        raise ValueError(f"predictions {tuple(predictions.shape)} and references {tuple(references.shape)} must have "
                         f"one shape whose length is a multiple of compression {compression_factor}")
    valid = torch.ones_like(references, dtype=torch.bool) if valid is None else valid.bool()
    hits = (predictions == references) & valid
    both = torch.stack([hits, valid]).double()  # (2, B, T)
    return reduce(both, "two b (l c) -> two c", "sum", c=compression_factor)


def accuracy_figures(counts: torch.Tensor) -> dict[str, float]:
    """Summed (2, C) `position_accuracy_counts` -> {'accuracy', 'accuracy_pos{i}'}."""
    correct, counted = counts
    figures = {"accuracy": (correct.sum() / counted.sum().clamp(min=1)).item()}
    for pos in range(len(correct)):
        figures[f"accuracy_pos{pos}"] = (correct[pos] / counted[pos].clamp(min=1)).item()
    return figures


LATENT_NOISE_STDS = (0.1, 0.5)


def _noisy_accuracy_counts(vae, input_ids, attention_mask, mean, logvar) -> dict[str, torch.Tensor]:
    """Gaussian VAE: (2, C) accuracy counts decoding a posterior sample and the mean plus fixed-std noise."""
    c = vae.config.compression_factor
    latents = {"sampled": mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)}
    latents.update({f"noise{std:g}": mean + std * torch.randn_like(mean) for std in LATENT_NOISE_STDS})
    counts = {}
    for name, z in latents.items():
        logits = vae.decode_quantized(z, input_ids, attention_mask)
        counts[name] = position_accuracy_counts(logits.argmax(-1), input_ids, attention_mask, c)
    return counts


def usage_figures(usage: dict) -> dict[str, float]:
    """Per-depth usage lists {'perplexity': [D], 'dead_fraction': [D]} -> {'usage_perplexity_d{j}',
    'dead_fraction_d{j}', 'usage_perplexity_mean', 'dead_fraction_mean'}."""
    figures = {}
    for depth, (ppl, dead) in enumerate(zip(usage["perplexity"], usage["dead_fraction"])):
        figures[f"usage_perplexity_d{depth}"] = ppl
        figures[f"dead_fraction_d{depth}"] = dead
    figures["usage_perplexity_mean"] = sum(usage["perplexity"]) / len(usage["perplexity"])
    figures["dead_fraction_mean"] = sum(usage["dead_fraction"]) / len(usage["dead_fraction"])
    return figures


def codebook_usage_figures(codes: torch.LongTensor, codebook_size: int) -> dict[str, float]:
    """Codes (..., D) (negative: padding) of a codebook of K entries -> `usage_figures`."""
    return usage_figures(codebook_usage(codes, codebook_size))


@torch.no_grad()
def evaluate_reconstruction(
    model, dataloader, accelerator=None, max_batches: int | None = None, semantic_teacher=None
) -> dict[str, float]:
    """Held-out blocks -> {'accuracy', 'recon_loss', 'accuracy_pos{i}', 'usage_perplexity_d{j}', 'dead_fraction_d{j}',
    'usage_perplexity_mean', 'dead_fraction_mean', 'codes_replaced'} (a Gaussian VAE: 'kl', 'accuracy_sampled' and
    'accuracy_noise{std}' instead of the usage figures); codes are gathered over data-parallel ranks. At most `max_batches` batches (>= 1; None: all); a dataloader without a batch is a ValueError.

    With a `semantic_teacher` (`rqlm.trainer.semantic_teacher.SemanticTeacher`) also 'semantic_loss', the mean
    over real latent positions of the semantic level 0's 1 - cosine to the teacher."""
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be at least 1 or None (the whole split), got {max_batches}")
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    was_training = unwrapped.training
    unwrapped.eval()
    c = unwrapped.config.compression_factor
    counts = torch.zeros(2, c, dtype=torch.float64)  # right, counted per position inside a chunk
    loss_sum, loss_tokens, kl_sum, batches = 0.0, 0.0, 0.0, 0
    semantic = torch.zeros(2, dtype=torch.float64)  # summed 1 - cosine over real latent positions, positions
    all_codes = []
    continuous = getattr(unwrapped.config, "is_continuous", False)
    noisy = {}
    for i, batch in enumerate(dataloader):
        if max_batches is not None and i >= max_batches:
            break
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        if semantic_teacher is None:
            out = unwrapped(input_ids=input_ids, attention_mask=attention_mask)
        else:
            targets = semantic_teacher(input_ids, attention_mask)  # (B, L, S)
            out = unwrapped(input_ids=input_ids, attention_mask=attention_mask, semantic_targets=targets)
            latent_mask = unwrapped.latent_mask(attention_mask)
            valid = torch.ones(targets.shape[:2], device=targets.device) if latent_mask is None else latent_mask
            positions = valid.sum().double()
            batch_semantic = torch.stack([out.semantic_loss.double() * positions, positions])
            if accelerator is not None:
                batch_semantic = accelerator.reduce(batch_semantic.to(accelerator.device), "sum")
            semantic += batch_semantic.cpu()
        stats = position_accuracy_counts(out.logits.argmax(-1), input_ids, attention_mask, c)  # (2, C)
        tokens = stats[1].sum()
        loss = torch.stack([out.recon_loss.double() * tokens, tokens])
        batches += 1
        if continuous:
            encoded = unwrapped.encode(input_ids, attention_mask)
            kl_sum += encoded.kl.item()
            for name, counted in _noisy_accuracy_counts(
                unwrapped, input_ids, attention_mask, encoded.posterior_mean, encoded.posterior_logvar
            ).items():
                if accelerator is not None:
                    counted = accelerator.reduce(counted.to(accelerator.device), "sum")
                noisy[name] = noisy.get(name, 0) + counted.cpu()
            codes = input_ids.new_zeros(0, 1)
        else:
            codes = out.codes
        if accelerator is not None:
            stats, loss = accelerator.reduce(stats.to(accelerator.device), "sum"), accelerator.reduce(
                loss.to(accelerator.device), "sum"
            )
            codes = accelerator.gather_for_metrics(codes)
        counts += stats.cpu()
        loss_sum += loss[0].item()
        loss_tokens += loss[1].item()
        all_codes.append(codes.reshape(-1, codes.shape[-1]).cpu())
    unwrapped.train(was_training)
    if not all_codes:
        raise ValueError("the held-out dataloader yielded no batch; reconstruction needs at least one block")
    metrics = {**accuracy_figures(counts), "recon_loss": loss_sum / max(loss_tokens, 1.0)}
    if semantic_teacher is not None:
        metrics["semantic_loss"] = (semantic[0] / semantic[1].clamp(min=1)).item()
    if continuous:
        metrics["kl"] = kl_sum / batches
        for name, counted in noisy.items():
            metrics[f"accuracy_{name}"] = accuracy_figures(counted)["accuracy"]
        return metrics
    usage = codebook_stats(unwrapped.quantizer, torch.cat(all_codes))
    metrics.update(usage_figures(usage))
    metrics["codes_replaced"] = float(usage["codes_replaced"])
    return metrics


def reconstruction_evaluate_fn(model, eval_dataloader, accelerator, semantic_teacher=None) -> dict[str, float]:
    """The training loop's `evaluate_fn` for RQ-VAE models (bind `semantic_teacher` with functools.partial)."""
    return evaluate_reconstruction(model, eval_dataloader, accelerator, semantic_teacher=semantic_teacher)
