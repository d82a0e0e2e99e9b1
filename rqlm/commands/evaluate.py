"""`rqlm evaluate`: the RQ model's perplexity bound against the Qwen3 baseline on the same held-out tokens.

    held-out blocks (LM folder's tokenizer) -> RQ bound = exp((code NLL + recon NLL) / tokens)
                                            -> baseline perplexity (every token, from the block's start)
                                            -> ratio bound / baseline
    held-out prompts -> RQ samples, baseline samples -> the baseline's perplexity on each (judged quality)
    held-out prefixes -> two samples of 4 tokens per prefix from each model -> BrierLM of both (likelihood-free)

--model may also be a `rqlm train-givt` folder (continuous latents): a Gaussian head's bound is the ELBO of
rqlm/evaluation/elbo_bound.py (latent KL term + reconstruction term); the energy head has no likelihood, so it
gets BrierLM and judged quality only.

The bound's terms come from rqlm/evaluation/bound.py, the baseline's and the judged figures from
rqlm/evaluation/perplexity.py, BrierLM from rqlm/evaluation/brier.py. A readable table goes to stdout, every
figure to `--output_json`.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

# the block size a training command writes into its model card (README.md): train-lm and train-givt write
# "block size 128 tokens", train-baseline "block size: 128 tokens"
TRAINED_BLOCK_SIZE = re.compile(r"block size:? (\d+) tokens")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rqlm.data.arguments import add_data_arguments

    parser.add_argument("--model", required=True, help="a `rqlm train-lm` output folder (RQ-Transformer + tokenizer), "
                        "or a `rqlm train-givt` one (continuous latents)")
    parser.add_argument("--baseline", required=True, help="a `rqlm train-baseline` output folder (Qwen3ForCausalLM)")
    add_data_arguments(parser)
    parser.set_defaults(block_size=None, compression_factor=None)
    parser._option_string_actions["--block_size"].help = (
        "tokens per held-out block, a multiple of C (default: the block size --model was trained on, which "
        "train-lm and train-givt write into its README.md): the bound is read on blocks of the length the LM learned"
    )
    parser._option_string_actions["--compression_factor"].help = "C; read from --model (a different value is an error)"
    parser._option_string_actions["--tokenizer"].help = "tokenizer folder (default: the --model folder's)"
    parser.add_argument("--batch_size", type=int, default=8, help="held-out blocks per forward pass")
    judged = parser.add_argument_group("judged quality of free generation")
    judged.add_argument("--num_prompts", type=int, default=16, help="held-out prompts to continue (0: skip)")
    judged.add_argument("--prompt_tokens", type=int, default=64, help="tokens of each prompt (a block's start)")
    judged.add_argument("--new_tokens", type=int, default=64, help="tokens each model samples per prompt")
    judged.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for both models")
    judged.add_argument("--top_k", type=int, default=0, help="top-k for both models (0: no limit)")
    judged.add_argument("--top_p", type=float, default=1.0, help="nucleus mass for both models")
    judged.add_argument("--seed", type=int, default=0, help="seed of the sampling (the same for both models)")
    brier = parser.add_argument_group("BrierLM (CALM's likelihood-free score, 0-100, higher is better)")
    brier.add_argument("--brier_prefixes", type=int, default=64,
                       help="held-out prefixes, --prompt_tokens long (the next 4 tokens are the reference), "
                            "that each model samples twice at temperature 1, seeded by --seed: every block's start, "
                            "then windows 4, 8, ... tokens further in when more are asked for (0: skip)")
    parser.add_argument("--output_json", default=None, help="write every figure to this JSON file")


def trained_block_size(folder) -> int:
    """The block size a `rqlm train-lm` / `train-givt` folder was trained on, from its model card (README.md)."""
    card = Path(folder) / "README.md"
    found = TRAINED_BLOCK_SIZE.search(card.read_text()) if card.is_file() else None
    if found is None:
        raise ValueError(f"--model '{folder}' does not say which block size it was trained on (no 'block size N "
                         "tokens' in its README.md, which train-lm writes); pass --block_size")
    return int(found.group(1))


def check_arguments(args: argparse.Namespace, config) -> None:
    """One-line errors for flags that are out of range or contradict the LM, before any weights load."""
    from rqlm.data.arguments import adopt_compression_factor
    from rqlm.evaluation.brier import BRIER_ORDERS

    c = config.compression_factor
    if args.streaming:
        raise ValueError("evaluate reads a fixed held-out split to score both models on it; omit --streaming")
    adopt_compression_factor(args, c, "the model's", "omit the flag (C is read from --model)")
    for name in ("batch_size", "prompt_tokens", "new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.max_eval_blocks is not None and args.max_eval_blocks < 1:
        raise ValueError(f"--max_eval_blocks must be at least 1 (or omitted for all), got {args.max_eval_blocks}")
    if args.num_prompts < 0:
        raise ValueError(f"--num_prompts must be >= 0 (0 skips the judged quality), got {args.num_prompts}")
    if args.num_prompts and args.prompt_tokens > args.block_size:
        raise ValueError(f"--prompt_tokens {args.prompt_tokens} is longer than a held-out block ({args.block_size}); "
                         "lower it or raise --block_size")
    if args.brier_prefixes < 0:
        raise ValueError(f"--brier_prefixes must be >= 0 (0 skips BrierLM), got {args.brier_prefixes}")
    if args.brier_prefixes and args.prompt_tokens + BRIER_ORDERS > args.block_size:
        raise ValueError(f"BrierLM reads --prompt_tokens {args.prompt_tokens} + the next {BRIER_ORDERS} tokens of a "
                         f"held-out block ({args.block_size}); lower --prompt_tokens, raise --block_size or pass "
                         "--brier_prefixes 0")
    from rqlm.loading import check_generation_arguments as check_sampling

    check_sampling(argparse.Namespace(prompt="-", max_new_tokens=args.new_tokens, do_sample=True,
                                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p))


def check_positions(args: argparse.Namespace, config, baseline_config) -> None:
    """Blocks, and prompts with their continuations, must fit both models' positions."""
    from rqlm.evaluation.brier import BRIER_ORDERS
    from rqlm.loading import token_limit

    latent = config.backbone_config.max_position_embeddings
    if args.block_size // config.compression_factor > latent:
        raise ValueError(f"--block_size {args.block_size} makes {args.block_size // config.compression_factor} latent "
                         f"positions, more than --model's {latent}; lower --block_size")
    if args.block_size + 1 > baseline_config.max_position_embeddings:  # + the separator each block is read after
        raise ValueError(f"--block_size {args.block_size} (+1 separator) exceeds --baseline's "
                         f"{baseline_config.max_position_embeddings} positions; lower --block_size")
    needed = max(args.prompt_tokens + args.new_tokens if args.num_prompts else 0,
                 args.prompt_tokens + BRIER_ORDERS if args.brier_prefixes else 0)
    for role, cfg in (("--model", config), ("--baseline", baseline_config)):
        if needed > token_limit(cfg):
            raise ValueError(f"--prompt_tokens + the new tokens = {needed} exceeds the {token_limit(cfg)} positions "
                             f"of {role}; lower them")


def is_exact(config) -> bool:
    """Whether the latent LM has an exact likelihood (the RQ model with depth_output='tokens')."""
    return getattr(config, "depth_output", "codes") == "tokens"


def has_bound(config) -> bool:
    """Whether the latent LM has a perplexity bound: the RQ model and GIVT's Gaussian head do, the energy head not."""
    return config.model_type != "givt" or config.head == "gaussian"


def latent_bound_terms(model, input_ids):
    """The bound's summed terms of a batch: the discrete bound (RQ) or the ELBO (Gaussian-head GIVT)."""
    from rqlm.evaluation.bound import bound_terms
    from rqlm.evaluation.elbo_bound import elbo_terms

    return elbo_terms(model, input_ids) if model.config.model_type == "givt" else bound_terms(model, input_ids)


def held_out_figures(model, baseline, eval_blocks, batch_size: int, separator_id: int) -> dict[str, float]:
    """The bound's terms (when the model has a bound) and the baseline's NLL, summed over the same held-out
    blocks -> figures."""
    import torch
    from torch.utils.data import DataLoader

    from rqlm.evaluation.bound import perplexity_bound
    from rqlm.evaluation.perplexity import block_nll, safe_exp

    totals: dict[str, torch.Tensor] = {}
    baseline_nll, baseline_tokens, blocks = 0.0, 0.0, 0
    exact_nll = 0.0
    exact = is_exact(model.config)
    bounded = has_bound(model.config) and not exact
    for batch in DataLoader(eval_blocks, batch_size=batch_size):
        input_ids = batch["input_ids"].long()
        blocks += len(input_ids)
        if exact:  # a tokens-mode LM: scored exactly as the baseline is, on the same tokens
            exact_nll += float(block_nll(model, input_ids, separator_id)["nll"])
        if bounded:
            for name, value in latent_bound_terms(model, input_ids).items():
                totals[name] = totals[name] + value if name in totals else value
        scored = block_nll(baseline, input_ids, separator_id)
        baseline_nll += float(scored["nll"])
        baseline_tokens += float(scored["num_tokens"])
    if not blocks:
        raise ValueError("the held-out split holds no block; give more text or lower --block_size")
    tokens = float(totals["num_tokens"]) if bounded else baseline_tokens
    if baseline_tokens != tokens:  # both read every token of the same blocks
        raise RuntimeError(f"the bound scored {tokens:.0f} tokens, the baseline {baseline_tokens:.0f}")
    baseline_perplexity = safe_exp(baseline_nll / tokens)
    figures = {
        "baseline_perplexity": baseline_perplexity,
        "nll_baseline_per_token": baseline_nll / tokens,
        "baseline_bits_per_token": baseline_nll / tokens / math.log(2),
        "num_tokens": tokens,
        "num_blocks": float(len(eval_blocks)),
    }
    if exact:
        perplexity = safe_exp(exact_nll / tokens)
        figures.update({
            "perplexity": perplexity,
            "perplexity_bound": perplexity,  # the exact figure is its own bound: tables compare it with the codes mode's
            "ratio": perplexity / baseline_perplexity,
            "nll_bound_per_token": exact_nll / tokens,
            "bits_per_token": exact_nll / tokens / math.log(2),
        })
        return figures
    if not bounded:
        return figures
    bound = perplexity_bound(totals)
    figures.update({
        "perplexity_bound": bound,
        "ratio": bound / baseline_perplexity,
        "nll_codes_per_token": float(totals["nll_codes"]) / tokens,
        "nll_recon_per_token": float(totals["nll_recon"]) / tokens,
        "nll_bound_per_token": (float(totals["nll_codes"]) + float(totals["nll_recon"])) / tokens,
    })
    figures["bits_per_token"] = figures["nll_bound_per_token"] / math.log(2)
    if "nll_codes_depth" not in totals:  # continuous latents: no depths
        return figures
    per_depth = totals["nll_codes_depth"] / totals["num_codes_depth"].clamp(min=1)
    accuracy = totals["correct_depth"] / totals["num_codes_depth"].clamp(min=1)
    for d, (nll, acc) in enumerate(zip(per_depth.tolist(), accuracy.tolist())):
        figures[f"nll_codes_depth_{d}"] = nll
        figures[f"code_accuracy_depth_{d}"] = acc
    return figures


def judged_figures(model, baseline, eval_blocks, args: argparse.Namespace, tokenizer) -> dict[str, float]:
    """The baseline's perplexity on the RQ model's and on its own sampled continuations of held-out prompts."""
    from rqlm.data.tokenizer import padding_id
    from rqlm.evaluation.perplexity import judged_perplexity
    from rqlm.loading import sampling_kwargs

    count = min(args.num_prompts, len(eval_blocks))
    prompts = eval_blocks[:count]["input_ids"][:, : args.prompt_tokens].long()
    pad = padding_id(tokenizer)
    settings = dict(
        max_new_tokens=args.new_tokens, seed=args.seed, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
        batch_size=args.batch_size, **sampling_kwargs(True, args.temperature, args.top_k, args.top_p),
    )
    rq = judged_perplexity(baseline, model, prompts, **settings)
    own = judged_perplexity(baseline, baseline, prompts, **settings)
    return {
        "judged_perplexity_rq_samples": rq["perplexity"],
        "judged_perplexity_baseline_samples": own["perplexity"],
        "judged_mean_length_rq_samples": rq["mean_length"],
        "judged_mean_length_baseline_samples": own["mean_length"],
        **{f"{name}_{who}_samples": result[name] for who, result in (("rq", rq), ("baseline", own))
           for name in ("distinct_2", "distinct_3", "repeated_3gram_rate")},
        "judged_num_prompts": float(count),
    }


def brier_figures(model, baseline, eval_blocks, args: argparse.Namespace, tokenizer) -> dict[str, float]:
    """BrierLM of both models on the same held-out prefixes and seed: 'brier_*' (RQ) and 'baseline_brier_*'."""
    from rqlm.data.tokenizer import padding_id
    from rqlm.evaluation.brier import BRIER_ORDERS, brier_lm_from_generate

    blocks = eval_blocks[:]["input_ids"].long()  # (B, T)
    windows = held_out_windows(blocks, args.brier_prefixes, args.prompt_tokens + BRIER_ORDERS)  # (N, P + 4)
    prefixes, references = windows[:, : args.prompt_tokens], windows[:, args.prompt_tokens :]  # (N, P), (N, 4)
    pad = padding_id(tokenizer)
    settings = {"batch_size": args.batch_size, "temperature": 1.0, "seed": args.seed,
                "eos_token_id": tokenizer.eos_token_id, "pad_token_id": pad}
    figures = {}
    for prefix, who in (("", model), ("baseline_", baseline)):
        scores = brier_lm_from_generate(who, prefixes, references, **settings)
        figures.update({f"{prefix}{name}": value for name, value in scores.items() if name != "num_prefixes"})
    figures["brier_num_prefixes"] = float(len(windows))
    return figures


def held_out_windows(blocks, count: int, width: int):
    """Up to `count` windows of `width` tokens from held-out blocks (B, T) -> (N, width): every block's start
    first, then the windows starting 4, 8, ... tokens in (their last 4 tokens, the references, never overlap)."""
    import torch

    from rqlm.evaluation.brier import BRIER_ORDERS

    offsets = range(0, blocks.shape[1] - width + 1, BRIER_ORDERS)
    return torch.cat([blocks[:, start : start + width] for start in offsets])[:count]


def print_table(figures: dict[str, float], args: argparse.Namespace, config) -> None:
    """The figures as a readable table on stdout."""
    c = config.compression_factor
    continuous = config.model_type == "givt"
    latent = (f"d={config.latent_dim}, {config.head} head" if continuous else
              f"D={config.num_quantizers}, K={config.codebook_size}")
    print(f"\nheld-out: {int(figures['num_blocks'])} blocks of {args.block_size} tokens "
          f"({int(figures['num_tokens']):,} tokens), C={c}, {latent}")
    print(f"{'':32}{'nats/token':>12}{'bits/token':>12}{'perplexity':>14}")
    rows = [("baseline perplexity", figures["nll_baseline_per_token"])]
    if is_exact(config):
        rows[:0] = [("RQ perplexity (tokens mode, exact)", figures["nll_bound_per_token"])]
    elif "perplexity_bound" in figures:
        rows[:0] = [
            ("GIVT ELBO perplexity bound" if continuous else "RQ perplexity bound", figures["nll_bound_per_token"]),
            ("  latent KL term" if continuous else "  code NLL term", figures["nll_codes_per_token"]),
            ("  token NLL given codes term" if getattr(config, "depth_output", "codes") == "codes_then_tokens"
             else "  reconstruction NLL term", figures["nll_recon_per_token"]),
        ]
    for name, nats in rows:
        print(f"{name:32}{nats:12.4f}{nats / math.log(2):12.4f}{_number(math.exp(min(nats, 700))):>14}")
    if "ratio" in figures:
        print(f"{'ratio ' + ('' if is_exact(config) else 'bound ') + '/ baseline':32}{'':24}{_number(figures['ratio']):>14}")
    if is_exact(config):
        _print_judged(figures, args, "rq")
        return
    if continuous:
        if "perplexity_bound" not in figures:
            print("the energy head is likelihood-free: no perplexity bound; BrierLM compares it")
        _print_judged(figures, args, "GIVT")
        return
    d, k = config.num_quantizers, config.codebook_size
    depths = "  ".join(f"{figures[f'nll_codes_depth_{j}']:.3f}" for j in range(d))
    accuracies = "  ".join(f"{figures[f'code_accuracy_depth_{j}']:.1%}" for j in range(d))
    print(f"code NLL per depth (nats per code; uniform = ln K = {math.log(k):.3f}): {depths}")
    print(f"code accuracy per depth (argmax): {accuracies}")
    _print_judged(figures, args, "rq")


def _print_judged(figures: dict[str, float], args: argparse.Namespace, label: str) -> None:
    if "judged_perplexity_rq_samples" in figures:
        print(f"judged quality: the baseline's perplexity on sampled continuations of "
              f"{int(figures['judged_num_prompts'])} held-out prompts ({args.prompt_tokens} tokens, "
              f"{args.new_tokens} new, temperature {args.temperature}, top_k {args.top_k}, top_p {args.top_p}, "
              f"seed {args.seed})")
        for who in ("rq", "baseline"):
            print(f"  {(label if who == 'rq' else who) + ' samples':30}{_number(figures[f'judged_perplexity_{who}_samples']):>14}"
                  f"   (mean length {figures[f'judged_mean_length_{who}_samples']:.1f} tokens, distinct-2 "
                  f"{figures[f'distinct_2_{who}_samples']:.2f}, distinct-3 {figures[f'distinct_3_{who}_samples']:.2f}, "
                  f"repeated 3-grams {figures[f'repeated_3gram_rate_{who}_samples']:.0%})")


def print_brier(figures: dict[str, float], args: argparse.Namespace, label: str = "RQ model") -> None:
    """BrierLM and its Brier-n of both models, one row each."""
    from rqlm.evaluation.brier import BRIER_ORDERS

    print(f"BrierLM on {int(figures['brier_num_prefixes'])} held-out prefixes ({args.prompt_tokens} tokens, "
          f"temperature 1, seed {args.seed}; 0-100, higher is better)")
    print(f"{'':32}{'BrierLM':>10}" + "".join(f"{f'Brier-{n} +- s.e.':>18}" for n in range(1, BRIER_ORDERS + 1)))
    for name, prefix in ((label, ""), ("baseline", "baseline_")):
        print(f"{name:32}{figures[prefix + 'brier_lm']:10.2f}" + "".join(
            f"{figures[f'{prefix}brier_{n}']:10.2f} +- {figures[f'{prefix}brier_{n}_stderr']:4.2f}"
            for n in range(1, BRIER_ORDERS + 1)))


def _number(value: float) -> str:
    """A figure with a precision that suits its size: 1.234, 136.2, 486,747."""
    if math.isinf(value):
        return "inf"
    return f"{value:,.0f}" if value >= 1000 else f"{value:.1f}" if value >= 100 else f"{value:.3f}"


def main(args: argparse.Namespace) -> int:
    from rqlm.data.loading import get_lm_datasets
    from rqlm.loading import (
        LATENT_LM_TYPES,
        check_same_vocabulary,
        load_folder_tokenizer,
        load_model,
        read_config,
    )

    config = read_config(args.model, "--model", LATENT_LM_TYPES)
    baseline_config = read_config(args.baseline, "--baseline", ("qwen3",))
    if args.block_size is None:
        args.block_size = trained_block_size(args.model)
    check_arguments(args, config)
    check_positions(args, config, baseline_config)
    tokenizer = load_folder_tokenizer(args.tokenizer or args.model, "--tokenizer" if args.tokenizer else "--model")
    check_same_vocabulary(tokenizer, args.model, config, "--model")
    check_same_vocabulary(tokenizer, args.baseline, baseline_config, "--baseline")
    _, eval_blocks = get_lm_datasets(
        args.dataset, tokenizer, block_size=args.block_size, compression_factor=config.compression_factor,
        text_column=args.text_column, max_eval_blocks=args.max_eval_blocks,
    )
    model, baseline = load_model(args.model, config), load_model(args.baseline, baseline_config)
    figures = held_out_figures(model, baseline, eval_blocks, args.batch_size, tokenizer.eos_token_id)
    if args.num_prompts:
        figures.update(judged_figures(model, baseline, eval_blocks, args, tokenizer))
    if args.brier_prefixes:
        figures.update(brier_figures(model, baseline, eval_blocks, args, tokenizer))
    print_table(figures, args, config)
    if args.brier_prefixes:
        print_brier(figures, args, "GIVT model" if config.model_type == "givt" else "RQ model")
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(figures, indent=1))
        print(f"figures written to {args.output_json}")
    return 0
