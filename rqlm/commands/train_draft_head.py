"""`rqlm train-draft-head`: train an RQDraftHead on a target causal LM's states, for drafting at the same size.

    --target TARGET_DIR (frozen) + --vae VAE_DIR (frozen, chunk-local) + --dataset (the target's own greedy
    text, `rqlm distill-data`) -> blocks of block_size tokens
    -> the target's last hidden states (computed per batch) and the VAE's codes of every window of C tokens
    -> the head: states at t, token t + 1 -> codes of tokens t + 2 .. t + C + 1
    -> the shared Accelerate loop; every eval: code NLL and accuracy per depth, and the teacher-forced
       acceptance (how many of a greedy draft's C tokens match the text, averaged over positions)

The tokenizer is the VAE folder's, and the target must read the same vocabulary.
"""

from __future__ import annotations

import argparse
import json

import torch

from rqlm.trainer.arguments import add_training_arguments, training_arguments_from_namespace

HEAD_FIELDS = (
    "target_layers", "hidden_size", "num_layers", "depth_num_layers", "depth_hidden_size", "depth_num_attention_heads", "depth_mode",
)  # fmt: skip


def layer_list(text: str) -> list[int]:
    """--target_layers: comma-separated hidden-state indices."""
    try:
        return [int(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated hidden-state indices such as 2,4, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rqlm.data.arguments import add_data_over_vae_arguments
    from rqlm.trainer.model_arguments import add_depth_arguments

    add_data_over_vae_arguments(parser)
    model = parser.add_argument_group("model")
    model.add_argument("--target", default=None, help="folder of the causal LM the head drafts for (frozen); required")
    model.add_argument("--target_layers", default=None, type=layer_list,
                       help="the target's hidden states the head reads, e.g. 2,4 (i: after layer i; the last: the final "
                       "norm's output; default: the final output alone)")
    model.add_argument("--hidden_size", type=int, default=512, help="width of the head's fusion layers")
    model.add_argument("--num_layers", type=int, default=1, help="SwiGLU residual blocks after the fusion")
    add_depth_arguments(model)
    add_training_arguments(
        parser, output_dir="runs/draft_head", max_steps=100_000, max_minutes=10, per_device_train_batch_size=16,
        per_device_eval_batch_size=16, learning_rate=1e-3, warmup_steps=50, eval_steps=200, eval_batches=10,
        save_steps=500,
    )  # fmt: skip


@torch.no_grad()
def head_evaluate_fn(model, eval_dataloader, accelerator) -> dict[str, float]:
    """The loop's `evaluate_fn`: held-out code NLL and accuracy per depth, and the teacher-forced acceptance:
    the mean number of a greedy draft's C tokens that match the text (+1: tokens per verification step)."""
    unwrapped = accelerator.unwrap_model(model)
    d = unwrapped.num_quantizers
    nll, correct, codes = (torch.zeros(d, dtype=torch.float64) for _ in range(3))
    accepted = positions = 0.0
    for batch in eval_dataloader:
        mask = batch.get("attention_mask")
        states = unwrapped.target_states(batch["input_ids"], mask)
        out = unwrapped(batch["input_ids"], mask, target_hidden=states)
        count = out.num_codes.double().cpu()
        nll += out.depth_nll.double().cpu() * count
        correct += out.depth_accuracy.double().cpu() * count
        codes += count
        lengths = unwrapped.accepted_lengths(batch["input_ids"], mask, target_hidden=states)
        accepted += float(lengths.clamp(min=0).sum())
        positions += float((lengths >= 0).sum())
    if positions == 0:
        raise ValueError("the held-out split gave no evaluation batch; pass more data or a smaller eval batch size")
    sums = torch.cat([nll, correct, codes, torch.tensor([accepted, positions], dtype=torch.float64)])
    sums = accelerator.reduce(sums.to(accelerator.device), "sum").cpu()
    nll, correct, codes, (accepted, positions) = sums[:d], sums[d : 2 * d], sums[2 * d : 3 * d], sums[3 * d :].tolist()
    metrics = {"code_nll": (nll / codes.clamp(min=1)).mean().item()}
    for depth in range(d):
        metrics[f"accuracy_d{depth}"] = (correct[depth] / max(codes[depth].item(), 1)).item()
    metrics["accepted_per_draft"] = accepted / positions
    metrics["tokens_per_step"] = 1 + accepted / positions
    return metrics


def main(args: argparse.Namespace) -> int:
    from accelerate import PartialState
    from accelerate.utils import set_seed

    from rqlm.data.arguments import load_blocks
    from rqlm.loading import (
        ANY_CAUSAL_LM,
        LATENT_LM_TYPES,
        check_same_vocabulary,
        load_model,
        load_vae,
        read_config,
        resolve_compression_factor,
        vae_tokenizer,
    )
    from rqlm.modeling.modeling_rq_draft_head import RQDraftHead
    from rqlm.trainer.loop import train
    from rqlm.trainer.preflight import check_before_data

    train_args = training_arguments_from_namespace(args)
    check_before_data(train_args)
    if args.target is None:
        raise ValueError("pass --target TARGET_DIR, the causal LM whose drafts the head makes")
    target_config = read_config(args.target, role="--target", model_types=ANY_CAUSAL_LM)
    if target_config.model_type in LATENT_LM_TYPES:
        raise ValueError(f"--target {args.target!r} is a latent LM; a draft head drafts for a token-level causal LM")
    vae = load_vae(args.vae)
    resolve_compression_factor(args, vae)
    tokenizer = vae_tokenizer(args)
    check_same_vocabulary(tokenizer, args.target, target_config, "--target")
    _, train_blocks, eval_blocks = load_blocks(args, default_tokenizer=args.vae)
    target = load_model(args.target, target_config).float()
    set_seed(train_args.seed)  # the head's weights
    model = RQDraftHead.for_target(target, vae, **{name: getattr(args, name) for name in HEAD_FIELDS})
    model.config.target_name_or_path = args.target
    model.attach_target(target.to(PartialState().device))
    trained = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("vae."))
    print(f"draft head: {trained / 1e6:.2f}M parameters on {args.target} (hidden {model.config.target_hidden_size}, "
          f"frozen, not saved) and the frozen VAE {args.vae}: C={vae.compression_factor} D={model.num_quantizers} "
          f"K={model.config.codebook_size}")
    card = (
        "## Data\n\n"
        f"- target: {args.target} (frozen; not in this checkpoint: pass it to `rqlm generate --verify-with`)\n"
        f"- VAE: {args.vae} (frozen inside this checkpoint)\n"
        f"- dataset: {args.dataset or 'embedded corpus'}; block size {args.block_size} tokens\n"
    )
    result = train(model, train_blocks, eval_blocks, train_args, tokenizer=tokenizer, evaluate_fn=head_evaluate_fn,
                   model_card_extra=card)
    summary = {k: round(v, 4) for k, v in result.eval_metrics.items()}
    print(f"finished at step {result.step} ({result.tokens_seen:,} tokens): {json.dumps(summary)}")
    return 0
