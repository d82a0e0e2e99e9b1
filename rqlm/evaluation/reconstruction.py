"""RQ-VAE reconstruction figures: token accuracy (overall and per position inside a chunk),
reconstruction loss, and per-depth codebook usage over a held-out split."""

from __future__ import annotations

import torch

from rqlm.modeling.quantizer_registry import codebook_stats


@torch.no_grad()
def evaluate_reconstruction(model, dataloader, accelerator=None, max_batches: int | None = None) -> dict[str, float]:
    """Held-out blocks -> {'accuracy', 'recon_loss', 'accuracy_pos{i}', 'usage_perplexity_d{j}', 'dead_fraction_d{j}',
    'usage_perplexity_mean', 'dead_fraction_mean', 'codes_replaced'}; codes are gathered over data-parallel ranks.
    At most `max_batches` batches (>= 1; None: all); a dataloader without a batch is a ValueError."""
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be at least 1 or None (the whole split), got {max_batches}")
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    was_training = unwrapped.training
    unwrapped.eval()
    c = unwrapped.config.compression_factor
    correct = torch.zeros(c, dtype=torch.float64)
    counted = torch.zeros(c, dtype=torch.float64)
    loss_sum, loss_tokens = 0.0, 0.0
    all_codes = []
    for i, batch in enumerate(dataloader):
        if max_batches is not None and i >= max_batches:
            break
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        out = unwrapped(input_ids=input_ids, attention_mask=attention_mask)
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        hits = (out.logits.argmax(-1) == input_ids) & valid
        stats = torch.stack(
            [hits.view(hits.shape[0], -1, c).sum((0, 1)).double(), valid.view(valid.shape[0], -1, c).sum((0, 1)).double()]
        )
        tokens = valid.sum().double()
        loss = torch.stack([out.recon_loss.double() * tokens, tokens])
        codes = out.codes
        if accelerator is not None:
            stats, loss = accelerator.reduce(stats.to(accelerator.device), "sum"), accelerator.reduce(
                loss.to(accelerator.device), "sum"
            )
            codes = accelerator.gather_for_metrics(codes)
        correct += stats[0].cpu()
        counted += stats[1].cpu()
        loss_sum += loss[0].item()
        loss_tokens += loss[1].item()
        all_codes.append(codes.reshape(-1, codes.shape[-1]).cpu())
    unwrapped.train(was_training)
    if not all_codes:
        raise ValueError("the held-out dataloader yielded no batch; reconstruction needs at least one block")
    metrics = {
        "accuracy": (correct.sum() / counted.sum().clamp(min=1)).item(),
        "recon_loss": loss_sum / max(loss_tokens, 1.0),
    }
    for pos in range(c):
        metrics[f"accuracy_pos{pos}"] = (correct[pos] / counted[pos].clamp(min=1)).item()
    usage = codebook_stats(unwrapped.quantizer, torch.cat(all_codes))
    for depth, (ppl, dead) in enumerate(zip(usage["perplexity"], usage["dead_fraction"])):
        metrics[f"usage_perplexity_d{depth}"] = ppl
        metrics[f"dead_fraction_d{depth}"] = dead
    metrics["usage_perplexity_mean"] = sum(usage["perplexity"]) / len(usage["perplexity"])
    metrics["dead_fraction_mean"] = sum(usage["dead_fraction"]) / len(usage["dead_fraction"])
    metrics["codes_replaced"] = float(usage["codes_replaced"])
    return metrics


def reconstruction_evaluate_fn(model, eval_dataloader, accelerator) -> dict[str, float]:
    """The training loop's `evaluate_fn` for RQ-VAE models."""
    return evaluate_reconstruction(model, eval_dataloader, accelerator)
