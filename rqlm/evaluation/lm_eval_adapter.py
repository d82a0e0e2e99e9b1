"""An lm-evaluation-harness model (`--model rqlm`) for `RQTransformerForCausalLM` checkpoints.

    loglikelihood(context, continuation) -> (log p bound of the continuation, greedy reproduces it)
    loglikelihood_rolling(text)          -> log p bound of the whole text, in windows of max_length tokens
    generate_until(context, gen_kwargs)  -> model.generate, cut at the first `until` string

Every log-likelihood is the perplexity bound of rqlm/evaluation/bound.py (`bound_terms`, the terms
`rqlm evaluate` reports): for the frozen VAE encoder's codes z of a token sequence x,

    bound(x) = NLL_codes(z) + NLL_recon(x | z) >= -log p(x)

How a continuation is carved out of it. The VAE works on whole chunks of C tokens, and a chunk's
codes depend on every token up to the chunk's end (causal encoder); the spatial model reads positions
< l, the decoder emits chunk l from codes <= l. So the context is left-padded with EOS up to a multiple
of C, exactly as `generate` pads a prompt, and the continuation starts on a chunk boundary:

    prefix = [EOS] * ((-len(context)) % C) + context                (whole chunks)
    log p(continuation | context) >= -(bound(prefix + continuation) - bound(prefix))

The difference is the code NLL of the continuation's chunks (given the context's codes) plus the
reconstruction NLL of the continuation's tokens: the prefix's terms are the same in both sequences and
cancel. It lower-bounds log p(continuation | codes of the prefix): the probability that the model,
prompted as `generate` prompts it, samples codes and then the decoder's tokens equal to the
continuation (any code sequence bounds that sum over codes from below; the encoder's is one). A
continuation that ends inside a chunk is right-padded and the padding is masked out of the
reconstruction term (the decoder's tokens of a chunk are independent given its codes, so summing
the padded positions out leaves the real tokens' terms). With an empty context, the continuation is
scored from the model's learned start position (no EOS in front), so

    loglikelihood("", text) == loglikelihood_rolling(text) == -bound(text)

which is `rqlm evaluate`'s figure for the same tokens (its blocks start at the learned start position).

A tokens-mode model (`depth_output="tokens"`) has an exact likelihood: there `sequence_nll` is the exact NLL
of the ids read after one EOS (as `rqlm evaluate` reads the baseline's blocks), the context is not padded,
and every log-likelihood above is exact (the difference of two exact sums of a causal model). Such a
folder also scores unchanged under lm-eval's own `--model hf --model_args pretrained=DIR,trust_remote_code=True`.

is_greedy: whether `model.generate(context, do_sample=False)` reproduces the continuation's tokens.
It costs one batched greedy `generate` of len(continuation) new tokens per request (ceil(n / C) spatial
steps of D depth steps each), on top of the two scoring passes; it is False for an empty context (there
is no prompt to generate from). The log-likelihoods themselves are scored one sequence per forward pass
(`bound_terms` sums over its batch); `batch_size` batches the generate calls, and the prefix bound is
computed once per distinct context (the choices of a multiple-choice question share it).
"""

from __future__ import annotations

import json
from pathlib import Path

import lm_eval.models  # noqa: F401  (lm-eval's own models first: it loads them only into an empty registry)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from rqlm.evaluation.bound import bound_terms
from rqlm.evaluation.perplexity import block_nll, until_first_eos

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_GEN_TOKS = 256


@register_model("rqlm")
class RQTransformerLM(TemplateLM):
    """`lm_eval` model over a `rqlm train-lm` folder (or a loaded `RQTransformerForCausalLM` + tokenizer).

    model_args: `pretrained` (folder or model), `tokenizer` (folder; default the model's), `device`
    (default cuda if available, else cpu), `batch_size` (requests per generate call), `max_length`
    (tokens one scoring pass reads; default the model's latent positions x C), `dtype` (float32,
    bfloat16, float16 or auto).
    """

    def __init__(
        self,
        pretrained,
        tokenizer=None,
        device: str | None = None,
        batch_size: int | str = 1,
        max_length: int | None = None,
        dtype: str | torch.dtype | None = "float32",
        max_batch_size: int | None = None,  # lm-eval passes it; only --batch_size auto (unsupported) would use it
    ):
        super().__init__()
        self.model, self.tokenizer = _load(pretrained, tokenizer)
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(device=self._device, dtype=_dtype(dtype)).eval()
        self.batch_size = _batch_size(batch_size)
        config = self.model.config
        self.c = config.compression_factor
        self.exact = getattr(config, "depth_output", "codes") == "tokens"  # exact likelihood, not a bound
        positions = config.backbone_config.max_position_embeddings - self.exact  # exact: room for the EOS read first
        self.max_length = positions * self.c if max_length is None else int(max_length)
        if self.max_length < self.c or self.max_length > positions * self.c:
            raise ValueError(f"max_length {self.max_length} must lie in [{self.c}, {positions * self.c}] "
                             f"(C={self.c} tokens per latent position, {positions} positions)")
        self.max_length -= self.max_length % self.c  # scoring windows are whole chunks
        self.generation_limit = (positions - 1) * self.c  # generate keeps one position for the new chunk
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        self._prefix_nll: dict[tuple[int, ...], float] = {}

    # ----------------------------------------------------------------- tokens
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Text -> token ids, without special tokens (as the training blocks were tokenized)."""
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # ----------------------------------------------------------------- the bound
    def sequence_nll(self, ids: list[int]) -> float:
        """-(log-likelihood bound) in nats of token ids read from the learned start position: bound_terms' sum.

        A length that is not a multiple of C is right-padded to one, the padding masked out of every term.
        """
        if not ids:
            return 0.0
        if self.exact:  # the exact NLL of every token, read after one EOS
            return float(block_nll(self.model, torch.tensor([ids], device=self.device), self.eot_token_id)["nll"])
        padding = -len(ids) % self.c
        input_ids = torch.tensor([ids + [self.pad_token_id] * padding], device=self.device)  # (1, T)
        mask = None
        if padding:
            mask = torch.ones_like(input_ids)
            mask[:, len(ids) :] = 0
        terms = bound_terms(self.model, input_ids, attention_mask=mask)
        return float(terms["nll_codes"] + terms["nll_recon"])

    def _cached_prefix_nll(self, prefix: list[int]) -> float:
        key = tuple(prefix)
        if key not in self._prefix_nll:
            self._prefix_nll[key] = self.sequence_nll(prefix)
        return self._prefix_nll[key]

    def chunk_prefix(self, context: list[int]) -> list[int]:
        """Context ids left-padded with EOS to whole chunks, as `generate` pads a prompt ([] stays []); a tokens-mode
        model reads any length, and its context stays as it is."""
        if self.exact:
            return list(context)
        return [self.eot_token_id] * (-len(context) % self.c) + context

    def continuation_nll(self, context: list[int], continuation: list[int]) -> float:
        """bound(prefix + continuation) - bound(prefix), prefix = the chunk-padded context, cut from the left
        by whole chunks to fit max_length (see the module docstring)."""
        prefix = self.chunk_prefix(context)
        overflow = len(prefix) + len(continuation) - self.max_length
        if overflow > 0:
            drop = -(-overflow // self.c) * self.c
            if drop > len(prefix):
                raise ValueError(f"a continuation of {len(continuation)} tokens does not fit max_length "
                                 f"{self.max_length}; raise max_length or shorten the continuation")
            prefix = prefix[drop:]
        return self.sequence_nll(prefix + continuation) - self._cached_prefix_nll(prefix)

    # ----------------------------------------------------------------- lm-eval requests
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(context, continuation) -> (lower bound on log p(continuation | context), greedy reproduces it)."""
        encoded = []
        for context, continuation in (req.args for req in requests):
            if context == "":  # scored from the learned start position: the same as loglikelihood_rolling
                encoded.append(([], self.tok_encode(continuation)))
            else:
                encoded.append(self._encode_pair(context, continuation))
        return self._loglikelihood_tokens([(req.args, ctx, cont) for req, (ctx, cont) in zip(requests, encoded)],
                                          disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """[((context, continuation), context ids, continuation ids)] -> [(log p bound, is_greedy)]."""
        scores = [-self.continuation_nll(ctx, cont)
                  for _, ctx, cont in tqdm(requests, desc="rqlm loglikelihood", disable=disable_tqdm)]
        greedy = self.greedy_reproduces([(ctx, cont) for _, ctx, cont in requests])
        results = list(zip(scores, greedy))
        for (args, _, _), result in zip(requests, results):
            if args is not None:
                self.cache_hook.add_partial("loglikelihood", args, result)
        self._prefix_nll.clear()
        return results

    def greedy_reproduces(self, pairs: list[tuple[list[int], list[int]]]) -> list[bool]:
        """For (context ids, continuation ids) pairs: whether greedy `generate` from the context gives the continuation."""
        out = [False] * len(pairs)
        todo = sorted((i for i, (ctx, cont) in enumerate(pairs) if ctx and cont), key=lambda i: len(pairs[i][0]))
        todo = [i for i in todo if len(pairs[i][1]) < self.generation_limit]  # else no room for a prompt: False
        for start in range(0, len(todo), self.batch_size):
            rows = todo[start : start + self.batch_size]
            longest = max(len(pairs[i][1]) for i in rows)
            prompts = [pairs[i][0][-(self.generation_limit - longest) :] for i in rows]
            new = self._generate(prompts, max_new_tokens=longest, do_sample=False)
            for i, tokens in zip(rows, new):
                cont = pairs[i][1]
                out[i] = tokens[: len(cont)] == cont
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Text -> lower bound on log p(text): -bound over windows of max_length tokens (see `rolling_nll`)."""
        results = []
        for req in tqdm(requests, desc="rqlm loglikelihood_rolling", disable=disable_tqdm):
            (text,) = req.args
            result = -self.rolling_nll(self.tok_encode(text))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), result)
            results.append(result)
        self._prefix_nll.clear()
        return results

    def rolling_nll(self, ids: list[int]) -> float:
        """-(log p bound) of ids from the start position, in windows of max_length tokens.

        Like lm-eval's rolling windows: the windows [0, W), [W, 2W), .. are scored each once; a window
        reads nothing before it, except the last, which reads the preceding tokens up to a full W as
        context (whole chunks: W and every window start are multiples of C). One window: `sequence_nll`.
        """
        w = self.max_length
        total = 0.0
        for start in range(0, len(ids), w):
            end = min(start + w, len(ids))
            context_start = max(0, min(start, end - w))
            context_start += -context_start % self.c  # a whole-chunk context
            window = ids[context_start:end]
            total += self.sequence_nll(window) - self._cached_prefix_nll(ids[context_start:start])
        return total

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """(context, gen_kwargs) -> the generated text, cut at the first `until` string.

        gen_kwargs: `until` (str or list; default the EOS text), `max_gen_toks` (default 256), `do_sample`,
        `temperature` (0: greedy), `top_k`, `top_p`. `generate` has no stop-string criterion: it runs to
        max_gen_toks (or EOS) and the text is cut afterwards.
        """
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), desc="rqlm generate_until", disable=disable_tqdm)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            if max_new >= self.generation_limit:
                raise ValueError(f"max_gen_toks {max_new} leaves no room for a prompt in the model's "
                                 f"{self.generation_limit} tokens; lower it")
            sampling = _sampling(kwargs)
            indices.sort(key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(indices), self.batch_size):
                rows = indices[start : start + self.batch_size]
                prompts = [(self.tok_encode(requests[i].args[0]) or [self.eot_token_id])[-(self.generation_limit - max_new) :]
                           for i in rows]
                for i, tokens in zip(rows, self._generate(prompts, max_new_tokens=max_new, **sampling)):
                    text = self.tok_decode(tokens)
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(rows))
        bar.close()
        return results

    def _generate(self, prompts: list[list[int]], max_new_tokens: int, **sampling) -> list[list[int]]:
        """Prompts (lists of ids) -> the new ids of each, up to (not including) its first EOS."""
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):  # left-padded, as generate expects
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        sequences = self.model.generate(
            input_ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=max_new_tokens,
            eos_token_id=self.eot_token_id, pad_token_id=self.pad_token_id, **sampling,
        )
        new = sequences[:, width:].cpu()  # (B, <= max_new_tokens)
        before_eos = (until_first_eos(new, self.eot_token_id) & (new != self.eot_token_id)).sum(1)  # (B,)
        return [row[:n] for row, n in zip(new.tolist(), before_eos.tolist())]


def _sampling(kwargs: dict) -> dict:
    """lm-eval gen_kwargs -> generate keywords: greedy unless do_sample with a temperature above 0."""
    temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
    do_sample = bool(kwargs.pop("do_sample", temperature > 0)) and temperature > 0
    settings = {"do_sample": do_sample}
    if do_sample:
        settings["temperature"] = temperature
        for name in ("top_k", "top_p"):
            if kwargs.get(name) is not None:
                settings[name] = kwargs[name]
    return settings


def _load(pretrained, tokenizer):
    """(model, tokenizer) from a train-lm folder, or passed through when already loaded."""
    from rqlm.loading import load_folder_tokenizer, load_model, read_config

    if isinstance(pretrained, (str, Path)):
        config = read_config(str(pretrained), "pretrained", ("rq_transformer",))
        model = load_model(str(pretrained), config)
        tokenizer = tokenizer or str(pretrained)
    else:
        model = pretrained
        if tokenizer is None:
            raise ValueError("pass tokenizer= (a folder or a tokenizer object) with a loaded model")
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_folder_tokenizer(str(tokenizer), "tokenizer")
    return model, tokenizer


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def _batch_size(value) -> int:
    if isinstance(value, str) and value.startswith("auto"):
        raise ValueError("--batch_size auto is not supported by the rqlm model; pass a number, e.g. --batch_size 8")
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {size}")
    return size


__all__ = ["RQTransformerLM"]
