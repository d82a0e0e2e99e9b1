"""Loading saved models below the commands: one place that reads a folder's config, weights and tokenizer.

Every reader (the commands, the report, the lm-eval adapter, the live page) gets the same one-line errors for
a missing folder, a folder without a model or tokenizer, a model of another kind, or a VAE where an LM belongs,
before any weights load.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LATENT_LM_TYPES = ("rq_transformer", "givt")  # latent LMs: C tokens per position, a VAE inside

MODEL_TYPES = (*LATENT_LM_TYPES, "qwen3")

ANY_CAUSAL_LM = ()  # `read_config(model_types=ANY_CAUSAL_LM)`: rq_transformer or any transformers causal LM

DRAFTER_TYPES = ("rq_transformer", "rq_draft_head")  # what `--verify-with` takes as `--model`


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


def load_vae(path: str | None):
    """A trained RQVAEModel from its folder, in eval mode; a missing folder or another model is one line."""
    from rqlm import RQVAEModel

    if path is None:
        raise ValueError("pass --vae VAE_DIR, the folder of a trained RQ-VAE (`rqlm train-vae --output_dir VAE_DIR`)")
    folder = Path(path).expanduser()
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"VAE folder '{folder}' not found (no config.json); train one with `rqlm train-vae --output_dir {folder}`"
        )
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != "rq_vae":
        raise ValueError(f"'{folder}' holds a {model_type!r} model, not an RQ-VAE ('rq_vae'); pass --vae a folder "
                         "written by `rqlm train-vae`")
    return RQVAEModel.from_pretrained(folder).eval()


def vae_tokenizer(args: argparse.Namespace):
    """The tokenizer saved in the VAE folder; `--tokenizer` must be the same one."""
    from rqlm.data.codes import tokenizer_hash
    from rqlm.data.tokenizer import load_tokenizer

    folder = Path(args.vae).expanduser()
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"VAE folder '{folder}' holds no tokenizer; re-save it with the tokenizer it was "
                                "trained with (`tokenizer.save_pretrained`)")
    tokenizer = load_tokenizer(folder)
    if args.tokenizer is not None and tokenizer_hash(load_tokenizer(args.tokenizer)) != tokenizer_hash(tokenizer):
        raise ValueError(f"--tokenizer {args.tokenizer} is not the tokenizer the VAE in {folder} was trained with; "
                         "omit --tokenizer (the VAE folder's is used)")
    return tokenizer


def resolve_compression_factor(args: argparse.Namespace, vae) -> None:
    """C is the VAE's: fill `args.compression_factor`, or refuse another one; check block_size against it."""
    from rqlm.data.arguments import adopt_compression_factor

    adopt_compression_factor(args, vae.compression_factor, "the VAE's", "omit it (the VAE's is used)")


def check_generation_arguments(args: argparse.Namespace) -> None:
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
