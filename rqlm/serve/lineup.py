"""Which models race on the page, checked and loaded once: the baseline, each latent LM, the baseline drafted.

`rqlm serve` with no model flags takes `make demo`'s models from runs/demo: the baseline, the tokens-mode
LM (`lm`) and the codes-mode LM (`lm_codes`) when present, and `lm` as the drafter. Every folder is read
(`rqlm.loading.read_config`) before any weights load, so a missing folder or a VAE given as a model is one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rqlm.loading import (
    ANY_CAUSAL_LM,
    DRAFTER_TYPES,
    LATENT_LM_TYPES,
    check_same_vocabulary,
    load_folder_tokenizer,
    load_model,
    read_config,
    token_limit,
)

DEMO_DIR = Path("runs/demo")
LAST_RUN_FILE = "serve_last_run.json"  # written beside the baseline's folder (the demo's run folder)


@dataclass
class Contender:
    """One column of the race: a model generating alone, or the baseline verifying a drafter's tokens."""

    name: str
    model: object
    drafter: object | None = None

    @property
    def drafted(self) -> bool:
        return self.drafter is not None

    @property
    def assisted(self) -> bool:
        """Whether the drafter is a tokens-mode RQ model, which drafts through transformers' assisted decoding."""
        return self.drafted and getattr(self.drafter.config, "depth_output", None) == "tokens"


@dataclass
class Lineup:
    """The folders of a race: `baseline` (a causal LM), `models` (latent LMs), `draft` (an RQ model or a draft head)."""

    baseline: str
    models: list[str] = field(default_factory=list)
    draft: str | None = None

    @property
    def last_run_path(self) -> Path:
        """Where the static view of the last race is kept: beside the baseline's folder (runs/demo/serve_last_run.json)."""
        return Path(self.baseline).expanduser().absolute().parent / LAST_RUN_FILE


def demo_lineup(run_dir: str | Path = DEMO_DIR) -> Lineup:
    """`make demo`'s models: runs/demo/baseline, runs/demo/lm and runs/demo/lm_codes (those present), drafter lm."""
    run = Path(run_dir)
    if not (run / "baseline").is_dir():
        raise FileNotFoundError(f"{run} holds no demo models; run make demo first, or pass --baseline/--model")
    models = [str(run / name) for name in ("lm", "lm_codes") if (run / name).is_dir()]
    return Lineup(str(run / "baseline"), models, str(run / "lm") if (run / "lm").is_dir() else None)


def check_lineup(lineup: Lineup) -> dict:
    """Every folder's config, read before any weights: {path: config}; one-line errors for a missing or wrong one."""
    configs = {lineup.baseline: read_config(lineup.baseline, "--baseline", ANY_CAUSAL_LM)}
    if configs[lineup.baseline].model_type in LATENT_LM_TYPES:
        raise ValueError(f"--baseline {lineup.baseline!r} is a latent LM; pass the causal LM it is compared with "
                         "(runs/demo/baseline), and the latent LM with --model")
    for path in lineup.models:
        configs[path] = read_config(path, "--model", LATENT_LM_TYPES)
    if lineup.draft is not None:
        configs[lineup.draft] = read_config(lineup.draft, "--draft", DRAFTER_TYPES)
    return configs


@dataclass
class Loaded:
    """A checked lineup's models, their tokenizer (the baseline's) and the most tokens every model can hold."""

    lineup: Lineup
    tokenizer: object
    contenders: list[Contender]
    token_limit: int


def load_lineup(lineup: Lineup) -> Loaded:
    """Check every folder, then load the models once: one Contender per column, in the page's order."""
    configs = check_lineup(lineup)
    tokenizer = load_folder_tokenizer(lineup.baseline, "--baseline")
    roles = {path: "--model" for path in lineup.models} | {lineup.draft: "--draft"}
    for path, config in configs.items():
        if path != lineup.baseline:
            check_same_vocabulary(tokenizer, path, config, roles[path])
    models = {path: load_model(path, config) for path, config in configs.items()}
    baseline = models[lineup.baseline]
    contenders = [Contender(f"baseline: {_name(lineup.baseline, configs[lineup.baseline])}", baseline)]
    contenders += [Contender(_name(path, configs[path]), models[path]) for path in lineup.models]
    if lineup.draft is not None:
        drafter = models[lineup.draft]
        contenders.append(Contender(f"baseline drafted by {_name(lineup.draft, configs[lineup.draft])}", baseline, drafter))
    return Loaded(lineup, tokenizer, contenders, min(token_limit(config) for config in configs.values()))


def _name(path: str, config) -> str:
    """A column's heading: the folder's name and what it holds ('lm (RQ, tokens mode, C=4)')."""
    folder = Path(path).name
    if config.model_type == "rq_transformer":
        return f"{folder} (RQ, {config.depth_output} mode, C={config.compression_factor})"
    if config.model_type == "rq_draft_head":
        return f"{folder} (RQ draft head)"
    if config.model_type == "givt":
        return f"{folder} (GIVT, {config.head} head)"
    return f"{folder} ({config.model_type})"
