"""Training settings shared by every rqlm command, as one dataclass and its argparse flags.

Each command calls `add_training_arguments(parser, learning_rate=..., ...)` with its own
defaults; transformers' `HfArgumentParser` makes the flags from the dataclass, so `--config file.yaml`
(read by rqlm/cli.py) and command-line flags fill the same fields, and
`training_arguments_from_namespace(args)` turns the parsed flags back into a `TrainingArguments`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import typing
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser

MIXED_PRECISION_CHOICES = ("auto", "no", "bf16", "fp16")
REPORT_TO_CHOICES = ("none", "tensorboard", "wandb")
LR_SCHEDULER_CHOICES = ("auto", "wsd", "cosine", "constant")


@dataclass
class TrainingArguments:
    """Settings of one training run; every field is also a `--flag` of the training commands."""

    output_dir: str = field(
        default="runs/model", metadata={"help": "where checkpoints, the model and logs go"}
    )
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps to train for"})
    max_minutes: float | None = field(
        default=None,
        metadata={
            "help": "budget of training time (evaluation and saving not counted): the learning rate decays to "
            "its floor as it runs out, then the run stops, saves and can be resumed with the time it has left"
        },
    )
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "training blocks per device per micro-batch"}
    )
    per_device_eval_batch_size: int = field(
        default=8, metadata={"help": "evaluation blocks per device per batch"}
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate of AdamW"})
    weight_decay: float = field(
        default=0.1, metadata={"help": "AdamW weight decay (not on norms, biases, embeddings)"}
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    lr_scheduler: str = field(
        default="auto",
        metadata={
            "help": "learning-rate schedule after the linear warmup, decaying to its floor at --max_steps or at "
            "the end of --max_minutes, whichever comes first; wsd: warmup-stable-decay (constant, then a "
            "linear decay over the last --decay_fraction); auto: wsd with --max_minutes, else cosine",
            "choices": LR_SCHEDULER_CHOICES,
        },
    )
    decay_fraction: float = field(
        default=0.2,
        metadata={"help": "wsd: the final fraction of the steps or the time budget spent decaying"},
    )
    warmup_steps: int = field(default=100, metadata={"help": "linear warmup steps from 0 to the peak rate"})
    min_lr_ratio: float = field(
        default=0.1, metadata={"help": "the schedule's floor as a fraction of the peak rate"}
    )
    unfreeze_warmup_steps: int = field(
        default=100,
        metadata={
            "help": "a frozen-then-unfrozen backbone's own linear warmup after the model's freeze_backbone_steps "
            "(its learning rate is 0 while frozen)"
        },
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "gradient clipping norm; 0 turns clipping off"}
    )
    mixed_precision: str = field(
        default="auto",
        metadata={
            "help": "autocast dtype; auto = bf16 where the device supports it (or accelerate launch's setting), "
            "else no",
            "choices": MIXED_PRECISION_CHOICES,
        },
    )
    eval_steps: int = field(
        default=200, metadata={"help": "evaluate on the held-out split every N steps; 0: only at the end"}
    )
    eval_batches: int | None = field(
        default=50, metadata={"help": "batches per evaluation (per device); none: the whole held-out split"}
    )
    save_steps: int = field(
        default=500, metadata={"help": "save a resumable checkpoint every N steps; 0: never"}
    )
    save_total_limit: int | None = field(
        default=2, metadata={"help": "checkpoints kept (oldest deleted); none: all"}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "a checkpoint folder, or 'latest' under output_dir/checkpoints"}
    )
    report_to: str = field(
        default="none", metadata={"help": "experiment tracker", "choices": REPORT_TO_CHOICES}
    )
    logging_steps: int = field(default=10, metadata={"help": "log the training loss every N steps"})
    seed: int = field(default=42, metadata={"help": "seed of weights init, data order and dropout"})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})

    def __post_init__(self):
        positive = (
            "max_steps",
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        non_negative = (
            "warmup_steps",
            "unfreeze_warmup_steps",
            "eval_steps",
            "save_steps",
            "max_grad_norm",
            "weight_decay",
            "dataloader_num_workers",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"--max_minutes must be > 0, got {self.max_minutes}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"--decay_fraction must be in (0, 1], got {self.decay_fraction}")
        for name, choices in (
            ("mixed_precision", MIXED_PRECISION_CHOICES),
            ("report_to", REPORT_TO_CHOICES),
            ("lr_scheduler", LR_SCHEDULER_CHOICES),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"--{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.lr_scheduler == "auto":
            self.lr_scheduler = "wsd" if self.max_minutes is not None else "cosine"
        if self.report_to != "none" and importlib.util.find_spec(self.report_to) is None:
            raise ValueError(
                f"--report_to {self.report_to} needs the {self.report_to} package: pip install {self.report_to}"
            )
        for name in ("eval_batches", "save_total_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1 or none, got {getattr(self, name)}")


def resolve_mixed_precision(value: str) -> str:
    """'auto' -> the `accelerate launch --mixed_precision` setting if any, else bf16 where supported, else 'no'."""
    if value != "auto":
        return value
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched:
        return launched
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def _none_or(convert):
    """An argparse type that reads 'none' / 'null' / '' as None: how an Optional field is cleared from the
    command line (YAML's null is None already)."""

    def parse(text: str):
        return None if text.strip().lower() in ("none", "null", "") else convert(text)

    parse.__name__ = convert.__name__  # argparse names it in "invalid int value"
    return parse


class _TrainingFlags(HfArgumentParser):
    """`HfArgumentParser`'s flags of `TrainingArguments` (the type from the annotation, help and choices from
    the field's metadata, the default), each added to `group` as rqlm has always spelled it: `--name` alone
    (HfArgumentParser also adds `--name-with-hyphens`, which would change every command's --help), 'none'
    read as None by the Optional fields, and the default in effect (the command's) at the end of the help."""

    def __init__(self, group):
        self.group = group
        hints = typing.get_type_hints(TrainingArguments)
        self.optional = {name for name, hint in hints.items() if type(None) in typing.get_args(hint)}
        super().__init__(TrainingArguments, add_help=False)  # calls add_argument once per field

    def add_argument(self, flag, *hyphenated, **kwargs):
        if flag.removeprefix("--") in self.optional:  # HfArgumentParser's type is int for `int | None`
            kwargs["type"] = _none_or(kwargs["type"])
        kwargs["help"] += " (default: %(default)s)"
        return self.group.add_argument(flag, **kwargs)


def add_training_arguments(parser: argparse.ArgumentParser, **default_overrides) -> argparse.ArgumentParser:
    """Add every `TrainingArguments` field as `--name` flag; keyword arguments change a command's defaults."""
    unknown = sorted(set(default_overrides) - {f.name for f in dataclasses.fields(TrainingArguments)})
    if unknown:
        raise TypeError(f"add_training_arguments got unknown defaults {unknown}")
    _TrainingFlags(parser.add_argument_group("training"))
    parser.set_defaults(**default_overrides)  # as a --config file's values are set, after these
    return parser


def training_arguments_from_namespace(args: argparse.Namespace) -> TrainingArguments:
    """The `TrainingArguments` held by parsed flags (other attributes of `args` are ignored). argparse has
    already typed a --config file's strings ('1e-3', 'none') with the flags' types."""
    (training,) = HfArgumentParser(TrainingArguments).parse_dict(vars(args), allow_extra_keys=True)
    return training
