"""`rqlm train-givt`: train the continuous latent LM (GIVTForCausalLM) over a trained Gaussian VAE.

    VAE_DIR (a `train-vae --quantizer_type gaussian` output + tokenizer) -> blocks of block_size tokens
    -> the frozen VAE's posterior q(z|x) per step (a sample in training, GIVT's recipe; cheap next to the LM)
    -> spatial Qwen3 (a preset from scratch, or a pretrained Qwen3's layers) + the head:
       --head gaussian (GIVT, NLL; --num_mixtures k) or --head energy (CALM, energy score)
    -> the shared Accelerate loop; every eval: the head's loss and, for the Gaussian head, the ELBO
       perplexity bound exp((KL term + reconstruction NLL) / tokens) (rqlm/evaluation/elbo_bound.py)

The tokenizer and C come from the VAE folder, as for `rqlm train-lm`; a quantized VAE is a one-line error
that names `train-lm`.
"""

from __future__ import annotations

import argparse
import json

import torch

from rqlm.data.arguments import add_vae_arguments
from rqlm.loading import load_vae, resolve_compression_factor, vae_tokenizer
from rqlm.modeling.configuration_givt import HEADS
from rqlm.presets import PRESETS, backbone_config, is_preset
from rqlm.trainer.arguments import training_arguments_from_namespace
from rqlm.trainer.model_arguments import add_spatial_training_arguments

GIVT_FIELDS = (
    "head", "num_mixtures", "energy_head_size", "energy_num_layers", "energy_num_samples", "sample_posterior",
    "freeze_backbone_steps", "lora_r", "lora_alpha",
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rqlm.data.arguments import add_data_arguments

    add_data_arguments(parser)
    parser.set_defaults(block_size=128, compression_factor=None)  # C: the VAE's
    add_vae_arguments(parser)
    parser._option_string_actions["--vae"].help = "folder of a trained Gaussian VAE (`rqlm train-vae --quantizer_type gaussian`); required"
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", default="tiny",
                       help=f"spatial transformer: a preset trained from scratch ({', '.join(PRESETS)}) "
                       "or a pretrained Qwen3 (folder or hub name) whose layers it starts from")
    model.add_argument("--head", default="gaussian", choices=HEADS,
                       help="gaussian: GIVT's Gaussian (mixture) head, trained by NLL, with a perplexity bound; "
                       "energy: CALM's likelihood-free energy head (default: %(default)s)")
    model.add_argument("--num_mixtures", type=int, default=1, help="k, components of the Gaussian head")
    model.add_argument("--energy_head_size", type=int, default=256, help="width of the energy head's MLP")
    model.add_argument("--energy_num_layers", type=int, default=2, help="residual MLP blocks of the energy head")
    model.add_argument("--energy_num_samples", type=int, default=8, help="generator samples per target in the energy score")
    model.add_argument("--sample_posterior", action=argparse.BooleanOptionalAction, default=True,
                       help="train on samples of the VAE posterior (what the bound scores) rather than its mean")
    add_spatial_training_arguments(parser, model, output_dir="runs/givt")


def load_gaussian_vae(path: str | None):
    """A trained Gaussian VAE from its folder; a quantized one is a one-line error naming train-lm."""
    vae = load_vae(path)
    if not vae.is_continuous:
        raise ValueError(f"'{path}' holds a quantized VAE ({vae.config.quantizer_type!r}); train-givt needs a "
                         "Gaussian one (`rqlm train-vae --quantizer_type gaussian`), or train `rqlm train-lm` over it")
    return vae


def build_model(args: argparse.Namespace, vae, tokenizer):
    """A GIVTForCausalLM over `vae`: spatial layers from a preset (from scratch) or a pretrained Qwen3."""
    from rqlm import GIVTForCausalLM

    fields = {name: getattr(args, name) for name in GIVT_FIELDS}
    if not is_preset(args.backbone):
        return GIVTForCausalLM.from_backbone(args.backbone, vae=vae, **fields)
    tokens = vae.config.backbone_config
    spatial = backbone_config(args.backbone, vocab_size=len(tokenizer), bos_token_id=tokens.bos_token_id,
                              eos_token_id=tokens.eos_token_id, pad_token_id=tokens.pad_token_id)
    return GIVTForCausalLM.from_vae(vae, backbone_config=spatial, **fields)


@torch.no_grad()
def givt_evaluate_fn(model, eval_dataloader, accelerator) -> dict[str, float]:
    """The loop's `evaluate_fn`: the head's held-out loss (on posterior means) and, for the Gaussian head, the
    ELBO bound's terms per token and the perplexity bound, summed over batches and ranks."""
    from rqlm.evaluation.bound import perplexity_bound
    from rqlm.evaluation.elbo_bound import elbo_terms

    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    gaussian = unwrapped.config.head == "gaussian"
    sums = torch.zeros(5, dtype=torch.float64, device=accelerator.device)  # loss x n, n, KL, recon, tokens
    for batch in eval_dataloader:
        out = unwrapped(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        n = out.num_latents.double()
        sums[0] += out.loss.double() * n
        sums[1] += n
        if gaussian:
            terms = elbo_terms(unwrapped, batch["input_ids"], batch.get("attention_mask"))
            sums[2:] += torch.stack([terms["nll_codes"], terms["nll_recon"], terms["num_tokens"]]).to(sums.device)
    unwrapped.train(was_training)
    if not sums[1]:
        raise ValueError("the held-out split gave no evaluation batch; pass more data or a smaller eval batch size")
    sums = accelerator.reduce(sums, "sum").cpu()
    metrics = {"loss": float(sums[0] / sums[1])}
    if gaussian:
        tokens = float(sums[4])
        metrics.update(
            latent_kl_per_token=float(sums[2]) / tokens,
            nll_recon_per_token=float(sums[3]) / tokens,
            perplexity_bound=perplexity_bound({"nll_codes": sums[2], "nll_recon": sums[3], "num_tokens": sums[4]}),
        )
    return metrics


def main(args: argparse.Namespace) -> int:
    from accelerate.utils import set_seed

    from rqlm.data.arguments import load_blocks
    from rqlm.trainer.loop import train
    from rqlm.trainer.preflight import check_before_data

    train_args = training_arguments_from_namespace(args)
    check_before_data(train_args, args.backbone)
    vae = load_gaussian_vae(args.vae)
    resolve_compression_factor(args, vae)
    tokenizer = vae_tokenizer(args)
    _, train_blocks, eval_blocks = load_blocks(args, default_tokenizer=args.vae)
    set_seed(train_args.seed)
    model = build_model(args, vae, tokenizer)
    trained = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("vae."))
    head = f"Gaussian head (k={args.num_mixtures})" if args.head == "gaussian" else "energy head"
    print(f"GIVT: {trained / 1e6:.2f}M parameters besides the frozen VAE "
          f"({sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M), C={vae.compression_factor} "
          f"d={vae.config.latent_dim}, {head}, backbone {args.backbone}")
    card = (
        "## Data\n\n"
        f"- Gaussian VAE: {args.vae} (frozen inside this checkpoint)\n"
        f"- dataset: {args.dataset or 'embedded corpus'}; block size {args.block_size} tokens\n"
        f"- spatial backbone: {args.backbone}; {head}\n"
    )
    result = train(model, train_blocks, eval_blocks, train_args, tokenizer=tokenizer, evaluate_fn=givt_evaluate_fn,
                   model_card_extra=card)
    summary = {k: round(v, 4) for k, v in result.eval_metrics.items()}
    print(f"finished at step {result.step} ({result.tokens_seen:,} tokens): {json.dumps(summary)}")
    return 0
