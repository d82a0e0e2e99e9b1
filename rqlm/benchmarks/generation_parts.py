"""Clocks inside one `generate` call: when its first tokens arrive (`StepClock`), and the RQ model's per-step
time split into spatial / depth / decoder / sampling (`part_timers`, wrappers put on the model instance)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers.generation.streamers import BaseStreamer

from rqlm.benchmarks.speed import synchronize

PARTS = ("spatial", "depth", "decoder", "sampling", "other")


class StepClock(BaseStreamer):
    """A streamer that notes when each put arrives: the first holds the prompt, the second the first new tokens."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    def put(self, value) -> None:
        synchronize(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@dataclass
class PartTimes:
    """Seconds spent in each part of the RQ model's generate, split into prefill and the decoding steps."""

    prefill: float = 0.0
    steps: int = 0
    parts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS[:-1], 0.0))
    first_step_at: float | None = None


@contextmanager
def part_timers(model, device: torch.device) -> Iterator[PartTimes]:
    """Time the RQ model's parts during `generate` by wrapping its methods and VAE modules on the instance.

    spatial = embed_codes + spatial_forward; depth = depth_step / parallel_depth_logits; sampling =
    _sample_codes less its depth calls (logits processors, argmax, bookkeeping); decoder = the VAE modules
    the chunk decoder runs (codes_to_quantized, latent/upsample/decoder stacks, lm_head); a GIVT model has no
    depth, and its head counts as sampling. A call nested in
    another timed call is not counted again. Everything before the first _sample_codes is prefill. The model
    is left as it was.
    """
    times = PartTimes()
    running: list[tuple[str, float, bool]] = []  # (part, start, counted: not inside another timed call)

    def begin(part: str) -> None:
        if part == "sampling" and times.first_step_at is None:
            synchronize(device)
            times.first_step_at = time.perf_counter()
        counted = not [p for p, _, _ in running if p != "sampling"]
        synchronize(device)
        running.append((part, time.perf_counter(), counted))

    def finish() -> None:
        synchronize(device)
        part, start, counted = running.pop()
        if counted and times.first_step_at is not None:
            times.parts[part] += time.perf_counter() - start
            times.steps += part == "sampling"

    def timed(part: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            begin(part)
            try:
                return fn(*args, **kwargs)
            finally:
                finish()

        return wrapper

    vae = model.vae
    methods = [
        (model, "embed_codes", "spatial"),
        (model, "spatial_forward", "spatial"),
        (model, "depth_step", "depth"),
        (model, "parallel_depth_logits", "depth"),
        (model, "_sample_codes", "sampling"),
        (vae, "codes_to_quantized", "decoder"),
    ]
    modules = [vae.from_latent, vae.upsample, vae.latent_decoder, vae.decoder, vae.decoder.norm, vae.lm_head]
    modules += [vae.decoder_embed_tokens] if vae.decoder_embed_tokens is not None else []
    methods = [(owner, name, part) for owner, name, part in methods if hasattr(owner, name)]
    for owner, name, part in methods:
        owner.__dict__[name] = timed(part, getattr(owner, name))
    # modules get hooks, not a forward of their own: generate's prepacked_linears leaves such layers alone
    hooks = [m.register_forward_pre_hook(lambda *_: begin("decoder")) for m in modules]
    hooks += [m.register_forward_hook(lambda *_: finish()) for m in modules]
    try:
        yield times
    finally:
        for owner, name, _ in methods:
            del owner.__dict__[name]
        for hook in hooks:
            hook.remove()
    times.parts["sampling"] -= times.parts["depth"]
