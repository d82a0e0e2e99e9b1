"""Interrupted runs as a user meets them: a real Ctrl-C (SIGINT) to `rqlm train-vae`, then a resume, ends
with every tensor of an uninterrupted run (weights and quantizer buffers: EMA codebooks, dead-code
counters); resuming a different model is a one-line error. Tiny configs, CPU, offline.
"""

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file
from test_rq_vae_training import vae_flags as rq_vae_training_flags
from test_trainer import clean_accelerate_state, text_corpus  # noqa: F401  (fixtures)

from rqlm import cli

STEPS = 40
SIGINT_AFTER_STEP = 3  # the interrupt comes once this step is in metrics.jsonl


def vae_flags(corpus, output_dir, **overrides) -> list[str]:
    """test_rq_vae_training's train-vae flags (kmeans init, dead-code expiry) on a step schedule of STEPS."""
    values = {"freeze_backbone_steps": 5, "warmup_steps": 2, "max_steps": STEPS, "max_minutes": "none", **overrides}
    return rq_vae_training_flags(corpus, output_dir, **values)


def logged_steps(output_dir) -> list[int]:
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


def test_ctrl_c_then_resume_equals_an_uninterrupted_run(text_corpus, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rqlm.cli", "train-vae", *vae_flags(text_corpus, run)],
            env=env,
            stdout=out,
            stderr=err,
        )
        deadline = time.monotonic() + 240
        while max(logged_steps(run), default=0) < SIGINT_AFTER_STEP and proc.poll() is None:
            assert time.monotonic() < deadline, "train-vae logged no steps in 4 minutes"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=240)
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert rc == 130, stderr[-3000:]
    assert "interrupted: saved" in stderr + stdout
    (checkpoint,) = (run / "checkpoints").iterdir()
    stopped_at = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    assert SIGINT_AFTER_STEP <= stopped_at < STEPS and checkpoint.name == f"step-{stopped_at}"

    assert cli.main(["train-vae", *vae_flags(text_corpus, run, resume_from_checkpoint="latest")]) == 0
    assert f"resumed from step {stopped_at} of {STEPS}" in capsys.readouterr().out
    assert cli.main(["train-vae", *vae_flags(text_corpus, tmp_path / "full")]) == 0

    full, resumed = load_file(tmp_path / "full" / "model.safetensors"), load_file(run / "model.safetensors")
    assert full.keys() == resumed.keys()
    differing = [
        k for k in full if not torch.allclose(full[k].double(), resumed[k].double(), rtol=0, atol=1e-6)
    ]
    assert not differing, f"{len(differing)} of {len(full)} tensors differ, e.g. {differing[:5]}"
    replaced = [v.item() for k, v in full.items() if k.endswith("codes_replaced")]
    assert replaced and all(n > 0 for n in replaced), "dead-code expiry never ran, so it went untested"
    assert logged_steps(run) == list(range(1, STEPS + 1)) + [STEPS]  # + the final evaluation


def test_resuming_a_different_model_is_a_one_line_error(text_corpus, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "vae"
    assert cli.main(["train-vae", *vae_flags(text_corpus, run, max_steps=2, save_steps=2)]) == 0
    capsys.readouterr()

    rc = cli.main(["train-vae", *vae_flags(text_corpus, run, latent_dim=8, resume_from_checkpoint="latest")])
    err = capsys.readouterr().err  # the data's progress bars, then the error
    assert rc == 1 and "Traceback" not in err, err
    assert "trained with latent_dim=16, this run has latent_dim=8" in err.strip().splitlines()[-1]

    baseline = [
        "train-baseline", "--dataset", str(text_corpus / "docs.jsonl"), "--tokenizer", str(text_corpus / "tokenizer"),
        "--backbone", "test", "--block_size", "32", "--max_minutes", "none", "--output_dir", str(tmp_path / "base"),
        "--resume_from_checkpoint", str(run / "checkpoints" / "step-2"),
    ]  # fmt: skip
    rc = cli.main(baseline)
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    assert "holds a RQVAEModel, this run trains a Qwen3ForCausalLM" in err.strip().splitlines()[-1]
