"""The one place where rqlm calls transformers' private API, under a tested version range.

Everything else in rqlm uses transformers' public API. What follows has no public equivalent; each
wrapper names the private call it makes and fails in one line, naming the supported range, when a
release has moved it.
"""

from __future__ import annotations

import torch
import transformers
from packaging.version import Version

# the transformers releases the suite passes on (pyproject.toml pins the same range)
SUPPORTED_TRANSFORMERS = ">=5.24,<5.26"


def private_api_error(name: str, error: Exception) -> RuntimeError:
    """A one-line error for a private transformers API that this release no longer has or changed."""
    return RuntimeError(
        f"transformers {transformers.__version__} changed its private {name} ({error}); rqlm supports "
        f"transformers{SUPPORTED_TRANSFORMERS}: pip install 'transformers{SUPPORTED_TRANSFORMERS}'"
    )


def transformers_version() -> Version:
    return Version(transformers.__version__)


# ----------------------------------------------------------------- generate() of the latent LMs
# (rqlm.modeling.generation_rq_transformer) The RQ-Transformer's own decoding loop resolves its settings and
# builds its logits processors as `GenerationMixin.generate` does, through the three private calls below
# (transformers' CSM model, whose loop is also its own, uses the same ones).


def prepare_generation_config(model, generation_config, kwargs: dict):
    """`generate`'s settings: (the resolved GenerationConfig, the kwargs that are not its fields).

    Private: `GenerationMixin._prepare_generation_config` (the model's generation_config, then the library's
    defaults, then `generation_config` or the kwargs).
    """
    prepare = getattr(model, "_prepare_generation_config", None)
    if prepare is None:
        raise private_api_error("GenerationMixin._prepare_generation_config", AttributeError("missing"))
    try:
        return prepare(generation_config, **kwargs)
    except TypeError as error:
        raise private_api_error("GenerationMixin._prepare_generation_config", error) from error


def default_generation_params() -> dict:
    """The values `generate` gives the GenerationConfig fields that nobody set (`max_length=20`, `top_k=50`, ...).

    Private: `GenerationConfig._get_default_generation_params`.
    """
    defaults = getattr(transformers.GenerationConfig, "_get_default_generation_params", None)
    if defaults is None:
        raise private_api_error("GenerationConfig._get_default_generation_params", AttributeError("missing"))
    return defaults()


def logits_processors(
    model, generation_config, input_length: int, logits_processor=None, device=None, eos_token_ids=None,
    attention_mask: torch.Tensor | None = None,
):
    """The LogitsProcessorList that `generate` would build from `generation_config`, `logits_processor` merged in.

    `input_length` is the prompt's length (min_new_tokens, begin_suppress_tokens count from it), `eos_token_ids`
    the ids that min_length, min_new_tokens and bad_words_ids treat as EOS, `attention_mask` (B, T0) the prompt's
    (repetition_penalty skips its left padding). Private: `GenerationMixin._get_logits_processor`, and the
    `_eos_token_tensor` it reads, which `generate` sets in its private `_prepare_special_tokens`.
    """
    build = getattr(model, "_get_logits_processor", None)
    if build is None:
        raise private_api_error("GenerationMixin._get_logits_processor", AttributeError("missing"))
    generation_config._eos_token_tensor = (
        torch.tensor(eos_token_ids, dtype=torch.long, device=device) if eos_token_ids else None
    )
    try:
        return build(
            generation_config, input_ids_seq_length=input_length, logits_processor=logits_processor, device=device,
            model_kwargs={"attention_mask": attention_mask},
        )
    except TypeError as error:
        raise private_api_error("GenerationMixin._get_logits_processor", error) from error


__all__ = [
    "SUPPORTED_TRANSFORMERS",
    "default_generation_params",
    "logits_processors",
    "prepare_generation_config",
    "private_api_error",
    "transformers_version",
]
