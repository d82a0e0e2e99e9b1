"""The race: one prompt, each column generated in turn, its tokens streamed as they are made.

    prompt, settings -> check_request (one-line ValueError)                          input_ids (1, T0)
    -> for each column, one after another (so each speed is measured alone on the machine), after
       SETTLE_SECONDS in which the browser draws the last update:
         generate in a worker thread, under rqlm.kernels.cpu_kernels, timed as `rqlm bench` times it
         (the wall time of the generate call; time to first token: to the streamer's first new tokens)
         while the caller's thread reads the tokens so far every UPDATE_SECONDS
    -> run_race() yields the list of Column states after each reading: the page renders them.

The worker only appends ids and clock readings in its streamer; decoding and rendering happen in the
caller's thread, between readings, so the page costs the measured generation as little as possible. It
still costs some: on the 2-core machine the Python of Gradio's server and the browser's drawing compete
with the run, so readings are kept to a few a second (docs/results/serve.md has the page against the bench).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
from transformers import set_seed
from transformers.generation.streamers import BaseStreamer

from rqlm.data.tokenizer import padding_id
from rqlm.drafting.assisted import assistant_drafting, forward_calls
from rqlm.drafting.verification import DraftStats, generate_with_drafter
from rqlm.kernels import cpu_kernels
from rqlm.loading import check_prompt_fits, sampling_kwargs

from .lineup import Contender, Loaded

MAX_NEW_TOKENS = 512  # the page's ceiling: a race of every column stays under a minute on a 2-core CPU
UPDATE_SECONDS = 0.25  # how often the page reads a running column: each reading costs the run (docs/results/serve.md)
WARM_TOKENS = 4  # an untimed run of this many tokens before each column
SETTLE_SECONDS = 0.5  # before each column's clock starts: the page's last update drawn, the CPU left to the run


@dataclass
class Settings:
    """The page's controls: how many tokens, greedy or sampling, the seed set before each column."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    seed: int = 0


@dataclass
class Column:
    """One column's state: its text and ids so far, and its speed once it has some."""

    name: str
    drafted: bool = False
    text: str = ""
    new_tokens: int = 0
    seconds: float = 0.0  # wall time so far (when done: of the whole generate call)
    first_token_seconds: float | None = None
    acceptance: float | None = None  # drafted columns: tokens kept per verification step
    done: bool = False
    error: str | None = None
    ids: list[int] = field(default_factory=list, repr=False)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def record(self) -> dict:
        """What the static view of the last run keeps (no ids)."""
        return {k: v for k, v in asdict(self).items() if k != "ids"} | {"tokens_per_second": self.tokens_per_second}


class _Clock(BaseStreamer):
    """Collects the new ids and the time the first of them arrived; the first put is the prompt."""

    def __init__(self, start: float):
        self.start, self.ids, self.first = start, [], None
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        if self.first is None:
            self.first = time.perf_counter() - self.start
        self.ids.extend(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def check_request(loaded: Loaded, prompt: str, settings: Settings) -> torch.LongTensor:
    """The prompt's ids (1, T0); a one-line ValueError for input no column can run."""
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty; type some text for the models to continue")
    n = settings.max_new_tokens
    if n is None or n != int(n) or not 1 <= n <= MAX_NEW_TOKENS:
        raise ValueError(f"max new tokens must be a whole number from 1 to {MAX_NEW_TOKENS}, got {n}")
    if settings.do_sample:
        if settings.temperature is None or settings.temperature <= 0:
            raise ValueError(f"the temperature must be > 0, got {settings.temperature}")
        if settings.top_k is None or settings.top_k < 0:
            raise ValueError(f"top-k must be >= 0 (0: no limit), got {settings.top_k}")
    if settings.seed is None or settings.seed != int(settings.seed) or settings.seed < 0:
        raise ValueError(f"the seed must be a whole number >= 0, got {settings.seed}")
    ids = loaded.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise ValueError("the prompt makes no tokens; type some text for the models to continue")
    for contender in loaded.contenders:
        for model in (contender.model, contender.drafter):
            if model is not None:
                check_prompt_fits(model.config, ids, int(n), contender.name)
    return ids


def run_race(loaded: Loaded, prompt: str, settings: Settings, kernels: bool = True) -> Iterator[list[Column]]:
    """Run every column in turn on `prompt`; yield all columns' states after each reading of the running one.

    Raises ValueError (before anything runs) for bad input; an error inside one column's generation is
    shown in that column (`Column.error`) and the race goes on.
    """
    input_ids = check_request(loaded, prompt, settings)
    columns = [Column(c.name, drafted=c.drafted) for c in loaded.contenders]
    for contender, column in zip(loaded.contenders, columns):
        yield columns
        # a short untimed run of this column first, as `rqlm bench` times a model it has just run: the previous
        # columns' weights have left the CPU caches, which costs the fastest models a tenth or more of a run
        with contextlib.suppress(Exception):  # a column that fails shows its error from the timed run below
            generate_column(loaded, contender, input_ids, Settings(max_new_tokens=WARM_TOKENS), _Clock(0.0), {}, kernels)
        time.sleep(SETTLE_SECONDS)
        yield from _stream(loaded, contender, column, columns, input_ids, settings, kernels)


def _stream(loaded, contender, column, columns, input_ids, settings, kernels) -> Iterator[list[Column]]:
    """Generate one column in a worker thread; yield the columns after each reading of its tokens."""
    start = time.perf_counter()
    clock, stats, finished = _Clock(start), {}, {}

    def work():
        try:
            finished["ids"] = generate_column(loaded, contender, input_ids, settings, clock, stats, kernels)
        except Exception as e:  # noqa: BLE001  (shown in the column: the page never shows a traceback)
            finished["error"] = f"{type(e).__name__}: {e}"
        finished["seconds"] = time.perf_counter() - start

    worker = threading.Thread(target=work, name=f"race: {contender.name}", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(UPDATE_SECONDS)
        _read(loaded, column, clock, stats, time.perf_counter() - start)
        yield columns
    _read(loaded, column, clock, stats, finished["seconds"])
    column.error = finished.get("error")
    if "ids" in finished:  # the output, not the streamer's copy, is what the column made
        column.ids = finished["ids"][0, input_ids.shape[1]:].tolist()
        column.new_tokens = len(column.ids)
        column.text = loaded.tokenizer.decode(column.ids, skip_special_tokens=True)
    column.done = True
    yield columns


def _read(loaded, column: Column, clock: _Clock, stats: dict, seconds: float) -> None:
    """The running column's tokens, text, clock and acceptance as of now."""
    column.ids = list(clock.ids)
    column.new_tokens, column.seconds, column.first_token_seconds = len(column.ids), seconds, clock.first
    column.text = loaded.tokenizer.decode(column.ids, skip_special_tokens=True)
    if "draft" in stats:
        column.acceptance = stats["draft"].tokens_per_step if stats["draft"].steps else None
    elif "calls" in stats and stats["calls"]["target"]:
        column.acceptance = len(column.ids) / stats["calls"]["target"]


def generate_column(loaded: Loaded, contender: Contender, input_ids, settings: Settings, streamer, stats: dict,
                    kernels: bool = True) -> torch.LongTensor:
    """One column's `generate` (1, T0) -> (1, T0 + new), as `rqlm generate` runs it; fills `stats` for drafting:
    'draft' (DraftStats) for an RQ drafter of its own loop, 'calls' (target forwards) for a tokens-mode one."""
    tokenizer = loaded.tokenizer
    options = {
        "attention_mask": torch.ones_like(input_ids),
        "max_new_tokens": int(settings.max_new_tokens),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": padding_id(tokenizer),
        "streamer": streamer,
        **sampling_kwargs(settings.do_sample, settings.temperature, int(settings.top_k), 1.0),
    }
    models = [m for m in (contender.model, contender.drafter) if m is not None]
    set_seed(int(settings.seed))
    with cpu_kernels(*models, enabled=kernels), torch.inference_mode():
        if not contender.drafted:
            return contender.model.generate(input_ids, **options)
        if contender.assisted:
            with assistant_drafting(contender.drafter), \
                    forward_calls(target=contender.model) as stats["calls"]:
                return contender.model.generate(input_ids, assistant_model=contender.drafter, **options)
        stats["draft"] = DraftStats(compression_factor=contender.drafter.compression_factor)
        return generate_with_drafter(contender.model, contender.drafter, input_ids, stats=stats["draft"], **options)


def identical(columns: list[Column], settings: Settings) -> bool | None:
    """Whether every finished drafting column made exactly the baseline's (the first column's) ids;
    None when there is nothing to compare (no drafting column, or sampling: the same distribution, not the same text)."""
    drafted = [c for c in columns if c.drafted and c.done and c.error is None]
    if settings.do_sample or not drafted or not columns[0].done or columns[0].error:
        return None
    return all(c.ids == columns[0].ids for c in drafted)
