"""The training loop's optimizer groups and learning-rate schedule (rqlm/trainer/loop.py).

Schedule. The learning rate of optimizer step s (0-based) is peak x warmup x decay x unfreeze:
warmup = min(1, (s + 1) / warmup_steps); decay goes from 1 to `min_lr_ratio` as the run's progress
goes from 0 to 1 (cosine, or wsd: constant, then linear over the last `decay_fraction`); progress is
the later of the steps' (s + 1 - warmup) / (max_steps - warmup) and, under `--max_minutes`, the time
budget's t / budget, where t is the TRAINING time (evaluation and saving not counted) projected to
the end of step s from the recent step time (never earlier than the step before's projection, so the
rate does not rise again when the machine's speed varies). The step projected to reach the budget is
the last one, so a time-budgeted run ends at the schedule's floor whatever the machine's speed. Rank
0 measures the time and every rank uses its figure. `trainer_state.json` keeps the training time, so a resumed run
continues the same budget. Backbone groups get `unfreeze = 0` while frozen, then a linear ramp over
`unfreeze_warmup_steps`, so newly unfrozen weights do not start at the full rate.
"""

from __future__ import annotations

import math

import torch

from rqlm.trainer.arguments import TrainingArguments


def ignored_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names in the model's `_ddp_params_and_buffers_to_ignore`: left out of the optimizer, DDP and unfreezing."""
    return set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups over ALL parameters (frozen ones too, so unfreezing trains them): decay / no decay (norms,
    biases, embeddings), each split into the model's `backbone_parameters()` (marked backbone=True) and the rest."""
    backbone = set()
    for method in (
        "backbone_parameters",
        "adapter_parameters",
    ):  # adapters toggle in place of the weights under LoRA
        if callable(getattr(model, method, None)):
            backbone.update(id(p) for p in getattr(model, method)())
    groups = {(is_backbone, decays): [] for is_backbone in (False, True) for decays in (True, False)}
    ignored = ignored_parameter_names(model)
    for name, param in model.named_parameters():
        if name in ignored:  # never trains (e.g. a frozen submodule DDP also skips)
            continue
        decays = not (param.ndim < 2 or "norm" in name or "embed" in name)
        groups[(id(param) in backbone, decays)].append(param)
    return [
        {"params": params, "weight_decay": weight_decay if decays else 0.0, "backbone": is_backbone}
        for (is_backbone, decays), params in groups.items()
        if params
    ]


def schedule_multiplier(args: TrainingArguments, step: int, train_seconds: float) -> float:
    """Fraction of the peak learning rate for optimizer step `step` (0-based) ending at `train_seconds` of training."""
    warmup = min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else 1.0
    progress = (step + 1 - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    if args.max_minutes is not None:
        progress = max(progress, train_seconds / (60 * args.max_minutes))
    progress = min(max(progress, 0.0), 1.0)
    floor = args.min_lr_ratio
    if args.lr_scheduler == "cosine":
        decay = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    elif args.lr_scheduler == "wsd":
        decay = min(1.0, floor + (1 - floor) * (1 - progress) / args.decay_fraction)
    else:
        decay = 1.0
    return warmup * decay


def unfreeze_multiplier(step: int, freeze_steps: int, warmup_steps: int) -> float:
    """Learning-rate fraction of a backbone frozen for `freeze_steps`: 0, then a linear ramp over `warmup_steps`."""
    if step < freeze_steps:
        return 0.0
    if freeze_steps == 0 or warmup_steps == 0:
        return 1.0
    return min(1.0, (step + 1 - freeze_steps) / warmup_steps)
