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

Training FLOPs (`params_per_token`, `training_flops`): the usual 6 N per token for a trained weight
(forward 2 N, backward 4 N) and 2 N per token for a frozen forward, where N counts every weight matrix
as many times as it is applied per text token. One forward pass of a block, with hooks on every
nn.Linear / nn.Conv1d / nn.ConvTranspose1d, counts the applications (a hook sees how many vectors
went through): the baseline's layers and LM head apply once per token (6 N D as usual); the
RQ-Transformer's spatial layers once per C tokens, its depth transformer D times per C tokens; the
frozen VAE's encoder path (inside the LM's forward on tokens) counts 2 N. Embedding lookups, norms,
attention scores (context-length dependent) and codebook distance computations count 0. So:
    baseline(t)      = 6 N_baseline t
    RQ system(t)     = 6 N_vae t_vae  +  (6 N_lm + 2 N_encoder) t
where t is the tokens the run has seen, t_vae the VAE run's tokens (its whole training, paid once).
The encoder term charges encoding per token seen (as train-lm does without `--codes`); with
`rqlm encode` it is paid once per dataset token, so this slightly over-counts a multi-epoch LM.
A frozen-then-unfrozen backbone counts 6 N throughout (an over-count of at most 2 N per frozen step).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

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
FLOPS_PER_TRAINED_PARAM = 6  # forward 2 + backward 4, per application
FLOPS_PER_FROZEN_PARAM = 2  # forward only


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


# ----------------------------------------------------------------------------- training FLOPs


COUNTED_MODULES = (nn.Linear, nn.Conv1d, nn.ConvTranspose1d)


def _applications(module: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    """How many times a module's whole weight was applied: vectors in (Linear, ConvTranspose1d) or out (Conv1d)."""
    if isinstance(module, nn.Linear):
        return inputs[0].numel() // module.in_features
    if isinstance(module, nn.ConvTranspose1d):
        return inputs[0].numel() // module.in_channels
    return output.numel() // module.out_channels


@torch.no_grad()
def params_per_token(model: nn.Module, input_ids: torch.LongTensor, frozen_prefixes=None,
                     **forward_kwargs) -> tuple[float, float]:
    """(trained, frozen) weights applied per token of `input_ids` (B, T) in one forward pass of `model`.

    A module counts as frozen when its name starts with one of `frozen_prefixes` (default: the modules
    of `model._ddp_params_and_buffers_to_ignore`, the RQ LM's frozen VAE)."""
    if frozen_prefixes is None:
        ignored = getattr(model, "_ddp_params_and_buffers_to_ignore", ())
        frozen_prefixes = tuple(sorted({name.split(".")[0] + "." for name in ignored}))
    counts = {"trained": 0, "frozen": 0}
    handles = []
    for name, module in model.named_modules():
        if not isinstance(module, COUNTED_MODULES):
            continue
        weights = sum(p.numel() for p in module.parameters(recurse=False))
        side = "frozen" if f"{name}.".startswith(tuple(frozen_prefixes)) else "trained"

        def hook(module, inputs, output, weights=weights, side=side):
            counts[side] += weights * _applications(module, inputs, output)

        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(input_ids=input_ids, **forward_kwargs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    tokens = input_ids.numel()
    return counts["trained"] / tokens, counts["frozen"] / tokens


def training_flops(trained_per_token: float, frozen_per_token: float, tokens: float) -> float:
    """6 N_trained + 2 N_frozen FLOPs per token, times the tokens seen."""
    return (FLOPS_PER_TRAINED_PARAM * trained_per_token + FLOPS_PER_FROZEN_PARAM * frozen_per_token) * tokens


def _probe_ids(vocab_size: int, block_size: int) -> torch.LongTensor:
    """One block of token ids (1, block_size) for counting: any ids do, the count depends only on shapes."""
    return (torch.arange(block_size) % vocab_size).unsqueeze(0)


def baseline_flops_per_token(baseline_dir: Path, block_size: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(baseline_dir)
    trained, frozen = params_per_token(model, _probe_ids(model.config.vocab_size, block_size), frozen_prefixes=())
    return training_flops(trained, frozen, 1)


def rq_flops(lm_dir: Path, block_size: int) -> dict[str, float]:
    """The RQ system's FLOPs per token: the VAE's training, and the LM's (6 N_lm + 2 N_encoder)."""
    from rqlm import RQTransformerForCausalLM

    model = RQTransformerForCausalLM.from_pretrained(lm_dir)
    ids = _probe_ids(model.config.vae_config.backbone_config.vocab_size, block_size)
    lm_trained, encoder = params_per_token(model, ids)
    vae, _ = params_per_token(model.vae, ids, frozen_prefixes=())  # the VAE trained all of itself
    return {
        "vae_flops_per_token": training_flops(vae, 0, 1),
        "lm_flops_per_token": training_flops(lm_trained, encoder, 1),
        "lm_params_per_token": lm_trained,
        "encoder_params_per_token": encoder,
    }


# ----------------------------------------------------------------------------- results


def _records(run_dir: Path) -> list[dict]:
    from rqlm.reporting.plots import read_metrics

    return read_metrics(run_dir)


def _last(records: list[dict], key: str):
    values = [r[key] for r in records if key in r]
    return values[-1] if values else None


def tokens_per_step(records: list[dict]) -> float:
    """Tokens one optimizer step reads (constant batch x block), from the logged tokens_seen."""
    logged = [r for r in records if "tokens_seen" in r and r.get("step")]
    return logged[-1]["tokens_seen"] / logged[-1]["step"] if logged else 0.0


def curve(records: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of every record holding `key`."""
    return [(r["step"], r[key]) for r in records if key in r]


def vae_figures(vae_dir: Path, args: argparse.Namespace) -> dict:
    """The VAE's held-out reconstruction accuracy and code usage (its last evaluation), and its sizes."""
    records = _records(vae_dir)
    usage = _last(records, "eval_usage_perplexity_mean")
    dead = _last(records, "eval_dead_fraction_mean")
    return {
        "compression_factor": args.compression_factor,
        "num_quantizers": args.num_quantizers,
        "codebook_size": args.codebook_size,
        "quantizer_type": args.quantizer_type,
        "bits": code_bits(args.quantizer_type, args.num_quantizers, args.codebook_size, args.quantizer_kwargs),
        "recon_accuracy": _last(records, "eval_accuracy"),
        "usage_perplexity": usage,
        "codes_used": None if dead is None else 1.0 - dead,
        "vae_tokens": _last(records, "tokens_seen"),
    }


def bench_figures(bench_file: Path) -> dict:
    """tokens/s of the trained RQ model and the fastest baseline way per batch size, and their ratio."""
    result = json.loads(bench_file.read_text())
    figures = {}
    for shape in result["shapes"]:
        rows = shape["rows"]
        for batch in sorted({r["batch_size"] for r in rows}):
            base = max((r["tokens_per_second"] for r in rows if r["batch_size"] == batch
                        and r["model"].startswith("Qwen3")), default=None)
            rq = [r["tokens_per_second"] for r in rows if r["batch_size"] == batch and r["model"].startswith("RQ")]
            if base and rq:
                figures[f"tokens_per_second_batch{batch}"] = rq[0]
                figures[f"baseline_tokens_per_second_batch{batch}"] = base
                figures[f"speedup_batch{batch}"] = rq[0] / base
    return figures


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """y at x on a polyline of (x, y) sorted by x, linear in log x; None outside its range."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= x <= x1 and x0 > 0:
            f = 0.0 if x1 == x0 else (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + f * (y1 - y0)
    return points[0][1] if len(points) == 1 and points[0][0] == x else None


def collect_results(plans: list[PointPlan], baseline_dir: Path | None, block_size: int) -> dict:
    """Every point's figures (VAE, evaluation, speed, FLOPs and curves) and the baseline's, as one dict."""
    results = {"baseline": None, "sweeps": {}}
    baseline_curve = []
    if baseline_dir is not None and (baseline_dir / "config.json").is_file():
        records = _records(baseline_dir)
        per_token = baseline_flops_per_token(baseline_dir, block_size)
        step_tokens = tokens_per_step(records)
        baseline_curve = [(per_token * step_tokens * s, math.exp(min(v, 700)))
                          for s, v in curve(records, "eval_loss")]
        results["baseline"] = {
            "folder": str(baseline_dir),
            "perplexity": _last(records, "eval_perplexity"),
            "tokens": _last(records, "tokens_seen"),
            "flops_per_token": per_token,
            "training_flops": per_token * (_last(records, "tokens_seen") or 0),
            "curve_flops_perplexity": baseline_curve,
        }
    for plan in plans:
        sweep = results["sweeps"].setdefault(plan.sweep.name, {"kind": plan.sweep.kind, "points": []})
        point = {"name": plan.point.name, "vae_overrides": plan.point.vae, "lm_overrides": plan.point.lm,
                 "vae_dir": str(plan.vae_dir), **vae_figures(plan.vae_dir, plan.vae_args)}
        if plan.lm_dir is not None:
            point.update(_lm_figures(plan, block_size, baseline_curve))
        if plan.bench_dir is not None and (plan.bench_dir / BENCH_FILE).is_file():
            point.update(bench_figures(plan.bench_dir / BENCH_FILE))
        sweep["points"].append(point)
    return results


def _lm_figures(plan: PointPlan, block_size: int, baseline_curve) -> dict:
    records = _records(plan.lm_dir)
    evaluation = json.loads((plan.eval_dir / EVALUATION_FILE).read_text())
    flops = rq_flops(plan.lm_dir, block_size)
    vae_flops = flops["vae_flops_per_token"] * (_last(_records(plan.vae_dir), "tokens_seen") or 0)
    step_tokens = tokens_per_step(records)
    lm_tokens = _last(records, "tokens_seen") or 0
    total = vae_flops + flops["lm_flops_per_token"] * lm_tokens
    figures = {
        "lm_dir": str(plan.lm_dir),
        "perplexity_bound": evaluation["perplexity_bound"],
        "baseline_perplexity": evaluation["baseline_perplexity"],
        "ratio": evaluation["ratio"],
        "bits_per_token": evaluation["bits_per_token"],
        "brier_lm": evaluation.get("brier_lm"),
        "baseline_brier_lm": evaluation.get("baseline_brier_lm"),
        "code_nll": _last(records, "eval_code_nll"),
        "lm_tokens": lm_tokens,
        **flops,
        "vae_training_flops": vae_flops,
        "training_flops": total,
        "baseline_perplexity_at_matched_flops": interpolate(baseline_curve, total) if baseline_curve else None,
        "curve_code_nll": curve(records, "eval_code_nll"),
        "curve_flops_bound": [(vae_flops + flops["lm_flops_per_token"] * step_tokens * s, v)
                              for s, v in curve(records, "eval_perplexity_bound")],
    }
    return figures


# ----------------------------------------------------------------------------- tables and plots


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        if abs(value) >= 1e6:
            return f"{value:.3g}"
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


TABLE_COLUMNS = (
    ("point", "name"), ("C", "compression_factor"), ("D", "num_quantizers"), ("K", "codebook_size"),
    ("quantizer", "quantizer_type"), ("bits", "bits"), ("recon acc", "recon_accuracy"),
    ("codes used", "codes_used"), ("code NLL", "code_nll"), ("bound", "perplexity_bound"),
    ("baseline ppl", "baseline_perplexity"), ("BrierLM", "brier_lm"), ("baseline BrierLM", "baseline_brier_lm"),
    ("speedup b1", "speedup_batch1"), ("speedup b8", "speedup_batch8"),
    ("train FLOPs", "training_flops"), ("baseline ppl @FLOPs", "baseline_perplexity_at_matched_flops"),
)


def results_markdown(results: dict) -> str:
    """One markdown table per sweep (columns without a value in the sweep left out)."""
    lines = ["# Sweep results", ""]
    base = results.get("baseline")
    if base:
        lines += [(f"Baseline: perplexity {_fmt(base['perplexity'])} after {_fmt(base['tokens'])} tokens, "
                   f"{_fmt(base['training_flops'])} training FLOPs."), ""]
    for name, sweep in results["sweeps"].items():
        columns = [(t, k) for t, k in TABLE_COLUMNS if any(p.get(k) is not None for p in sweep["points"])]
        lines += [f"## {name} ({sweep['kind']})", "", f"![{name}]({name}.png)", "",
                  "| " + " | ".join(t for t, _ in columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_fmt(p.get(k)) for _, k in columns) + " |" for p in sweep["points"]]
        lines.append("")
    return "\n".join(lines)


def plot_sweep(name: str, sweep: dict, baseline: dict | None, path: Path) -> Path:
    """The sweep's figure (see the module docstring for each kind); saves a PNG."""
    from rqlm.reporting.plots import plt  # pyplot with the Agg backend selected

    points = sweep["points"]
    labels = [p["name"] for p in points]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    left, right = axes
    kind = sweep["kind"]
    if kind == "compression":
        ordered = sorted(points, key=lambda p: p["compression_factor"])
        cs = [p["compression_factor"] for p in ordered]
        left.plot(cs, [p.get("perplexity_bound") for p in ordered], marker="o", label="RQ perplexity bound")
        _baseline_line(left, baseline)
        left.set(xlabel="compression C (tokens per latent position)", ylabel="perplexity", yscale="log",
                 xticks=cs, title="quality")
        for key in sorted({k for p in ordered for k in p if k.startswith("speedup_batch")}):
            batch = key.removeprefix("speedup_batch")
            right.plot(cs, [p.get(key) for p in ordered], marker="o", label=f"batch {batch}")
        right.axhline(1.0, color="gray", linestyle=":", label="baseline speed")
        right.set(xlabel="compression C", ylabel="tokens/s against the baseline", xticks=cs, title="generation speedup")
    elif kind in ("codebook", "quantizer"):
        bits = [p["bits"] for p in points]
        names = [f"{n}\nK={p['codebook_size']} D={p['num_quantizers']}" for n, p in zip(labels, points)]
        if kind == "codebook":
            _bars(left, names, [p.get("perplexity_bound") for p in points], "perplexity bound")
            left.set_yscale("log")
            _baseline_line(left, baseline)
        else:
            _bars(left, names, [p.get("codes_used") for p in points], "fraction of codes used (held-out)")
        _bars(right, names, [p.get("recon_accuracy") for p in points], "VAE reconstruction accuracy (held-out)")
        fig.suptitle(f"{name}: {kind} at {min(bits):.1f}-{max(bits):.1f} bits per position"
                     if max(bits) - min(bits) > 1e-6 else f"{name}: {kind} at {bits[0]:.0f} bits per position")
    elif kind == "backbone":
        for p in points:
            if p.get("curve_code_nll"):
                steps, values = zip(*p["curve_code_nll"])
                left.plot(steps, values, marker="o", markersize=3, label=p["name"])
        left.set(xlabel="step", ylabel="held-out code NLL (nats per code)", title="code NLL over training")
        _bars(right, labels, [p.get("perplexity_bound") for p in points], "final perplexity bound")
        right.set_yscale("log")
        _baseline_line(right, baseline)
    elif kind == "compute":
        if baseline and baseline.get("curve_flops_perplexity"):
            xs, ys = zip(*baseline["curve_flops_perplexity"])
            left.plot(xs, ys, marker="s", markersize=3, color="black", label="baseline perplexity")
        for p in points:
            if p.get("curve_flops_bound"):
                xs, ys = zip(*p["curve_flops_bound"])
                (line,) = left.plot(xs, ys, marker="o", markersize=3, label=f"{p['name']}: RQ bound")
                left.axvline(p["vae_training_flops"], color=line.get_color(), linestyle=":", linewidth=1)
        left.set(xlabel="training FLOPs (RQ: VAE (dotted) + LM)", ylabel="perplexity", xscale="log",
                 yscale="log", title="perplexity against training FLOPs")
        names = [n for p in points for n in (f"{p['name']}\nRQ bound", f"{p['name']}\nbaseline @FLOPs")]
        values = [v for p in points for v in (p.get("perplexity_bound"), p.get("baseline_perplexity_at_matched_flops"))]
        _bars(right, names, values, "perplexity at the RQ run's final FLOPs")
        right.set(yscale="log", title="matched training FLOPs")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if kind not in ("codebook", "quantizer"):
        fig.suptitle(f"{name} ({kind})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _bars(ax, names: list[str], values: list, ylabel: str) -> None:
    heights = [v if v is not None else 0.0 for v in values]
    bars = ax.bar(range(len(names)), heights)
    ax.set_xticks(range(len(names)), names, fontsize=7)
    ax.set_ylabel(ylabel)
    for bar, v in zip(bars, values):
        ax.annotate(_fmt(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=7)


def _baseline_line(ax, baseline: dict | None) -> None:
    if baseline and baseline.get("perplexity"):
        ax.axhline(baseline["perplexity"], color="black", linestyle="--", label="baseline perplexity")


def write_results(results: dict, output_dir: Path) -> list[Path]:
    """results.json, results.md and one PNG per sweep under output_dir; returns the files written."""
    output_dir.mkdir(parents=True, exist_ok=True)
    written = [output_dir / "results.json", output_dir / "results.md"]
    written[0].write_text(json.dumps(results, indent=1) + "\n")
    written[1].write_text(results_markdown(results))
    for name, sweep in results["sweeps"].items():
        written.append(plot_sweep(name, sweep, results.get("baseline"), output_dir / f"{name}.png"))
    return written
