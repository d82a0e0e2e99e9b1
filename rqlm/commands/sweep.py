"""`rqlm sweep CONFIG.yaml`: train and evaluate a grid of recipes, then tabulate and plot them.

    CONFIG.yaml (checked whole before anything trains; see rqlm/sweeps/runner.py for its keys)
    -> the shared baseline (train-baseline)
    -> per point: train-vae -> encode -> train-lm -> evaluate [-> bench]   (quantizer sweeps: train-vae only)
    -> OUTPUT_DIR/results.json, results.md and <sweep>.png per sweep

Every stage goes through rqlm.pipeline.run_stage: a finished stage is skipped (points sharing a VAE
or an LM share its folder), a killed training resumes from its last checkpoint, `--force` redoes all.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_config", metavar="CONFIG.yaml", help="the grid (e.g. configs/sweeps/cpu.yaml)")
    parser.add_argument("--output_dir", default="runs/sweep", help="where every run, results and plots go "
                        "(default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="redo finished stages instead of skipping them")
    parser.add_argument("--only", default=None, metavar="NAME", help="run only the sweep of this name")
    parser.add_argument("--max_steps", type=int, default=None, metavar="N",
                        help="cap every training stage at N steps: a quick smoke run of a long grid "
                        "(its runs get their own folders)")


def main(args: argparse.Namespace) -> int:
    from rqlm.pipeline import StageLog
    from rqlm.sweeps.results import collect_results, write_results
    from rqlm.sweeps.runner import load_sweep_config, plan_sweeps

    config = load_sweep_config(args.sweep_config)
    if args.max_steps is not None:
        config.cap_steps(args.max_steps)
    sweeps = config.select(args.only)
    output_dir = Path(args.output_dir)
    plans = plan_sweeps(config, sweeps, output_dir)
    print(f"sweep {args.sweep_config}: {', '.join(f'{s.name} ({s.kind}, {len(s.points)} points)' for s in sweeps)}"
          f" -> {output_dir}")
    log = StageLog()
    try:
        run_all(config, sweeps, plans, output_dir, args.force, log)
    except RuntimeError as e:  # a failed stage: its own error is printed above; one line here
        print(f"rqlm sweep: {e}", file=sys.stderr)
        return 1
    results = collect_results(plans, output_dir / "baseline" if any(s.trains_lm for s in sweeps) else None,
                              int(config.data["block_size"]))
    previous = output_dir / "results.json"
    if args.only and previous.is_file():  # keep the other sweeps' results of an earlier full run
        import json

        earlier = json.loads(previous.read_text())
        results["sweeps"] = {**earlier.get("sweeps", {}), **results["sweeps"]}
        results["baseline"] = results["baseline"] or earlier.get("baseline")
    written = write_results(results, output_dir)
    log.print_summary()
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def run_all(config, sweeps, plans, output_dir: Path, force: bool, log) -> None:
    """Every stage of the shared baseline and of every point, each through run_stage, each folder once."""
    from rqlm.pipeline import TRAINED, run_stage
    from rqlm.sweeps.runner import BENCH_FILE, CODES_DONE_FILE, EVALUATION_FILE, baseline_argv

    handled = set()

    def stage(name: str, folder: Path, argv: list[str], done_file: str) -> None:
        if folder in handled:  # shared by an earlier point of this invocation
            return
        handled.add(folder)
        run_stage(name, folder, argv, force=force, done_file=done_file, log=log)

    if any(s.trains_lm for s in sweeps):
        baseline_dir, argv = baseline_argv(config, output_dir)
        stage("baseline", baseline_dir, argv, TRAINED)
    for plan in plans:
        label = f"{plan.sweep.name}/{plan.point.name}"
        stage(f"{label} vae", plan.vae_dir, plan.vae_argv, TRAINED)
        if plan.lm_dir is None:
            continue
        stage(f"{label} codes", plan.codes_dir, plan.codes_argv, CODES_DONE_FILE)
        stage(f"{label} lm", plan.lm_dir, plan.lm_argv, TRAINED)
        stage(f"{label} evaluate", plan.eval_dir, plan.eval_argv, EVALUATION_FILE)
        if plan.bench_dir is not None:
            stage(f"{label} bench", plan.bench_dir, plan.bench_argv, BENCH_FILE)
