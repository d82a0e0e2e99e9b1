"""Plot one metric of several training runs against step: NAME=RUN_DIR ... -> a PNG.

    python scripts/compare_runs.py --metric eval_accuracy --output docs/vae_accuracy.png c4=runs/vae c2=runs/vae-c2

`--metric a,b`: each run plots the first of the named metrics it logged (train-lm's eval_token_nll beside
train-baseline's eval_loss).
"""

import argparse

from rqlm.reporting.plots import plot_metric_comparison


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="NAME=RUN_DIR (a folder holding metrics.jsonl)")
    parser.add_argument("--metric", default="eval_accuracy")
    parser.add_argument("--output", required=True)
    parser.add_argument("--title", default=None)
    args = parser.parse_args()
    runs = dict(run.rsplit("=", 1) for run in args.runs)  # names may hold "=", folders do not
    print(plot_metric_comparison(runs, args.metric, args.output, args.title))


if __name__ == "__main__":
    main()
