"""`rqlm train-vae`: train the RQ-VAE (text -> residual codes -> text) with the shared Accelerate loop.

Defaults train a from-scratch tiny Qwen3 backbone on the embedded corpus with the local
tokenizer; `--backbone Qwen/Qwen3-0.6B` starts encoder and decoder from pretrained layers
(`RQVAEModel.from_backbone`). Held-out reconstruction accuracy and codebook usage are
evaluated every `--eval_steps` and written to the model card and the training plot.

`--semantic_teacher DIR --semantic_weight W` distils the first residual level toward a frozen causal LM of the
same tokenizer (e.g. a `rqlm train-baseline` folder): its mean last-layer hidden state over each chunk, computed
on every batch (`rqlm.trainer.semantic_teacher`), never saved with the VAE. `semantic_loss` is logged in training
and evaluated on the held-out split.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

from rqlm.presets import PRESETS, backbone_config, is_preset
from rqlm.trainer.arguments import add_training_arguments, training_arguments_from_namespace


def _mapping(text):
    """A JSON object given on the command line, or a mapping already parsed from YAML."""
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"decay\": 0.9}}': {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object such as '{\"decay\": 0.9}'")
    return value


# The CPU default, chosen by the measurements in the README's research table: EMA codebooks
# initialised by kmeans, dead codes re-seeded from the batch, the VQ-VAE paper's commitment 0.25.
CPU_QUANTIZER_KWARGS = {"kmeans_init": True, "threshold_ema_dead_code": 2, "decay": 0.8, "commitment_weight": 0.25}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rqlm.data.arguments import add_data_arguments

    add_data_arguments(parser)
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", default="tiny",
                       help=f"a preset trained from scratch ({', '.join(PRESETS)}) or a pretrained Qwen3 "
                       "(hub name or folder) (default: %(default)s)")
    model.add_argument("--num_encoder_layers", type=int, default=0,
                       help="Qwen3 layers of the encoder (0: embeddings only; see the README's research table) "
                       "(default: %(default)s)")
    model.add_argument("--num_decoder_layers", type=int, default=0,
                       help="Qwen3 layers of the decoder (default: %(default)s)")
    model.add_argument("--num_latent_layers", type=int, default=0,
                       help="latent transformer layers each side of the quantizer (default: %(default)s)")
    model.add_argument("--latent_dim", type=int, default=64, help="d, the codebook dimension (default: %(default)s)")
    model.add_argument("--latent_num_attention_heads", type=int, default=2,
                       help="attention heads of the latent layers; must divide d (default: %(default)s)")
    model.add_argument("--num_quantizers", type=int, default=8, help="D, residual depth (default: %(default)s)")
    model.add_argument("--codebook_size", type=int, default=1024,
                       help="K, codes per codebook (default: %(default)s)")
    model.add_argument("--quantizer_type", default="residual_vq",
                       help="quantizer family, see rqlm.quantizers, or 'gaussian' for a continuous VAE "
                       "(diagonal-Gaussian posterior, no codes; the VAE of `rqlm train-givt`) "
                       "(default: %(default)s)")
    model.add_argument("--quantizer_kwargs", type=_mapping, default=dict(CPU_QUANTIZER_KWARGS),
                       help="JSON keyword arguments of the quantizer, vector-quantize-pytorch's names "
                       f"(default: '{json.dumps(CPU_QUANTIZER_KWARGS)}')")
    model.add_argument("--quantizer_loss_weight", type=float, default=1.0,
                       help="weight of the quantizer losses (commitment, aux) in the loss (default: %(default)s)")
    model.add_argument("--kl_weight", type=float, default=1e-3,
                       help="gaussian: weight of the KL to N(0, I) (CALM's 1e-3) (default: %(default)s)")
    model.add_argument("--kl_clamp", type=float, default=0.5,
                       help="gaussian: per-dimension KL clamped below at this many nats, free bits (CALM's 0.5) "
                       "(default: %(default)s)")
    model.add_argument("--token_mask_prob", type=float, default=0.0,
                       help="training: probability of zeroing an input token's embedding (CALM: 0.15) "
                       "(default: %(default)s)")
    model.add_argument("--latent_dropout", type=float, default=0.0,
                       help="training: dropout on the latent before the decoder (CALM: 0.15) (default: %(default)s)")
    model.add_argument("--decoder_sees_previous_tokens", action=argparse.BooleanOptionalAction, default=False,
                       help="feed the decoder the tokens of earlier chunks (known at generation time) "
                       "(default: %(default)s)")
    model.add_argument("--freeze_backbone_steps", type=int, default=0,
                       help="optimizer steps the Qwen3 layers stay frozen before they train (default: %(default)s)")
    model.add_argument("--lora_r", type=int, default=0,
                       help="LoRA rank on the Qwen3 layers; 0 trains them fully (default: %(default)s)")
    model.add_argument("--lora_alpha", type=int, default=16, help="LoRA scaling alpha (default: %(default)s)")
    model.add_argument("--semantic_teacher", default=None,
                       help="a causal LM of the same tokenizer (folder, e.g. a `rqlm train-baseline` output, or hub "
                       "name) whose per-chunk mean hidden state the first residual level is distilled toward "
                       "(residual_vq only) (default: none)")
    model.add_argument("--semantic_weight", type=float, default=None,
                       help="weight of the semantic loss, 1 - cosine to the teacher (default: 1.0 with "
                       "--semantic_teacher)")
    model.add_argument("--init_from", default=None,
                       help="start from a trained RQ-VAE folder (its architecture; the architecture flags are "
                       "ignored) with a fresh optimizer and schedule, e.g. to continue with --rate_prior "
                       "(default: a new model)")
    model.add_argument("--rate_prior", default=None,
                       help="joint rate-distortion: a `rqlm train-lm --depth_output codes` folder trained on this "
                       "VAE's codes (usually with --init_from that VAE), frozen; the loss adds --rate_weight x "
                       "the expected code NLL under soft assignments (default: none)")
    model.add_argument("--rate_weight", type=float, default=None,
                       help="weight of the rate, nats per token (default: 0.1 with --rate_prior)")
    model.add_argument("--rate_temperature", type=float, default=1.0,
                       help="temperature of the rate's soft assignments over each codebook (default: %(default)s)")
    add_training_arguments(
        parser,
        output_dir="runs/vae",
        max_steps=2400,
        max_minutes=10,
        per_device_train_batch_size=8,
        learning_rate=2e-3,
        warmup_steps=50,
        eval_steps=200,
        eval_batches=10,
        save_steps=500,
    )
    parser.set_defaults(block_size=128)


VAE_FIELDS = (
    "compression_factor", "num_encoder_layers", "num_decoder_layers", "num_latent_layers", "latent_dim",
    "latent_num_attention_heads", "num_quantizers", "codebook_size", "quantizer_type", "quantizer_kwargs",
    "quantizer_loss_weight", "kl_weight", "kl_clamp", "token_mask_prob", "latent_dropout", "decoder_sees_previous_tokens", "freeze_backbone_steps", "lora_r", "lora_alpha",
)


def build_model(args: argparse.Namespace, tokenizer, semantic_dim: int = 0):
    """An RQVAEModel from a preset backbone sized to the tokenizer, or from a pretrained Qwen3; with a semantic
    level 0 of width `semantic_dim` (the teacher's hidden size) when > 0."""
    from rqlm import RQVAEConfig, RQVAEModel
    from rqlm.data.tokenizer import padding_id
    from rqlm.modeling.configuration_rq_vae import GAUSSIAN

    if getattr(args, "init_from", None) is not None:
        from pathlib import Path

        if not Path(args.init_from).is_dir():
            raise FileNotFoundError(f"--init_from {args.init_from!r} is not a folder; pass a `rqlm train-vae` output")
        overrides = {"semantic_dim": semantic_dim, "semantic_weight": args.semantic_weight} if semantic_dim else {}
        return RQVAEModel.from_pretrained(args.init_from, **overrides)
    fields = {name: getattr(args, name) for name in VAE_FIELDS}
    if semantic_dim:
        fields.update(semantic_dim=semantic_dim, semantic_weight=args.semantic_weight)
    if fields["quantizer_type"] == GAUSSIAN:  # no quantizer: its (RVQ) keyword defaults do not apply
        fields["quantizer_kwargs"] = {}
    if not is_preset(args.backbone):
        return RQVAEModel.from_backbone(args.backbone, **fields)
    pad = padding_id(tokenizer)
    backbone = backbone_config(
        args.backbone,
        vocab_size=len(tokenizer),
        num_hidden_layers=max(args.num_encoder_layers, args.num_decoder_layers, 1),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad,
    )
    return RQVAEModel(RQVAEConfig(backbone_config=backbone, **fields))


def main(args: argparse.Namespace) -> int:

    from accelerate.utils import set_seed

    from rqlm.data.arguments import load_blocks
    from rqlm.evaluation.reconstruction import reconstruction_evaluate_fn
    from rqlm.trainer.loop import train
    from rqlm.trainer.preflight import check_before_data

    train_args = training_arguments_from_namespace(args)
    check_semantic_arguments(args)
    check_rate_arguments(args)
    check_before_data(train_args, args.backbone)
    tokenizer, train_blocks, eval_blocks = load_blocks(args, default_tokenizer=None if is_preset(args.backbone) else args.backbone)
    teacher = None
    if args.semantic_teacher is not None:
        from rqlm.trainer.semantic_teacher import SemanticTeacher

        teacher = SemanticTeacher.from_pretrained(args.semantic_teacher, tokenizer, args.compression_factor)
    set_seed(train_args.seed)
    model = build_model(args, tokenizer, semantic_dim=teacher.hidden_size if teacher is not None else 0)
    prior = None
    if args.rate_prior is not None:
        from rqlm.trainer.code_prior import CodePrior

        model.config.rate_weight, model.config.rate_temperature = args.rate_weight, args.rate_temperature
        model.config.validate_values()
        prior = CodePrior.from_pretrained(args.rate_prior, model)
    n_params = sum(p.numel() for p in model.parameters())
    config = model.config  # the flags', or with --init_from the loaded VAE's
    latent = (f"Gaussian d={config.latent_dim}" if model.is_continuous else
              f"D={config.num_quantizers} K={config.codebook_size} d={config.latent_dim}")
    print(f"RQ-VAE: {n_params / 1e6:.2f}M parameters, C={config.compression_factor} {latent}, "
          f"{len(train_blocks)} train / {len(eval_blocks)} held-out blocks")
    start = time.perf_counter()
    if args.init_from is not None:
        print(f"starting from {args.init_from} (its architecture; the architecture flags are ignored)")
    if prior is not None:
        print(f"joint rate-distortion: the rate under {args.rate_prior}, weight {args.rate_weight:g}, "
              f"temperature {args.rate_temperature:g}")
    if teacher is not None:
        print(f"semantic level 0: distilled toward {args.semantic_teacher} (hidden size {teacher.hidden_size}), "
              f"weight {args.semantic_weight:g}")
    result = train(model, train_blocks, eval_blocks, train_args, tokenizer=tokenizer,
                   evaluate_fn=partial(reconstruction_evaluate_fn, semantic_teacher=teacher),
                   inputs_fn=training_inputs(teacher, prior))
    conditions = run_conditions(result, train_args, time.perf_counter() - start)
    accuracy = result.eval_metrics.get("eval_accuracy")
    print(f"held-out reconstruction accuracy {accuracy:.1%} {conditions}" if accuracy is not None else
          f"finished {conditions}")
    summary = {k: round(v, 4) for k, v in result.eval_metrics.items()}
    print(f"all held-out figures: {json.dumps(summary)}")
    return 0


def training_inputs(teacher, prior):
    """The training loop's `inputs_fn`: the batch's forward arguments, plus the semantic teacher's targets and the
    code prior where given (None: the loop's default)."""
    if teacher is None and prior is None:
        return None
    from rqlm.trainer.loop import model_inputs

    def inputs(batch: dict) -> dict:
        kwargs = model_inputs(batch)
        if teacher is not None:
            kwargs["semantic_targets"] = teacher(kwargs["input_ids"], kwargs.get("attention_mask"))
        if prior is not None:
            kwargs["code_log_prior"] = prior  # the VAE's forward calls it on the batch's own codes
        return kwargs

    return inputs


def check_rate_arguments(args: argparse.Namespace) -> None:
    """--rate_weight needs --rate_prior, whose weight defaults to 0.1 (the VAE's config checks its quantizer)."""
    if args.rate_prior is None:
        if args.rate_weight is not None:
            raise ValueError("--rate_weight needs --rate_prior (the codes-mode latent LM whose rate the VAE pays)")
        return
    if args.rate_weight is None:
        args.rate_weight = 0.1
    if args.rate_weight < 0 or args.rate_temperature <= 0:
        raise ValueError(f"--rate_weight must be >= 0 and --rate_temperature > 0, got {args.rate_weight} and "
                         f"{args.rate_temperature}")


def check_semantic_arguments(args: argparse.Namespace) -> None:
    """--semantic_weight needs --semantic_teacher; the teacher's weight defaults to 1; a residual VQ only."""
    from rqlm.modeling.configuration_rq_vae import SEMANTIC_QUANTIZERS

    if args.semantic_teacher is None:
        if args.semantic_weight is not None:
            raise ValueError("--semantic_weight needs --semantic_teacher (the causal LM to distil level 0 toward)")
        return
    if args.semantic_weight is None:
        args.semantic_weight = 1.0
    if args.quantizer_type not in SEMANTIC_QUANTIZERS:
        raise ValueError(
            f"--semantic_teacher distils the first level of a residual VQ; --quantizer_type is "
            f"{args.quantizer_type!r}, use residual_vq"
        )


def run_conditions(result, train_args, seconds: float) -> str:
    """'after 300 steps (stopped by the 3-minute budget, ...), 3.1 minutes wall clock, 2,184 training tokens/s ...':
    the conditions a figure depends on (a loaded or slower machine trains fewer steps in a time budget)."""
    stop = (f"stopped by the {train_args.max_minutes:g}-minute budget, --max_steps {train_args.max_steps}"
            if result.stopped_by_time else f"of --max_steps {train_args.max_steps}")
    speeds = sorted(r["tokens_per_second"] for r in result.history if "tokens_per_second" in r)
    speed = f", {speeds[len(speeds) // 2]:,.0f} training tokens/s on this machine" if speeds else ""
    duration = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} minutes"
    return f"after {result.step} steps ({stop}), {result.tokens_seen:,} tokens, {duration} wall clock{speed}"
