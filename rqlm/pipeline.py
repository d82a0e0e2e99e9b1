"""Stages of a multi-command run (`rqlm demo`, `rqlm sweep`): each one an `rqlm` command that skips itself
when its output is finished and resumes a killed training from its last checkpoint.

    run_stage(name, output_dir, argv)
      output_dir/done_file exists (and not force)      -> skipped
      output_dir/checkpoints/step-N of a training command -> `rqlm argv --resume_from_checkpoint latest`
      otherwise (force: after removing output_dir)      -> `rqlm argv`
    StageLog: seconds, ran / skipped and output of every stage, printed as one table at the end

A training command writes `config.json` with its weights and the model card `README.md` after them
(rqlm/trainer/loop.py), so `done_file=TRAINED` marks a training stage whose weights are complete.
"""

from __future__ import annotations

import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rqlm.trainer.loop import CHECKPOINTS_DIR

TRAINING_COMMANDS = ("train-vae", "train-lm", "train-baseline", "train-givt")
TRAINED = "README.md"  # the model card: the training loop's last file after the weights
INTERRUPTED = 130  # what `rqlm` returns on Ctrl-C (a training command saves a checkpoint first)


class StageFailed(RuntimeError):
    """A stage's command exited with an error; the message names the stage in one line."""


@dataclass
class StageRecord:
    """One stage: its name, wall-clock seconds, whether it ran (False: skipped), and its output."""

    name: str
    seconds: float
    ran: bool
    output: str


@dataclass
class StageLog:
    """Per-stage seconds and ran / skipped of one pipeline run; `summary()` is the table printed at its end."""

    records: list[StageRecord] = field(default_factory=list)

    def add(self, name: str, seconds: float, ran: bool, output: str | Path) -> None:
        self.records.append(StageRecord(name, seconds, ran, str(output)))

    @contextmanager
    def timed(self, name: str, output: str | Path):
        """Time a stage that is not an `rqlm` command (e.g. writing the report); it always runs."""
        start = time.perf_counter()
        yield
        self.add(name, time.perf_counter() - start, True, output)

    @property
    def total_seconds(self) -> float:
        return sum(r.seconds for r in self.records)

    def as_dicts(self) -> list[dict]:
        return [asdict(r) for r in self.records]

    def summary(self) -> str:
        """A plain-text table: stage, seconds, ran / skipped, output; then the total."""
        width = max([len(r.name) for r in self.records] + [5])
        lines = [f"{'stage':<{width}}  {'seconds':>8}  {'status':<7}  output"]
        for r in self.records:
            lines.append(f"{r.name:<{width}}  {r.seconds:8.1f}  {'ran' if r.ran else 'skipped':<7}  {r.output}")
        lines.append(f"{'total':<{width}}  {self.total_seconds:8.1f}")
        return "\n".join(lines)

    def print_summary(self) -> None:
        print("\nstage summary:\n" + self.summary())


def has_checkpoint(output_dir: str | Path) -> bool:
    """Whether a training output folder holds a resumable checkpoint (checkpoints/step-N)."""
    return any((Path(output_dir) / CHECKPOINTS_DIR).glob("step-*"))


def fresh_accelerate_state() -> None:
    """Each in-process command builds its own Accelerator; drop the previous command's shared state (its
    mixed precision, device placement) so a stage runs as it would from the shell."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def run_stage(
    name: str,
    output_dir: str | Path,
    argv: list[str],
    *,
    force: bool = False,
    done_file: str = "config.json",
    log: StageLog | None = None,
) -> bool:
    """Run `rqlm <argv>` in-process unless `output_dir/done_file` exists; True if it ran, False if skipped.

    A training command (argv[0] in TRAINING_COMMANDS) whose output holds a checkpoint but no `done_file`
    resumes with `--resume_from_checkpoint latest`. `force` removes `output_dir` first and runs afresh.
    A failing command raises StageFailed (a RuntimeError) in one line naming the stage; an interrupted one
    (Ctrl-C) raises KeyboardInterrupt. `log` records the stage.
    """
    from rqlm.cli import main as rqlm_main

    output_dir = Path(output_dir)
    done = output_dir / done_file
    start = time.perf_counter()
    if done.exists() and not force:
        print(f"\n== {name}: skipped ({done} exists; --force redoes it)", flush=True)
        if log is not None:
            log.add(name, time.perf_counter() - start, False, output_dir)
        return False
    if force and output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)  # for commands that write into it without creating it
    argv = [str(a) for a in argv]
    if argv[0] in TRAINING_COMMANDS and has_checkpoint(output_dir) and "--resume_from_checkpoint" not in argv:
        argv += ["--resume_from_checkpoint", "latest"]
        print(f"\n== {name}: resuming the unfinished run in {output_dir}: rqlm {' '.join(argv)}", flush=True)
    else:
        print(f"\n== {name}: rqlm {' '.join(argv)}", flush=True)
    fresh_accelerate_state()
    status = rqlm_main(argv)
    again = " (rerun to resume from its last checkpoint)" if argv[0] in TRAINING_COMMANDS else ""
    if status == INTERRUPTED:
        print(f"stage {name} interrupted{again}", file=sys.stderr)
        raise KeyboardInterrupt
    if status:
        raise StageFailed(f"stage {name} failed: `rqlm {argv[0]}` exited with status {status}; "
                          f"see its error above{again}")
    if log is not None:
        log.add(name, time.perf_counter() - start, True, output_dir)
    return True
