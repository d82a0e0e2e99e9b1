"""The one place where rqlm calls transformers' private API, under a tested version range.

Everything else in rqlm uses transformers' public API. What follows has no public equivalent; each
wrapper names the private call it makes and fails in one line, naming the supported range, when a
release has moved it.
"""

from __future__ import annotations

import torch
import transformers
from packaging.version import Version
from transformers import GenerationMixin
from transformers.generation.candidate_generator import CandidateGenerator

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


# ----------------------------------------------------------------- assisted decoding from rqlm's drafts
# (rqlm.drafting.verification) transformers 5.24 and 5.25 take no candidate generator from outside: `generate`
# builds its own from `assistant_model` or `prompt_lookup_num_tokens`. Its public `custom_generate=` callable
# receives the prepared inputs and runs the private assisted loop below, whose `_get_candidate_generator` is
# answered, on the model and for that call only, with rqlm's generator.


def assisted_decoding(model, input_ids: torch.LongTensor, candidate_generator: CandidateGenerator, **kwargs):
    """transformers' assisted decoding of `input_ids` (1, T) with `candidate_generator` proposing every draft.

    `kwargs` are what `generate` passes a `custom_generate` callable (logits processors, stopping criteria, the
    prepared generation config, the cache, the model kwargs) and the streamer. Private: it runs
    `GenerationMixin._assisted_decoding`, answering the `_get_candidate_generator` that loop calls; the loop
    reads more of the generator than the `CandidateGenerator` base class has (5.25: `num_drafting_tokens`).
    """
    decoding = getattr(GenerationMixin, "_assisted_decoding", None)
    if decoding is None or not hasattr(GenerationMixin, "_get_candidate_generator"):
        missing = AttributeError("GenerationMixin has no _assisted_decoding or _get_candidate_generator")
        raise private_api_error("assisted decoding loop", missing)
    model._get_candidate_generator = lambda *args, **options: candidate_generator  # this call only: see below
    try:
        return decoding(model, input_ids, **kwargs)
    except AttributeError as error:
        if error.obj is candidate_generator:  # the loop asks the generator for what it lacks: the contract moved
            raise private_api_error("assisted decoding loop's use of its CandidateGenerator", error) from error
        raise
    finally:
        del model._get_candidate_generator


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
    "assisted_decoding",
    "default_generation_params",
    "logits_processors",
    "prepare_generation_config",
    "private_api_error",
    "transformers_version",
]
