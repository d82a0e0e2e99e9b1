"""`rqlm demo`: the whole pipeline on the embedded corpus, one `rqlm` command per stage, then a report.

    tokenizer   rqlm train-tokenizer                       -> DIR/tokenizer   (BPE on the embedded corpus)
    baseline    rqlm train-baseline (Qwen3, preset tiny)   -> DIR/baseline    (the offline stand-in for a
                                                                               pretrained Qwen3)
    vae         rqlm train-vae                             -> DIR/vae         (the CPU recipe: embeddings and
                                                                               latent layers, no Qwen3 layers to
                                                                               take from the baseline)
    codes       rqlm encode                                -> DIR/codes
    lm          rqlm train-lm --backbone DIR/baseline      -> DIR/lm          (train-lm's default, the tokens mode:
                  --freeze_backbone_steps N                                    a token decoder writes each chunk;
                                                                               spatial layers copied from the
                                                                               baseline, frozen, then unfrozen)
    evaluation  rqlm evaluate                              -> DIR/evaluation/evaluation.json  (exact perplexity)
    reconstruction  rqlm inspect DIR/vae                   -> DIR/reconstruction/inspect.json
    benchmark   rqlm bench --model DIR/lm --baseline DIR/baseline (batch 1 and 8) -> DIR/benchmark/bench.json
    lm-codes    rqlm train-lm --depth_output codes ...     -> DIR/lm_codes    (the codes mode beside it: a depth
                                                                               decoder writes the D codes)
    lm-codes-evaluation, lm-codes-benchmark                -> DIR/lm_codes_{evaluation,benchmark}/  (its bound)
  with --continuous (always with --quick), the continuous latents beside them (issue 14):
    gaussian-vae    rqlm train-vae --quantizer_type gaussian  -> DIR/gaussian_vae
    gaussian-reconstruction  rqlm inspect DIR/gaussian_vae    -> DIR/gaussian_reconstruction/inspect.json
    givt, givt-energy        rqlm train-givt --head gaussian | energy --backbone DIR/baseline
                                                              -> DIR/givt, DIR/givt_energy
    givt-evaluation, givt-energy-evaluation   rqlm evaluate --model DIR/givt[_energy]
                                                              -> DIR/givt[_energy]_evaluation/evaluation.json
    givt-benchmark, givt-energy-benchmark     rqlm bench --model DIR/givt[_energy]
                                                              -> DIR/givt[_energy]_benchmark/bench.json
    report      rqlm/reporting/report.py                  -> DIR/report.md, DIR/metrics.json, DIR/plots/*.png

Every stage runs through rqlm.pipeline.run_stage: it is skipped when its output is finished (`--force`
redoes it), a killed training resumes from its last checkpoint, and a stage that runs makes every later
stage run again (their outputs would be stale). The report is rewritten every run.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from rqlm.pipeline import TRAINED

# minutes of training time (`--max_minutes`) per training stage: 10 in all, plus about 3 minutes of data loading,
# evaluation, encoding and benchmarking keep the default demo under 15 minutes on 2 cores (with 11 in all, two full
# runs beside other trainings, load 6-9, took 16.7-16.9 minutes). The tokens-mode LM, the
# default, gets the most: at the tiny shape its step costs 5-9x the codes mode's (a 4-layer token decoder over every
# token: 21 steps in 3.4 minutes against the codes mode's 107 in 2, one run on a loaded machine). The baseline keeps
# its 3 (both LMs' spatial layers start from it). The codes mode, a comparison row whose bound stays 1,800x and more
# the baseline's perplexity at any of these budgets, gets 1.5, as does the VAE, which only the codes mode reads (the
# tokens mode's input is token embeddings)
DEFAULT_MINUTES = {"baseline": 3.0, "vae": 1.5, "lm": 4.0, "lm_codes": 1.5}
# the same for the continuous stages of --continuous (about 9 minutes more with their evaluation and benchmark)
CONTINUOUS_MINUTES = {"gaussian_vae": 2.0, "givt": 3.0, "givt_energy": 2.0}
GIVT_HEADS = {"givt": "gaussian", "givt_energy": "energy"}  # training stage -> its `train-givt --head`
BLOCK_SIZE = 128  # the VAE's and the LM's block size; the baseline reads the same blocks
FREEZE_BACKBONE_STEPS = 50  # the LM's spatial layers (copied from the baseline) stay frozen this long
BENCH_BATCH_SIZES = "1,8"


@dataclass
class Settings:
    """What differs between the full demo and `--quick` (besides the time budgets)."""

    vocab_size: int = 8192
    backbone: str = "tiny"  # the baseline's preset, hence the LM's spatial stack
    step_limits: dict | None = None  # stage -> --max_steps (None: the time budget ends the run)
    freeze_backbone_steps: int = FREEZE_BACKBONE_STEPS
    unfreeze_warmup_steps: int = 50
    eval_steps: int = 100
    save_steps: int = 100
    eval_batches: int = 10
    logging_steps: int = 10
    max_eval_blocks: int | None = None  # held-out blocks of evaluate and inspect (None: all)
    num_prompts: int = 8  # judged quality of free generation in `evaluate`
    brier_prefixes: int = 512  # held-out prefixes of BrierLM; 64 leave Brier-2..4 at 0 +- noise for these models
    bench_prompt_length: int = 64
    bench_new_tokens: int = 64
    vae_flags: tuple = ()  # model flags of train-vae (default: its CPU recipe)
    lm_flags: tuple = ()  # model flags of both train-lm stages (default: its defaults; lm-codes adds --depth_output codes)
    gaussian_vae_flags: tuple = ()  # model flags of train-vae --quantizer_type gaussian (default: the CPU recipe)
    givt_flags: tuple = ()  # model flags of train-givt (default: its defaults)


QUICK = Settings(
    vocab_size=1024, backbone="test", step_limits=dict.fromkeys(DEFAULT_MINUTES | CONTINUOUS_MINUTES, 8),
    freeze_backbone_steps=4, unfreeze_warmup_steps=2, eval_steps=4, save_steps=4, eval_batches=1, logging_steps=2, max_eval_blocks=8, num_prompts=2,
    brier_prefixes=4, bench_prompt_length=16, bench_new_tokens=8,
    vae_flags=("--num_quantizers", 4, "--codebook_size", 64, "--latent_dim", 16),
    # one depth layer in both modes: the tokens mode's default of 4 made the --quick LM stage 3x slower
    lm_flags=("--depth_hidden_size", 64, "--depth_num_attention_heads", 2, "--depth_num_layers", 1),
    gaussian_vae_flags=("--latent_dim", 16), givt_flags=("--energy_head_size", 64),
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run the whole pipeline on the embedded corpus: tokenizer -> baseline Qwen3 -> RQ-VAE -> codes -> "
        "RQ-Transformer in tokens mode (spatial layers from the baseline) -> evaluation -> reconstruction -> "
        "benchmark -> the RQ-Transformer in codes mode beside it, evaluated and benchmarked -> report. Default "
        f"budgets: baseline {DEFAULT_MINUTES['baseline']:g}, RQ-VAE {DEFAULT_MINUTES['vae']:g}, tokens mode "
        f"{DEFAULT_MINUTES['lm']:g} and codes mode {DEFAULT_MINUTES['lm_codes']:g} minutes of training time, plus "
        "about 3 minutes of data, "
        "evaluation and benchmark: at most 15 minutes on a 2-core CPU. --quick: a few steps per stage, "
        "about a minute. Finished stages are skipped on a rerun; a killed training stage resumes. --continuous adds "
        "the continuous latents: a Gaussian VAE and GIVT's Gaussian and CALM's energy heads over it, as two more "
        "columns of the report (--quick always has them)."
    )
    parser.add_argument("--output_dir", default="runs/demo", help="where every stage's output and the report go "
                        "(default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="redo every stage, even the finished ones")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run in about a minute: test-size models, 8 steps per stage, few held-out blocks")
    parser.add_argument("--vocab_size", type=int, default=None,
                        help=f"entries of the BPE tokenizer (default: {Settings.vocab_size}; --quick: {QUICK.vocab_size})")
    parser.add_argument("--data_only", action="store_true",
                        help="stop after the tokenizer stage and print the corpus's statistics")
    parser.add_argument("--continuous", action="store_true",
                        help="also the continuous latents (issue 14): a Gaussian VAE, GIVT's Gaussian head and CALM's "
                        "energy head over it, evaluated and benchmarked beside the others (about "
                        f"{sum(CONTINUOUS_MINUTES.values()) + 2:g} minutes more; always part of --quick)")
    for stage, minutes in (DEFAULT_MINUTES | CONTINUOUS_MINUTES).items():
        parser.add_argument(f"--{stage}_minutes", type=float, default=None,
                            help=f"training time of the {stage} stage (default: {minutes:g}; --quick: 8 steps)")


def stages(args: argparse.Namespace, settings: Settings) -> list[tuple[str, Path, list, str]]:
    """(name, output folder, `rqlm` argv, file that marks it finished) of every command stage, in order."""
    from rqlm.benchmarks import HEADLINE_C
    from rqlm.reporting.report import JUDGED_TEMPERATURE

    out = Path(args.output_dir)
    tokenizer, baseline, vae, codes, lm, lm_codes = (out / n for n in ("tokenizer", "baseline", "vae", "codes", "lm",
                                                                        "lm_codes"))
    blocks = ["--block_size", BLOCK_SIZE]
    held_out = [] if settings.max_eval_blocks is None else ["--max_eval_blocks", settings.max_eval_blocks]

    def training(stage: str) -> list:
        minutes = getattr(args, f"{stage}_minutes")
        limit = (settings.step_limits or {}).get(stage)
        default = (DEFAULT_MINUTES | CONTINUOUS_MINUTES)[stage]
        budget = ["--max_minutes", minutes if minutes is not None else "none" if limit else default]
        steps = ["--max_steps", limit] if limit else []
        return [*blocks, *held_out, *budget, *steps, "--eval_steps", settings.eval_steps,
                "--eval_batches", settings.eval_batches, "--save_steps", settings.save_steps,
                "--logging_steps", settings.logging_steps]

    def evaluate(model: Path, output_dir: Path) -> list:
        figures = ["evaluate", "--model", model, "--baseline", baseline, *held_out, "--num_prompts",
                   settings.num_prompts, "--new_tokens", 32, "--prompt_tokens", 32, "--temperature", JUDGED_TEMPERATURE,
                   "--output_json", output_dir / "evaluation.json"]
        if command_accepts("evaluate", "--brier_prefixes"):  # BrierLM, where `rqlm evaluate` has it
            figures += ["--brier_prefixes", settings.brier_prefixes]
        return figures

    def inspect(model: Path, output_dir: Path) -> list:
        return ["inspect", model, *held_out, "--num_examples", 2, "--no-color", "--output", output_dir / "inspect.html"]

    def bench(model: Path, output_dir: Path, evaluation_dir: Path | None) -> list:
        # --evaluation_json: the bound printed beside the model (a model without one, the energy head, has none)
        bound = [] if evaluation_dir is None else ["--evaluation_json", evaluation_dir / "evaluation.json"]
        return ["bench", "--model", model, "--baseline", baseline, "--shapes", "tiny", "--compile_shapes", "",
                "--no-parallel_depth", "--compression_factors", HEADLINE_C, "--batch_sizes", BENCH_BATCH_SIZES,
                "--prompt_length", settings.bench_prompt_length, "--new_tokens", settings.bench_new_tokens,
                *bound, "--output_json", output_dir / "bench.json"]

    def latent_lm(output_dir: Path, stage: str, *mode) -> list:  # spatial layers from the baseline
        return ["train-lm", "--vae", vae, "--codes", codes, "--backbone", baseline, *mode,
                "--freeze_backbone_steps", settings.freeze_backbone_steps,
                "--unfreeze_warmup_steps", settings.unfreeze_warmup_steps, "--output_dir", output_dir,
                *settings.lm_flags, *training(stage)]

    codes_evaluation = out / "lm_codes_evaluation"
    rq_stages = [
        ("tokenizer", tokenizer, ["train-tokenizer", "--vocab_size", args.vocab_size or settings.vocab_size,
                                  "--output_dir", tokenizer],
         "tokenizer.json"),
        ("baseline", baseline, ["train-baseline", "--tokenizer", tokenizer, "--backbone", settings.backbone,
                                "--output_dir", baseline, *training("baseline")], TRAINED),
        ("vae", vae, ["train-vae", "--tokenizer", tokenizer, "--backbone", settings.backbone, "--output_dir", vae,
                      *settings.vae_flags, *training("vae")], TRAINED),
        # save_to_disk writes dataset_dict.json first and the last split's dataset_info.json last
        ("codes", codes, ["encode", "--vae", vae, *blocks, "--output_dir", codes], "validation/dataset_info.json"),
        ("lm", lm, latent_lm(lm, "lm"), TRAINED),  # train-lm's default: the tokens mode
        ("evaluation", out / "evaluation", evaluate(lm, out / "evaluation"), "evaluation.json"),
        ("reconstruction", out / "reconstruction", inspect(vae, out / "reconstruction"), "inspect.json"),
        ("benchmark", out / "benchmark", bench(lm, out / "benchmark", out / "evaluation"), "bench.json"),
        ("lm-codes", lm_codes, latent_lm(lm_codes, "lm_codes", "--depth_output", "codes"), TRAINED),
        ("lm-codes-evaluation", codes_evaluation, evaluate(lm_codes, codes_evaluation), "evaluation.json"),
        ("lm-codes-benchmark", out / "lm_codes_benchmark", bench(lm_codes, out / "lm_codes_benchmark", codes_evaluation),
         "bench.json"),
    ]
    if not continuous(args):
        return rq_stages
    gaussian_vae = out / "gaussian_vae"
    continuous_stages = [
        ("gaussian-vae", gaussian_vae, ["train-vae", "--quantizer_type", "gaussian", "--tokenizer", tokenizer,
                                        "--backbone", settings.backbone, "--output_dir", gaussian_vae,
                                        *settings.gaussian_vae_flags, *training("gaussian_vae")], TRAINED),
        ("gaussian-reconstruction", out / "gaussian_reconstruction",
         inspect(gaussian_vae, out / "gaussian_reconstruction"), "inspect.json"),
    ]
    for stage, head in GIVT_HEADS.items():  # the spatial layers from the baseline, as the RQ LM's
        givt, name = out / stage, stage.replace("_", "-")
        evaluation, benchmark = out / f"{stage}_evaluation", out / f"{stage}_benchmark"
        continuous_stages += [
            (name, givt, ["train-givt", "--vae", gaussian_vae, "--head", head, "--backbone", baseline,
                          "--freeze_backbone_steps", settings.freeze_backbone_steps,
                          "--unfreeze_warmup_steps", settings.unfreeze_warmup_steps, "--output_dir", givt,
                          *settings.givt_flags, *training(stage)], TRAINED),
            (f"{name}-evaluation", evaluation, evaluate(givt, evaluation), "evaluation.json"),
            (f"{name}-benchmark", benchmark, bench(givt, benchmark, evaluation if head == "gaussian" else None),
             "bench.json"),
        ]
    return rq_stages + continuous_stages


def continuous(args: argparse.Namespace) -> bool:
    """Whether the run has the continuous-latent stages: `--continuous`, and always `--quick` (its test covers them)."""
    return args.continuous or args.quick


def training_stages(args: argparse.Namespace) -> dict[str, float]:
    """Training stage -> its default budget in minutes, for the stages this run has."""
    return DEFAULT_MINUTES | (CONTINUOUS_MINUTES if continuous(args) else {})


def command_accepts(command: str, flag: str) -> bool:
    """Whether `rqlm <command>` has `flag` (a stage passes an optional flag only where it exists)."""
    import importlib

    from rqlm.cli import SUBCOMMANDS

    parser = argparse.ArgumentParser(add_help=False)
    importlib.import_module(SUBCOMMANDS[command][0]).add_arguments(parser)
    return flag in parser._option_string_actions


def main(args: argparse.Namespace) -> int:
    from rqlm.cli import CLIError
    from rqlm.pipeline import StageFailed

    try:
        return run_demo(args)
    except StageFailed as e:
        raise CLIError(str(e)) from None


def run_demo(args: argparse.Namespace) -> int:
    """Every stage in order (each skipped when finished), then the report and the stage summary."""
    from rqlm.pipeline import StageLog, run_stage
    from rqlm.reporting.report import write_report

    settings = QUICK if args.quick else Settings()
    for stage in DEFAULT_MINUTES | CONTINUOUS_MINUTES:
        minutes = getattr(args, f"{stage}_minutes")
        if minutes is not None and minutes <= 0:
            raise ValueError(f"--{stage}_minutes must be > 0, got {minutes:g}")
    out = Path(args.output_dir)
    log = StageLog()
    redo = args.force
    run_stages = stages(args, settings)
    for name, folder, argv, done_file in run_stages:
        # a stage that ran makes every later stage's output stale: they run again too
        redo = run_stage(name, folder, argv, force=redo, done_file=done_file, log=log) or redo
        record_stage_seconds(out, log)
        if args.data_only:
            print_corpus_statistics(folder)
            log.print_summary()
            return 0
    with log.timed("report", out / "report.md"):
        budgets = {stage: (getattr(args, f"{stage}_minutes") or default) if not args.quick
                   else getattr(args, f"{stage}_minutes") for stage, default in training_stages(args).items()}
        # the seconds of this run's stages (stages.json keeps those of an earlier --continuous run too)
        names = {name for name, *_ in run_stages}
        seconds = {name: t for name, t in record_stage_seconds(out, log).items() if name in names}
        report = write_report(out, stage_seconds=seconds, budgets=budgets,
                              block_size=BLOCK_SIZE, quick=args.quick, continuous=continuous(args))
    log.print_summary()
    print(f"\nreport: {report} (figures in {out / 'metrics.json'}, plots in {out / 'plots'})")
    for warning in json.loads((out / "metrics.json").read_text()).get("warnings", []):
        print(f"warning: {warning}")
    return 0


def print_corpus_statistics(tokenizer_dir: Path) -> None:
    """Documents, characters, tokens and characters per token of each split of the embedded corpus."""
    from rqlm.data import build_embedded_corpus, corpus_statistics, load_tokenizer

    print("embedded corpus (CPython docs topics and stdlib docstrings):")
    for split, s in corpus_statistics(build_embedded_corpus(), load_tokenizer(tokenizer_dir)).items():
        print(f"  {split:<10} {s['documents']:>6,} documents {s['characters']:>11,} characters "
              f"{s['tokens']:>9,} tokens {s['chars_per_token']:6.2f} chars/token")


STAGES_FILE = "stages.json"


def record_stage_seconds(out: Path, log) -> dict:
    """DIR/stages.json: seconds of each stage's last run that did the work (a skipped stage keeps its earlier
    figure, so the report of a rerun still says what each stage took)."""
    path = out / STAGES_FILE
    seconds = json.loads(path.read_text()) if path.is_file() else {}
    for record in log.records:
        if record.ran:
            seconds[record.name] = round(record.seconds, 1)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(seconds, indent=1))
    return seconds
