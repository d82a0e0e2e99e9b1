"""Code datasets: blocks of tokens beside the frozen RQ-VAE's codes of them, computed once.

    blocks "input_ids" (T,) -> VAE.encode, batched -> "codes" (L, D) int16 (int32 when K > 32767)

Two ways to reuse them across latent-LM runs:
- `rqlm encode` saves a `DatasetDict` (train / validation) with `save_to_disk`; its `info.description`
  holds `codes_provenance` (the VAE's config and weights hashes, the tokenizer's hash), which
  `load_codes` checks against the VAE of the run, so codes of another VAE are a one-line error.
- `train-lm` without `--codes` calls `encode_blocks`, a `datasets.map` whose fingerprint is the blocks'
  content hash + the VAE's weights hash, written to a cache file under the `datasets` cache: a second
  run over the same data and VAE reads the file instead of encoding again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict, load_from_disk

CODES_FORMAT = "rqlm-codes-v1"
ENCODE_BATCH_SIZE = 64  # blocks per VAE forward
INT16_MAX_CODEBOOK = 2**15 - 1
CONFIG_KEYS_NOT_HASHED = ("transformers_version", "architectures", "dtype", "torch_dtype", "_name_or_path")


def _sha256(chunks) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()[:16]


def vae_config_hash(vae) -> str:
    """A short hash of the VAE's config (what its codes mean), stable across saves."""
    config = json.loads(vae.config.to_json_string(use_diff=False))
    config = {k: v for k, v in config.items() if k not in CONFIG_KEYS_NOT_HASHED}
    return _sha256([json.dumps(config, sort_keys=True).encode()])


def vae_weights_hash(vae) -> str:
    """A short hash of every weight and buffer of the VAE (what its codes are)."""
    state = vae.state_dict()
    return _sha256(name.encode() + state[name].detach().cpu().contiguous().numpy().tobytes() for name in sorted(state))


def tokenizer_hash(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary and special tokens (what the token ids mean)."""
    vocab = sorted(tokenizer.get_vocab().items())
    specials = [tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id]
    return _sha256([json.dumps([vocab, specials]).encode()])


def codes_provenance(vae, tokenizer, vae_path: str | os.PathLike | None = None) -> dict:
    """What a code dataset was made with: checked by `check_provenance` before codes are reused."""
    return {
        "format": CODES_FORMAT,
        "vae": None if vae_path is None else str(vae_path),
        "vae_config_hash": vae_config_hash(vae),
        "vae_weights_hash": vae_weights_hash(vae),
        "tokenizer": getattr(tokenizer, "name_or_path", None),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "compression_factor": vae.compression_factor,
        "num_quantizers": vae.config.num_quantizers,
        "codebook_size": vae.config.codebook_size,
    }


def _codes_dtype(codebook_size: int):
    return np.int16 if codebook_size <= INT16_MAX_CODEBOOK else np.int32


def _blocks_hash(blocks: Dataset) -> str:
    """Content hash of a blocks dataset's input_ids (in-memory datasets carry no stable fingerprint)."""
    ids = blocks.with_format("numpy")["input_ids"]
    return _sha256([np.ascontiguousarray(ids, dtype=np.int64).tobytes()])


def encode_blocks(
    vae,
    blocks: Dataset,
    batch_size: int = ENCODE_BATCH_SIZE,
    cache_dir: str | os.PathLike | None = None,
    desc: str = "encode",
) -> Dataset:
    """Blocks with "input_ids" (N, T) -> the same rows plus "codes" (N, L, D), batched, with a progress bar.

    `cache_dir` given: the `map` is cached there under a fingerprint of (blocks, VAE weights), and
    reused by a later call with the same blocks and VAE. Returned in torch format.
    """
    device = next(vae.parameters()).device
    dtype = _codes_dtype(vae.config.codebook_size)
    vae.eval()

    @torch.no_grad()
    def encode(input_ids) -> dict:
        ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64), device=device)
        codes = vae.encode(ids).codes  # (B, L, D)
        return {"codes": codes.cpu().numpy().astype(dtype)}

    blocks = blocks.with_format(None)
    cache = {}
    if cache_dir is not None:
        fingerprint = _sha256([f"{CODES_FORMAT}:{_blocks_hash(blocks)}:{vae_weights_hash(vae)}".encode()])
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        cache = {"new_fingerprint": fingerprint, "cache_file_name": str(Path(cache_dir) / f"codes-{fingerprint}.arrow")}
    encoded = blocks.map(
        encode, input_columns="input_ids", batched=True, batch_size=batch_size, desc=desc, **cache
    )
    return encoded.with_format("torch")


def default_cache_dir() -> Path:
    """Where `train-lm` caches codes it computes itself: beside the `datasets` cache."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "rqlm_codes"


def save_codes(dataset: DatasetDict, output_dir: str | os.PathLike, provenance: dict) -> None:
    """`save_to_disk` with the provenance in every split's `info.description`."""
    for split in dataset.values():
        split.info.description = json.dumps(provenance)
    dataset.save_to_disk(str(output_dir))


def load_codes(path: str | os.PathLike) -> tuple[DatasetDict, dict]:
    """A folder written by `rqlm encode` -> (splits train/validation in torch format, provenance)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"codes folder '{folder}' not found; make it with `rqlm encode --vae VAE_DIR --output_dir {folder}`")
    try:
        dataset = load_from_disk(str(folder))
    except FileNotFoundError:
        dataset = None
    if not isinstance(dataset, DatasetDict) or not {"train", "validation"} <= set(dataset):
        raise ValueError(f"'{folder}' is not a code dataset of `rqlm encode` (no train/validation splits); "
                         "make one with `rqlm encode --vae VAE_DIR --output_dir DIR`")
    try:
        provenance = json.loads(dataset["train"].info.description or "")
    except json.JSONDecodeError:
        provenance = {}
    if provenance.get("format") != CODES_FORMAT or "codes" not in dataset["train"].column_names:
        raise ValueError(f"'{folder}' holds a dataset without rqlm codes; make one with `rqlm encode --vae VAE_DIR`")
    return DatasetDict({split: dataset[split].with_format("torch") for split in ("train", "validation")}), provenance


def check_provenance(provenance: dict, expected: dict, where: str) -> None:
    """One-line ValueError when codes were made by another VAE (config or weights) or tokenizer."""
    for key, what in (("vae_config_hash", "config"), ("vae_weights_hash", "weights"), ("tokenizer_hash", "tokenizer")):
        if provenance.get(key) != expected[key]:
            made_by = provenance.get("vae") or "another VAE"
            raise ValueError(
                f"the codes in {where} were made by {made_by}, whose {what} differs from {expected['vae']}'s "
                f"({key} {provenance.get(key)} != {expected[key]}); re-run `rqlm encode --vae {expected['vae']}` "
                "or pass the VAE they were made with"
            )


__all__ = [
    "check_provenance",
    "codes_provenance",
    "default_cache_dir",
    "encode_blocks",
    "load_codes",
    "save_codes",
    "vae_config_hash",
    "vae_weights_hash",
]
