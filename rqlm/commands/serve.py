"""`rqlm serve`: the race page in a browser (rqlm/serve/): the baseline, each latent LM, the drafted baseline.

With no model flags, `make demo`'s models in runs/demo. Every folder is checked before the page starts,
so a missing folder or a VAE given as a model is a one-line error here, not a broken page.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", default=None, metavar="LM",
                        help="a latent LM folder (`rqlm train-lm`), one column each; repeatable (default: runs/demo's)")
    parser.add_argument("--baseline", default=None, metavar="BASE",
                        help="the causal LM the latent LMs race against (default: runs/demo/baseline)")
    parser.add_argument("--draft", default=None, metavar="MODEL_OR_HEAD",
                        help="an RQ model or draft head that drafts for --baseline: the last column (default: runs/demo/lm)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on")
    parser.add_argument(
        "--no_cpu_kernels", dest="cpu_kernels", action="store_false",
        help="generate without rqlm's CPU kernels (default: on, as in rqlm generate and rqlm bench)",
    )


def lineup_of(args: argparse.Namespace):
    """The folders named by the flags, or runs/demo's when none is given."""
    from rqlm.serve import Lineup, demo_lineup

    if args.model is None and args.baseline is None and args.draft is None:
        return demo_lineup()
    if args.baseline is None:
        raise ValueError("pass --baseline BASE with --model / --draft: every race starts from the baseline")
    return Lineup(args.baseline, list(args.model or []), args.draft)


def main(args: argparse.Namespace) -> int:
    from rqlm.serve import load_lineup
    from rqlm.serve.page import build_page, launch_page

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must lie in 1-65535, got {args.port}")
    loaded = load_lineup(lineup_of(args))
    print(f"racing {len(loaded.contenders)} columns: " + "; ".join(c.name for c in loaded.contenders))
    launch_page(build_page(loaded, kernels=args.cpu_kernels), args.host, args.port)
    return 0
