"""`rqlm sweep`'s parts: a YAML grid expanded into command lines, training FLOPs, collected results and plots.

    CONFIG.yaml -> load_sweep_config: one-line errors for an unknown key, sweep kind, stage flag or an
                   empty grid, before anything trains
    -> plan_sweeps: every point's stages as `rqlm` argv (train-vae -> encode -> train-lm -> evaluate
       [-> bench]); a stage's folder is named by its flags, so points that share a VAE or an LM share it
    -> (rqlm/commands/sweep.py runs the stages through rqlm.pipeline.run_stage)
    -> collect_results -> results.json, results.md, one PNG per sweep (plot_sweep)

The YAML (see configs/sweeps/cpu.yaml):
    data:      data flags given to every stage (dataset, block_size, max_eval_blocks, ...)
    baseline:  train-baseline flags of the shared baseline (also the pretrained backbone `backbone: baseline`)
    vae, lm:   train-vae / train-lm flags shared by every point (budgets: max_steps, max_minutes, ...)
    evaluate:  `rqlm evaluate` flags;  bench: `rqlm bench` flags (for sweeps with `bench: true`)
    sweeps:    name -> {kind, bench (optional), points: [{name, vae: {flag: value}, lm: {flag: value}}]}

Sweep kinds and what each plots:
    compression  perplexity bound and generation speedup against C
    codebook     K against D at one bit budget: bound and VAE reconstruction accuracy per point
    quantizer    quantizer families at one bit budget: VAE reconstruction accuracy and code usage (VAE only)
    backbone     held-out code NLL over steps and the final bound (`lm: {backbone: baseline}`: the shared
                 baseline's layers, pretrained; a preset name: the same shape from scratch)
    compute      the bound against training FLOPs, beside the baseline's perplexity against its FLOPs

Training FLOPs are counted in rqlm/sweeps/flops.py, results collected in rqlm/sweeps/results.py, and each
sweep plotted in rqlm/sweeps/plots.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("compression", "codebook", "quantizer", "backbone", "compute")
SECTIONS = ("data", "baseline", "vae", "lm", "evaluate", "bench", "sweeps")
STAGE_COMMANDS = {"baseline": "train-baseline", "vae": "train-vae", "lm": "train-lm", "evaluate": "evaluate",
                  "bench": "bench"}
SWEEP_KEYS = ("kind", "bench", "points")
POINT_KEYS = ("name", "vae", "lm")
# flags the sweep sets itself: a YAML value for them would be silently replaced
MANAGED_FLAGS = ("config", "output_dir", "resume_from_checkpoint", "vae", "codes", "model", "baseline",
                 "evaluation_json", "output_json", "plot", "quick")
# C belongs to the VAE (train-lm, encode and evaluate read it from the VAE), streaming to no stage here
NOT_DATA_FLAGS = ("compression_factor", "streaming")
DEFAULT_BLOCK_SIZE = 128  # train-lm's and evaluate's default (train-baseline's own is 256)
BASELINE_BACKBONE = "baseline"  # `lm: {backbone: baseline}`: the shared baseline's folder
FIXED_BUDGET_KINDS = ("codebook", "quantizer")
BIT_TOLERANCE = 0.5  # FSQ levels give a few codes fewer than K: 240 codes (7.9 bits) matches 8 bits


# ----------------------------------------------------------------------------- the YAML


@dataclass
class Point:
    """One grid point: its overrides of the shared train-vae / train-lm flags."""

    name: str
    vae: dict = field(default_factory=dict)
    lm: dict = field(default_factory=dict)


@dataclass
class Sweep:
    name: str
    kind: str
    points: list[Point]
    bench: bool = False

    @property
    def trains_lm(self) -> bool:
        return self.kind != "quantizer"


@dataclass
class SweepConfig:
    """A parsed sweep file: the shared flags of each stage and the named sweeps."""

    path: str
    data: dict
    baseline: dict
    vae: dict
    lm: dict
    evaluate: dict
    bench: dict
    sweeps: list[Sweep]

    def cap_steps(self, max_steps: int) -> None:
        """Every training stage stops after at most `max_steps` steps (a smoke run of a long grid)."""
        if max_steps < 1:
            raise ValueError(f"--max_steps must be at least 1, got {max_steps}")
        for section in (self.baseline, self.vae, self.lm):
            section["max_steps"] = min(int(section.get("max_steps", max_steps)), max_steps)
        for point in (p for sweep in self.sweeps for p in sweep.points):
            for section in (point.vae, point.lm):
                if "max_steps" in section:
                    section["max_steps"] = min(int(section["max_steps"]), max_steps)

    def select(self, only: str | None) -> list[Sweep]:
        """The sweeps to run: all, or the one named `only`."""
        if only is None:
            return self.sweeps
        chosen = [s for s in self.sweeps if s.name == only]
        if not chosen:
            raise ValueError(f"--only {only!r}: {self.path} has no such sweep; choose from "
                             f"{', '.join(s.name for s in self.sweeps)}")
        return chosen


def _mapping(value, where: str) -> dict:
    """A YAML mapping with '-' in keys read as '_'. A wrong type in the user's file is a ValueError (TRY004
    waived here and below): the CLI prints those as one line."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping of flag: value, got {type(value).__name__}")  # noqa: TRY004
    return {str(k).replace("-", "_"): v for k, v in value.items()}


def _unknown_keys(values: dict, allowed, where: str) -> None:
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; allowed: {', '.join(allowed)}")


def load_sweep_config(path: str | Path) -> SweepConfig:
    """Read and check a sweep YAML: every key, kind and stage flag is known and the grid is not empty."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"sweep file '{path}' not found; see configs/sweeps/cpu.yaml for an example") from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"sweep file '{path}' is not valid YAML: {first}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"sweep file '{path}' must hold a mapping with the keys {', '.join(SECTIONS)}")  # noqa: TRY004
    _unknown_keys(raw, SECTIONS, f"sweep file '{path}'")
    sections = {name: _mapping(raw.get(name), f"'{name}' in '{path}'") for name in SECTIONS if name != "sweeps"}
    sections["data"].setdefault("block_size", DEFAULT_BLOCK_SIZE)  # one block size for every stage
    sweeps = _parse_sweeps(raw.get("sweeps"), path)
    config = SweepConfig(path=str(path), sweeps=sweeps, **sections)
    check_flags(config)
    return config


def _parse_sweeps(raw, path: Path) -> list[Sweep]:
    if not raw:
        raise ValueError(f"sweep file '{path}' names no sweeps; add `sweeps: {{name: {{kind: ..., points: [...]}}}}`")
    if not isinstance(raw, dict):
        raise ValueError(f"'sweeps' in '{path}' must map a sweep name to {{kind, points}}")  # noqa: TRY004
    sweeps = []
    for name, body in raw.items():
        where = f"sweep {name!r}"
        body = _mapping(body, where)
        _unknown_keys(body, SWEEP_KEYS, where)
        kind = body.get("kind")
        if kind not in KINDS:
            raise ValueError(f"{where} has unknown kind {kind!r}; choose from {', '.join(KINDS)}")
        points_raw = body.get("points") or []
        if not isinstance(points_raw, list) or not points_raw:
            raise ValueError(f"{where} has an empty grid; give `points:` a list of {{name, vae, lm}}")
        points = []
        for i, item in enumerate(points_raw):
            item = _mapping(item, f"{where} point {i}")
            _unknown_keys(item, POINT_KEYS, f"{where} point {i}")
            point_name = str(item.get("name") or f"point{i}")
            points.append(Point(point_name, _mapping(item.get("vae"), f"{where} point {point_name!r} vae"),
                                _mapping(item.get("lm"), f"{where} point {point_name!r} lm")))
        names = [p.name for p in points]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"{where} repeats point names {duplicates}; give every point its own name")
        sweeps.append(Sweep(str(name), kind, points, bench=bool(body.get("bench", kind == "compression"))))
    return sweeps


# ----------------------------------------------------------------------------- flags -> argv


class _RaisingParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are ValueErrors (argparse would print usage and exit)."""

    def error(self, message):
        raise ValueError(message)


_PARSERS: dict[str, argparse.ArgumentParser] = {}


def command_parser(command: str) -> argparse.ArgumentParser:
    """The argparse parser of `rqlm <command>` (built once)."""
    import importlib

    from rqlm.cli import SUBCOMMANDS

    if command not in _PARSERS:
        parser = _RaisingParser(prog=f"rqlm {command}", add_help=False)
        importlib.import_module(SUBCOMMANDS[command][0]).add_arguments(parser)
        _PARSERS[command] = parser
    return _PARSERS[command]


def _actions(command: str) -> dict[str, argparse.Action]:
    return {a.dest: a for a in command_parser(command)._actions if a.option_strings}


def to_argv(command: str, values: dict) -> list[str]:
    """{flag: value} -> `rqlm <command>` argv: True/False as a switch, a list comma-joined, a dict as JSON,
    None as 'none' (left out where None is the command's default)."""
    actions = _actions(command)
    argv = [command]
    for name, value in values.items():
        action = actions[name]
        option = action.option_strings[0]
        if value is None and action.default is None:
            continue  # the command's own default; a flag such as --dataset takes no 'none'
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(option if value else f"--no-{option[2:]}")
        elif action.nargs == 0:  # store_true / store_false
            if bool(value) != bool(action.default):
                argv.append(option)
        elif isinstance(value, dict):
            argv += [option, json.dumps(value)]
        elif isinstance(value, (list, tuple)):
            argv += [option, ",".join(str(v) for v in value)]
        else:
            argv += [option, "none" if value is None else str(value)]
    return argv


def parse_stage(command: str, values: dict, where: str, managed: dict | None = None) -> argparse.Namespace:
    """The parsed flags of one stage (defaults filled in); an unknown or managed flag is a one-line error.
    `managed`: the flags the sweep sets itself (placeholders do when only checking)."""
    actions = _actions(command)
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise ValueError(f"{where}: `rqlm {command}` has no flag {', '.join('--' + u for u in unknown)}")
    taken = sorted(set(values) & set(MANAGED_FLAGS))
    if taken:
        raise ValueError(f"{where}: {', '.join('--' + m for m in taken)} is set by the sweep; remove it")
    try:
        return command_parser(command).parse_args(to_argv(command, {**values, **(managed or {})})[1:])
    except ValueError as e:
        raise ValueError(f"{where}: `rqlm {command}`: {e}") from None


def data_flags(config: SweepConfig, command: str) -> dict:
    """The `data:` flags that `rqlm <command>` takes."""
    actions = _actions(command)
    return {k: v for k, v in config.data.items() if k in actions}


def _data_dests() -> set[str]:
    """The flags of `rqlm.data.arguments.add_data_arguments`."""
    from rqlm.data.arguments import add_data_arguments

    parser = argparse.ArgumentParser(add_help=False)
    add_data_arguments(parser)
    return {a.dest for a in parser._actions}


def check_flags(config: SweepConfig) -> None:
    """Every section's and point's flags parse for their command; fixed-budget sweeps match in bits."""
    data_dests = _data_dests()
    bad = sorted(set(config.data) - (data_dests - set(NOT_DATA_FLAGS)))
    if bad:
        raise ValueError(f"'data' in '{config.path}' has {bad}, not data flags shared by every stage "
                         f"(choose from {', '.join(sorted(data_dests - set(NOT_DATA_FLAGS)))}; "
                         "compression_factor goes under vae)")
    for section in ("baseline", "evaluate", "bench"):
        command = STAGE_COMMANDS[section]
        placeholders = {"model": "LM_DIR", "baseline": "BASELINE_DIR"} if command == "evaluate" else None
        parse_stage(command, {**data_flags(config, command), **getattr(config, section)}, f"'{section}'",
                    placeholders)
    parse_stage("train-vae", {**data_flags(config, "train-vae"), **config.vae}, "'vae'")
    parse_stage("train-lm", lm_values(config, Point("shared"), Path("baseline")), "'lm'")
    for sweep in config.sweeps:
        bits = {}
        for point in sweep.points:
            where = f"sweep {sweep.name!r} point {point.name!r}"
            vae = parse_stage("train-vae", vae_values(config, point), f"{where} vae")
            bits[point.name] = code_bits(vae.quantizer_type, vae.num_quantizers, vae.codebook_size,
                                         vae.quantizer_kwargs)
            if sweep.trains_lm:
                lm = lm_values(config, point, Path("baseline"))
                parse_stage("train-lm", lm, f"{where} lm")
            elif point.lm:
                raise ValueError(f"{where}: a {sweep.kind} sweep trains only the VAE; remove its `lm:` flags")
        if sweep.kind in FIXED_BUDGET_KINDS:
            first = next(iter(bits))
            off = [n for n, b in bits.items() if abs(b - bits[first]) > BIT_TOLERANCE]
            if off:
                raise ValueError(f"sweep {sweep.name!r} compares at one bit budget, but point {off[0]!r} has "
                                 f"{bits[off[0]]:.1f} bits per position and {first!r} {bits[first]:.1f}; "
                                 "choose K and D with D * log2(K) equal")


def vae_values(config: SweepConfig, point: Point) -> dict:
    """train-vae flags of a point: data, then the shared vae flags, then the point's."""
    return {**data_flags(config, "train-vae"), **config.vae, **point.vae}


def lm_values(config: SweepConfig, point: Point, baseline_dir: Path) -> dict:
    """train-lm flags of a point; `backbone: baseline` becomes the shared baseline's folder. The LM is the codes
    mode unless the YAML says `depth_output: tokens` (the sweeps' figures are its code NLL and bound per bit
    budget; train-lm's own default is the tokens mode)."""
    values = {"depth_output": "codes", **data_flags(config, "train-lm"), **config.lm, **point.lm}
    if values.get("backbone") == BASELINE_BACKBONE:
        values["backbone"] = str(baseline_dir)
    return values


def code_bits(quantizer_type: str, num_quantizers: int, codebook_size: int, quantizer_kwargs: dict) -> float:
    """Bits per latent position: D codes of log2(codes per codebook) each (FSQ-style: the product of levels)."""
    from rqlm.modeling.quantizer_registry import ALIASES, FSQ_LEVELS

    name = ALIASES.get(quantizer_type, quantizer_type)
    codes = codebook_size
    if name in ("fsq", "residual_fsq", "latent_quantize", "FSQ", "ResidualFSQ", "LatentQuantize"):
        levels = (quantizer_kwargs or {}).get("levels") or FSQ_LEVELS.get(codebook_size)
        codes = math.prod(levels) if levels else codebook_size
    return num_quantizers * math.log2(codes)


# ----------------------------------------------------------------------------- the plan: stages per point


def _digest(values) -> str:
    return hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _identity(args: argparse.Namespace) -> dict:
    """A stage's resolved flags without the folders the sweep sets: equal for runs that train the same thing."""
    return {k: v for k, v in vars(args).items() if k not in MANAGED_FLAGS}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_")[:40]


@dataclass
class PointPlan:
    """The folders and command lines of one point's stages."""

    sweep: Sweep
    point: Point
    vae_dir: Path
    vae_argv: list[str]
    codes_dir: Path | None = None
    codes_argv: list[str] | None = None
    lm_dir: Path | None = None
    lm_argv: list[str] | None = None
    eval_dir: Path | None = None
    eval_argv: list[str] | None = None
    bench_dir: Path | None = None
    bench_argv: list[str] | None = None
    vae_args: argparse.Namespace | None = None


EVALUATION_FILE = "evaluate.json"
BENCH_FILE = "bench.json"
CODES_DONE_FILE = "validation/state.json"  # save_to_disk writes the validation split last


def baseline_argv(config: SweepConfig, output_dir: Path) -> tuple[Path, list[str]]:
    """The shared baseline's folder and its train-baseline argv."""
    folder = output_dir / "baseline"
    values = {**data_flags(config, "train-baseline"), **config.baseline, "output_dir": str(folder)}
    return folder, to_argv("train-baseline", values)


def plan_point(config: SweepConfig, sweep: Sweep, point: Point, output_dir: Path) -> PointPlan:
    """A point's stages: VAE (named by its flags), then for LM sweeps codes, LM, evaluate and maybe bench."""
    values = vae_values(config, point)
    args = parse_stage("train-vae", values, f"sweep {sweep.name!r} point {point.name!r} vae")
    vae_name = (f"C{args.compression_factor}-D{args.num_quantizers}-K{args.codebook_size}-"
                f"{_slug(args.quantizer_type)}-{_digest(_identity(args))}")
    vae_dir = output_dir / "vae" / vae_name
    plan = PointPlan(sweep, point, vae_dir, to_argv("train-vae", {**values, "output_dir": str(vae_dir)}),
                     vae_args=args)
    if not sweep.trains_lm:
        return plan
    baseline_dir = output_dir / "baseline"
    plan.codes_dir = output_dir / "codes" / vae_name
    encode = {**data_flags(config, "encode"), "vae": str(vae_dir), "output_dir": str(plan.codes_dir)}
    plan.codes_argv = to_argv("encode", encode)
    lm = lm_values(config, point, baseline_dir)
    lm_args = parse_stage("train-lm", lm, f"sweep {sweep.name!r} point {point.name!r} lm")
    backbone = {**config.lm, **point.lm}.get("backbone", lm_args.backbone)
    lm_name = f"{vae_name}-{_slug(str(backbone))}-{_digest({**_identity(lm_args), 'vae': vae_name})}"
    plan.lm_dir = output_dir / "lm" / lm_name
    plan.lm_argv = to_argv("train-lm", {**lm, "vae": str(vae_dir), "codes": str(plan.codes_dir),
                                        "output_dir": str(plan.lm_dir)})
    plan.eval_dir = output_dir / "evaluate" / lm_name
    evaluate = {**data_flags(config, "evaluate"), **config.evaluate, "model": str(plan.lm_dir),
                "baseline": str(baseline_dir), "output_json": str(plan.eval_dir / EVALUATION_FILE)}
    plan.eval_argv = to_argv("evaluate", evaluate)
    if sweep.bench:
        plan.bench_dir = output_dir / "bench" / lm_name
        bench = {"shapes": ["tiny"], "compile_shapes": [], "parallel_depth": False, **config.bench,
                 "model": str(plan.lm_dir), "baseline": str(baseline_dir),
                 "evaluation_json": str(plan.eval_dir / EVALUATION_FILE),
                 "output_json": str(plan.bench_dir / BENCH_FILE)}
        plan.bench_argv = to_argv("bench", bench)
    return plan


def plan_sweeps(config: SweepConfig, sweeps: list[Sweep], output_dir: Path) -> list[PointPlan]:
    return [plan_point(config, sweep, point, output_dir) for sweep in sweeps for point in sweep.points]
