"""FSDP (version 2, through Accelerate) runs of train-vae and train-lm on two CPU processes (gloo).

Accelerate 1.15 turns FSDP on only for accelerator devices: under `accelerate launch --use_fsdp` with
ACCELERATE_USE_CPU its state stays MULTI_CPU and the model is wrapped in DDP instead (accelerate/state.py
sets DistributedType.FSDP inside the MULTI_GPU/NPU/XPU/... branch only). The launched script below sets the
shared state to FSDP with the plugin the launcher's flags describe before the command builds its
Accelerator, so the loop then runs accelerate's own FSDP2 path (`fully_shard` per Qwen3DecoderLayer,
sharded save_state / load_state, gathered final save) on gloo. Nothing else is patched.
"""

from __future__ import annotations

import json
import math
import textwrap
from types import SimpleNamespace

import pytest
import torch
from conftest import launch_two_processes
from safetensors.torch import load_file
from test_train_lm import clean_accelerate_state  # noqa: F401  (an autouse fixture: fresh Accelerate state, codes cached per test)
from test_trainer import text_corpus  # noqa: F401  (a fixture)

from rqlm import cli
from rqlm.pipeline import fresh_accelerate_state

FSDP_ON_CPU_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from rqlm import cli

    precision = os.environ["ACCELERATE_MIXED_PRECISION"]
    Accelerator(cpu=True, mixed_precision=precision)  # the shared state, as the launcher configured it (MULTI_CPU)
    PartialState().distributed_type = AcceleratorState().distributed_type = DistributedType.FSDP
    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables
    if precision != "no":
        plugin.set_mixed_precision(precision)  # what accelerate does on a GPU: bf16 params in forward and reduce
    AcceleratorState().fsdp_plugin = plugin

    if "DTYPES_OUT" in os.environ:  # the dtypes the forwards computed in, written per rank at exit
        import atexit, json, torch
        from rqlm.modeling.vector_quantize import VectorQuantize

        seen = {"linear_weights": set(), "vector_quantize_outputs": set()}

        def record(module, args, output):
            if isinstance(module, torch.nn.Linear):
                seen["linear_weights"].add(str(module.weight.dtype))  # the unsharded weight FSDP gathered
            elif isinstance(module, VectorQuantize):  # (quantized, indices, loss)
                seen["vector_quantize_outputs"].add(" ".join(str(t.dtype) for t in output))

        torch.nn.modules.module.register_module_forward_hook(record)
        path = f"{os.environ['DTYPES_OUT']}.{os.environ['RANK']}.json"
        atexit.register(lambda: open(path, "w").write(json.dumps({k: sorted(v) for k, v in seen.items()})))
    sys.exit(cli.main(sys.argv[1:]))
    """
)
# configs/accelerate/fsdp.yaml's settings, as launcher flags
FSDP_FLAGS = [
    "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
    "--fsdp_transformer_layer_cls_to_wrap", "Qwen3DecoderLayer", "--fsdp_state_dict_type", "SHARDED_STATE_DICT",
    "--fsdp_reshard_after_forward", "true", "--fsdp_cpu_ram_efficient_loading", "false",
    "--fsdp_sync_module_states", "false",
]  # fmt: skip
STEPS, SAVE_AT = 4, 2
TOLERANCE = 1e-4  # 4 AdamW steps at lr 3e-3 from gradients summed in another order


def common_flags(**overrides) -> list[str]:
    values = {"learning_rate": 3e-3, "warmup_steps": 1, "max_steps": STEPS, "max_minutes": "none",
              "eval_steps": 0, "eval_batches": 1, "logging_steps": 1, "mixed_precision": "no", "block_size": 32}
    values.update(overrides)
    return [item for name, value in values.items() for item in (f"--{name}", str(value))]


def vae_flags(corpus, **overrides) -> list[str]:
    # EMA codebooks without kmeans init or dead-code expiry: those draw random rows per rank, so two ranks
    # are not one process there (under DDP as under FSDP)
    return ["--dataset", str(corpus / "docs.jsonl"), "--tokenizer", str(corpus / "tokenizer"), "--backbone", "test",
            "--num_encoder_layers", "1", "--num_decoder_layers", "1", "--latent_dim", "16", "--num_quantizers", "2",
            "--codebook_size", "16", "--quantizer_kwargs", json.dumps({"decay": 0.8}), *common_flags(**overrides)]


def lm_flags(corpus, vae_dir, **overrides) -> list[str]:
    return ["--vae", str(vae_dir), "--dataset", str(corpus / "docs.jsonl"), "--backbone", "test",
            "--depth_output", "codes", "--depth_hidden_size", "32", "--depth_num_attention_heads", "2", "--per_device_eval_batch_size", "4",
            *common_flags(**overrides)]


def one_process(command: str, flags: list[str]) -> None:
    fresh_accelerate_state()
    assert cli.main([command, *flags]) == 0
    fresh_accelerate_state()


def fsdp_two_processes(tmp_path, command: str, flags: list[str], mixed_precision: str = "no", env=None) -> str:
    """`accelerate launch` 2 CPU processes of `rqlm COMMAND FLAGS` under FSDP2 (`env` added); returns stdout."""
    env = {"HF_DATASETS_CACHE": str(tmp_path / "codes_cache"), **(env or {})}
    proc = launch_two_processes(
        FSDP_ON_CPU_SCRIPT, [command, *flags], tmp_path, launch_flags=FSDP_FLAGS, mixed_precision=mixed_precision, env=env
    )
    return proc.stdout


def differences(a, b) -> dict[str, float]:
    """Largest absolute difference of every saved tensor of two output folders (same keys required)."""
    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert left.keys() == right.keys()
    return {k: (left[k].double() - right[k].double()).abs().max().item() for k in left}


def assert_sharded_checkpoint(folder) -> None:
    """save_state under FSDP's SHARDED_STATE_DICT writes a distributed-checkpoint folder, not one state dict."""
    checkpoint = folder / "checkpoints" / f"step-{SAVE_AT}"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and (checkpoint / "optimizer_0").is_dir()
    assert not (checkpoint / "model.safetensors").exists()


@pytest.fixture
def vae_dir(text_corpus, tmp_path):  # noqa: F811
    """A 1-process train-vae run: the reference of the FSDP run and the VAE of the LM runs."""
    out = tmp_path / "vae_one"
    one_process("train-vae", [*vae_flags(text_corpus, per_device_train_batch_size=4), "--output_dir", str(out)])
    return out


def test_train_vae_under_fsdp_equals_one_process_and_resumes_from_a_sharded_checkpoint(text_corpus, vae_dir, tmp_path):  # noqa: F811
    fsdp, resumed = tmp_path / "vae_fsdp", tmp_path / "vae_resumed"
    flags = vae_flags(text_corpus, per_device_train_batch_size=2, save_steps=SAVE_AT)  # 2 x 2 = the 1-process 4
    fsdp_two_processes(tmp_path, "train-vae", [*flags, "--output_dir", str(fsdp)])
    assert_sharded_checkpoint(fsdp)
    diff = differences(vae_dir, fsdp)
    assert any(k.endswith("_codebook.embed") for k in diff) and any(k.endswith("cluster_size") for k in diff)
    assert max(diff.values()) < TOLERANCE, {k: v for k, v in diff.items() if v >= TOLERANCE}
    assert max(diff.values()) > 0  # (a sanity check that the two runs really differ in summation order)

    checkpoint = fsdp / "checkpoints" / f"step-{SAVE_AT}"
    out = fsdp_two_processes(tmp_path, "train-vae",
                             [*flags, "--output_dir", str(resumed), "--resume_from_checkpoint", str(checkpoint)])
    assert f"resumed from step {SAVE_AT} of {STEPS}" in out
    assert max(differences(fsdp, resumed).values()) < 1e-6


def test_train_lm_under_fsdp_equals_one_process_and_resumes(text_corpus, vae_dir, tmp_path):  # noqa: F811
    one, fsdp, resumed = tmp_path / "lm_one", tmp_path / "lm_fsdp", tmp_path / "lm_resumed"
    one_process("train-lm", [*lm_flags(text_corpus, vae_dir, per_device_train_batch_size=4), "--output_dir", str(one)])
    flags = lm_flags(text_corpus, vae_dir, per_device_train_batch_size=2, save_steps=SAVE_AT)
    fsdp_two_processes(tmp_path, "train-lm", [*flags, "--output_dir", str(fsdp)])
    assert_sharded_checkpoint(fsdp)
    diff = differences(one, fsdp)
    assert max(diff.values()) < TOLERANCE, {k: v for k, v in diff.items() if v >= TOLERANCE}
    vae = load_file(vae_dir / "model.safetensors")
    saved = load_file(fsdp / "model.safetensors")
    assert all(torch.equal(saved[f"vae.{k}"], v) for k, v in vae.items()), "FSDP training moved the frozen VAE"

    checkpoint = fsdp / "checkpoints" / f"step-{SAVE_AT}"
    out = fsdp_two_processes(tmp_path, "train-lm",
                             [*flags, "--output_dir", str(resumed), "--resume_from_checkpoint", str(checkpoint)])
    assert f"resumed from step {SAVE_AT} of {STEPS}" in out
    assert max(differences(fsdp, resumed).values()) < 1e-6


def test_quantizer_math_stays_fp32_under_a_bf16_fsdp_policy(text_corpus, tmp_path):  # noqa: F811
    """bf16 mixed precision under FSDP2 gathers the sharded parameters in bf16 for forward; the EMA codebooks are
    buffers (never cast, still fp32 and synchronized), the quantizer computes in fp32, and the losses reach the
    loop as the model computed them (fp32), not rounded to bf16 by the policy's `output_dtype` (accelerate 1.15
    sets one, 1.16 does not; `keep_fsdp_outputs_as_computed` clears it)."""
    out = tmp_path / "vae_bf16"
    flags = vae_flags(text_corpus, per_device_train_batch_size=2, mixed_precision="auto")
    dtypes = tmp_path / "dtypes"
    fsdp_two_processes(tmp_path, "train-vae", [*flags, "--output_dir", str(out)], mixed_precision="bf16",
                       env={"DTYPES_OUT": str(dtypes)})  # fmt: skip
    for rank in range(2):
        seen = json.loads((tmp_path / f"dtypes.{rank}.json").read_text())
        assert seen["linear_weights"] == ["torch.bfloat16"], f"the forward did not run on bf16 weights: {seen}"
        assert seen["vector_quantize_outputs"] == ["torch.float32 torch.int64 torch.float32"], seen

    def fits_10_bits(value: float) -> bool:
        """A bf16 number (8 significant bits) or the mean of two close ones (the ranks' mean the loop logs)."""
        return (math.frexp(value)[0] * 2**10).is_integer()

    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "quantizer_loss" in r]
    for key in ("loss", "recon_loss", "quantizer_loss"):
        assert not all(fits_10_bits(r[key]) for r in steps), f"{key} reached the loop rounded to bf16: {steps}"
    saved = load_file(out / "model.safetensors")
    assert all(v.dtype == torch.float32 for k, v in saved.items() if k.endswith(("_codebook.embed", "cluster_size")))


def test_fsdp2_outputs_keep_the_dtype_the_model_computed():
    """accelerate 1.15's bf16 FSDP2 policy rounds the root's outputs to bf16 (`output_dtype`): the loop clears it,
    keeping the bf16 parameters and reductions; FSDP1's policy and no plugin are left alone."""
    from torch.distributed.fsdp import MixedPrecision, MixedPrecisionPolicy

    from rqlm.trainer.loop import keep_fsdp_outputs_as_computed

    bf16 = torch.bfloat16
    for policy, kept in [
        (MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16, output_dtype=bf16),
         MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16)),
        (MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16), MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16)),
        (MixedPrecision(param_dtype=bf16, reduce_dtype=bf16, buffer_dtype=bf16),
         MixedPrecision(param_dtype=bf16, reduce_dtype=bf16, buffer_dtype=bf16)),
        (None, None),
    ]:  # fmt: skip
        plugin = SimpleNamespace(mixed_precision_policy=policy)
        keep_fsdp_outputs_as_computed(SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))
        assert plugin.mixed_precision_policy == kept
    keep_fsdp_outputs_as_computed(SimpleNamespace(state=SimpleNamespace()))  # not FSDP: nothing to do
