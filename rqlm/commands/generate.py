"""`rqlm generate`: stream a continuation of a prompt from a saved model, optionally beside the baseline's.

`--model` is a `rqlm train-lm` folder (an RQ-Transformer, C tokens per step) or a causal LM
folder (`rqlm train-baseline`'s Qwen3, or any transformers causal LM); `--baseline` adds a second
model, run with the same prompt, seed and sampling settings. `--verify-with TARGET_DIR` makes the
RQ model of `--model` (or a draft head trained on that target, `rqlm train-draft-head`) the drafter of
the causal LM in TARGET_DIR (rqlm/modeling/drafting.py): what is
printed is the target's own continuation (greedy: the same tokens as `--model TARGET_DIR`), produced
with up to C drafted tokens kept per target forward. Each continuation is streamed as it is produced
(TextStreamer), followed by its speed: new tokens / wall time of the `generate` call.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

LATENT_LM_TYPES = ("rq_transformer", "givt")  # latent LMs: C tokens per position, a VAE inside
MODEL_TYPES = (*LATENT_LM_TYPES, "qwen3")
ANY_CAUSAL_LM = ()  # `read_config(model_types=ANY_CAUSAL_LM)`: rq_transformer or any transformers causal LM
DRAFTER_TYPES = ("rq_transformer", "rq_draft_head")  # what `--verify-with` takes as `--model`


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
        "--draft_confidence", type=float, default=0.0,
        help="draft a chunk only when the drafter's first code for it is at least this likely (with --verify-with; 0: always)",
    )
    parser.add_argument(
        "--no_prepack", dest="prepack", action="store_false",
        help="run multi-row linear calls as they are (the RQ model's VAE decoder, the target's verification with "
        "--verify-with; default: through oneDNN with reordered weights, on CPU in fp32)",
    )


def read_config(path: str, role: str = "--model", model_types: tuple[str, ...] = MODEL_TYPES):
    """The config of a saved model folder, read before any weights; one-line errors for a missing or foreign one."""
    from transformers import AutoConfig

    import rqlm  # noqa: F401  (registers rq_transformer and rq_vae with AutoConfig)

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{role} folder {path!r} does not exist; pass a folder saved by rqlm train-lm / train-baseline")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{role} folder {path!r} holds no saved model (config.json missing)")
    config = AutoConfig.from_pretrained(folder)
    if config.model_type == "rq_draft_head" and config.model_type not in model_types:
        raise ValueError(
            f"{role} {path!r} is a draft head: it drafts for the target it was trained on and generates nothing "
            f"alone; run `rqlm generate --model {path} --verify-with TARGET_DIR`"
        )
    if model_types == ANY_CAUSAL_LM:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type not in LATENT_LM_TYPES:
            raise ValueError(
                f"{role} {path!r} holds a {config.model_type!r} checkpoint, not a causal LM; pass a `rqlm train-lm` "
                "or `rqlm train-baseline` output (or another transformers causal LM folder)"
            )
        return config
    if config.model_type not in model_types:
        raise ValueError(
            f"{role} {path!r} holds a {config.model_type!r} checkpoint; expected {' or '.join(map(repr, model_types))} "
            "(a `rqlm train-lm` or `rqlm train-baseline` output)"
        )
    return config


def load_model(path: str, config):
    """The model of a folder whose config `read_config` accepted, in eval mode."""
    from transformers import AutoModelForCausalLM

    if config.model_type == "rq_draft_head":
        from rqlm.modeling.modeling_rq_draft_head import RQDraftHead

        return RQDraftHead.from_pretrained(Path(path).expanduser(), config=config).eval()
    return AutoModelForCausalLM.from_pretrained(Path(path).expanduser(), config=config).eval()


def load_folder_tokenizer(path: str, role: str = "--model"):
    """The tokenizer saved in a model folder; a one-line error when the folder holds none."""
    from rqlm.data.tokenizer import load_tokenizer

    folder = Path(path).expanduser()
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise FileNotFoundError(f"{role} folder {path!r} holds no tokenizer; pass --tokenizer")
    return load_tokenizer(folder)


def vocab_size(config) -> int:
    """Rows of the token embedding: the VAE's vocabulary for an RQ model, the LM's for Qwen3 (or another causal LM)."""
    if config.model_type in DRAFTER_TYPES or config.model_type in LATENT_LM_TYPES:
        return config.vae_config.backbone_config.vocab_size
    return config.get_text_config().vocab_size


def check_same_vocabulary(tokenizer, path: str, config, role: str = "--baseline") -> None:
    """One-line error when the model of `path` reads another vocabulary than `tokenizer`'s.

    The folder's own tokenizer, when it holds one, must map every string to the same id; without
    one, its embedding must have exactly `len(tokenizer)` rows, as rqlm sizes every model.
    """
    from rqlm.data.tokenizer import load_tokenizer

    folder = Path(path).expanduser()
    rows = vocab_size(config)
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        own = load_tokenizer(folder)
        same = own.get_vocab() == tokenizer.get_vocab() and rows >= len(tokenizer)
        what = f"another tokenizer ({len(own)} entries, embedding of {rows}) than the model's ({len(tokenizer)} entries)"
    else:
        same = rows == len(tokenizer)
        what = f"a vocabulary of {rows} tokens, the model's tokenizer {len(tokenizer)}"
    if not same:
        raise ValueError(f"{role} {path!r} has {what}; compare models trained on the same tokenizer")


def token_limit(config) -> int:
    """How many tokens (prompt + new) the model's positions cover."""
    if config.model_type in LATENT_LM_TYPES:
        # the learned start position takes one of the spatial positions
        return (config.backbone_config.max_position_embeddings - 1) * config.compression_factor
    text = config.get_text_config()
    return getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None) or 2**31


def sampling_kwargs(do_sample: bool, temperature: float, top_k: int, top_p: float) -> dict:
    """`generate` keywords for greedy decoding or for sampling with the given settings."""
    if not do_sample:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p}


def check_arguments(args: argparse.Namespace) -> None:
    """One-line errors for flags that are out of range, before any model is loaded."""
    if not args.prompt.strip():
        raise ValueError("the prompt is empty; pass the text to continue, e.g. rqlm generate --model DIR \"def main(\"")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if args.do_sample:
        if args.temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {args.temperature}")
        if args.top_k < 0:
            raise ValueError(f"--top_k must be >= 0 (0: no limit), got {args.top_k}")
        if not 0 < args.top_p <= 1:
            raise ValueError(f"--top_p must lie in (0, 1], got {args.top_p}")


def check_prompt_fits(config, input_ids, max_new_tokens: int, role: str = "--model") -> None:
    """One-line errors, before any weights load, for a prompt the model cannot read or continue."""
    limit = token_limit(config)
    if input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"the prompt ({input_ids.shape[1]} tokens) plus --max_new_tokens {max_new_tokens} exceeds the "
            f"{limit} positions of {role}; shorten the prompt or lower --max_new_tokens"
        )
    if int(input_ids.max()) >= vocab_size(config):
        raise ValueError(f"the tokenizer gives ids up to {int(input_ids.max())}, beyond the "
                         f"{vocab_size(config)} tokens of {role}; use the model folder's own tokenizer")


def generate_streamed(model, tokenizer, input_ids, args: argparse.Namespace, drafter=None, stats=None) -> tuple[int, float]:
    """Stream one continuation of input_ids (1, T0) to stdout -> (new tokens, seconds).

    With `drafter` (an RQ model), `model` verifies its drafts (`generate_with_drafter`, which fills `stats`).
    """
    import torch
    from transformers import TextStreamer, set_seed

    from rqlm.data.tokenizer import padding_id
    from rqlm.modeling.drafting import generate_with_drafter

    streamer = TextStreamer(tokenizer, skip_special_tokens=True)
    pad = padding_id(tokenizer)
    set_seed(args.seed)
    start = time.perf_counter()
    from rqlm.modeling.generation_rq_transformer import RQTransformerGenerationMixin

    generate = model.generate
    if isinstance(model, RQTransformerGenerationMixin):
        generate = functools.partial(model.generate, prepack=args.prepack)
    if drafter is not None:
        generate = functools.partial(
            generate_with_drafter, model, drafter, num_draft_tokens=args.draft_tokens, stats=stats,
            confidence_threshold=args.draft_confidence, prepack=args.prepack,
        )
    with torch.inference_mode():
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
    check_arguments(args)
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
    from rqlm.modeling.drafting import DraftStats

    if args.baseline:
        raise ValueError("--verify-with and --baseline go separately: the verified output is the target's own")
    if args.draft_tokens is not None and args.draft_tokens < 1:
        raise ValueError(f"--draft_tokens must be at least 1, got {args.draft_tokens}")
    if not 0.0 <= args.draft_confidence <= 1.0:
        raise ValueError(f"--draft_confidence is a probability in [0, 1], got {args.draft_confidence}")
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
    below = f", {stats.gated_steps} without a draft (below --draft_confidence)" if args.draft_confidence else ""
    print(f"drafting: {stats.steps} verification steps, acceptance {stats.tokens_per_step:.2f} tokens/step{below}")
    return 0
