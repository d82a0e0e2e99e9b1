"""Shared fixtures: tiny Qwen3 backbones built from code, so tests run offline in seconds; two-process launches."""

import os
import socket
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_qwen3_config(vocab_size: int = 96, hidden_size: int = 32, num_hidden_layers: int = 2, **overrides):
    from transformers import Qwen3Config

    values = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": hidden_size // 2,
        "max_position_embeddings": 512,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
    }
    values.update(overrides)
    return Qwen3Config(**values)


def free_port() -> int:
    """A free local TCP port, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(
    script: str, args, tmp_path, launch_flags=("--multi_gpu",), mixed_precision="no", env=None, timeout=300
) -> subprocess.CompletedProcess:
    """`accelerate launch` 2 CPU processes of the Python source `script` (written under tmp_path) with `args`
    -> the finished process (text stdout and stderr), asserted to exit 0, its output's end shown if it did not.

    `--multi_gpu` picks accelerate's torchrun launcher and ACCELERATE_USE_CPU makes it a gloo CPU group
    (`--cpu --num_processes 2` alone starts a single process); `launch_flags` replaces it (FSDP's flags), `env`
    is added to the environment.
    """
    path = tmp_path / "launched.py"
    path.write_text(script)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"), **(env or {})}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *launch_flags, "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", mixed_precision, "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(path), *map(str, args),
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture
def qwen3_config():
    return tiny_qwen3_config()


@pytest.fixture
def small_layers_prepacked(monkeypatch):
    """prepacked_linears reorders only weights of 2 MiB and more; the tiny test models' layers are all smaller."""
    import rqlm.kernels.prepacked

    monkeypatch.setattr(rqlm.kernels.prepacked, "MIN_BYTES", 0)


def run_demo(output_dir, *flags) -> int:
    """`rqlm demo --quick` in-process, on one thread (the stages' small ops only wait on each other with two)."""
    from rqlm import cli
    from rqlm.pipeline import fresh_accelerate_state

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    fresh_accelerate_state()
    try:
        return cli.main(["demo", "--quick", "--output_dir", str(output_dir), *map(str, flags)])
    finally:
        fresh_accelerate_state()
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """A finished `rqlm demo --quick` folder (session-wide: it is the slow part; test_demo and the page share it)."""
    out = tmp_path_factory.mktemp("demo") / "run"
    assert run_demo(out) == 0
    return out
