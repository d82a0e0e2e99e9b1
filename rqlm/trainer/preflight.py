"""Checks the training commands run before building any data, so a wrong flag fails in seconds."""

from __future__ import annotations

from pathlib import Path

from rqlm.presets import backbone_config, is_preset


def check_before_data(train_args, backbone: str | None = None) -> None:
    """One-line errors for a checkpoint to resume that is missing and a `--backbone` that is not a Qwen3."""
    from rqlm.trainer.loop import find_checkpoint

    if train_args.resume_from_checkpoint:
        find_checkpoint(train_args.resume_from_checkpoint, Path(train_args.output_dir))
    if backbone is not None and not is_preset(backbone):  # a Qwen3 to load: refuse anything else now
        backbone_config(backbone)
