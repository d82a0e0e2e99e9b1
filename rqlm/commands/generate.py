"""`rqlm generate`: stream a continuation of a prompt from a saved model, optionally beside the baseline's.

`--model` is a `rqlm train-lm` folder (an RQ-Transformer, C tokens per step) or a causal LM
folder (`rqlm train-baseline`'s Qwen3, or any transformers causal LM); `--baseline` adds a second
model, run with the same prompt, seed and sampling settings. `--verify-with TARGET_DIR` makes the
RQ model of `--model` (or a draft head trained on that target, `rqlm train-draft-head`) the drafter of
the causal LM in TARGET_DIR (rqlm/drafting/verification.py): what is
printed is the target's own continuation (greedy: the same tokens as `--model TARGET_DIR`), produced
with up to C drafted tokens kept per target forward. Each continuation is streamed as it is produced
(TextStreamer), followed by its speed: new tokens / wall time of the `generate` call.
"""

from __future__ import annotations

import argparse
import functools
import time

from rqlm.loading import (
    ANY_CAUSAL_LM,
    DRAFTER_TYPES,
    MODEL_TYPES,
    check_generation_arguments,
    check_prompt_fits,
    check_same_vocabulary,
    load_folder_tokenizer,
    load_model,
    read_config,
    sampling_kwargs,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the text to continue")
    parser.add_argument("--model", required=True, help="a `rqlm train-lm` or `rqlm train-baseline` output folder")
    parser.add_argument("--baseline", default=None, help="a second model folder (e.g. the Qwen3 baseline) to compare")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder's)")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="tokens to generate after the prompt")
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do_sample)")
    parser.add_argument("--top_k", type=int, default=0, help="keep the k most likely choices (0: all; with --do_sample)")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (with --do_sample)")
    parser.add_argument("--seed", type=int, default=0, help="seed set before each model generates")
    parser.add_argument(
        "--verify-with", "--verify_with", dest="verify_with", default=None, metavar="TARGET_DIR",
        help="a causal LM folder (same tokenizer) that verifies the RQ model's drafts: its own output, C tokens per step",
    )
    parser.add_argument(
        "--draft_tokens", type=int, default=None, help="tokens drafted per verification step (with --verify-with; default C)"
    )
    parser.add_argument(
        "--no_cpu_kernels", dest="cpu_kernels", action="store_false",
        help="generate without rqlm's CPU kernels (default: on; the same text, faster on CPU; see rqlm.kernels)",
    )


def generate_streamed(model, tokenizer, input_ids, args: argparse.Namespace, drafter=None, stats=None) -> tuple[int, float]:
    """Stream one continuation of input_ids (1, T0) to stdout -> (new tokens, seconds).

    With `drafter` (an RQ model), `model` verifies its drafts (`generate_with_drafter`, which fills `stats`).
    """
    import torch
    from transformers import TextStreamer, set_seed

    from rqlm.data.tokenizer import padding_id
    from rqlm.drafting.verification import generate_with_drafter
    from rqlm.kernels import cpu_kernels

    streamer = TextStreamer(tokenizer, skip_special_tokens=True)
    pad = padding_id(tokenizer)
    set_seed(args.seed)
    start = time.perf_counter()
    generate = model.generate
    if drafter is not None:
        generate = functools.partial(
            generate_with_drafter, model, drafter, num_draft_tokens=args.draft_tokens, stats=stats
        )
    kernels = cpu_kernels(*(m for m in (model, drafter) if m is not None), enabled=args.cpu_kernels)
    with kernels, torch.inference_mode():
        output = generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=args.max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
            streamer=streamer,
            **sampling_kwargs(args.do_sample, args.temperature, args.top_k, args.top_p),
        )
    seconds = time.perf_counter() - start
    return output.shape[1] - input_ids.shape[1], seconds


def main(args: argparse.Namespace) -> int:
    check_generation_arguments(args)
    if args.verify_with:
        return verify_main(args)
    runs = [("model", args.model)] + ([("baseline", args.baseline)] if args.baseline else [])
    configs = [read_config(path, f"--{role}", ANY_CAUSAL_LM if role == "model" else MODEL_TYPES) for role, path in runs]  # every folder checked before loading
    tokenizer = load_folder_tokenizer(args.tokenizer or args.model, "--tokenizer" if args.tokenizer else "--model")
    input_ids = tokenizer(args.prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt makes no tokens; pass some text to continue")
    for (role, path), config in zip(runs, configs):
        if role != "model":
            check_same_vocabulary(tokenizer, path, config, f"--{role}")
        check_prompt_fits(config, input_ids, args.max_new_tokens, f"--{role}")
    speeds = []
    for (role, path), config in zip(runs, configs):
        model = load_model(path, config)
        print(f"--- {role}: {path} ({config.model_type}) ---")
        new, seconds = generate_streamed(model, tokenizer, input_ids, args)
        speeds.append((role, new, seconds))
    print()
    for role, new, seconds in speeds:
        print(f"{role}: {new} new tokens in {seconds:.2f} s = {new / max(seconds, 1e-9):.1f} tokens/s")
    return 0


def verify_main(args: argparse.Namespace) -> int:
    """`--verify-with TARGET_DIR`: the target's continuation, the RQ model of --model drafting; then speed and acceptance."""
    from rqlm.drafting.verification import DraftStats

    if args.baseline:
        raise ValueError("--verify-with and --baseline go separately: the verified output is the target's own")
    if args.draft_tokens is not None and args.draft_tokens < 1:
        raise ValueError(f"--draft_tokens must be at least 1, got {args.draft_tokens}")
    config = read_config(args.model, "--model", DRAFTER_TYPES)
    target_config = read_config(args.verify_with, "--verify-with", ANY_CAUSAL_LM)
    if target_config.model_type == "rq_transformer":
        raise ValueError(f"--verify-with {args.verify_with!r} is an RQ model; pass the causal LM that checks the drafts")
    tokenizer = load_folder_tokenizer(args.tokenizer or args.model, "--tokenizer" if args.tokenizer else "--model")
    input_ids = tokenizer(args.prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt makes no tokens; pass some text to continue")
    check_same_vocabulary(tokenizer, args.verify_with, target_config, "--verify-with")
    check_prompt_fits(target_config, input_ids, args.max_new_tokens, "--verify-with")
    drafter, target = load_model(args.model, config), load_model(args.verify_with, target_config)
    print(f"--- model: {args.verify_with} ({target_config.model_type}), drafted by {args.model} ({config.model_type}) ---")
    stats = DraftStats()
    new, seconds = generate_streamed(target, tokenizer, input_ids, args, drafter=drafter, stats=stats)
    print()
    print(f"model: {new} new tokens in {seconds:.2f} s = {new / max(seconds, 1e-9):.1f} tokens/s")
    print(f"drafting: {stats.steps} verification steps, acceptance {stats.tokens_per_step:.2f} tokens/step")
    return 0
