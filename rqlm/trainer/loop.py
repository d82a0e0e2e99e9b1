"""One explicit Accelerate training loop shared by every rqlm model.

    Accelerator -> set_seed -> DataLoaders -> AdamW (all parameters) -> warmup + cosine -> prepare
    for each micro-batch: accumulate -> forward -> backward -> clip -> step -> schedule -> zero_grad
    every eval_steps: evaluate on the held-out split; every save_steps: save_state + data position
    at the end: save_pretrained (safetensors) + tokenizer + README.md model card + metrics.jsonl + plot

A model plugs in with `forward(input_ids=, attention_mask=, labels=) -> output with .loss` and,
optionally, `on_step_begin(step)` (called before the first forward of every optimizer step).
"""

from __future__ import annotations

import itertools
import json
import math
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import broadcast, set_seed
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

from rqlm.evaluation.plots import plot_training_curves, training_title
from rqlm.trainer.arguments import TrainingArguments, resolve_mixed_precision

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_NAME = "trainer_state.json"
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "training_curves.png"
# scalar tensors read from the model output and logged as training metrics
LOGGED_OUTPUT_KEYS = ("loss", "recon_loss", "quantizer_loss")


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
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf")}


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups over ALL parameters (frozen ones too, so unfreezing trains them); no decay on norms, biases, embeddings."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.ndim < 2 or "norm" in name or "embed" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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
    accelerator: Accelerator, output_dir: Path, state: dict, save_total_limit: int | None
) -> Path:
    """save_state (model, optimizer, scheduler, RNG) + trainer_state.json (step, data position, history)."""
    path = output_dir / CHECKPOINTS_DIR / f"step-{state['step']}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        (path / TRAINER_STATE_NAME).write_text(json.dumps(state, indent=1))
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
) -> TrainResult:
    """Train `model` on blocks of `input_ids` for `args.max_steps` optimizer steps; save it to `args.output_dir`."""
    output_dir = Path(args.output_dir)
    evaluate_fn = evaluate_fn or evaluate_loss
    resume_dir = (
        find_checkpoint(args.resume_from_checkpoint, output_dir) if args.resume_from_checkpoint else None
    )

    # 1. Accelerator. DDP registers only parameters that require grad when it wraps the model, and a
    #    parameter frozen now may be unfrozen by on_step_begin later: register all of them and let DDP
    #    skip the ones that get no gradient in a step (find_unused_parameters).
    frozen = [p for p in model.parameters() if not p.requires_grad]
    may_change_trainable = bool(frozen) or callable(getattr(model, "on_step_begin", None))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=resolve_mixed_precision(args.mixed_precision),
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=str(output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=may_change_trainable)],
    )
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

    # 3. Optimizer over every parameter and a schedule counted in optimizer steps. Accelerate steps a
    #    prepared scheduler once per process per optimizer step, hence the num_processes factors.
    optimizer = torch.optim.AdamW(
        parameter_groups(model, args.weight_decay),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )
    warmup = args.warmup_steps * accelerator.num_processes
    if args.lr_scheduler == "cosine":
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, warmup, args.max_steps * accelerator.num_processes, min_lr_rate=args.min_lr_ratio
        )
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup)

    # 4. prepare (with every parameter trainable while DDP wraps it, see 1.)
    for p in frozen:
        p.requires_grad_(True)
    model, optimizer, train_dataloader, scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, scheduler
    )
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

    # 5. Resume: weights, optimizer, scheduler, RNG, then step and data position.
    step, epoch, batches_done, tokens_seen, history = 0, 0, 0, 0, []
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        state = json.loads((resume_dir / TRAINER_STATE_NAME).read_text())
        step, epoch, batches_done = state["step"], state["epoch"], state["batches_done"]
        tokens_seen, history = state["tokens_seen"], state["history"]
    accumulation_counter = accelerator.step  # accelerate's micro-batch counter at the last optimizer step

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
            "history": history,
        }

    progress = tqdm(
        total=args.max_steps, initial=step, desc="train", disable=not accelerator.is_local_main_process
    )
    eval_metrics, stopped_by_time, last_saved_step = {}, False, None
    start = window_start = time.perf_counter()
    window_sums = torch.zeros(len(LOGGED_OUTPUT_KEYS), device=accelerator.device)
    window_micro_batches, window_tokens = 0, 0
    step_tokens, step_begun, last_eval_step, grad_norm = 0, False, None, None
    model.train()

    # 6. The loop.
    try:
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
                    step_begun = True
                with accelerator.accumulate(model):
                    outputs = model(**model_inputs(batch))
                    accelerator.backward(outputs.loss)
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()

                for i, key in enumerate(LOGGED_OUTPUT_KEYS):
                    value = getattr(outputs, key, None)
                    if isinstance(value, torch.Tensor):
                        window_sums[i] += value.detach().float()
                window_micro_batches += 1
                window_tokens += batch["input_ids"].numel() * accelerator.num_processes
                step_tokens += batch["input_ids"].numel() * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue

                # one optimizer step done
                step += 1
                batches_done = batch_index + 1
                tokens_seen, step_tokens = tokens_seen + step_tokens, 0
                accumulation_counter = accelerator.step
                step_begun = False
                progress.update(1)

                if step % args.logging_steps == 0 or step == args.max_steps:
                    means = accelerator.reduce(window_sums / window_micro_batches, reduction="mean")
                    elapsed = time.perf_counter() - window_start
                    record = {
                        "step": step,
                        "lr": scheduler.get_last_lr()[0],
                        "tokens_seen": tokens_seen,
                        "tokens_per_second": window_tokens / elapsed,
                        "elapsed_s": time.perf_counter() - start,
                    }
                    if grad_norm is not None:
                        record["grad_norm"] = float(grad_norm)
                    record.update(
                        {
                            k: means[i].item()
                            for i, k in enumerate(LOGGED_OUTPUT_KEYS)
                            if isinstance(getattr(outputs, k, None), torch.Tensor)
                        }
                    )
                    log(record)
                    progress.set_postfix(
                        loss=f"{record['loss']:.4f}",
                        lr=f"{record['lr']:.2e}",
                        tok_s=f"{record['tokens_per_second']:.0f}",
                    )
                    window_sums.zero_()
                    window_micro_batches, window_tokens, window_start = 0, 0, time.perf_counter()

                paused = time.perf_counter()  # evaluation and saving do not count in tokens_per_second
                if eval_dataloader is not None and args.eval_steps and step % args.eval_steps == 0:
                    eval_metrics = run_evaluation()
                if args.save_steps and step % args.save_steps == 0:
                    save_checkpoint(accelerator, output_dir, trainer_state(), args.save_total_limit)
                    last_saved_step = step
                window_start += time.perf_counter() - paused

                if args.max_minutes is not None:
                    out_of_time = torch.tensor(
                        [time.perf_counter() - start >= 60 * args.max_minutes],
                        dtype=torch.float32,
                        device=accelerator.device,
                    )
                    stopped_by_time = bool(broadcast(out_of_time).item())
                if step >= args.max_steps or stopped_by_time:
                    break
            else:
                epoch, batches_done = epoch + 1, 0
    except KeyboardInterrupt:
        # keep what the completed optimizer steps reached; a half-accumulated step is redone on resume
        if step > 0 and last_saved_step != step:
            accelerator.step = accumulation_counter
            path = save_checkpoint(accelerator, output_dir, trainer_state(), args.save_total_limit)
            if accelerator.is_main_process:
                progress.write(f"interrupted: saved {path}; resume with --resume_from_checkpoint latest")
        raise
    finally:
        progress.close()

    # 7. Final evaluation and save.
    if stopped_by_time and last_saved_step != step:
        save_checkpoint(accelerator, output_dir, trainer_state(), args.save_total_limit)
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
    if accelerator.is_main_process:
        unwrapped.save_pretrained(output_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        write_model_card(output_dir, unwrapped, args, result, model_card_extra)
        if any("loss" in r or any(k.startswith("eval_") for k in r) for r in history):
            plot_training_curves(history, output_dir / PLOT_NAME, title=training_title(unwrapped.config))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result
