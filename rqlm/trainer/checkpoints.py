"""Resumable checkpoints of the training loop (rqlm/trainer/loop.py): where they go, what they hold, which one
a run resumes from.

    output_dir/checkpoints/step-<step>/         accelerate's save_state (model, optimizer, RNG, dataloader)
        trainer_state.json                      step, data position, training time, history
        model_signature.json                    the model's class and config, checked before load_state

`save_total_limit` keeps the newest (highest step) checkpoints.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from accelerate import Accelerator

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_NAME = "trainer_state.json"
MODEL_SIGNATURE_NAME = "model_signature.json"  # class and config of the model a checkpoint holds


def model_signature(model) -> dict:
    """{'class', 'config'}: what a checkpoint's weights fit; the config flattened to dotted keys, private ones dropped."""

    def flatten(value: dict, prefix: str = "") -> dict:
        flat = {}
        for key, item in value.items():
            if key.startswith("_") or key in (
                "transformers_version",
                "architectures",
                "dtype",
                "torch_dtype",
            ):
                continue
            if isinstance(item, dict) and key.endswith("_config"):
                flat.update(flatten(item, f"{prefix}{key}."))
            else:
                flat[f"{prefix}{key}"] = item
        return flat

    config = getattr(model, "config", None)
    config = json.loads(config.to_json_string(use_diff=False)) if hasattr(config, "to_json_string") else {}
    return {"class": type(model).__name__, "config": flatten(config)}


OFF_VALUES = (None, False, 0, 0.0, "", [], {})  # a config field at one of these is a feature left off


def check_model_signature(checkpoint: Path, signature: dict) -> None:
    """Raise a one-line ValueError if `checkpoint` was saved from another model class or config than the one
    `signature` (`model_signature` of the model before `prepare`: FSDP2 renames the class it shards) describes.
    A config field the checkpoint predates (absent from its signature) matches while this run leaves it off."""
    path = checkpoint / MODEL_SIGNATURE_NAME
    if not path.is_file():
        return
    saved, current = json.loads(path.read_text()), json.loads(json.dumps(signature))
    advice = "resume with the model settings it was trained with, or train into a new --output_dir"
    if saved["class"] != current["class"]:
        raise ValueError(
            f"checkpoint {checkpoint} holds a {saved['class']}, this run trains a {current['class']}; {advice}"
        )
    for key in sorted(saved["config"].keys() | current["config"].keys()):
        was, now = saved["config"].get(key, "unset"), current["config"].get(key, "unset")
        if was == "unset" and now in OFF_VALUES:  # a field added since the checkpoint, left off in this run
            continue
        if was != now:
            raise ValueError(
                f"checkpoint {checkpoint} was trained with {key}={was!r}, this run has {key}={now!r}; {advice}"
            )


def find_checkpoint(resume_from_checkpoint: str, output_dir: Path) -> Path:
    """'latest' -> the highest output_dir/checkpoints/step-N; a path -> itself, checked to be a checkpoint."""
    if resume_from_checkpoint == "latest":
        found = sorted((output_dir / CHECKPOINTS_DIR).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        if not found:
            raise FileNotFoundError(
                f"no checkpoint to resume from in {output_dir / CHECKPOINTS_DIR}; train without "
                "--resume_from_checkpoint first (with --save_steps > 0)"
            )
        return found[-1]
    path = Path(resume_from_checkpoint)
    if not (path / TRAINER_STATE_NAME).is_file():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} not found (no {TRAINER_STATE_NAME} inside); pass a folder "
            f"{output_dir / CHECKPOINTS_DIR}/step-N or 'latest'"
        )
    return path


def save_checkpoint(
    accelerator: Accelerator, output_dir: Path, state: dict, signature: dict, save_total_limit: int | None
) -> Path:
    """save_state (model, optimizer, RNG) + trainer_state.json (step, data position, training time, history)
    + the model's class and config."""
    path = output_dir / CHECKPOINTS_DIR / f"step-{state['step']}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        (path / TRAINER_STATE_NAME).write_text(json.dumps(state, indent=1))
        (path / MODEL_SIGNATURE_NAME).write_text(json.dumps(signature, indent=1))
        if save_total_limit is not None:
            found = sorted(path.parent.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
            for old in found[:-save_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return path
