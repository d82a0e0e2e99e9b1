"""`rqlm distill-data`: a target causal LM's own continuations of training text, as a dataset for its drafter.

    training split (never the held-out one) -> prompts of --prompt_length tokens, at seeded offsets
    -> target.generate, batched (greedy by default: what lossless greedy drafting must predict)
    -> OUTPUT.jsonl, one {"text": prompt + continuation} per line, written batch by batch

A drafter is only as fast as the share of its tokens the target keeps, and it keeps what it would
have said itself: an RQ-VAE and RQ-Transformer trained on this file (`--dataset OUTPUT.jsonl`)
model the target's output instead of the corpus (sequence-level distillation, as in DistillSpec).
A run that stops (Ctrl-C) keeps its finished lines; running the command again continues after
them with the same prompts, and a larger --prompts extends the same list.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rqlm.data.arguments import DATASET_HELP

    parser.add_argument("--target", required=True, help="the causal LM folder whose continuations are written")
    parser.add_argument("--output", required=True, help="the .jsonl file to write (continued when it exists)")
    parser.add_argument("--dataset", default=None, help=f"where the prompts come from: {DATASET_HELP}")
    parser.add_argument("--text_column", default="text", help="column holding the documents")
    parser.add_argument("--prompts", type=int, default=2048, help="prompts to continue (one line each)")
    parser.add_argument("--prompt_length", type=int, default=64, help="tokens per prompt, cut from training text")
    parser.add_argument("--new_tokens", type=int, default=128, help="tokens the target generates per prompt")
    parser.add_argument("--batch_size", type=int, default=32, help="prompts per generate call")
    parser.add_argument("--do_sample", action="store_true", help="sample (temperature 1) instead of greedy decoding")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt offsets and of sampling")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def check_arguments(args: argparse.Namespace) -> None:
    for name in ("prompts", "prompt_length", "new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if Path(args.output).suffix.lower() != ".jsonl":
        raise ValueError(f"--output must be a .jsonl file (train-vae / train-lm read it with --dataset), got {args.output!r}")


def prompt_windows(documents: list[list[int]], count: int, length: int, seed: int) -> list[list[int]]:
    """`count` windows of `length` ids from the tokenized documents, at seeded offsets, in a fixed order.

    Windows are drawn with probability proportional to each document's number of windows, so long
    documents give more prompts; one at a time, so a larger `count` extends the same list.
    """
    import torch

    long_enough = [ids for ids in documents if len(ids) >= length]
    if not long_enough:
        raise ValueError(f"no training document has {length} tokens; lower --prompt_length")
    weights = torch.tensor([len(ids) - length + 1 for ids in long_enough], dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    windows = []
    for _ in range(count):
        ids = long_enough[int(torch.multinomial(weights, 1, generator=generator))]
        start = int(torch.randint(len(ids) - length + 1, (1,), generator=generator))
        windows.append(ids[start : start + length])
    return windows


def _lines_done(path: Path) -> int:
    """Complete lines already in `path` (a trailing partial line, from a kill mid-write, is dropped)."""
    if not path.exists():
        return 0
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        path.write_text(text, encoding="utf-8")
    return text.count("\n")


def main(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from rqlm.data.loading import load_text_dataset
    from rqlm.loading import ANY_CAUSAL_LM, LATENT_LM_TYPES, load_folder_tokenizer, load_model, read_config

    check_arguments(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = read_config(args.target, role="--target", model_types=ANY_CAUSAL_LM)
    if config.model_type in LATENT_LM_TYPES:
        raise ValueError(f"--target {args.target!r} is a latent LM; distill from the causal LM that will verify the drafts")
    tokenizer = load_folder_tokenizer(args.target, role="--target")
    output = Path(args.output).expanduser()
    done = _lines_done(output)
    if done >= args.prompts:
        print(f"{output}: {done:,} lines already, nothing to do")
        return 0
    texts = list(load_text_dataset(args.dataset, text_column=args.text_column)["train"][args.text_column])
    documents = tokenizer(texts, add_special_tokens=False)["input_ids"]
    prompts = prompt_windows(documents, args.prompts, args.prompt_length, args.seed)
    model = load_model(args.target, config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    eos = tokenizer.eos_token_id
    output.parent.mkdir(parents=True, exist_ok=True)
    tokens = 0
    with open(output, "a", encoding="utf-8") as f, tqdm(total=args.prompts, initial=done, desc="distill", unit="prompt") as bar:
        for start in range(done, args.prompts, args.batch_size):
            batch = torch.tensor(prompts[start : start + args.batch_size], device=device)  # equal lengths: no padding
            torch.manual_seed(args.seed + start)
            with torch.no_grad():
                out = model.generate(
                    batch,
                    attention_mask=torch.ones_like(batch),
                    max_new_tokens=args.new_tokens,
                    **({"do_sample": True, "top_k": 0} if args.do_sample else {"do_sample": False}),
                    eos_token_id=eos,
                    pad_token_id=eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id,
                )
            for prompt, row in zip(batch.tolist(), out[:, batch.shape[1] :].tolist()):
                if eos in row:
                    row = row[: row.index(eos)]  # the document ends where the target ends it
                tokens += len(row)
                f.write(json.dumps({"text": tokenizer.decode(prompt + row)}, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(batch))
    print(f"wrote {args.prompts - done:,} continuations ({tokens:,} generated tokens) to {output}")
    return 0
