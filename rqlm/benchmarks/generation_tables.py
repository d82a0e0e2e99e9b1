"""The markdown tables and summary lines of `rqlm bench`'s generation results (`benchmark_shape`'s rows)."""

from __future__ import annotations

from rqlm.benchmarks.generation_parts import PARTS


def best_baseline(rows: list[dict], shape: str, batch: int) -> dict:
    """The fastest baseline row at (shape, batch)."""
    rows = [r for r in rows if r["shape"] == shape and r["batch_size"] == batch and r["way"]]
    return max(rows, key=lambda r: r["tokens_per_second"])


def summary_lines(result: dict, shape: str, compression_factor: int = 4) -> list[str]:
    """One line per batch size: the autoregressive RQ model at C against the fastest baseline."""
    lines = []
    rows = [r for r in result["rows"] if r["shape"] == shape]
    for batch in sorted({r["batch_size"] for r in rows}):
        rq = [
            r
            for r in rows
            if r["batch_size"] == batch
            and r["compression_factor"] == compression_factor
            and r["depth_mode"] == "autoregressive"
        ]
        if not rq:
            continue
        base = best_baseline(rows, shape, batch)
        lines.append(
            f"speedup batch {batch} C={compression_factor}: {rq[0]['tokens_per_second'] / base['tokens_per_second']:.2f}x "
            f"(RQ {rate(rq[0]['tokens_per_second'])} tok/s, baseline {rate(base['tokens_per_second'])} tok/s)"
        )
    for r in rows:  # the continuous latent LMs, when measured
        if r.get("head") is not None and r["compression_factor"] == compression_factor:
            base = best_baseline(rows, shape, r["batch_size"])
            lines.append(
                f"speedup batch {r['batch_size']} {r['model']}: {r['tokens_per_second'] / base['tokens_per_second']:.2f}x "
                f"({rate(r['tokens_per_second'])} tok/s, baseline {rate(base['tokens_per_second'])} tok/s)"
            )
    return lines


def rate(tokens_per_second: float) -> str:
    """Whole tokens/s, with one decimal below 10 so a slow CPU run does not print 0."""
    return f"{tokens_per_second:.0f}" if tokens_per_second >= 10 else f"{tokens_per_second:.1f}"


def _steps(row: dict) -> int:
    return -(-row["new_tokens"] // row["compression_factor"])


def ms_per_step(row: dict) -> float:
    """Milliseconds per decoding step after the first (one token for the baseline, one chunk of C for RQ)."""
    steps = _steps(row)
    after_first = row["seconds"] - row["time_to_first_token_ms"] / 1000
    return 1000 * after_first / max(steps - 1, 1)


def decode_tokens_per_second(row: dict) -> float:
    """New tokens/s after the first step: C tokens per RQ step, one per baseline step, times the batch."""
    per_step = min(row["compression_factor"], row["new_tokens"]) * row["batch_size"]
    return 1000 * per_step / ms_per_step(row) if _steps(row) > 1 else float("nan")


def format_tables(result: dict) -> str:
    """The speed table, the RQ per-step split, parameter counts, and the trained model's perplexity bound."""
    return "\n".join([setup_line(result["setup"]), "", *speed_table(result), "", *parts_table(result), "",
                      *parameter_table(result)])  # fmt: skip


def setup_line(s: dict) -> str:
    """One line saying how the runs were made (decoding, prompts, dtype, machine, load) and what each figure means."""
    return (
        f"Generation: greedy, KV caches on both, {s['prompt_length']}-token prompts, EOS ignored; {s['dtype']}, "
        f"{s['device']}, {s['threads']} threads, load average {s['load_average_before']:.1f} -> "
        f"{s.get('load_average_after', s['load_average_before']):.1f} on {s['cpu_count']} CPUs; "
        f"median of {s['repeats']}; tok/s = all new tokens / generate's wall time, decode tok/s leaves out the "
        f"first step (prefill); speedup = tok/s against the fastest baseline at the same shape and batch"
    )


def speed_table(result: dict) -> list[str]:
    """One row per measured run: tokens/s, decode tokens/s, TTFT, ms/step, memory and speedup."""
    lines = [
        "| shape | model | batch | new tokens | tok/s | decode tok/s | TTFT ms | ms/step | peak MB "
        + "| KV cache MB | speedup |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for shape in result["shapes"]:
        for r in shape["rows"]:
            best = best_baseline(shape["rows"], r["shape"], r["batch_size"])
            name = r["model"] + (f" ({r['way']})" if r["way"] else "")
            peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:,.0f}"
            lines.append(
                f"| {r['shape']} | {name} | {r['batch_size']} | {r['new_tokens']} | {r['tokens_per_second']:,.1f} "
                f"| {decode_tokens_per_second(r):,.1f} | {r['time_to_first_token_ms']:,.0f} | {ms_per_step(r):,.1f} | {peak} | {r['kv_cache_mb']:,.2f} "
                f"| {r['tokens_per_second'] / best['tokens_per_second']:.2f}x |"
            )
    return lines


def parts_table(result: dict) -> list[str]:
    """The latent LMs' per-step time split into `PARTS`, as shares."""
    lines = [
        "Latent LMs, share of the per-step time (one step = one spatial position = C tokens; GIVT heads: sampling):",
        "",
        "| shape | model | batch | ms/step | " + " | ".join(PARTS) + " |",
        "|---|---|---:|---:|" + "---:|" * len(PARTS),
    ]
    for shape in result["shapes"]:
        for r in shape["rows"]:
            if r["parts_ms"] is None:
                continue
            total = sum(r["parts_ms"].values())
            shares = " | ".join(f"{100 * r['parts_ms'][p] / total:.0f}%" for p in PARTS)
            lines.append(f"| {r['shape']} | {r['model']} | {r['batch_size']} | {total:,.1f} | {shares} |")
    return lines


def parameter_table(result: dict) -> list[str]:
    """Parameter counts per shape, then the compile warm-up and the trained model's perplexities where measured."""
    lines = [
        "| shape | model | parameters | spatial transformer | frozen VAE |",
        "|---|---|---:|---:|---:|",
    ]
    for shape in result["shapes"]:
        lines.append(
            f"| {shape['shape']} | Qwen3 baseline | {shape['baseline_parameters'] / 1e6:,.1f}M | - | - |"
        )
        for name, p in shape["rq_parameters"].items():
            lines.append(
                f"| {shape['shape']} | {name} | {p['total'] / 1e6:,.1f}M | {p['spatial'] / 1e6:,.1f}M "
                f"| {p['vae'] / 1e6:,.1f}M |"
            )
        if "compile_seconds" in shape:
            compiled = ", ".join(f"batch {b}: {t:.0f} s" for b, t in shape["compile_seconds"].items())
            lines.append(f"\n{shape['shape']}: torch.compile warm-up (first call, not timed) {compiled}")
        if "evaluation" in shape:
            e = shape["evaluation"]
            lines.append(
                f"\n{shape['shape']} (trained): perplexity bound {e['perplexity_bound']:,.1f}, "
                f"baseline perplexity {e['baseline_perplexity']:,.1f}"
            )
    return lines
