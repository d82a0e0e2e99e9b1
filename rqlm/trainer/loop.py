"""One explicit Accelerate training loop shared by every rqlm model.

    Accelerator -> set_seed -> DataLoaders -> AdamW (backbone in its own groups) -> prepare
    for each optimizer step: set the learning rates -> for each micro-batch: accumulate -> forward ->
    backward -> clip -> step -> zero_grad; every eval_steps: evaluate; every save_steps: save_state
    at the end: save_pretrained (safetensors) + tokenizer + README.md model card + metrics.jsonl + plot

A model plugs in with `forward(input_ids=, attention_mask=, labels=) -> output with .loss` and,
optionally, `on_step_begin(step)` (called before the first forward of every optimizer step),
`backbone_parameters()` (weights frozen for `config.freeze_backbone_steps` steps, then trained) and
`logged_output_keys` (scalar output fields logged besides `loss` and every `*_loss`). `train(inputs_fn=)` maps a
batch to the forward's kwargs (default `model_inputs`), e.g. to add a frozen teacher's targets that the model's
checkpoint must not hold.

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

Ctrl-C. The first SIGINT finishes the optimizer step in progress, saves a checkpoint exactly like a
periodic one (a forward of a half-done step would already have moved EMA codebooks, dead-code
counters and RNG states) and raises KeyboardInterrupt; a second one, a moment later, stops at once
without saving. Each checkpoint also holds the model's class and config, so resuming a different
model is a one-line error instead of a load_state traceback.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from rqlm.evaluation.perplexity import safe_exp
from rqlm.reporting.plots import plot_training_curves, training_title
from rqlm.trainer.arguments import TrainingArguments, resolve_mixed_precision

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_NAME = "trainer_state.json"
MODEL_SIGNATURE_NAME = "model_signature.json"  # class and config of the model a checkpoint holds
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "training_curves.png"
STEP_TIME_SMOOTHING = 0.8  # weight of the running step time against the last step's, for the time projection
SECOND_INTERRUPT_SECONDS = (
    1.0  # a Ctrl-C sooner after the first is the launcher forwarding it, not a second one
)

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished (or time-budgeted) run reached."""

    step: int
    output_dir: str
    history: list[dict] = field(default_factory=list)  # one record per logging / evaluation step
    eval_metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation, keys "eval_*"
    tokens_seen: int = 0
    stopped_by_time: bool = False


def model_inputs(batch: dict) -> dict:
    """input_ids (B, T) [+ attention_mask] -> forward kwargs; labels are the inputs with padding set to -100."""
    input_ids = batch["input_ids"]
    inputs = {"input_ids": input_ids}
    labels = batch.get("labels", input_ids)
    if "attention_mask" in batch:
        inputs["attention_mask"] = batch["attention_mask"]
        labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    inputs["labels"] = labels
    if "codes" in batch:  # codes the frozen VAE computed once (`rqlm encode`), stored as small integers
        inputs["codes"] = batch["codes"].long()
    return inputs


@torch.no_grad()
def evaluate_loss(model, eval_dataloader, accelerator: Accelerator) -> dict[str, float]:
    """Mean loss over the held-out batches, gathered across ranks, and its perplexity exp(loss)."""
    losses = []
    for batch in eval_dataloader:
        loss = model(**model_inputs(batch)).loss.detach().float()
        losses.append(accelerator.gather_for_metrics(loss.repeat(batch["input_ids"].shape[0])))
    if not losses:
        raise ValueError(
            "the held-out split gave no evaluation batch; pass more data or a smaller eval batch size"
        )
    loss = torch.cat(losses).mean().item()
    return {"loss": loss, "perplexity": safe_exp(loss)}


def logged_output_keys(model, outputs) -> list[str]:
    """Scalar tensor fields of a model output to log: `loss`, every `*_loss`, and the model's `logged_output_keys`."""
    extra = set(getattr(model, "logged_output_keys", ()))
    fields = outputs.items() if hasattr(outputs, "items") else vars(outputs).items()
    return [
        key
        for key, value in fields
        if (key == "loss" or key.endswith("_loss") or key in extra)
        and isinstance(value, torch.Tensor)
        and value.numel() == 1
    ]


def keep_fsdp_outputs_as_computed(accelerator: Accelerator) -> None:
    """Under FSDP2 mixed precision, let the model's outputs keep the dtypes it computes them in (fp32 losses).

    accelerate 1.15's policy for bf16 also has `output_dtype=bf16`, which rounds every output of the sharded
    root to bf16, the fp32 losses included (an eval loss near 5 nats moves in steps of 1/32); 1.16's has none.
    Clearing it makes both releases run the same: bf16 parameters in forward and reduce, fp32 losses out.
    """
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    policy = getattr(plugin, "mixed_precision_policy", None)
    if getattr(policy, "output_dtype", None) is not None:  # FSDP2's MixedPrecisionPolicy (FSDP1's has none)
        plugin.mixed_precision_policy = replace(policy, output_dtype=None)


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


class DeferredInterrupt:
    """While active, a first Ctrl-C (SIGINT) only sets `requested`, so the loop can stop at a step boundary;
    another one more than SECOND_INTERRUPT_SECONDS later raises KeyboardInterrupt at once."""

    def __init__(self):
        self.requested_at = None
        self.previous_handler = None

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.requested_at is None:
            self.requested_at = now
        elif now - self.requested_at > SECOND_INTERRUPT_SECONDS:
            raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            self.previous_handler = signal.signal(signal.SIGINT, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous_handler is not None:
            signal.signal(signal.SIGINT, self.previous_handler)


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


def write_model_card(
    output_dir: Path, model, args: TrainingArguments, result: TrainResult, extra: str | None
):
    """README.md: what was trained, for how long, how well, and the command that did it."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    num_params = sum(p.numel() for p in model.parameters())
    rows = [
        ("model type", f"`{model_type}` ({type(model).__name__})"),
        ("parameters", f"{num_params / 1e6:.2f} M"),
        ("optimizer steps", str(result.step)),
        ("tokens seen", f"{result.tokens_seen:,}"),
        ("stopped by", "time budget (--max_minutes)" if result.stopped_by_time else "--max_steps"),
    ]
    rows += [(name, f"{value:.4f}") for name, value in result.eval_metrics.items()]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    command = " ".join(shlex.quote(a) for a in sys.argv)
    card = (
        f"---\nlibrary_name: transformers\ntags:\n- rqlm\n- {model_type}\n---\n\n"
        f"# {model_type} trained with rqlm\n\n| | |\n|---|---|\n{table}\n\n"
        f"Training curves: `{PLOT_NAME}`; every logged value: `{METRICS_NAME}`.\n\n"
        f"## Command\n\n```\n{command}\n```\n\n"
        f"## Training arguments\n\n```yaml\n{yaml.safe_dump(asdict(args), sort_keys=False)}```\n"
    )
    if extra:
        card += f"\n{extra.rstrip()}\n"
    (output_dir / "README.md").write_text(card)


def train(
    model,
    train_dataset,
    eval_dataset,
    args: TrainingArguments,
    tokenizer=None,
    evaluate_fn: Callable | None = None,
    model_card_extra: str | None = None,
    inputs_fn: Callable[[dict], dict] | None = None,
) -> TrainResult:
    """Train `model` on blocks of `input_ids` for `args.max_steps` optimizer steps; save it to `args.output_dir`.

    `inputs_fn(batch) -> forward kwargs` prepares each training batch (default `model_inputs`)."""
    output_dir = Path(args.output_dir)
    evaluate_fn = evaluate_fn or evaluate_loss
    inputs_fn = inputs_fn or model_inputs
    resume_dir = (
        find_checkpoint(args.resume_from_checkpoint, output_dir) if args.resume_from_checkpoint else None
    )

    # 1. Accelerator. DDP registers only parameters that require grad when it wraps the model, and a
    #    parameter frozen now may be unfrozen by on_step_begin later: register all of them and let DDP
    #    skip the ones that get no gradient in a step (find_unused_parameters).
    ignored = ignored_parameter_names(model)
    frozen = [p for name, p in model.named_parameters() if not p.requires_grad and name not in ignored]
    may_change_trainable = bool(frozen) or callable(getattr(model, "on_step_begin", None))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=resolve_mixed_precision(args.mixed_precision),
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=str(output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=may_change_trainable)],
    )
    keep_fsdp_outputs_as_computed(accelerator)
    set_seed(args.seed)

    # 2. Data: shuffled per epoch from (seed, epoch) alone, so a resumed run sees the same order.
    #    Each loader has its own generator so iterating it never touches the global RNG.
    is_iterable = isinstance(train_dataset, IterableDataset)
    train_dataloader = DataLoader(
        train_dataset,
        batch_size=args.per_device_train_batch_size,
        shuffle=not is_iterable,
        drop_last=True,
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed),
    )
    eval_dataloader = None
    if eval_dataset is not None:
        if args.eval_batches is not None:
            num_blocks = args.eval_batches * args.per_device_eval_batch_size * accelerator.num_processes
            if isinstance(eval_dataset, IterableDataset):
                eval_dataset = eval_dataset.take(num_blocks)
            elif len(eval_dataset) > num_blocks:
                eval_dataset = eval_dataset.select(range(num_blocks))
        eval_dataloader = DataLoader(
            eval_dataset,
            batch_size=args.per_device_eval_batch_size,
            num_workers=args.dataloader_num_workers,
            generator=torch.Generator().manual_seed(args.seed),
        )

    # 3. Optimizer over every parameter; the learning rates are set before every step (see the docstring).
    optimizer = torch.optim.AdamW(
        parameter_groups(model, args.weight_decay),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )
    freeze_steps = getattr(getattr(model, "config", None), "freeze_backbone_steps", 0) or 0
    budget_seconds = None if args.max_minutes is None else 60 * args.max_minutes

    def set_learning_rates(step: int, train_seconds: float) -> None:
        peak = args.learning_rate * schedule_multiplier(args, step, train_seconds)
        backbone = unfreeze_multiplier(step, freeze_steps, args.unfreeze_warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = peak * backbone if group["backbone"] else peak

    # 4. prepare (with every parameter trainable while DDP wraps it, see 1.)
    signature = model_signature(model)
    for p in frozen:
        p.requires_grad_(True)
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    for p in frozen:
        p.requires_grad_(False)
    if eval_dataloader is not None:
        eval_dataloader = accelerator.prepare(eval_dataloader)
    blocks_per_batch = args.per_device_train_batch_size * accelerator.num_processes
    num_blocks = (
        sum(1 for _ in itertools.islice(train_dataset, blocks_per_batch))
        if is_iterable
        else len(train_dataset)
    )
    if num_blocks < blocks_per_batch:
        raise ValueError(
            f"the training split has {num_blocks} blocks, fewer than one batch of "
            f"{args.per_device_train_batch_size} x {accelerator.num_processes} processes; "
            "lower --per_device_train_batch_size or give more data"
        )
    unwrapped = accelerator.unwrap_model(model)
    on_step_begin = getattr(unwrapped, "on_step_begin", None)

    # 5. Resume: weights, optimizer, RNG, then step, data position and training time.
    step, epoch, batches_done, tokens_seen, train_seconds, history = 0, 0, 0, 0, 0.0, []
    spent_budget = 0.0  # the time budget (seconds) that ended the resumed run, if one did
    if resume_dir is not None:
        check_model_signature(resume_dir, signature)
        try:
            accelerator.load_state(str(resume_dir))
        except (
            RuntimeError
        ) as e:  # a checkpoint without a signature (or one it does not catch) that does not fit
            first_lines = " ".join(str(e).split("\n")[:2]).strip()
            raise ValueError(f"checkpoint {resume_dir} does not fit this model ({first_lines})") from None
        state = json.loads((resume_dir / TRAINER_STATE_NAME).read_text())
        step, epoch, batches_done = state["step"], state["epoch"], state["batches_done"]
        tokens_seen, history = state["tokens_seen"], state["history"]
        train_seconds = state.get("train_seconds", 0.0)
        spent_budget = state.get("time_budget_spent") or 0.0
        resumed = f"resumed from step {step} of {args.max_steps}"
        if budget_seconds is not None:
            resumed += f", {train_seconds / 60:.1f} of {args.max_minutes:g} minutes of training time spent"
        logger.info(resumed)
        accelerator.print(f"{resumed} ({resume_dir})")

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        # rewrite the log so a resumed run continues it rather than duplicating steps
        with open(output_dir / METRICS_NAME, "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in history)
    if args.report_to != "none":
        config = {k: v for k, v in asdict(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("rqlm", config=config)

    def log(record: dict) -> None:
        history.append(record)
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if accelerator.is_main_process:
            with open(output_dir / METRICS_NAME, "a") as f:
                f.write(json.dumps(record) + "\n")

    def run_evaluation() -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            metrics = {
                f"eval_{k}": float(v) for k, v in evaluate_fn(model, eval_dataloader, accelerator).items()
            }
        model.train()
        nonlocal last_eval_step
        last_eval_step = step
        log({"step": step, **metrics})
        if accelerator.is_main_process:
            progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    def trainer_state() -> dict:
        return {
            "step": step,
            "epoch": epoch,
            "batches_done": batches_done,
            "tokens_seen": tokens_seen,
            "train_seconds": train_seconds,
            # a run ends when its next step is projected past the budget, so its train_seconds can fall short of
            # it: the budget it ended is recorded, and a resume with the same budget trains no further
            "time_budget_spent": budget_seconds if stopped_by_time else None,
            "history": history,
        }

    def save() -> Path:
        nonlocal last_saved_step
        path = save_checkpoint(accelerator, output_dir, trainer_state(), signature, args.save_total_limit)
        last_saved_step = step
        return path

    # a time-budgeted run counts training seconds, a step-budgeted one steps
    progress = tqdm(
        total=args.max_steps if budget_seconds is None else budget_seconds,
        initial=step if budget_seconds is None else min(train_seconds, budget_seconds),
        desc="train",
        unit="step" if budget_seconds is None else "s",
        bar_format=None
        if budget_seconds is None
        else "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s of training time [{elapsed}<{remaining}{postfix}]",
        disable=not accelerator.is_local_main_process,
    )
    eval_metrics, stopped_by_time, last_saved_step = {}, False, None
    # rank 0's training time at the projected end of the next step, and whether that step is the budget's last
    projected_seconds, step_seconds_estimate, last_by_time = train_seconds, None, False
    if budget_seconds is not None and max(train_seconds, spent_budget) >= budget_seconds:
        stopped_by_time = True  # a resumed run whose budget is already spent
    window_sums: dict[str, torch.Tensor] = {}
    window_micro_batches, window_tokens, window_train_seconds = 0, 0, 0.0
    step_tokens, step_begun, last_eval_step, grad_norm, logged_keys = 0, False, None, None, None
    model.train()

    # 6. The loop.
    try:
        with DeferredInterrupt() as interrupt:
            tick = time.perf_counter()  # training time runs from here; evaluation and saving reset it
            while step < args.max_steps and not stopped_by_time:
                train_dataloader.set_epoch(epoch)
                batches = (
                    accelerator.skip_first_batches(train_dataloader, batches_done)
                    if batches_done
                    else train_dataloader
                )
                for batch_index, batch in enumerate(batches, start=batches_done):
                    if not step_begun:
                        if on_step_begin is not None:
                            on_step_begin(step)
                        set_learning_rates(step, projected_seconds)
                        step_begun = True
                    with accelerator.accumulate(model):
                        outputs = model(**inputs_fn(batch))
                        accelerator.backward(outputs.loss)
                        if accelerator.sync_gradients and args.max_grad_norm > 0:
                            grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad()

                    if logged_keys is None:
                        logged_keys = logged_output_keys(unwrapped, outputs)
                    for key in logged_keys:
                        window_sums[key] = window_sums.get(key, 0.0) + getattr(outputs, key).detach().float()
                    window_micro_batches += 1
                    window_tokens += batch["input_ids"].numel() * accelerator.num_processes
                    step_tokens += batch["input_ids"].numel() * accelerator.num_processes
                    if not accelerator.sync_gradients:
                        continue

                    # one optimizer step done
                    step_seconds = time.perf_counter() - tick
                    train_seconds += step_seconds
                    window_train_seconds += step_seconds
                    step += 1
                    batches_done = batch_index + 1
                    tokens_seen, step_tokens = tokens_seen + step_tokens, 0
                    step_begun = False
                    stopped_by_time = last_by_time

                    if step % args.logging_steps == 0 or step == args.max_steps or stopped_by_time:
                        means = accelerator.reduce(
                            torch.stack([window_sums[k] for k in logged_keys]) / window_micro_batches,
                            reduction="mean",
                        )
                        lrs = {"lr": optimizer.param_groups[0]["lr"]}
                        backbone_lrs = [g["lr"] for g in optimizer.param_groups if g["backbone"]]
                        if backbone_lrs and not all(g["backbone"] for g in optimizer.param_groups):
                            lrs["lr_backbone"] = backbone_lrs[0]
                        record = {
                            "step": step,
                            **lrs,
                            "tokens_seen": tokens_seen,
                            "tokens_per_second": window_tokens / window_train_seconds,
                            "train_seconds": train_seconds,
                        }
                        if grad_norm is not None:
                            record["grad_norm"] = float(grad_norm)
                        record.update({k: means[i].item() for i, k in enumerate(logged_keys)})
                        log(record)
                        progress.set_postfix_str(
                            f"step {step}, loss {record['loss']:.4f}, lr {record['lr']:.2e}, "
                            f"tok/s {record['tokens_per_second']:.0f}"
                        )
                        window_sums.clear()
                        window_micro_batches, window_tokens, window_train_seconds = 0, 0, 0.0
                    if budget_seconds is None:
                        progress.update(1)
                    else:
                        progress.update(min(train_seconds, budget_seconds) - progress.n)

                    if eval_dataloader is not None and args.eval_steps and step % args.eval_steps == 0:
                        eval_metrics = run_evaluation()
                    if args.save_steps and step % args.save_steps == 0:
                        save()

                    # Every rank takes rank 0's training time (so all use one learning rate and stop together)
                    # and learns whether any of them was interrupted.
                    step_seconds_estimate = (
                        step_seconds
                        if step_seconds_estimate is None
                        else STEP_TIME_SMOOTHING * step_seconds_estimate
                        + (1 - STEP_TIME_SMOOTHING) * step_seconds
                    )
                    is_main = accelerator.is_main_process
                    shared = accelerator.reduce(
                        torch.tensor(
                            [
                                train_seconds if is_main else 0.0,
                                train_seconds + step_seconds_estimate if is_main else 0.0,
                                float(interrupt.requested),
                            ],
                            dtype=torch.float64,
                            device=accelerator.device,
                        ),
                        reduction="sum",
                    ).tolist()
                    # a projection never moves back: after a slow step, a fast one would otherwise raise the rate again
                    train_seconds, interrupted = shared[0], shared[2] > 0
                    projected_seconds = max(projected_seconds, shared[1])
                    last_by_time = budget_seconds is not None and projected_seconds >= budget_seconds
                    if interrupted:
                        path = (
                            save()
                            if last_saved_step != step
                            else output_dir / CHECKPOINTS_DIR / f"step-{step}"
                        )
                        if accelerator.is_main_process:
                            progress.write(
                                f"interrupted: saved {path} after step {step}; resume with "
                                "--resume_from_checkpoint latest"
                            )
                        raise KeyboardInterrupt
                    if step >= args.max_steps or stopped_by_time:
                        break
                    tick = time.perf_counter()
                else:
                    epoch, batches_done = epoch + 1, 0
    except KeyboardInterrupt:
        if step_begun and accelerator.is_main_process:
            # a second Ctrl-C (or one outside the loop's handler) stopped a half-done step: saving it would
            # keep the quantizer and RNG state of the half-done step
            progress.write(f"interrupted during step {step + 1}: not saved; resume from the last checkpoint")
        raise
    finally:
        progress.close()

    # 7. Final evaluation and save.
    if stopped_by_time and last_saved_step != step:
        save()
    if eval_dataloader is not None and last_eval_step != step:
        eval_metrics = run_evaluation()
    result = TrainResult(
        step=step,
        output_dir=str(output_dir),
        history=history,
        eval_metrics=eval_metrics,
        tokens_seen=tokens_seen,
        stopped_by_time=stopped_by_time,
    )
    accelerator.wait_for_everyone()
    # under FSDP (or ZeRO-3) each rank holds a shard: every rank takes part in gathering the full weights
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped.save_pretrained(output_dir, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        write_model_card(output_dir, unwrapped, args, result, model_card_extra)
        if any("loss" in r or any(k.startswith("eval_") for k in r) for r in history):
            plot_training_curves(history, output_dir / PLOT_NAME, title=training_title(unwrapped.config))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result
