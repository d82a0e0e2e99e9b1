"""`rqlm train-lm`: train the latent LM (RQTransformerForCausalLM) over a trained RQ-VAE's codes.

    VAE_DIR (model + tokenizer) -> blocks of block_size tokens -> codes (B, L, D), computed once
      (`--codes DIR` from `rqlm encode`, or a `datasets` cache keyed by the VAE's weights)
    -> spatial Qwen3 (a preset from scratch, or a pretrained Qwen3's layers) + depth transformer
    -> the shared Accelerate loop; every eval: code NLL per depth against each depth's marginal
       entropy, and the perplexity bound exp((NLL_codes + NLL_recon) / tokens)

The tokenizer and C come from the VAE folder: another `--tokenizer` or `--compression_factor` is a
one-line error, as is a `--block_size` that is not a multiple of C.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from rqlm.data.arguments import add_data_over_vae_arguments
from rqlm.loading import load_vae, resolve_compression_factor, vae_tokenizer
from rqlm.modeling.configuration_rq_transformer import DEPTH_OUTPUTS, SPATIAL_INPUTS
from rqlm.presets import PRESETS, backbone_config, is_preset
from rqlm.trainer.arguments import training_arguments_from_namespace
from rqlm.trainer.model_arguments import add_depth_arguments, add_spatial_training_arguments

LM_FIELDS = (
    "depth_output", "token_decoder_context", "token_head_rank", "depth_num_layers", "depth_hidden_size", "depth_num_attention_heads", "spatial_input", "depth_mode",
    "aux_token_loss_weight", "freeze_backbone_steps", "lora_r", "lora_alpha",
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_over_vae_arguments(parser)
    model = parser.add_argument_group("model")
    model.add_argument("--codes", default=None, help="codes folder written by `rqlm encode` (default: encode here, "
                       "cached by `datasets` under a fingerprint of the data and the VAE's weights)")
    model.add_argument("--backbone", default="tiny",
                       help=f"spatial transformer: a preset trained from scratch ({', '.join(PRESETS)}) "
                       "or a pretrained Qwen3 (folder or hub name) whose layers it starts from")
    model.add_argument("--depth_output", default="tokens", choices=DEPTH_OUTPUTS,
                       help="what the depth decoder writes per latent position: the chunk's C tokens (default: a "
                       "causal LM with exact likelihood; 1.09x the baseline's held-out perplexity at equal tokens and "
                       "3.47x its tokens/s at the Qwen3-0.6B shape, docs/results/latent_lm.md), or the D codes the "
                       "VAE decodes (codes: only a perplexity bound, 1,800-3,700x the baseline's), or both, the codes "
                       "first (codes_then_tokens: a bound, code NLL + token NLL given the codes)")
    model.add_argument("--token_decoder_context", type=int, default=None,
                       help="tokens mode: tokens before the chunk the token decoder also reads (default: C, one chunk; "
                       "0: the chunk alone)")
    model.add_argument("--token_head_rank", type=int, default=0,
                       help="the token decoder's vocabulary head: Linear(width, r) then Linear(r, V) (0: one Linear; "
                       "r cuts its cost per token at a large vocabulary)")
    add_depth_arguments(model)
    parser.set_defaults(depth_num_layers=None)  # the mode's: 1 for codes, 4 for tokens
    model.add_argument("--spatial_input", default=None, choices=SPATIAL_INPUTS,
                       help="each finished chunk's input: the VAE's quantized latent, summed per-depth code embeddings, "
                       "the chunk's token embeddings, or tokens and codes summed (the last two with --depth_output "
                       "tokens; default: code_embeddings for codes, token_embeddings for tokens)")
    model.add_argument("--aux_token_loss_weight", type=float, default=0.0,
                       help="weight of C heads on the spatial output predicting the next chunk's tokens")
    add_spatial_training_arguments(parser, model, output_dir="runs/lm")


def encoded_splits(args: argparse.Namespace, vae, tokenizer):
    """(train, eval) datasets with "input_ids" (T,) and "codes" (L, D): from `--codes`, or encoded here (cached)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from rqlm.data.arguments import load_blocks
    from rqlm.data.codes import (
        check_provenance,
        codes_provenance,
        default_cache_dir,
        encode_blocks,
        load_codes,
    )

    if args.codes is not None:
        splits, provenance = load_codes(args.codes)
        check_provenance(provenance, codes_provenance(vae, tokenizer, args.vae), f"'{args.codes}'")
        train, evaluation = splits["train"], splits["validation"]
        if args.max_eval_blocks is not None:
            evaluation = evaluation.select(range(min(args.max_eval_blocks, len(evaluation))))
        print(f"data: codes from {args.codes} (made by `rqlm encode` from {provenance.get('vae')}): "
              f"train {len(train):,} blocks, held out {len(evaluation):,} blocks of {train[0]['input_ids'].shape[0]}")
        return train, evaluation
    if args.streaming:
        raise ValueError("train-lm encodes the data once and caches it; --streaming is not supported, "
                         "run `rqlm encode` on a local copy instead")
    _, train_blocks, eval_blocks = load_blocks(args, default_tokenizer=args.vae)
    # rank 0 writes the cache, the others read it; the state is made as the loop's Accelerator will make it
    # (a plain PartialState() ignores `accelerate launch --cpu` and would turn a 2-process CPU run into two 1-process runs)
    with PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).main_process_first():
        train = encode_blocks(vae, train_blocks, args.encode_batch_size, default_cache_dir(), desc="encode train")
        evaluation = encode_blocks(vae, eval_blocks, args.encode_batch_size, default_cache_dir(), desc="encode held-out")
    return train, evaluation


def build_model(args: argparse.Namespace, vae, tokenizer):
    """An RQTransformerForCausalLM over `vae`: spatial layers from a preset (from scratch) or a pretrained Qwen3."""
    from rqlm import RQTransformerForCausalLM

    fields = {name: getattr(args, name) for name in LM_FIELDS}
    if not is_preset(args.backbone):
        return RQTransformerForCausalLM.from_backbone(args.backbone, vae=vae, **fields)
    tokens = vae.config.backbone_config
    spatial = backbone_config(
        args.backbone,
        vocab_size=len(tokenizer),
        bos_token_id=tokens.bos_token_id,
        eos_token_id=tokens.eos_token_id,
        pad_token_id=tokens.pad_token_id,
    )
    return RQTransformerForCausalLM.from_vae(vae, backbone_config=spatial, **fields)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def lm_evaluate_fn(model, eval_dataloader, accelerator) -> dict[str, float]:
    """The loop's `evaluate_fn`: held-out code NLL and accuracy per depth, each depth's marginal entropy,
    code and reconstruction NLL per token and the perplexity bound, summed over batches and ranks (tokens mode:
    `token_lm_evaluate`; codes_then_tokens: the same bound, its reconstruction term the token decoder's NLL)."""
    from rqlm.evaluation.bound import bound_terms

    unwrapped = accelerator.unwrap_model(model)
    if unwrapped.config.depth_output == "tokens":
        return token_lm_evaluate(unwrapped, eval_dataloader, accelerator)
    d, k = unwrapped.num_quantizers, unwrapped.config.codebook_size
    sums, counts = None, torch.zeros(d, k, dtype=torch.float64, device=accelerator.device)
    for batch in eval_dataloader:
        codes = batch["codes"].long() if "codes" in batch else None
        terms = bound_terms(unwrapped, batch["input_ids"], batch.get("attention_mask"), codes=codes)
        sums = terms if sums is None else {name: sums[name] + value for name, value in terms.items()}
        codes = unwrapped.encode(batch["input_ids"], batch.get("attention_mask")) if codes is None else codes
        flat = codes.reshape(-1, d)  # (N, D)
        for depth in range(d):
            kept = flat[:, depth][flat[:, depth] >= 0]
            counts[depth] += torch.bincount(kept, minlength=k).double()
    if sums is None:
        raise ValueError("the held-out split gave no evaluation batch; pass more data or a smaller eval batch size")
    sums = {name: accelerator.reduce(value.to(accelerator.device), "sum").cpu() for name, value in sums.items()}
    counts = accelerator.reduce(counts, "sum").cpu()
    return bound_metrics(sums, counts, unwrapped.compression_factor)


@torch.no_grad()
def token_lm_evaluate(model, eval_dataloader, accelerator) -> dict[str, float]:
    """Held-out NLL of every token of the blocks under a tokens-mode LM, each block read after one separator as
    `rqlm evaluate` reads the baseline's, summed over batches and ranks: its exact perplexity (also reported as
    `perplexity_bound`, which it equals, so tables compare it with the codes mode's bound)."""
    from rqlm.evaluation.perplexity import block_nll, safe_exp

    separator = model.config.vae_config.backbone_config.eos_token_id
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # nats, tokens
    for batch in eval_dataloader:
        if "attention_mask" in batch and not batch["attention_mask"].all():
            raise ValueError("the held-out blocks are padded; the evaluation reads whole packed blocks")
        scored = block_nll(model, batch["input_ids"], separator)
        total += torch.stack([scored["nll"], scored["num_tokens"]]).to(total)
    if not total[1]:
        raise ValueError("the held-out split gave no evaluation batch; pass more data or a smaller eval batch size")
    nats, tokens = accelerator.reduce(total, "sum").tolist()
    perplexity = safe_exp(nats / tokens)
    return {"token_nll": nats / tokens, "bits_per_token": nats / tokens / math.log(2), "perplexity": perplexity,
            "perplexity_bound": perplexity, "num_tokens": tokens}


def marginal_entropy(counts: torch.Tensor) -> torch.Tensor:
    """Code counts (D, K) -> entropy in nats of each depth's empirical code distribution (D,)."""
    p = counts / counts.sum(dim=-1, keepdim=True).clamp(min=1)
    return -(p * p.clamp(min=1e-30).log()).sum(dim=-1)


def bound_metrics(sums: dict, counts: torch.Tensor, compression_factor: int) -> dict[str, float]:
    """Summed bound terms and code counts -> the evaluation's named figures (nats unless 'bits')."""
    from rqlm.evaluation.bound import perplexity_bound

    tokens = float(sums["num_tokens"])
    nll_depth = sums["nll_codes_depth"] / sums["num_codes_depth"].clamp(min=1)
    accuracy_depth = sums["correct_depth"] / sums["num_codes_depth"].clamp(min=1)
    entropy = marginal_entropy(counts)
    metrics = {"code_nll": nll_depth.mean().item()}
    for depth in range(len(nll_depth)):
        metrics[f"nll_d{depth}"] = nll_depth[depth].item()
        metrics[f"marginal_entropy_d{depth}"] = entropy[depth].item()
        metrics[f"accuracy_d{depth}"] = accuracy_depth[depth].item()
    nats = (float(sums["nll_codes"]) + float(sums["nll_recon"])) / max(tokens, 1.0)
    metrics.update(
        nll_codes_per_token=float(sums["nll_codes"]) / max(tokens, 1.0),
        marginal_entropy_per_token=entropy.sum().item() / compression_factor,
        nll_recon_per_token=float(sums["nll_recon"]) / max(tokens, 1.0),
        bits_per_token=nats / math.log(2),
        perplexity_bound=perplexity_bound(sums),
        num_tokens=tokens,
    )
    return metrics


def main(args: argparse.Namespace) -> int:
    from accelerate.utils import set_seed

    from rqlm.trainer.loop import train
    from rqlm.trainer.preflight import check_before_data

    train_args = training_arguments_from_namespace(args)
    check_before_data(train_args, args.backbone)
    vae = load_vae(args.vae)
    if vae.is_continuous:
        raise ValueError(f"'{args.vae}' holds a Gaussian VAE (continuous latents, no codes); train its latent LM "
                         "with `rqlm train-givt --vae ...`")
    resolve_compression_factor(args, vae)
    tokenizer = vae_tokenizer(args)
    train_data, eval_data = encoded_splits(args, vae, tokenizer)
    set_seed(train_args.seed)  # the weights of the from-scratch parts
    model = build_model(args, vae, tokenizer)
    trained = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("vae."))
    print(f"RQ-Transformer: {trained / 1e6:.2f}M parameters besides the frozen VAE "
          f"({sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M), C={vae.compression_factor} "
          f"D={model.num_quantizers} K={model.config.codebook_size}, backbone {args.backbone}")
    card = (
        "## Data\n\n"
        f"- VAE: {args.vae} (frozen inside this checkpoint)\n"
        f"- codes: {args.codes or 'encoded by train-lm (datasets cache)'}\n"
        f"- dataset: {args.dataset or 'embedded corpus'}; block size {args.block_size} tokens\n"
        f"- spatial backbone: {args.backbone}\n"
    )
    result = train(model, train_data, eval_data, train_args, tokenizer=tokenizer, evaluate_fn=lm_evaluate_fn,
                   model_card_extra=card)
    summary = {k: round(v, 4) for k, v in result.eval_metrics.items()}
    print(f"finished at step {result.step} ({result.tokens_seen:,} tokens): {json.dumps(summary)}")
    return 0
