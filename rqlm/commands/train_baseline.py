"""`rqlm train-baseline`: the plain Qwen3 causal LM every RQ figure is compared with.

It reads the same blocks as the RQ models (same corpus, tokenizer, block size) and trains
with the shared loop of rqlm/trainer/loop.py. `--backbone` is a preset trained from scratch
(test, tiny, small, base) or a pretrained Qwen3 (hub name or local folder) to fine-tune.
"""

from __future__ import annotations

import argparse
import shlex

from rqlm.presets import PRESETS, backbone_config, is_preset
from rqlm.trainer.arguments import add_training_arguments, training_arguments_from_namespace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rqlm.data.arguments import add_data_arguments

    add_data_arguments(parser)
    model = parser.add_argument_group("model")
    model.add_argument(
        "--backbone",
        default="tiny",
        help=f"a preset trained from scratch ({', '.join(PRESETS)}) or a pretrained Qwen3 to fine-tune "
        "(hub name or folder) (default: %(default)s)",
    )
    add_training_arguments(
        parser,
        output_dir="runs/baseline",
        max_steps=2000,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        warmup_steps=100,
        eval_steps=200,
        save_steps=500,
    )


def build_model(backbone: str, tokenizer):
    """A fresh Qwen3ForCausalLM from a preset sized to the tokenizer, or the pretrained one named."""
    from transformers import Qwen3ForCausalLM

    if is_preset(backbone):
        config = backbone_config(
            backbone,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
        )
        return Qwen3ForCausalLM(config)
    try:
        model = Qwen3ForCausalLM.from_pretrained(backbone)
    except OSError as e:
        raise ValueError(
            f"backbone {backbone!r} is neither a preset ({', '.join(PRESETS)}) "
            f"nor a loadable Qwen3: {str(e).strip().splitlines()[0]}"
        ) from None
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(
            f"backbone {backbone!r} has vocab_size {model.config.vocab_size} < tokenizer length {len(tokenizer)}; "
            "use the backbone's own tokenizer (omit --tokenizer)"
        )
    return model


def equivalent_command(args: argparse.Namespace) -> str:
    """`rqlm train-baseline` with every option spelled out (YAML values included)."""
    parts = ["rqlm", "train-baseline"]
    for name, value in vars(args).items():
        if name == "config" or value is None or value is False:
            continue
        parts += [f"--{name}"] if value is True else [f"--{name}", shlex.quote(str(value))]
    return " ".join(parts)


def main(args: argparse.Namespace) -> int:

    from accelerate.utils import set_seed

    from rqlm.data.arguments import load_blocks
    from rqlm.trainer.loop import train
    from rqlm.trainer.preflight import check_before_data

    train_args = training_arguments_from_namespace(args)
    check_before_data(train_args, args.backbone)
    default_tokenizer = None if is_preset(args.backbone) else args.backbone
    tokenizer, train_blocks, eval_blocks = load_blocks(args, default_tokenizer=default_tokenizer)
    set_seed(train_args.seed)  # the weights of a from-scratch backbone
    model = build_model(args.backbone, tokenizer)
    card = (
        f"## Reproduce\n\n```\n{equivalent_command(args)}\n```\n\n"
        "## Data\n\n"
        f"- dataset: {args.dataset or 'embedded corpus (CPython documentation)'}\n"
        f"- tokenizer: {args.tokenizer or ('embedded BPE' if is_preset(args.backbone) else args.backbone)} "
        f"({len(tokenizer)} tokens)\n"
        f"- block size: {args.block_size} tokens\n"
        f"- backbone: {args.backbone}\n"
    )
    result = train(model, train_blocks, eval_blocks, train_args, tokenizer=tokenizer, model_card_extra=card)
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.eval_metrics.items())
    print(
        f"trained {result.step} steps ({result.tokens_seen:,} tokens); {metrics}; saved to {result.output_dir}"
    )
    return 0
