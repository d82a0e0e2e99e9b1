"""The demo's report: every figure of one `rqlm demo` run, read from the files its stages wrote.

    DIR/evaluation/evaluation.json  (rqlm evaluate)  the tokens mode's exact perplexity, bits/token, BrierLM,
                                                     judged quality (the judge's perplexity, distinct-n, repeats)
    DIR/lm_codes_evaluation/evaluation.json          the same of the codes mode, its perplexity a bound
    DIR/reconstruction/inspect.json (rqlm inspect)   reconstruction accuracy (per chunk position), usage per depth
    DIR/benchmark/bench.json        (rqlm bench)     tokens/s, time to first token, peak memory, parameters
    DIR/lm_codes_benchmark/bench.json                the same of the codes mode, beside the baseline again
    DIR/{baseline,vae,lm,lm_codes}/metrics.jsonl     steps, tokens, training time (the conditions)
  and, for a run with the continuous latents (`rqlm demo --continuous`, or --quick):
    DIR/givt[_energy]_evaluation/evaluation.json       GIVT's ELBO bound (Gaussian head), BrierLM, judged quality
    DIR/gaussian_reconstruction/inspect.json         the Gaussian VAE's reconstruction (also of perturbed latents)
    DIR/givt[_energy]_benchmark/bench.json             tokens/s etc., beside the baseline measured in the same run
    DIR/{gaussian_vae,givt,givt_energy}/metrics.jsonl
    -> DIR/metrics.json (all of them), DIR/plots/*.png, and DIR/report.md: a headline table with a row per model
       (held-out perplexity, exact or bound, and its ratio to the baseline's; judged quality of temperature-1
       samples; speedup), every figure with a column per model, greedy continuations of the same held-out
       prompts, the reconstruction diff of held-out text.

A figure the run did not produce (e.g. BrierLM before `rqlm evaluate` has it) is null in metrics.json and
'n/a' in the table; one that does not apply to a model (codebook usage of a continuous latent, the perplexity
of the likelihood-free energy head) is '—'.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

BENCH_BATCHES = (1, 8)
BASELINE = "baseline"
RQ_MODEL = "rq"  # the RQ-Transformer in tokens mode, train-lm's default
RQ_CODES = "rq_codes"  # the RQ-Transformer in codes mode beside it
GIVT, GIVT_ENERGY = "givt", "givt_energy"
COLUMNS = {BASELINE: "Qwen3 baseline", RQ_MODEL: "RQ-Transformer (tokens mode)",
           RQ_CODES: "RQ-Transformer (codes mode)", GIVT: "GIVT (Gaussian head)",
           GIVT_ENERGY: "GIVT (energy head)"}  # table column (headline row) of each model, in this order
# latent LM -> its training, `rqlm evaluate` and `rqlm bench` folders under DIR
OUTPUTS = {RQ_MODEL: ("lm", "evaluation", "benchmark"),
           RQ_CODES: ("lm_codes", "lm_codes_evaluation", "lm_codes_benchmark"),
           GIVT: (GIVT, "givt_evaluation", "givt_benchmark"),
           GIVT_ENERGY: (GIVT_ENERGY, "givt_energy_evaluation", "givt_energy_benchmark")}
LIKELIHOOD_FREE = (GIVT_ENERGY,)  # no perplexity (bound): BrierLM compares them
JUDGED_TEMPERATURE = 1.0  # the demo's `rqlm evaluate --temperature` of the judged samples
TRAINING_STAGES = {"baseline": "Qwen3 baseline", "vae": "RQ-VAE", "lm": COLUMNS[RQ_MODEL],
                   "lm_codes": COLUMNS[RQ_CODES]}
CONTINUOUS_STAGES = {"gaussian_vae": "Gaussian VAE", GIVT: COLUMNS[GIVT], GIVT_ENERGY: COLUMNS[GIVT_ENERGY]}
NUM_SAMPLES = 2  # held-out prompts continued by both models
# Training steps per minute of training time that `make demo` makes on an idle 2-core CPU (AMD EPYC, fp32; the run
# of docs/results/demo.md, 2026-12-07): a stage far below its figure ran on a busy or slower machine.
IDLE_STEPS_PER_MINUTE = {"baseline": 196, "vae": 412, "lm": 62, "lm_codes": 195}
SLOW_FRACTION = 0.5  # warn below this fraction of the idle rate
DEMO_MINUTES = 15  # what `make demo` promises on 2 cores
SAMPLE_PROMPT_TOKENS = 32
SAMPLE_NEW_TOKENS = 32
DIFF_TOKENS = 64  # tokens of each held-out block shown with its reconstruction
NOT_APPLICABLE = "—"
MISSING = "n/a"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `rqlm demo` (the stage that writes it) first")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- figures


def perplexity_kind(evaluation: dict) -> str | None:
    """What the latent LM's held-out perplexity in `rqlm evaluate` JSON is: 'exact' (the tokens mode, which also
    writes `perplexity`), 'bound' (the codes mode's, or GIVT's ELBO), None (a likelihood-free model)."""
    return "exact" if "perplexity" in evaluation else "bound" if "perplexity_bound" in evaluation else None


def evaluation_figures(evaluation: dict) -> dict[str, dict]:
    """`rqlm evaluate` JSON -> per model (the latent LM under RQ_MODEL, and the baseline): held-out perplexity
    (exact or bound, as `perplexity_kind` says; None for a likelihood-free model) and its ratio to the baseline's,
    bits per token, BrierLM (and Brier-1..4), judged perplexity of the samples with their distinct-2 / distinct-3
    and repeated 3-gram rate."""
    figures = {}
    for model, prefix, perplexity, who in ((RQ_MODEL, "", "perplexity_bound", "rq"),
                                           (BASELINE, "baseline_", "baseline_perplexity", "baseline")):
        figures[model] = {"perplexity": evaluation.get(perplexity),
                          "perplexity_kind": "exact" if model == BASELINE else perplexity_kind(evaluation),
                          "perplexity_ratio": 1.0 if model == BASELINE else evaluation.get("ratio"),
                          "bits_per_token": evaluation.get(f"{prefix}bits_per_token")}
        for name in ("brier_lm", "brier_1", "brier_2", "brier_3", "brier_4"):
            figures[model][name] = evaluation.get(f"{prefix}{name}")
        figures[model]["judged_perplexity"] = evaluation.get(f"judged_perplexity_{who}_samples")
        for name in ("distinct_2", "distinct_3", "repeated_3gram_rate"):
            figures[model][name] = evaluation.get(f"{name}_{who}_samples")
    return figures


def reconstruction_figures(inspect: dict) -> dict:
    """`rqlm inspect` JSON -> accuracy, accuracy by chunk position, usage perplexity and unused codes per depth."""
    positions = sorted(int(k.removeprefix("accuracy_pos")) for k in inspect if k.startswith("accuracy_pos"))
    depths = sorted(int(k.removeprefix("usage_perplexity_d")) for k in inspect
                    if k.startswith("usage_perplexity_d") and k.removeprefix("usage_perplexity_d").isdigit())
    figures = {
        "reconstruction_accuracy": inspect["accuracy"],
        "reconstruction_accuracy_by_position": [inspect[f"accuracy_pos{p}"] for p in positions],
        "usage_perplexity_by_depth": [inspect[f"usage_perplexity_d{d}"] for d in depths],
        "dead_fraction_by_depth": [inspect[f"dead_fraction_d{d}"] for d in depths],
    }
    if "accuracy_sampled" in inspect:  # a Gaussian VAE: decoding a posterior sample, and the mean plus noise
        figures["reconstruction_accuracy_sampled"] = inspect["accuracy_sampled"]
        figures["reconstruction_accuracy_noise"] = {k.removeprefix("accuracy_noise"): v for k, v in inspect.items()
                                                    if k.startswith("accuracy_noise")}
    return figures


def bench_figures(bench: dict) -> dict[str, dict]:
    """`rqlm bench` JSON (a trained latent LM and the baseline) -> per model (the latent LM under RQ_MODEL) and
    batch size: tokens/s, time to first token, peak memory, and the latent LM's speedup over the baseline in
    the same run; and parameters. The baseline's figures are its fastest way of generating at each batch size."""
    from rqlm.benchmarks.generation_tables import best_baseline

    shape = bench["shapes"][0]
    figures = {RQ_MODEL: {}, BASELINE: {}}
    for batch in BENCH_BATCHES:
        rq_rows = [r for r in shape["rows"] if r["batch_size"] == batch and r["way"] is None]
        if not rq_rows:
            continue
        rows = {RQ_MODEL: rq_rows[0], BASELINE: best_baseline(shape["rows"], shape["shape"], batch)}
        for model, row in rows.items():
            figures[model][f"tokens_per_second_batch{batch}"] = row["tokens_per_second"]
            figures[model][f"time_to_first_token_ms_batch{batch}"] = row["time_to_first_token_ms"]
            figures[model][f"peak_memory_mb_batch{batch}"] = row["peak_mb"]
        figures[BASELINE][f"generate_way_batch{batch}"] = rows[BASELINE]["way"]
        figures[RQ_MODEL][f"speedup_batch{batch}"] = (rows[RQ_MODEL]["tokens_per_second"]
                                                     / rows[BASELINE]["tokens_per_second"])
    (rq_parameters,) = shape["rq_parameters"].values()
    figures[RQ_MODEL]["parameters"] = rq_parameters["total"] - rq_parameters["vae"]
    figures[RQ_MODEL]["parameters_frozen_vae"] = rq_parameters["vae"]
    figures[BASELINE]["parameters"] = shape["baseline_parameters"]
    return figures


def training_conditions(run_dir: Path) -> dict:
    """A training run's steps, tokens and training minutes, from the last record of its metrics.jsonl."""
    from rqlm.reporting.plots import read_metrics

    trained = [r for r in read_metrics(run_dir) if "tokens_seen" in r]
    if not trained:
        return {"steps": 0, "tokens_seen": 0, "train_minutes": 0.0}
    last = trained[-1]
    return {"steps": last["step"], "tokens_seen": last["tokens_seen"], "train_minutes": last["train_seconds"] / 60}


def machine() -> dict:
    """What the figures were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def latent_lm_figures(out: Path, model: str) -> dict:
    """A latent LM's figures (keys of OUTPUTS): its evaluation's and its benchmark's."""
    _, evaluation, benchmark = OUTPUTS[model]
    figures = evaluation_figures(_read_json(out / evaluation / "evaluation.json"))[RQ_MODEL]
    return figures | bench_figures(_read_json(out / benchmark / "bench.json"))[RQ_MODEL]


def reads_codes(config: dict) -> bool:
    """Whether an RQ-Transformer (its config.json) reads the VAE's codes: the codes mode, or a tokens mode whose
    spatial input is not the token embeddings alone (then the RQ-VAE's figures are its too)."""
    return config["depth_output"] != "tokens" or config["spatial_input"] != "token_embeddings"


def collect_metrics(out: Path, stage_seconds: dict, budgets: dict, quick: bool, continuous: bool = False) -> dict:
    """Every figure of the run in DIR, with its conditions (see the module docstring for the sources): the
    baseline, both RQ modes, and with `continuous` the GIVT models (their sections GIVT and GIVT_ENERGY)."""
    evaluation = _read_json(out / "evaluation" / "evaluation.json")
    inspect = _read_json(out / "reconstruction" / "inspect.json")
    bench = _read_json(out / "benchmark" / "bench.json")
    latent_lms = (RQ_MODEL, RQ_CODES) + ((GIVT, GIVT_ENERGY) if continuous else ())
    metrics = {BASELINE: evaluation_figures(evaluation)[BASELINE] | bench_figures(bench)[BASELINE]}
    metrics |= {model: latent_lm_figures(out, model) for model in latent_lms}
    lm_configs = {model: _read_json(out / OUTPUTS[model][0] / "config.json") for model in (RQ_MODEL, RQ_CODES)}
    for model, config in lm_configs.items():
        if reads_codes(config):  # the RQ-VAE's reconstruction and code usage
            metrics[model].update(reconstruction_figures(inspect))
    if continuous:
        gaussian = reconstruction_figures(_read_json(out / "gaussian_reconstruction" / "inspect.json"))
        for model in (GIVT, GIVT_ENERGY):
            metrics[model].update(gaussian)
    tokens = lm_configs[RQ_MODEL]
    vae_config = _read_json(out / "vae" / "config.json")
    stages = TRAINING_STAGES | (CONTINUOUS_STAGES if continuous else {})
    metrics["conditions"] = {
        "machine": machine(),
        "quick": quick,
        "budget_minutes": budgets,
        "training": {stage: training_conditions(out / stage) for stage in stages},
        "stage_seconds": stage_seconds,
        "evaluation_tokens": evaluation["num_tokens"],
        "evaluation_blocks": evaluation["num_blocks"],
        "compression_factor": vae_config["compression_factor"],
        "num_quantizers": vae_config["num_quantizers"],
        "codebook_size": vae_config["codebook_size"],
        "tokens_mode": {k: tokens[k] for k in ("depth_num_layers", "depth_hidden_size", "token_decoder_context",
                                              "spatial_input")},
        "bench": {k: bench["setup"][k] for k in ("device", "threads", "dtype", "prompt_length", "load_average_before")}
        | {"new_tokens": bench["shapes"][0]["new_tokens"]},
        # every other latent LM is benchmarked in its own `rqlm bench` run, beside the baseline again
        "other_bench": {model: {"load_average_before": _read_json(out / OUTPUTS[model][2] / "bench.json")["setup"]
                                ["load_average_before"]} for model in latent_lms[1:]},
    }
    metrics["evaluation"], metrics["reconstruction"] = evaluation, inspect
    for model in latent_lms[1:]:
        metrics[f"{OUTPUTS[model][0]}_evaluation"] = _read_json(out / OUTPUTS[model][1] / "evaluation.json")
    if continuous:
        gaussian_vae = _read_json(out / "gaussian_vae" / "config.json")
        metrics["conditions"]["gaussian_vae"] = {k: gaussian_vae[k] for k in ("latent_dim", "kl_weight", "kl_clamp")}
        metrics["gaussian_reconstruction"] = _read_json(out / "gaussian_reconstruction" / "inspect.json")
    return metrics


# ----------------------------------------------------------------------------- samples and reconstruction


def held_out_blocks(tokenizer, block_size: int, compression_factor: int, count: int):
    """`count` held-out blocks of the embedded corpus, spread over its validation split, (count, T) LongTensor."""
    import torch

    from rqlm.data.loading import get_lm_datasets

    _, eval_blocks = get_lm_datasets(None, tokenizer, block_size=block_size, compression_factor=compression_factor)
    step = max(1, len(eval_blocks) // count)
    return torch.stack([eval_blocks[i * step]["input_ids"] for i in range(min(count, len(eval_blocks)))]).long()


FOLDERS = {BASELINE: "baseline"} | {model: folders[0] for model, folders in OUTPUTS.items()}  # model -> DIR/folder


def report_models(metrics: dict) -> list[str]:
    """The models of the run, in the table's column order."""
    return [model for model in COLUMNS if model in metrics]


def greedy_samples(out: Path, blocks, models: tuple[str, ...] = (BASELINE, RQ_MODEL, RQ_CODES)) -> list[dict]:
    """The prompt (block start) and each model's greedy continuation (a GIVT head: its mean latent), as text."""
    import torch

    from rqlm.data.tokenizer import padding_id
    from rqlm.loading import load_folder_tokenizer, load_model, read_config

    tokenizer = load_folder_tokenizer(str(out / "lm"))
    prompts = blocks[:, :SAMPLE_PROMPT_TOKENS]
    pad = padding_id(tokenizer)
    samples = [{"prompt": tokenizer.decode(p)} for p in prompts]
    for model in models:
        folder = out / FOLDERS[model]
        lm = load_model(str(folder), read_config(str(folder), "--baseline" if model == BASELINE else "--model"))
        with torch.no_grad():
            ids = lm.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=SAMPLE_NEW_TOKENS,
                              do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
        for sample, row in zip(samples, ids[:, prompts.shape[1]:]):
            sample[model] = tokenizer.decode(row, skip_special_tokens=True)
    return samples


def reconstruction_diffs(out: Path, blocks) -> list[dict]:
    """Each held-out block's first DIFF_TOKENS tokens: the original text and the reconstruction with the tokens
    that differ marked (`rqlm inspect`'s HTML rendering), and how many matched."""
    import torch

    from rqlm import RQVAEModel
    from rqlm.data.tokenizer import load_tokenizer
    from rqlm.reporting.marking import marked_text

    tokenizer = load_tokenizer(out / "vae")
    vae = RQVAEModel.from_pretrained(out / "vae").eval()
    with torch.no_grad():
        reconstructed = vae(blocks).logits.argmax(-1)
    diffs = []
    for original, recon in zip(blocks[:, :DIFF_TOKENS].tolist(), reconstructed[:, :DIFF_TOKENS].tolist()):
        diffs.append({
            "original": tokenizer.decode(original),
            "marked": marked_text(tokenizer, original, recon, "html"),
            "matched": sum(a == b for a, b in zip(original, recon)),
            "tokens": len(original),
        })  # fmt: skip
    return diffs


# ----------------------------------------------------------------------------- markdown


def number(value) -> str:
    """A figure as the table shows it: 'n/a' when missing, 1.234 / 136.2 / 486,747 by size."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"


def percent(value) -> str:
    return MISSING if value is None else f"{100 * value:.1f}%"


def millions(value) -> str:
    return MISSING if value is None else f"{value / 1e6:.2f}M"


def perplexity_cell(f: dict) -> str:
    """A held-out perplexity labelled as what it is: '136.2 (exact)', '64,080 (bound)', or '—' (none)."""
    if f.get("perplexity_kind") is None:
        return NOT_APPLICABLE
    return f"{number(f['perplexity'])} ({f['perplexity_kind']})"


def ratio_cell(value) -> str:
    """A ratio to the baseline's figure: '1.09×', '0.63×', '1,876×'."""
    if value is None:
        return MISSING
    return f"{value:.2f}×" if abs(value) < 100 else f"{number(value)}×"


def headline_columns(metrics: dict) -> list[str]:
    """The headline table's column labels (after the model's name)."""
    speedups = [b for b in BENCH_BATCHES if f"speedup_batch{b}" in metrics[RQ_MODEL]]
    return ["held-out perplexity", "/ baseline",
            f"judged perplexity of temperature-{JUDGED_TEMPERATURE:g} samples (by the baseline)", "distinct-2",
            "distinct-3", "repeated 3-grams",
            "speedup (tokens/s over the baseline's), batch " + " / ".join(map(str, speedups))]


def headline_rows(metrics: dict) -> list[tuple[str, list[str]]]:
    """(model name, its cells under `headline_columns`): a row per model, the baseline first."""
    speedups = [b for b in BENCH_BATCHES if f"speedup_batch{b}" in metrics[RQ_MODEL]]
    rows = []
    for model in report_models(metrics):
        f = metrics[model]
        likelihood_free = f.get("perplexity_kind") is None
        rows.append((COLUMNS[model], [
            perplexity_cell(f),
            "1" if model == BASELINE else NOT_APPLICABLE if likelihood_free else ratio_cell(f.get("perplexity_ratio")),
            number(f.get("judged_perplexity")), number(f.get("distinct_2")), number(f.get("distinct_3")),
            percent(f.get("repeated_3gram_rate")),
            "1" if model == BASELINE else " / ".join(ratio_cell(f.get(f"speedup_batch{b}")) for b in speedups),
        ]))
    return rows


def table_rows(metrics: dict) -> list[tuple[str, list[str]]]:
    """(row label, one cell per model of `report_models`) of the table of every figure."""
    models = report_models(metrics)
    k = metrics["conditions"]["codebook_size"]
    rows = []

    def row(label: str, cell) -> None:
        """A row whose cell for model m is cell(m, its figures); a None cell does not apply ('—')."""
        cells = [cell(m, metrics[m]) for m in models]
        rows.append((label, [NOT_APPLICABLE if c is None else c for c in cells]))

    def brier(m: str, f: dict) -> str:
        if f.get("brier_lm") is None:
            return MISSING
        parts = " / ".join(number(f.get(f"brier_{n}")) for n in range(1, 5))
        return f"{number(f['brier_lm'])} ({parts})"

    def usage(m: str, f: dict):
        depths = f.get("usage_perplexity_by_depth")
        return " · ".join(f"d{d} {p:.0f}" for d, p in enumerate(depths)) if depths else None

    def parameters(m: str, f: dict) -> str:
        frozen = f.get("parameters_frozen_vae")
        return millions(f["parameters"]) + ("" if frozen is None else f" + {millions(frozen)}")

    def figure(name: str):
        return lambda m, f: number(f[name])

    def speedup(batch: int):
        return lambda m, f: None if m == BASELINE else f"{f[f'speedup_batch{batch}']:.2f}×"

    row("bits per token (exact, or the bound's: see the headline table)",
        lambda m, f: None if f.get("perplexity_kind") is None else number(f["bits_per_token"]))
    row("BrierLM ×100 (Brier-1 / 2 / 3 / 4)", brier)
    row("reconstruction accuracy of the VAE the model reads (held-out tokens)",
        lambda m, f: percent(f["reconstruction_accuracy"]) if "reconstruction_accuracy" in f else None)
    if any("reconstruction_accuracy_sampled" in metrics[m] for m in models):
        row("reconstruction accuracy, decoding a posterior sample",
            lambda m, f: percent(f["reconstruction_accuracy_sampled"]) if "reconstruction_accuracy_sampled" in f
            else None)
    row(f"codebook usage perplexity per depth (of K = {k})", usage)
    for batch in BENCH_BATCHES:
        if f"tokens_per_second_batch{batch}" not in metrics[RQ_MODEL]:
            continue
        row(f"tokens/s, batch {batch}", figure(f"tokens_per_second_batch{batch}"))
        row(f"speedup over the baseline, batch {batch} (its tokens/s in the same `rqlm bench` run)", speedup(batch))
        row(f"time to first token, batch {batch} (ms)", figure(f"time_to_first_token_ms_batch{batch}"))
        row(f"peak memory, batch {batch} (MB)", figure(f"peak_memory_mb_batch{batch}"))
    row("parameters (latent LMs: trained; + the frozen VAE in the checkpoint)", parameters)
    return rows


def markdown_table(corner: str, columns: list[str], rows: list[tuple[str, list[str]]]) -> str:
    """A markdown table: `corner` over the labels and the columns' names, then a row per (label, cells), the
    cells right-aligned."""
    lines = [f"| {corner} | ".replace("|  |", "| |") + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    return "\n".join(lines + [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows])


def conditions_text(metrics: dict) -> str:
    """The conditions every figure depends on, as a markdown list."""
    c = metrics["conditions"]
    m, bench, tokens = c["machine"], c["bench"], c["tokens_mode"]
    lines = [
        f"- machine: {m['cpu']}, {m['cpu_count']} CPUs, torch {m['torch']} ({m['device']}), {m['platform']}",
        (f"- model: C = {c['compression_factor']} tokens per latent position; the codes mode writes D = "
         f"{c['num_quantizers']} residual codes of K = {c['codebook_size']} per position, which the frozen RQ-VAE "
         f"decodes to tokens (its perplexity is an upper bound); the tokens mode's {tokens['depth_num_layers']}-layer "
         f"token decoder (width {tokens['depth_hidden_size']}) writes the C tokens from the spatial state and the "
         f"{tokens['token_decoder_context']} tokens before the chunk (its perplexity is exact; spatial input: "
         f"{tokens['spatial_input'].replace('_', ' ')}); both modes' spatial layers start from the baseline"),
    ]
    if "gaussian_vae" in c:
        g = c["gaussian_vae"]
        lines.append(f"- continuous latents: a Gaussian VAE with d = {g['latent_dim']} per latent position (KL weight "
                     f"{g['kl_weight']:g}, per-dimension KL clamped below at {g['kl_clamp']:g} nats), the GIVT "
                     "models' spatial layers started from the baseline as the RQ-Transformer's; the Gaussian head's "
                     "perplexity is the ELBO bound, the energy head has none (likelihood-free)")
    for stage, label in (TRAINING_STAGES | CONTINUOUS_STAGES).items():
        if stage not in c["training"]:
            continue
        t = c["training"][stage]
        budget = c["budget_minutes"].get(stage)
        limit = f"--max_minutes {budget:g}" if budget is not None else "a step limit (--quick)"
        lines.append(f"- {label}: {t['steps']:,} steps, {t['tokens_seen']:,} tokens, "
                     f"{t['train_minutes']:.1f} minutes of training time ({limit})")
    lines.append(f"- held-out evaluation: {int(c['evaluation_blocks'])} blocks, {int(c['evaluation_tokens']):,} tokens "
                 "of the embedded corpus's validation split, the same for every model")
    evaluation = metrics["evaluation"]
    if "judged_num_prompts" in evaluation:
        lines.append(f"- judged quality: {int(evaluation['judged_num_prompts'])} held-out prompts, each model's "
                     f"continuation sampled at temperature {JUDGED_TEMPERATURE:g} and scored by the baseline (lower "
                     "is likelier to it; a repetitive text scores low too, so distinct-2 / distinct-3, the fractions "
                     "of distinct 2- and 3-grams, and the rate of repeated 3-grams stand beside it)")
    if "brier_num_prefixes" in evaluation:
        lines.append(f"- BrierLM: {int(evaluation['brier_num_prefixes'])} held-out prefixes, two samples of "
                     "4 tokens each per prefix and model (`rqlm evaluate`; standard errors in metrics.json)")
    lines.append(f"- speed: `rqlm bench` on {bench['device']}, {bench['threads']} torch thread(s), {bench['dtype']}, "
                 f"{bench['prompt_length']}-token prompts, {bench['new_tokens']} new tokens, load average "
                 f"{bench['load_average_before']:.1f} before; the baseline's fastest way of generating at each batch "
                 "size; peak memory = weights and buffers + the highest allocation during generate")
    if c["other_bench"]:
        loads = ", ".join(f"{b['load_average_before']:.1f}" for b in c["other_bench"].values())
        names = ", ".join(COLUMNS[model] for model in c["other_bench"])
        lines.append(f"- {names}: benchmarked in a `rqlm bench` run of its own, the same settings, beside the "
                     f"baseline measured again in that run, whose figure its speedup is against (load averages "
                     f"{loads} before)")
    seconds = c["stage_seconds"]
    if seconds:
        lines.append("- stage wall-clock seconds: " + ", ".join(f"{k} {v:,.0f}" for k, v in seconds.items())
                     + f" (total {sum(seconds.values()) / 60:.1f} minutes)")
    if c["quick"]:
        lines.append("- **--quick**: a smoke run of a few steps per stage; its figures say nothing about quality")
    return "\n".join(lines)


def run_warnings(metrics: dict) -> list[str]:
    """What the report must say before its figures: stages that made far fewer steps than on an idle machine (so
    their models are under-trained and the comparison skewed), and a run over the demo's 15 minutes."""
    c = metrics["conditions"]
    if c["quick"]:
        return []
    warnings = []
    for stage, idle in IDLE_STEPS_PER_MINUTE.items():
        t = c["training"].get(stage)
        if not t or t["train_minutes"] <= 0:
            continue
        rate = t["steps"] / t["train_minutes"]
        if rate < SLOW_FRACTION * idle:
            label = (TRAINING_STAGES | CONTINUOUS_STAGES)[stage]
            warnings.append(
                f"{label} made {t['steps']:,} steps ({rate:,.0f} a minute; an idle 2-core CPU makes about {idle:,}): "
                "the machine was busy or slower, so this model is under-trained and its figures are not comparable "
                "to docs/results/demo.md"
            )
    total = sum(c["stage_seconds"].values()) / 60
    if total > DEMO_MINUTES:
        warnings.append(f"the run took {total:.1f} minutes, past the {DEMO_MINUTES} an idle 2-core CPU needs")
    return warnings


def render_report(metrics: dict, samples: list[dict], diffs: list[dict], plots: dict[str, str]) -> str:
    """report.md's text."""
    models = report_models(metrics)
    heads = {GIVT: "GIVT's Gaussian head", GIVT_ENERGY: "CALM's energy head"}
    continuous = [heads[m] for m in models if m in heads]
    parts = [
        "# rqlm demo report",
        ("The RQ-Transformer in both modes, its spatial layers started from the baseline, beside the Qwen3 baseline "
         "it was built on, on the same held-out tokens: the tokens mode (train-lm's default: a token decoder writes "
         "each chunk's C tokens; exact perplexity) and the codes mode (a depth decoder writes each chunk's D "
         "residual codes, which the frozen RQ-VAE decodes; a perplexity bound)"
         + (f", and the continuous latent LMs over a Gaussian VAE ({' / '.join(continuous)})" if continuous else "")
         + ". Every number comes from this run (all of them in `metrics.json`)."),
        *(f"> **Warning**: {w}." for w in metrics.get("warnings", [])),
        markdown_table("model", headline_columns(metrics), headline_rows(metrics)),
        "Every figure, a column per model:",
        markdown_table("", [COLUMNS[m] for m in models], table_rows(metrics)),
        "## Conditions",
        conditions_text(metrics),
        "## Sample continuations",
        (f"Greedy decoding (no sampling) of {SAMPLE_NEW_TOKENS} new tokens after the first {SAMPLE_PROMPT_TOKENS} "
        "tokens of held-out blocks, the same prompts for every model"
         + (" (a GIVT head: its mean latent each step)." if continuous else ".")),
    ]
    for i, sample in enumerate(samples):
        parts.append(f"**Prompt {i}:**\n\n```\n{sample['prompt']}\n```" + "".join(
            f"\n\n**{COLUMNS[m]}:**\n\n```\n{sample[m]}\n```" for m in models if m in sample))
    parts += ["## Reconstruction of held-out text",
              (f"The RQ-VAE's reconstruction of the first {DIFF_TOKENS} tokens of held-out blocks; "
              "<mark>marked</mark> tokens differ from the original (hover: the original token).")]
    for i, diff in enumerate(diffs):
        parts.append(f"**Block {i}: {diff['matched']}/{diff['tokens']} tokens reconstructed.** Original:\n\n"
                     f"```\n{diff['original']}\n```\n\nReconstruction:\n\n<pre>{diff['marked']}</pre>")
    parts += ["## Plots"] + [f"- [{title}]({path})\n\n  ![{title}]({path})" for title, path in plots.items()]
    return "\n\n".join(parts) + "\n"


def final_figures(metrics: dict) -> dict[str, tuple[float, str]]:
    """Training stage -> (the figure the tables show of its model, as they write it), drawn at the end of the
    stage's held-out curve: the curve is the training loop's few held-out batches, the tables' figure
    `rqlm evaluate`'s (or `rqlm inspect`'s) on every held-out block."""
    finals = {"baseline": (metrics[BASELINE]["perplexity"], number(metrics[BASELINE]["perplexity"]))}
    for stage, model in (("lm", RQ_MODEL), ("lm_codes", RQ_CODES), (GIVT, GIVT)):
        if model in metrics and metrics[model].get("perplexity") is not None:
            finals[stage] = (metrics[model]["perplexity"], number(metrics[model]["perplexity"]))
    accuracy = metrics["reconstruction"]["accuracy"]
    finals["vae"] = (accuracy, percent(accuracy))
    if "gaussian_reconstruction" in metrics:
        accuracy = metrics["gaussian_reconstruction"]["accuracy"]
        finals["gaussian_vae"] = (accuracy, percent(accuracy))
    return finals


def write_plots(out: Path, metrics: dict) -> dict[str, str]:
    """The report's PNGs under DIR/plots -> {title: path relative to DIR}."""
    from rqlm.reporting.report_plots import plot_codebook_usage, plot_position_accuracy, plot_stage_curves

    plots = out / "plots"
    rq = reconstruction_figures(metrics["reconstruction"])  # the RQ-VAE's (the codes mode reads it)
    vaes = {"RQ-VAE": rq} | ({"Gaussian VAE": metrics[GIVT]} if GIVT in metrics else {})  # its VAE's figures
    written = {
        "training curves of every stage": plot_stage_curves({s: out / s for s in metrics["conditions"]["training"]},
                                                            plots / "training_curves.png", final_figures(metrics)),
        "codebook usage per depth": plot_codebook_usage(rq["usage_perplexity_by_depth"], rq["dead_fraction_by_depth"],
                                                        metrics["conditions"]["codebook_size"],
                                                        plots / "codebook_usage.png"),
        "reconstruction accuracy by position in a chunk": plot_position_accuracy(
            {vae: f["reconstruction_accuracy_by_position"] for vae, f in vaes.items()},
            {vae: f["reconstruction_accuracy"] for vae, f in vaes.items()}, plots / "position_accuracy.png"),
    }
    return {title: str(path.relative_to(out)) for title, path in written.items()}


def write_report(out: str | Path, stage_seconds: dict, budgets: dict, block_size: int, quick: bool = False,
                 continuous: bool = False) -> Path:
    """DIR/metrics.json, DIR/plots/*.png and DIR/report.md from the outputs of a finished demo run in DIR
    (`block_size`: the run's, whose held-out blocks give the sample prompts and the reconstruction diff;
    `continuous`: the run has the GIVT models' stages too)."""
    from rqlm.data.tokenizer import load_tokenizer

    out = Path(out)
    metrics = collect_metrics(out, stage_seconds, budgets, quick, continuous)
    metrics["warnings"] = run_warnings(metrics)
    blocks = held_out_blocks(load_tokenizer(out / "lm"), block_size, metrics["conditions"]["compression_factor"],
                             NUM_SAMPLES)
    samples, diffs = greedy_samples(out, blocks, report_models(metrics)), reconstruction_diffs(out, blocks)
    metrics["samples"] = [dict(s, decoding="greedy") for s in samples]
    plots = write_plots(out, metrics)
    metrics["plots"] = plots
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    report = out / "report.md"
    report.write_text(render_report(metrics, samples, diffs, plots))
    return report
