"""Speed of lossless latent drafting at batch 1: the plain target, the RQ drafter alone, the target verified-with-RQ.

A draft head (RQDraftHead) drafts from the target's own state: it has no speed alone and no bound (both
"–"), and drafts at most C tokens a step (longer draft lengths are skipped for it).

For each prompt, greedy decoding with KV caches and EOS ignored (every run makes exactly the asked
number of new tokens), timed one after the other on the same machine:
  - `target.generate` (the reference output and speed);
  - `drafter.generate` (the RQ model alone, C tokens per step: its speed without the target's guarantee);
  - `generate_with_drafter(target, drafter)` (the target's output, drafts verified C at a time), checked
    identical to the reference, with its acceptance: new tokens per verification step (one target forward).
Figures are summed over the prompts: tokens/s = all new tokens / all generate wall time. Also per
drafter and draft length: the share of the verified run spent drafting, the share of drafted tokens the target kept, the drafter's
perplexity bound on the target's own greedy text (prompt and continuation: how well the drafter
models what it must predict), and the break-even acceptance: the tokens per step at which one
verification step, at its measured cost, takes as long as the target alone takes for those tokens
(speedup = acceptance / break-even).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from rqlm.benchmarks.speed import synchronize
from rqlm.drafting.assisted import assistant_drafting, forward_calls
from rqlm.drafting.verification import DraftStats, generate_with_drafter
from rqlm.evaluation.bound import bound_terms, perplexity_bound
from rqlm.evaluation.perplexity import safe_exp
from rqlm.kernels import cpu_kernels
from rqlm.modeling.modeling_rq_draft_head import RQDraftHead


@dataclass
class Drafter:
    """An RQ model (or an RQ draft head) to measure as a drafter, and how to name it in the tables."""

    name: str
    model: torch.nn.Module


def _timed(fn, device) -> tuple[torch.LongTensor, float]:
    """fn() under inference mode (every path alike: it is what generate_with_drafter and the RQ model's generate run
    in, and 4-6% faster than no_grad for the plain target too), with its wall time."""
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def held_out_prompts(tokenizer, count: int, length: int) -> list[torch.LongTensor]:
    """The first `count` held-out documents of the embedded corpus with at least `length` tokens, cut to their first
    `length` tokens (each (1, length)): the prompts `rqlm bench --drafting` drafts on (acceptance depends on the text)."""
    from rqlm.data.corpus import build_embedded_corpus

    prompts = []
    for text in build_embedded_corpus()["validation"]["text"]:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if ids.shape[1] >= length:
            prompts.append(ids[:, :length])
        if len(prompts) == count:
            break
    return prompts


def benchmark_drafting(
    target,
    drafters: list[Drafter],
    prompts: list[torch.LongTensor],
    new_tokens: int,
    device: torch.device | str = "cpu",
    num_draft_tokens: int | list[int | None] | None = None,
    log=print,
    kernels: bool = True,
) -> dict:
    """Every drafter, at every draft length, against the target over `prompts` (each (1, T0))
    -> {'target': row, 'rows': [...]}.

    `num_draft_tokens`: tokens drafted per step, or a list of them (None: the drafter's C).
    `kernels`: everything runs under `rqlm.kernels.cpu_kernels` (the verification's multi-row linears through oneDNN).
    """
    with cpu_kernels(target, *(d.model for d in drafters), enabled=kernels):
        return _benchmark_drafting(target, drafters, prompts, new_tokens, device, num_draft_tokens, log, kernels)


def _benchmark_drafting(target, drafters, prompts, new_tokens, device, num_draft_tokens, log, kernels):
    device = torch.device(device)
    lengths = num_draft_tokens if isinstance(num_draft_tokens, (list, tuple)) else [num_draft_tokens]
    greedy = {"max_new_tokens": new_tokens, "do_sample": False, "eos_token_id": None}
    pad = {"pad_token_id": target.generation_config.pad_token_id or 0}
    prompts = [p.to(device) for p in prompts]
    verified = greedy | pad
    target.generate(prompts[0], max_new_tokens=2, do_sample=False, eos_token_id=None, **pad)  # warm-up
    references, seconds = [], 0.0
    for ids in prompts:
        out, s = _timed(lambda ids=ids: target.generate(ids, **greedy, **pad), device)
        references.append(out)
        seconds += s
    made = sum(r.shape[1] - p.shape[1] for r, p in zip(references, prompts))
    result = {
        "new_tokens": new_tokens,
        "prompts": len(prompts),
        "prompt_length": prompts[0].shape[1],
        "cpu_kernels": kernels,
        "target": {"tokens_per_second": made / seconds, "seconds": seconds, "new_tokens": made},
        "rows": [],
    }
    log(f"  target: {made / seconds:,.1f} tok/s")
    for drafter in drafters:
        model = drafter.model.to(device).eval()
        c = model.compression_factor
        head = isinstance(model, RQDraftHead)  # drafts from the target's state: nothing to run alone, no bound
        assisted = getattr(model.config, "depth_output", None) == "tokens"  # exact q(token): transformers' path
        if head:
            alone = bound = float("nan")
        else:
            model.generate(prompts[0], max_new_tokens=c, do_sample=False, eos_token_id=None)  # warm-up
            alone = sum(_timed(lambda ids=ids, model=model: model.generate(ids, **greedy), device)[1] for ids in prompts)
            bound = _perplexity_on(model, references) if assisted else _bound_on(model, references)
        for length in lengths:
            if head and (length or c) > c:  # a head drafts one chunk per step
                continue
            row_of = _assisted_row if assisted else _verified_row
            row = row_of(target, model, prompts, references, length, verified, device)
            row |= {
                "drafter": drafter.name,
                "compression_factor": c,
                "draft_tokens": length or c,
                "rq_tokens_per_second": made / alone,
                "verified_tokens_per_second": made / row["seconds"],
                "speedup": (made / row["seconds"]) / result["target"]["tokens_per_second"],
                # tokens/step at which a verification step (draft + target forward), at its measured cost, pays for itself
                "break_even_acceptance": row["seconds"] / max(row["steps"], 1) * result["target"]["tokens_per_second"],
                "bound_on_target_text": bound,
            }
            result["rows"].append(row)
            log(
                f"  {drafter.name}, {row['draft_tokens']} drafted: alone {_number(made / alone)} "
                f"tok/s, verified {row['verified_tokens_per_second']:,.1f} tok/s, acceptance {row['acceptance']:.2f} tokens/step"
            )
    return result


def _verified_row(target, model, prompts, references, num_draft_tokens, settings, device) -> dict:
    """`generate_with_drafter` over every prompt: time, steps, acceptance, kept share, identical to the references."""
    steps = emitted = kept = drafted = 0
    verified = drafting = 0.0
    identical = True
    warm_up = settings | {"max_new_tokens": 2}  # as for the target and the drafter alone; also reorders the target's weights
    generate_with_drafter(target, model, prompts[0], num_draft_tokens=num_draft_tokens, **warm_up)
    for ids, reference in zip(prompts, references):
        stats = DraftStats()
        out, s = _timed(
            lambda ids=ids, stats=stats: generate_with_drafter(
                target, model, ids, num_draft_tokens=num_draft_tokens, stats=stats, **settings
            ),
            device,
        )
        verified += s
        drafting += stats.draft_seconds
        identical &= torch.equal(out, reference)
        steps += stats.steps
        emitted += sum(a + 1 for a in stats.accepted)
        kept += sum(stats.accepted)
        drafted += sum(len(d) for d in stats.drafts)
    return {
        "seconds": verified,
        "steps": steps,
        "acceptance": emitted / max(steps, 1),
        "kept_share": kept / max(drafted, 1),
        "drafting_share": drafting / verified,
        "identical": bool(identical),
    }


def _assisted_row(target, model, prompts, references, num_draft_tokens, settings, device) -> dict:
    """`target.generate(assistant_model=model)` over every prompt, as `_verified_row` measures its drafter.

    Steps are the target's forward calls (each verifies one draft), drafted tokens the assistant's forward calls
    that made a token (its prefill makes the first).
    """
    options = settings | {"assistant_model": model}
    with assistant_drafting(model, num_draft_tokens):
        target.generate(prompts[0], **(options | {"max_new_tokens": 2}))  # warm-up
        with forward_calls(target=target, assistant=model) as calls:
            seconds, emitted, identical = 0.0, 0, True
            for ids, reference in zip(prompts, references):
                out, s = _timed(lambda ids=ids: target.generate(ids, **options), device)
                seconds += s
                emitted += out.shape[1] - ids.shape[1]
                identical &= torch.equal(out, reference)
    steps = calls["target"]
    return {
        "seconds": seconds,
        "steps": steps,
        "acceptance": emitted / max(steps, 1),
        "kept_share": (emitted - steps) / max(calls["assistant"], 1),
        "drafted_tokens": calls["assistant"],
        "drafting_share": float("nan"),
        "identical": bool(identical),
    }


def _perplexity_on(model, references: list[torch.LongTensor]) -> float:
    """A tokens-mode drafter's exact perplexity on the target's greedy sequences."""
    nll = count = 0.0
    with torch.no_grad():
        for ids in references:
            nll += float(model(ids, labels=ids).loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return safe_exp(nll / count)


def _bound_on(model, references: list[torch.LongTensor]) -> float:
    """The drafter's perplexity bound on the target's greedy sequences (each cut to a multiple of C)."""
    c = model.compression_factor
    terms = [bound_terms(model, ids[:, : ids.shape[1] // c * c]) for ids in references if ids.shape[1] >= c]
    return perplexity_bound({k: sum(t[k] for t in terms) for k in ("nll_codes", "nll_recon", "num_tokens")})


def format_drafting_table(result: dict) -> str:
    """The markdown table: target, RQ alone and verified tok/s, speedup and acceptance per drafter."""
    t = result["target"]
    setup = (
        f"Drafting at batch 1: greedy, KV caches, {result['prompts']} prompts of {result['prompt_length']} tokens, "
        f"{result['new_tokens']} new tokens each, EOS ignored; target alone {t['tokens_per_second']:,.1f} tok/s; "
        + ("rqlm's CPU kernels on" if result.get("cpu_kernels", True) else "rqlm's CPU kernels off")
    )
    lines = [
        setup,
        "",
        (
            "| drafter | C | draft tokens | RQ alone tok/s | target verified tok/s | speedup | acceptance tokens/step "
            "| drafted tokens kept | break-even tokens/step | drafting share | drafter's perplexity (codes: bound) on the target's text "
            "| identical |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['drafter']} | {r['compression_factor']} | {r['draft_tokens']} "
            f"| {_number(r['rq_tokens_per_second'])} | {r['verified_tokens_per_second']:,.1f} | {r['speedup']:.2f}x "
            f"| {r['acceptance']:.2f} | {100 * r['kept_share']:.0f}% "
            f"| {r['break_even_acceptance']:.2f} | {_percent(r['drafting_share'])} | {_number(r['bound_on_target_text'])} "
            f"| {'yes' if r['identical'] else 'NO'} |"
        )
    return "\n".join(lines)


def _percent(x: float) -> str:
    return "–" if math.isnan(x) else f"{100 * x:.0f}%"


def _number(x: float) -> str:
    if math.isnan(x):  # a draft head has no speed alone and no bound
        return "–"
    return f"{x:,.1f}" if x < 1e5 else f"{x:.3g}"


def summary_line(result: dict) -> str:
    """`drafting speedup batch 1: 1.62x (acceptance 2.31 tokens/step, target 40 tok/s)` for the first drafter."""
    r = result["rows"][0]
    return (
        f"drafting speedup batch 1: {r['speedup']:.2f}x (acceptance {r['acceptance']:.2f} tokens/step, "
        f"target {result['target']['tokens_per_second']:.0f} tok/s)"
    )
