"""The demo's report: every figure of one `rqlm demo` run, read from the files its stages wrote.

    DIR/evaluation/evaluation.json  (rqlm evaluate)  perplexity (bound), bits/token, BrierLM, judged quality
    DIR/reconstruction/inspect.json (rqlm inspect)   reconstruction accuracy (per chunk position), usage per depth
    DIR/benchmark/bench.json        (rqlm bench)     tokens/s, time to first token, peak memory, parameters
    DIR/{baseline,vae,lm}/metrics.jsonl              steps, tokens, training time (the conditions)
    -> DIR/metrics.json (all of them), DIR/plots/*.png, and DIR/report.md: the RQ model and the baseline side by
       side, greedy continuations of the same held-out prompts, the reconstruction diff of held-out text.

A figure the run did not produce (e.g. BrierLM before `rqlm evaluate` has it) is null in metrics.json and
'n/a' in the table.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

BENCH_BATCHES = (1, 8)
RQ_MODEL = "rq"
BASELINE = "baseline"
TRAINING_STAGES = {"baseline": "Qwen3 baseline", "vae": "RQ-VAE", "lm": "RQ-Transformer"}
NUM_SAMPLES = 2  # held-out prompts continued by both models
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


def evaluation_figures(evaluation: dict) -> dict[str, dict]:
    """`rqlm evaluate` JSON -> per model: perplexity, bits per token, BrierLM (and Brier-1..4), judged perplexity."""
    figures = {RQ_MODEL: {}, BASELINE: {}}
    for model, prefix in ((RQ_MODEL, ""), (BASELINE, "baseline_")):
        figures[model]["perplexity"] = evaluation["perplexity_bound" if model == RQ_MODEL else "baseline_perplexity"]
        figures[model]["bits_per_token"] = evaluation[f"{prefix}bits_per_token"]
        for name in ("brier_lm", "brier_1", "brier_2", "brier_3", "brier_4"):
            figures[model][name] = evaluation.get(f"{prefix}{name}")
        who = "rq" if model == RQ_MODEL else "baseline"
        figures[model]["judged_perplexity"] = evaluation.get(f"judged_perplexity_{who}_samples")
    return figures


def reconstruction_figures(inspect: dict) -> dict:
    """`rqlm inspect` JSON -> accuracy, accuracy by chunk position, usage perplexity and unused codes per depth."""
    positions = sorted(int(k.removeprefix("accuracy_pos")) for k in inspect if k.startswith("accuracy_pos"))
    depths = sorted(int(k.removeprefix("usage_perplexity_d")) for k in inspect
                    if k.startswith("usage_perplexity_d") and k.removeprefix("usage_perplexity_d").isdigit())
    return {
        "reconstruction_accuracy": inspect["accuracy"],
        "reconstruction_accuracy_by_position": [inspect[f"accuracy_pos{p}"] for p in positions],
        "usage_perplexity_by_depth": [inspect[f"usage_perplexity_d{d}"] for d in depths],
        "dead_fraction_by_depth": [inspect[f"dead_fraction_d{d}"] for d in depths],
    }


def bench_figures(bench: dict) -> dict[str, dict]:
    """`rqlm bench` JSON (trained models) -> per model and batch size: tokens/s, time to first token, peak memory;
    and parameters. The baseline's figures are its fastest way of generating at each batch size."""
    from rqlm.evaluation.generation_speed import best_baseline

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
    (rq_parameters,) = shape["rq_parameters"].values()
    figures[RQ_MODEL]["parameters"] = rq_parameters["total"] - rq_parameters["vae"]
    figures[RQ_MODEL]["parameters_frozen_vae"] = rq_parameters["vae"]
    figures[BASELINE]["parameters"] = shape["baseline_parameters"]
    return figures


def training_conditions(run_dir: Path) -> dict:
    """A training run's steps, tokens and training minutes, from the last record of its metrics.jsonl."""
    from rqlm.evaluation.plots import read_metrics

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


def collect_metrics(out: Path, stage_seconds: dict, budgets: dict, quick: bool) -> dict:
    """Every figure of the run in DIR, with its conditions (see the module docstring for the sources)."""
    evaluation = _read_json(out / "evaluation" / "evaluation.json")
    inspect = _read_json(out / "reconstruction" / "inspect.json")
    bench = _read_json(out / "benchmark" / "bench.json")
    metrics = evaluation_figures(evaluation)
    metrics[RQ_MODEL].update(reconstruction_figures(inspect))
    for model, figures in bench_figures(bench).items():
        metrics[model].update(figures)
    vae_config = _read_json(out / "vae" / "config.json")
    metrics["conditions"] = {
        "machine": machine(),
        "quick": quick,
        "budget_minutes": budgets,
        "training": {stage: training_conditions(out / stage) for stage in TRAINING_STAGES},
        "stage_seconds": stage_seconds,
        "evaluation_tokens": evaluation["num_tokens"],
        "evaluation_blocks": evaluation["num_blocks"],
        "compression_factor": vae_config["compression_factor"],
        "num_quantizers": vae_config["num_quantizers"],
        "codebook_size": vae_config["codebook_size"],
        "bench": {k: bench["setup"][k] for k in ("device", "threads", "dtype", "prompt_length", "load_average_before")}
        | {"new_tokens": bench["shapes"][0]["new_tokens"]},
    }
    metrics["evaluation"], metrics["reconstruction"] = evaluation, inspect
    return metrics


# ----------------------------------------------------------------------------- samples and reconstruction


def held_out_blocks(tokenizer, block_size: int, compression_factor: int, count: int):
    """`count` held-out blocks of the embedded corpus, spread over its validation split, (count, T) LongTensor."""
    import torch

    from rqlm.data.loading import get_lm_datasets

    _, eval_blocks = get_lm_datasets(None, tokenizer, block_size=block_size, compression_factor=compression_factor)
    step = max(1, len(eval_blocks) // count)
    return torch.stack([eval_blocks[i * step]["input_ids"] for i in range(min(count, len(eval_blocks)))]).long()


def greedy_samples(out: Path, blocks) -> list[dict]:
    """The prompt (block start) and each model's greedy continuation, as text."""
    import torch

    from rqlm.commands.generate import load_folder_tokenizer, load_model, read_config

    tokenizer = load_folder_tokenizer(str(out / "lm"))
    prompts = blocks[:, :SAMPLE_PROMPT_TOKENS]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    samples = [{"prompt": tokenizer.decode(p)} for p in prompts]
    for model, folder, role in ((RQ_MODEL, out / "lm", "--model"), (BASELINE, out / "baseline", "--baseline")):
        lm = load_model(str(folder), read_config(str(folder), role))
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
    from rqlm.commands.inspect import marked_text
    from rqlm.data.tokenizer import load_tokenizer

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


def table_rows(metrics: dict) -> list[tuple[str, str, str]]:
    """(row label, RQ cell, baseline cell) of the comparison table."""
    rq, base, conditions = metrics[RQ_MODEL], metrics[BASELINE], metrics["conditions"]
    k = conditions["codebook_size"]

    def brier(figures: dict) -> str:
        if figures.get("brier_lm") is None:
            return MISSING
        parts = " / ".join(number(figures.get(f"brier_{n}")) for n in range(1, 5))
        return f"{number(figures['brier_lm'])} ({parts})"

    usage = " · ".join(f"d{d} {p:.0f}" for d, p in enumerate(rq["usage_perplexity_by_depth"]))
    rows = [
        ("perplexity (RQ: upper bound)", number(rq["perplexity"]), number(base["perplexity"])),
        ("bits per token (RQ: bound)", number(rq["bits_per_token"]), number(base["bits_per_token"])),
        ("BrierLM ×100 (Brier-1 / 2 / 3 / 4)", brier(rq), brier(base)),
        ("judged perplexity of sampled continuations (by the baseline)", number(rq.get("judged_perplexity")),
         number(base.get("judged_perplexity"))),
        ("reconstruction accuracy (held-out tokens)", percent(rq["reconstruction_accuracy"]), NOT_APPLICABLE),
        (f"codebook usage perplexity per depth (of K = {k})", usage, NOT_APPLICABLE),
    ]
    for batch in BENCH_BATCHES:
        if f"tokens_per_second_batch{batch}" not in rq:
            continue
        rows += [
            (f"tokens/s, batch {batch}", number(rq[f"tokens_per_second_batch{batch}"]),
             number(base[f"tokens_per_second_batch{batch}"])),
            (f"time to first token, batch {batch} (ms)", number(rq[f"time_to_first_token_ms_batch{batch}"]),
             number(base[f"time_to_first_token_ms_batch{batch}"])),
            (f"peak memory, batch {batch} (MB)", number(rq[f"peak_memory_mb_batch{batch}"]),
             number(base[f"peak_memory_mb_batch{batch}"])),
        ]  # fmt: skip
    rows.append(("parameters (RQ: trained; + the frozen RQ-VAE)",
                 f"{millions(rq['parameters'])} + {millions(rq['parameters_frozen_vae'])}",
                 millions(base["parameters"])))
    return rows


def conditions_text(metrics: dict) -> str:
    """The conditions every figure depends on, as a markdown list."""
    c = metrics["conditions"]
    m, bench = c["machine"], c["bench"]
    lines = [
        f"- machine: {m['cpu']}, {m['cpu_count']} CPUs, torch {m['torch']} ({m['device']}), {m['platform']}",
        (f"- model: C = {c['compression_factor']} tokens per latent position, D = {c['num_quantizers']} residual "
        f"depths, K = {c['codebook_size']} codes per depth"),
    ]
    for stage, label in TRAINING_STAGES.items():
        t = c["training"][stage]
        budget = c["budget_minutes"].get(stage)
        limit = f"--max_minutes {budget:g}" if budget is not None else "a step limit (--quick)"
        lines.append(f"- {label}: {t['steps']:,} steps, {t['tokens_seen']:,} tokens, "
                     f"{t['train_minutes']:.1f} minutes of training time ({limit})")
    lines.append(f"- held-out evaluation: {int(c['evaluation_blocks'])} blocks, {int(c['evaluation_tokens']):,} tokens "
                 "of the embedded corpus's validation split")
    evaluation = metrics["evaluation"]
    if "brier_num_prefixes" in evaluation:
        lines.append(f"- BrierLM: {int(evaluation['brier_num_prefixes'])} held-out prefixes, two samples of "
                     "4 tokens each per prefix and model (`rqlm evaluate`; standard errors in metrics.json)")
    lines.append(f"- speed: `rqlm bench` on {bench['device']}, {bench['threads']} torch thread(s), {bench['dtype']}, "
                 f"{bench['prompt_length']}-token prompts, {bench['new_tokens']} new tokens, load average "
                 f"{bench['load_average_before']:.1f} before; the baseline's fastest way of generating at each batch "
                 "size; peak memory = weights and buffers + the highest allocation during generate")
    seconds = c["stage_seconds"]
    if seconds:
        lines.append("- stage wall-clock seconds: " + ", ".join(f"{k} {v:,.0f}" for k, v in seconds.items())
                     + f" (total {sum(seconds.values()) / 60:.1f} minutes)")
    if c["quick"]:
        lines.append("- **--quick**: a smoke run of a few steps per stage; its figures say nothing about quality")
    return "\n".join(lines)


def render_report(metrics: dict, samples: list[dict], diffs: list[dict], plots: dict[str, str]) -> str:
    """report.md's text."""
    table = ["| | RQ-Transformer | Qwen3 baseline |", "|---|---:|---:|"]
    table += [f"| {label} | {rq} | {base} |" for label, rq, base in table_rows(metrics)]
    parts = [
        "# rqlm demo report",
        ("The RQ-Transformer (a latent LM over RQ-VAE codes, its spatial layers started from the baseline) beside "
        "the Qwen3 baseline it was built on, on the same held-out tokens. Every number comes from this run "
        "(all of them in `metrics.json`)."),
        "\n".join(table),
        "## Conditions",
        conditions_text(metrics),
        "## Sample continuations",
        (f"Greedy decoding (no sampling) of {SAMPLE_NEW_TOKENS} new tokens after the first {SAMPLE_PROMPT_TOKENS} "
        "tokens of held-out blocks, the same prompts for both models."),
    ]
    for i, sample in enumerate(samples):
        parts.append(f"**Prompt {i}:**\n\n```\n{sample['prompt']}\n```\n\n**RQ-Transformer:**\n\n```\n{sample[RQ_MODEL]}"
                     f"\n```\n\n**Qwen3 baseline:**\n\n```\n{sample[BASELINE]}\n```")
    parts += ["## Reconstruction of held-out text",
              (f"The RQ-VAE's reconstruction of the first {DIFF_TOKENS} tokens of held-out blocks; "
              "<mark>marked</mark> tokens differ from the original (hover: the original token).")]
    for i, diff in enumerate(diffs):
        parts.append(f"**Block {i}: {diff['matched']}/{diff['tokens']} tokens reconstructed.** Original:\n\n"
                     f"```\n{diff['original']}\n```\n\nReconstruction:\n\n<pre>{diff['marked']}</pre>")
    parts += ["## Plots"] + [f"- [{title}]({path})\n\n  ![{title}]({path})" for title, path in plots.items()]
    return "\n\n".join(parts) + "\n"


def write_plots(out: Path, metrics: dict) -> dict[str, str]:
    """The report's PNGs under DIR/plots -> {title: path relative to DIR}."""
    from rqlm.evaluation.report_plots import plot_codebook_usage, plot_position_accuracy, plot_stage_curves

    plots = out / "plots"
    rq = metrics[RQ_MODEL]
    written = {
        "training curves of every stage": plot_stage_curves({s: out / s for s in TRAINING_STAGES},
                                                            plots / "training_curves.png"),
        "codebook usage per depth": plot_codebook_usage(rq["usage_perplexity_by_depth"], rq["dead_fraction_by_depth"],
                                                        metrics["conditions"]["codebook_size"],
                                                        plots / "codebook_usage.png"),
        "reconstruction accuracy by position in a chunk": plot_position_accuracy(
            rq["reconstruction_accuracy_by_position"], rq["reconstruction_accuracy"], plots / "position_accuracy.png"),
    }
    return {title: str(path.relative_to(out)) for title, path in written.items()}


def write_report(out: str | Path, stage_seconds: dict, budgets: dict, block_size: int, quick: bool = False) -> Path:
    """DIR/metrics.json, DIR/plots/*.png and DIR/report.md from the outputs of a finished demo run in DIR
    (`block_size`: the run's, whose held-out blocks give the sample prompts and the reconstruction diff)."""
    from rqlm.data.tokenizer import load_tokenizer

    out = Path(out)
    metrics = collect_metrics(out, stage_seconds, budgets, quick)
    blocks = held_out_blocks(load_tokenizer(out / "lm"), block_size, metrics["conditions"]["compression_factor"],
                             NUM_SAMPLES)
    samples, diffs = greedy_samples(out, blocks), reconstruction_diffs(out, blocks)
    metrics["samples"] = [dict(s, decoding="greedy") for s in samples]
    plots = write_plots(out, metrics)
    metrics["plots"] = plots
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    report = out / "report.md"
    report.write_text(render_report(metrics, samples, diffs, plots))
    return report
