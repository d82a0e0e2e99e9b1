"""The `rqlm` command: one subcommand per job, each defined in its own module.

Every subcommand module exposes `add_arguments(parser)` and `main(args) -> int`; a module that
hands its arguments unchanged to another program's command line (`rqlm lm-eval`) exposes
`main_argv(argv) -> int` instead.
Modules are imported lazily so `rqlm --help` stays fast. A YAML file given with
`--config` supplies defaults; flags given on the command line override it.
Bad input (ValueError, FileNotFoundError, KeyError from our own checks) is
reported as one line on stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# name -> (module, one-line help)
SUBCOMMANDS = {
    "demo": ("rqlm.commands.demo", "run the whole pipeline on the embedded default corpus"),
    "train-tokenizer": ("rqlm.data.tokenizer", "train a byte-level BPE tokenizer on a corpus"),
    "train-vae": ("rqlm.commands.train_vae", "train the RQ-VAE (text -> residual codes -> text)"),
    "encode": ("rqlm.commands.encode", "compute a trained RQ-VAE's codes of a dataset once, for train-lm"),
    "train-lm": ("rqlm.commands.train_lm", "train the RQ-Transformer over RQ-VAE codes"),
    "train-givt": ("rqlm.commands.train_givt", "train the continuous latent LM (GIVT / CALM heads) over a Gaussian VAE"),
    "train-draft-head": ("rqlm.commands.train_draft_head", "train a draft head on a target's states, to draft for it at its own size"),
    "train-baseline": ("rqlm.commands.train_baseline", "train the plain Qwen3 baseline on the same data"),
    "distill-data": ("rqlm.commands.distill_data", "a target LM's own continuations of training text, for training its drafter"),
    "evaluate": ("rqlm.commands.evaluate", "perplexity (bound), reconstruction and codebook usage"),
    "bench": ("rqlm.commands.bench", "speed and memory against the baseline or the reference quantizers"),
    "generate": ("rqlm.commands.generate", "generate text from a checkpoint"),
    "serve": ("rqlm.commands.serve", "race the baseline and the latent LMs in a browser (a Gradio page)"),
    "inspect": ("rqlm.commands.inspect", "show held-out text beside its RQ-VAE reconstruction"),
    "sweep": ("rqlm.commands.sweep", "train and evaluate a grid of recipes from a YAML file, with plots"),
    "lm-eval": ("rqlm.commands.lm_eval", "lm-evaluation-harness with the rqlm model adapter registered"),
    "plan": ("rqlm.commands.plan", "memory per GPU to train around a Qwen3 size (1-64 GPUs, FSDP, LoRA), offline"),
}


class CLIError(Exception):
    """An error the user can fix; printed as one line."""


def _yaml_problem(error) -> str:
    """A YAML parse error in one line: what was wrong and where ('... at line 2, column 6')."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def _load_yaml_defaults(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Set parser defaults from `--config file.yaml` so command-line flags still win.

    The file is read as `HfArgumentParser.parse_yaml_file` reads one; its values become defaults rather
    than that method's dataclass, which would drop the command's own defaults and its other flags.
    argparse then types the strings among them ('1e-3', 'none') as it types the command line's.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config is None:
        return
    import yaml

    try:
        values = yaml.safe_load(Path(known.config).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise CLIError(f"config file {known.config!r} not found") from None
    except yaml.YAMLError as e:
        raise CLIError(f"config file {known.config!r} is not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(values, dict):
        raise CLIError(f"config file {known.config!r} must hold a mapping of option: value")
    valid = {action.dest for action in parser._actions}
    unknown = sorted({k.replace("-", "_") for k in values} - valid)
    if unknown:
        raise CLIError(f"config file {known.config!r} has unknown options {unknown}")
    parser.set_defaults(**{k.replace("-", "_"): v for k, v in values.items()})


def parse_command(name: str, module, argv: list[str]) -> argparse.Namespace:
    """The flags of `rqlm NAME ARGV`: the command's defaults, over them a --config file's, over both the
    command line's."""
    parser = argparse.ArgumentParser(prog=f"rqlm {name}", description=SUBCOMMANDS[name][1])
    parser.add_argument("--config", default=None, help="YAML file of option: value defaults")
    module.add_arguments(parser)
    _load_yaml_defaults(parser, argv)
    return parser.parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rqlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"rqlm: unknown command {argv[0]!r}; choose from {', '.join(SUBCOMMANDS)}", file=sys.stderr)
            return 2
        top.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    module_name = SUBCOMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("rqlm"):
            print(f"rqlm {name}: not available yet ({module_name} does not exist in this version)", file=sys.stderr)
            return 2
        raise
    if hasattr(module, "main_argv"):
        try:
            return int(module.main_argv(rest) or 0)
        except (CLIError, ValueError, FileNotFoundError, NotADirectoryError) as e:
            print(f"rqlm {name}: error: {e}", file=sys.stderr)
            return 1
    try:
        return int(module.main(parse_command(name, module, rest)) or 0)
    except (CLIError, ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"rqlm {name}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"rqlm {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
