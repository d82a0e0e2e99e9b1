"""One explicit Accelerate training loop shared by every rqlm model, in the steps `train` names:

    make_accelerator (seed) -> build_dataloaders -> build_optimizer
    (AdamW, backbone in its own groups) -> prepare -> resume (checkpoints.py) -> start_logging
    train_loop: for each optimizer step: train_micro_batch (set the learning rates, accumulate -> forward ->
        backward -> clip -> step -> zero_grad) -> end_step (log, progress bar); every eval_steps: evaluate;
        every save_steps: save; every rank shares rank 0's training time and any Ctrl-C
    finish: save_pretrained (safetensors) + tokenizer + README.md model card + metrics.jsonl + plot

The learning-rate schedule, and how `--max_minutes` ends a run at its floor, is in optimization.py.

A model plugs in with `forward(input_ids=, attention_mask=, labels=) -> output with .loss` and,
optionally, `on_step_begin(step)` (called before the first forward of every optimizer step),
`backbone_parameters()` (weights frozen for `config.freeze_backbone_steps` steps, then trained) and
`logged_output_keys` (scalar output fields logged besides `loss` and every `*_loss`). `train(inputs_fn=)` maps a
batch to the forward's kwargs (default `model_inputs`), e.g. to add a frozen teacher's targets that the model's
checkpoint must not hold.

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
import shlex
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
from rqlm.trainer.checkpoints import (
    CHECKPOINTS_DIR,
    MODEL_SIGNATURE_NAME,  # noqa: F401  (imported from here by older callers)
    TRAINER_STATE_NAME,
    check_model_signature,
    find_checkpoint,
    model_signature,
    save_checkpoint,
)
from rqlm.trainer.optimization import (
    ignored_parameter_names,
    parameter_groups,
    schedule_multiplier,
    unfreeze_multiplier,
)

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


@dataclass
class Run:
    """What every step of a run uses: the arguments, the prepared objects and where things go."""

    args: TrainingArguments
    accelerator: Accelerator
    model: torch.nn.Module  # as prepared (DDP / FSDP wrapped)
    unwrapped: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_dataloader: DataLoader
    eval_dataloader: DataLoader | None
    output_dir: Path
    signature: dict  # model_signature before prepare
    evaluate_fn: Callable
    inputs_fn: Callable[[dict], dict]
    freeze_steps: int
    budget_seconds: float | None
    progress: tqdm | None = None


@dataclass
class TrainState:
    """Where a run stands: what a checkpoint keeps (step .. history) and what the loop tracks between steps."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0  # micro-batches of the current epoch already trained
    tokens_seen: int = 0
    train_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    spent_budget: float = 0.0  # the time budget (seconds) that ended the resumed run, if one did
    stopped_by_time: bool = False
    eval_metrics: dict[str, float] = field(default_factory=dict)
    last_saved_step: int | None = None
    last_eval_step: int | None = None
    # rank 0's training time at the projected end of the next step, and whether that step is the budget's last
    projected_seconds: float = 0.0
    step_seconds_estimate: float | None = None
    last_by_time: bool = False
    step_begun: bool = False  # on_step_begin and the learning rates done for the step in progress
    step_tokens: int = 0
    grad_norm: torch.Tensor | None = None
    logged_keys: list[str] | None = None
    # the logging window: sums of the logged outputs over its micro-batches, its tokens and training time
    window_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    window_micro_batches: int = 0
    window_tokens: int = 0
    window_train_seconds: float = 0.0

    def checkpoint(self, budget_seconds: float | None) -> dict:
        """trainer_state.json's contents."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "tokens_seen": self.tokens_seen,
            "train_seconds": self.train_seconds,
            # a run ends when its next step is projected past the budget, so its train_seconds can fall short of
            # it: the budget it ended is recorded, and a resume with the same budget trains no further
            "time_budget_spent": budget_seconds if self.stopped_by_time else None,
            "history": self.history,
        }


def make_accelerator(model, args: TrainingArguments) -> tuple[Accelerator, list[torch.nn.Parameter]]:
    """The Accelerator, seeded; and the frozen parameters.

    DDP registers only parameters that require grad when it wraps the model, and a parameter frozen now may be
    unfrozen by on_step_begin later: register all of them and let DDP skip the ones that get no gradient in a step
    (find_unused_parameters)."""
    ignored = ignored_parameter_names(model)
    frozen = [p for name, p in model.named_parameters() if not p.requires_grad and name not in ignored]
    may_change_trainable = bool(frozen) or callable(getattr(model, "on_step_begin", None))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=resolve_mixed_precision(args.mixed_precision),
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=may_change_trainable)],
    )
    keep_fsdp_outputs_as_computed(accelerator)
    set_seed(args.seed)
    return accelerator, frozen


def build_dataloaders(
    train_dataset, eval_dataset, args: TrainingArguments, num_processes: int
) -> tuple[DataLoader, DataLoader | None]:
    """Shuffled per epoch from (seed, epoch) alone, so a resumed run sees the same order; each loader has its own
    generator so iterating it never touches the global RNG. The eval split is cut to `eval_batches`."""
    train_dataloader = DataLoader(
        train_dataset,
        batch_size=args.per_device_train_batch_size,
        shuffle=not isinstance(train_dataset, IterableDataset),
        drop_last=True,
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed),
    )
    if eval_dataset is None:
        return train_dataloader, None
    if args.eval_batches is not None:
        num_blocks = args.eval_batches * args.per_device_eval_batch_size * num_processes
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
    return train_dataloader, eval_dataloader


def build_optimizer(model, args: TrainingArguments) -> torch.optim.Optimizer:
    """AdamW over every parameter; the learning rates are set before every step (`set_learning_rates`)."""
    return torch.optim.AdamW(
        parameter_groups(model, args.weight_decay),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )


def prepare(accelerator: Accelerator, model, optimizer, train_dataloader, eval_dataloader, frozen) -> tuple:
    """accelerator.prepare, with every parameter trainable while DDP wraps it (see `make_accelerator`)."""
    for p in frozen:
        p.requires_grad_(True)
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    for p in frozen:
        p.requires_grad_(False)
    if eval_dataloader is not None:
        eval_dataloader = accelerator.prepare(eval_dataloader)
    return model, optimizer, train_dataloader, eval_dataloader


def check_one_batch(train_dataset, args: TrainingArguments, num_processes: int) -> None:
    """Raise if the training split holds less than one batch across all processes."""
    blocks_per_batch = args.per_device_train_batch_size * num_processes
    num_blocks = (
        sum(1 for _ in itertools.islice(train_dataset, blocks_per_batch))
        if isinstance(train_dataset, IterableDataset)
        else len(train_dataset)
    )
    if num_blocks < blocks_per_batch:
        raise ValueError(
            f"the training split has {num_blocks} blocks, fewer than one batch of "
            f"{args.per_device_train_batch_size} x {num_processes} processes; "
            "lower --per_device_train_batch_size or give more data"
        )


def resume(run: Run, resume_dir: Path) -> TrainState:
    """Weights, optimizer and RNG from the checkpoint, then step, data position and training time."""
    check_model_signature(resume_dir, run.signature)
    try:
        run.accelerator.load_state(str(resume_dir))
    except RuntimeError as e:  # a checkpoint without a signature (or one it does not catch) that does not fit
        first_lines = " ".join(str(e).split("\n")[:2]).strip()
        raise ValueError(f"checkpoint {resume_dir} does not fit this model ({first_lines})") from None
    saved = json.loads((resume_dir / TRAINER_STATE_NAME).read_text())
    state = TrainState(
        step=saved["step"],
        epoch=saved["epoch"],
        batches_done=saved["batches_done"],
        tokens_seen=saved["tokens_seen"],
        history=saved["history"],
        train_seconds=saved.get("train_seconds", 0.0),
        spent_budget=saved.get("time_budget_spent") or 0.0,
    )
    resumed = f"resumed from step {state.step} of {run.args.max_steps}"
    if run.budget_seconds is not None:
        resumed += (
            f", {state.train_seconds / 60:.1f} of {run.args.max_minutes:g} minutes of training time spent"
        )
    logger.info(resumed)
    run.accelerator.print(f"{resumed} ({resume_dir})")
    return state


def start_logging(run: Run, state: TrainState) -> None:
    """metrics.jsonl rewritten from the history (a resumed run continues it rather than duplicating steps),
    the trackers, and the progress bar: training seconds for a time-budgeted run, steps for a step-budgeted one."""
    args, budget_seconds = run.args, run.budget_seconds
    if run.accelerator.is_main_process:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        with open(run.output_dir / METRICS_NAME, "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in state.history)
    if args.report_to != "none":
        config = {k: v for k, v in asdict(args).items() if isinstance(v, (int, float, str, bool))}
        run.accelerator.init_trackers("rqlm", config=config)
    run.progress = tqdm(
        total=args.max_steps if budget_seconds is None else budget_seconds,
        initial=state.step if budget_seconds is None else min(state.train_seconds, budget_seconds),
        desc="train",
        unit="step" if budget_seconds is None else "s",
        bar_format=None
        if budget_seconds is None
        else "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s of training time [{elapsed}<{remaining}{postfix}]",
        disable=not run.accelerator.is_local_main_process,
    )
    state.projected_seconds = state.train_seconds
    if budget_seconds is not None and max(state.train_seconds, state.spent_budget) >= budget_seconds:
        state.stopped_by_time = True  # a resumed run whose budget is already spent


def log(run: Run, state: TrainState, record: dict) -> None:
    """Append a record to the history, the trackers and metrics.jsonl."""
    state.history.append(record)
    run.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
    if run.accelerator.is_main_process:
        with open(run.output_dir / METRICS_NAME, "a") as f:
            f.write(json.dumps(record) + "\n")


def set_learning_rates(run: Run, step: int, train_seconds: float) -> None:
    """The schedule's rate for optimizer step `step`, times the unfreeze ramp for the backbone groups."""
    peak = run.args.learning_rate * schedule_multiplier(run.args, step, train_seconds)
    backbone = unfreeze_multiplier(step, run.freeze_steps, run.args.unfreeze_warmup_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = peak * backbone if group["backbone"] else peak


def train_micro_batch(run: Run, state: TrainState, batch: dict) -> None:
    """One micro-batch: begin the optimizer step if it is the first, forward, backward, clip and step (the
    optimizer steps only when gradients sync), and add its outputs and tokens to the logging window."""
    accelerator, model = run.accelerator, run.model
    if not state.step_begun:
        on_step_begin = getattr(run.unwrapped, "on_step_begin", None)
        if on_step_begin is not None:
            on_step_begin(state.step)
        set_learning_rates(run, state.step, state.projected_seconds)
        state.step_begun = True
    with accelerator.accumulate(model):
        outputs = model(**run.inputs_fn(batch))
        accelerator.backward(outputs.loss)
        if accelerator.sync_gradients and run.args.max_grad_norm > 0:
            state.grad_norm = accelerator.clip_grad_norm_(model.parameters(), run.args.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad()

    if state.logged_keys is None:
        state.logged_keys = logged_output_keys(run.unwrapped, outputs)
    for key in state.logged_keys:
        state.window_sums[key] = state.window_sums.get(key, 0.0) + getattr(outputs, key).detach().float()
    tokens = batch["input_ids"].numel() * accelerator.num_processes
    state.window_micro_batches += 1
    state.window_tokens += tokens
    state.step_tokens += tokens


def end_step(run: Run, state: TrainState, batch_index: int, step_seconds: float) -> None:
    """Count a finished optimizer step; log the window's means every logging_steps and at the end; move the bar."""
    args = run.args
    state.train_seconds += step_seconds
    state.window_train_seconds += step_seconds
    state.step += 1
    state.batches_done = batch_index + 1
    state.tokens_seen, state.step_tokens = state.tokens_seen + state.step_tokens, 0
    state.step_begun = False
    state.stopped_by_time = state.last_by_time
    if state.step % args.logging_steps == 0 or state.step == args.max_steps or state.stopped_by_time:
        log_window(run, state)
    if run.budget_seconds is None:
        run.progress.update(1)
    else:
        run.progress.update(min(state.train_seconds, run.budget_seconds) - run.progress.n)


def log_window(run: Run, state: TrainState) -> None:
    """Log the logging window's mean outputs (across ranks), learning rates and throughput, then reset it."""
    keys, param_groups = state.logged_keys, run.optimizer.param_groups
    means = run.accelerator.reduce(
        torch.stack([state.window_sums[k] for k in keys]) / state.window_micro_batches, reduction="mean"
    )
    lrs = {"lr": param_groups[0]["lr"]}
    backbone_lrs = [g["lr"] for g in param_groups if g["backbone"]]
    if backbone_lrs and not all(g["backbone"] for g in param_groups):
        lrs["lr_backbone"] = backbone_lrs[0]
    record = {
        "step": state.step,
        **lrs,
        "tokens_seen": state.tokens_seen,
        "tokens_per_second": state.window_tokens / state.window_train_seconds,
        "train_seconds": state.train_seconds,
    }
    if state.grad_norm is not None:
        record["grad_norm"] = float(state.grad_norm)
    record.update({k: means[i].item() for i, k in enumerate(keys)})
    log(run, state, record)
    run.progress.set_postfix_str(
        f"step {state.step}, loss {record['loss']:.4f}, lr {record['lr']:.2e}, "
        f"tok/s {record['tokens_per_second']:.0f}"
    )
    state.window_sums.clear()
    state.window_micro_batches, state.window_tokens, state.window_train_seconds = 0, 0, 0.0


def evaluate(run: Run, state: TrainState) -> None:
    """Evaluate on the held-out split, log the `eval_*` metrics and print them above the bar."""
    run.model.eval()
    with torch.no_grad():
        metrics = run.evaluate_fn(run.model, run.eval_dataloader, run.accelerator)
    run.model.train()
    state.eval_metrics = {f"eval_{k}": float(v) for k, v in metrics.items()}
    state.last_eval_step = state.step
    log(run, state, {"step": state.step, **state.eval_metrics})
    if run.accelerator.is_main_process:
        run.progress.write(
            f"step {state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in state.eval_metrics.items())
        )


def save(run: Run, state: TrainState) -> Path:
    """A resumable checkpoint of the current step."""
    path = save_checkpoint(
        run.accelerator,
        run.output_dir,
        state.checkpoint(run.budget_seconds),
        run.signature,
        run.args.save_total_limit,
    )
    state.last_saved_step = state.step
    return path


def share_rank0_time(run: Run, state: TrainState, step_seconds: float, interrupt_requested: bool) -> bool:
    """Every rank takes rank 0's training time (so all use one learning rate and stop together) and learns
    whether any of them was interrupted, which it returns. Also decides whether the next step is the budget's last."""
    state.step_seconds_estimate = (
        step_seconds
        if state.step_seconds_estimate is None
        else STEP_TIME_SMOOTHING * state.step_seconds_estimate + (1 - STEP_TIME_SMOOTHING) * step_seconds
    )
    is_main = run.accelerator.is_main_process
    shared = run.accelerator.reduce(
        torch.tensor(
            [
                state.train_seconds if is_main else 0.0,
                state.train_seconds + state.step_seconds_estimate if is_main else 0.0,
                float(interrupt_requested),
            ],
            dtype=torch.float64,
            device=run.accelerator.device,
        ),
        reduction="sum",
    ).tolist()
    # a projection never moves back: after a slow step, a fast one would otherwise raise the rate again
    state.train_seconds = shared[0]
    state.projected_seconds = max(state.projected_seconds, shared[1])
    state.last_by_time = run.budget_seconds is not None and state.projected_seconds >= run.budget_seconds
    return shared[2] > 0


def save_and_stop(run: Run, state: TrainState) -> None:
    """After a Ctrl-C: save the step just finished (unless saved already) and raise KeyboardInterrupt."""
    if state.last_saved_step != state.step:
        path = save(run, state)
    else:
        path = run.output_dir / CHECKPOINTS_DIR / f"step-{state.step}"
    if run.accelerator.is_main_process:
        run.progress.write(
            f"interrupted: saved {path} after step {state.step}; resume with --resume_from_checkpoint latest"
        )
    raise KeyboardInterrupt


def train_loop(run: Run, state: TrainState) -> None:
    """Optimizer steps until max_steps or the time budget; evaluate and save on their schedules; stop on Ctrl-C."""
    args, accelerator = run.args, run.accelerator
    run.model.train()
    try:
        with DeferredInterrupt() as interrupt:
            tick = time.perf_counter()  # training time runs from here; evaluation and saving reset it
            while state.step < args.max_steps and not state.stopped_by_time:
                run.train_dataloader.set_epoch(state.epoch)
                batches = run.train_dataloader
                if state.batches_done:
                    batches = accelerator.skip_first_batches(run.train_dataloader, state.batches_done)
                for batch_index, batch in enumerate(batches, start=state.batches_done):
                    train_micro_batch(run, state, batch)
                    if not accelerator.sync_gradients:
                        continue
                    step_seconds = time.perf_counter() - tick
                    end_step(run, state, batch_index, step_seconds)
                    if (
                        run.eval_dataloader is not None
                        and args.eval_steps
                        and state.step % args.eval_steps == 0
                    ):
                        evaluate(run, state)
                    if args.save_steps and state.step % args.save_steps == 0:
                        save(run, state)
                    if share_rank0_time(run, state, step_seconds, interrupt.requested):
                        save_and_stop(run, state)
                    if state.step >= args.max_steps or state.stopped_by_time:
                        break
                    tick = time.perf_counter()
                else:
                    state.epoch, state.batches_done = state.epoch + 1, 0
    except KeyboardInterrupt:
        if state.step_begun and accelerator.is_main_process:
            # a second Ctrl-C (or one outside the loop's handler) stopped a half-done step: saving it would
            # keep the quantizer and RNG state of the half-done step
            run.progress.write(
                f"interrupted during step {state.step + 1}: not saved; resume from the last checkpoint"
            )
        raise
    finally:
        run.progress.close()


def finish(run: Run, state: TrainState, tokenizer, model_card_extra: str | None) -> TrainResult:
    """Save a time-budgeted run's last step, evaluate it if not yet done, then save_pretrained (gathered from every
    rank's shard under FSDP / ZeRO-3) + tokenizer + model card + training curves."""
    accelerator, unwrapped, output_dir = run.accelerator, run.unwrapped, run.output_dir
    if state.stopped_by_time and state.last_saved_step != state.step:
        save(run, state)
    if run.eval_dataloader is not None and state.last_eval_step != state.step:
        evaluate(run, state)
    result = TrainResult(
        step=state.step,
        output_dir=str(output_dir),
        history=state.history,
        eval_metrics=state.eval_metrics,
        tokens_seen=state.tokens_seen,
        stopped_by_time=state.stopped_by_time,
    )
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(run.model)
    if accelerator.is_main_process:
        unwrapped.save_pretrained(output_dir, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        write_model_card(output_dir, unwrapped, run.args, result, model_card_extra)
        if any("loss" in r or any(k.startswith("eval_") for k in r) for r in state.history):
            plot_training_curves(
                state.history, output_dir / PLOT_NAME, title=training_title(unwrapped.config)
            )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


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
    resume_dir = (
        find_checkpoint(args.resume_from_checkpoint, output_dir) if args.resume_from_checkpoint else None
    )
    accelerator, frozen = make_accelerator(model, args)
    train_dataloader, eval_dataloader = build_dataloaders(
        train_dataset, eval_dataset, args, accelerator.num_processes
    )
    optimizer = build_optimizer(model, args)
    signature = model_signature(model)
    freeze_steps = getattr(getattr(model, "config", None), "freeze_backbone_steps", 0) or 0
    model, optimizer, train_dataloader, eval_dataloader = prepare(
        accelerator, model, optimizer, train_dataloader, eval_dataloader, frozen
    )
    check_one_batch(train_dataset, args, accelerator.num_processes)
    run = Run(
        args=args,
        accelerator=accelerator,
        model=model,
        unwrapped=accelerator.unwrap_model(model),
        optimizer=optimizer,
        train_dataloader=train_dataloader,
        eval_dataloader=eval_dataloader,
        output_dir=output_dir,
        signature=signature,
        evaluate_fn=evaluate_fn or evaluate_loss,
        inputs_fn=inputs_fn or model_inputs,
        freeze_steps=freeze_steps,
        budget_seconds=None if args.max_minutes is None else 60 * args.max_minutes,
    )
    state = resume(run, resume_dir) if resume_dir is not None else TrainState()
    start_logging(run, state)
    train_loop(run, state)
    return finish(run, state, tokenizer, model_card_extra)
