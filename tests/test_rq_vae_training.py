"""`rqlm train-vae` and RQVAEModel checkpoints on tiny configs, CPU, offline.

Covers: a real two-process `accelerate launch` run (kmeans init, dead-code expiry, a frozen-then-unfrozen
backbone) ending with bit-identical codebooks and weights on both ranks; a run stopped at step k and
resumed from its checkpoint reaching the weights and EMA buffers of an uninterrupted run; and
save_pretrained -> from_pretrained for every quantizer family giving identical codes and logits.
"""

import hashlib
import json
import textwrap

import pytest
import torch
from conftest import launch_two_processes, tiny_qwen3_config
from safetensors.torch import load_file
from test_trainer import clean_accelerate_state, text_corpus  # noqa: F401  (fixtures)

from rqlm import RQVAEConfig, RQVAEModel, cli
from rqlm.modeling.quantizer_registry import FAMILIES

C, K = 4, 16
# kwargs that build each family at K=16, D=2 (simvq gives one code per position, so D=1)
FAMILY_KWARGS = {
    "fsq": {"levels": [4, 4]},
    "residual_fsq": {"levels": [4, 4]},
    "latent_quantize": {"levels": [4, 4]},
    "vq": {"kmeans_init": True},
    "residual_vq": {"kmeans_init": True, "threshold_ema_dead_code": 1},
}


def vae_flags(corpus, output_dir, **overrides) -> list[str]:
    """`rqlm train-vae` flags for a test-preset RQ-VAE with an EMA residual VQ (kmeans init, dead-code
    expiry) on the test corpus; overrides replace or add flags."""
    values = {
        "dataset": corpus / "docs.jsonl",
        "tokenizer": corpus / "tokenizer",
        "backbone": "test",
        "block_size": 32,
        "num_encoder_layers": 1,
        "num_decoder_layers": 1,
        "latent_dim": 16,
        "num_quantizers": 2,
        "codebook_size": K,
        "quantizer_kwargs": json.dumps({"kmeans_init": True, "threshold_ema_dead_code": 2, "decay": 0.8}),
        "freeze_backbone_steps": 2,
        "per_device_train_batch_size": 4,
        "learning_rate": 3e-3,
        "warmup_steps": 1,
        "eval_steps": 0,
        "eval_batches": 1,
        "save_steps": 0,
        "logging_steps": 1,
        "mixed_precision": "no",
        "output_dir": output_dir,
    }
    values.update(overrides)
    return [item for name, value in values.items() for item in (f"--{name}", str(value))]


def saved_weights(output_dir) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "model.safetensors")


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().numpy().tobytes()).hexdigest()


# ----------------------------------------------------------------------------
# (1) two processes end with bit-identical codebooks and weights

# Runs `rqlm train-vae` through rqlm.cli.main under accelerate launch; every rank hashes the model it
# trained (the object handed to the training loop, so each rank's own copy) and writes rank{i}.json.
TWO_PROCESS_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, sys
    from accelerate import PartialState
    import rqlm.trainer.loop
    from rqlm import cli

    trained = []
    real_train = rqlm.trainer.loop.train

    def train(model, *args, **kwargs):  # train-vae imports `train` when it runs, so it gets this one
        trained.append(model)
        return real_train(model, *args, **kwargs)

    rqlm.trainer.loop.train = train
    out, flags = sys.argv[1], sys.argv[2:]
    rc = cli.main(["train-vae", *flags])
    state = PartialState()
    weights = trained[0].state_dict()
    with open(f"{out}/rank{state.process_index}.json", "w") as f:
        json.dump({
            "rc": rc,
            "num_processes": state.num_processes,
            "digests": {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest() for k, v in weights.items()},
            "initted": [bool(v) for k, v in weights.items() if k.endswith("initted")],
            "codes_replaced": sum(int(v) for k, v in weights.items() if k.endswith("codes_replaced")),
        }, f)
    """
)


def test_accelerate_launch_two_processes_end_with_identical_codebooks(text_corpus, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    launch_two_processes(TWO_PROCESS_SCRIPT, [out, *vae_flags(text_corpus, out, max_steps=4)], tmp_path)
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]
    assert all(r["rc"] == 0 and r["num_processes"] == 2 for r in ranks)
    assert ranks[0]["initted"] and all(ranks[0]["initted"]), "kmeans init never ran"
    assert ranks[0]["codes_replaced"] > 0, "dead-code expiry never ran, so its sync went untested"
    differing = [k for k in ranks[0]["digests"] if ranks[0]["digests"][k] != ranks[1]["digests"].get(k)]
    assert not differing, f"the ranks ended with different {differing}"
    saved = saved_weights(out)
    assert any("quantizer" in k and k.endswith("embed_avg") for k in saved)
    assert {k: digest(v) for k, v in saved.items()} == {k: ranks[0]["digests"][k] for k in saved}


# ----------------------------------------------------------------------------
# (2) resume: k steps, then resume to n == n steps uninterrupted


def test_resume_reaches_the_weights_and_ema_buffers_of_an_uninterrupted_run(text_corpus, tmp_path):  # noqa: F811
    # a constant schedule, so the k-step run follows the n-step run's learning rates; the backbone
    # unfreezes at step 4, after the resume point
    def run(output_dir, **overrides):
        flags = vae_flags(
            text_corpus, tmp_path / output_dir, lr_scheduler="constant", freeze_backbone_steps=4, **overrides
        )
        assert cli.main(["train-vae", *flags]) == 0

    run("full", max_steps=6)
    run("resumed", max_steps=3, save_steps=3)
    stopped = saved_weights(tmp_path / "resumed")
    run("resumed", max_steps=6, resume_from_checkpoint="latest")

    full, resumed = saved_weights(tmp_path / "full"), saved_weights(tmp_path / "resumed")
    assert full.keys() == resumed.keys()
    for key, value in full.items():
        torch.testing.assert_close(
            resumed[key], value, rtol=0, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}"
        )
    ema = [k for k in full if k.endswith(("cluster_size", "embed_avg"))]
    assert ema and all(not torch.equal(stopped[k], full[k]) for k in ema), (
        "steps 4-6 left the EMA buffers alone"
    )
    records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))


# ----------------------------------------------------------------------------
# (3) save_pretrained -> from_pretrained for every quantizer family


def random_ids(batch=2, length=32, vocab=96, seed=1) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("quantizer_type", list(FAMILIES))
def test_save_and_load_every_quantizer_family(quantizer_type, tmp_path):
    torch.manual_seed(0)
    config = RQVAEConfig(
        backbone_config=tiny_qwen3_config(),
        compression_factor=C,
        num_quantizers=1 if quantizer_type == "simvq" else 2,
        codebook_size=K,
        latent_dim=16,
        quantizer_type=quantizer_type,
        quantizer_kwargs=FAMILY_KWARGS.get(quantizer_type, {}),
    )
    model = RQVAEModel(config)
    ids = random_ids()
    model.train()
    model(ids)  # a training forward: kmeans init and EMA statistics leave the initial state
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = RQVAEModel.from_pretrained(tmp_path).eval()

    with torch.no_grad():
        before, after = model(ids), loaded(ids)
        decoded = loaded.decode(after.codes)
    assert torch.equal(before.codes, after.codes), f"{quantizer_type}: codes changed by save/load"
    assert torch.equal(before.logits, after.logits), f"{quantizer_type}: logits changed by save/load"
    torch.testing.assert_close(decoded, after.logits, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------
# (4) LoRA through train-vae's loop: adapters and the per-chunk path's ends train, layer weights do not


def test_train_vae_lora_trains_adapters_and_ends_not_layers(text_corpus, tmp_path, monkeypatch):  # noqa: F811
    import rqlm.trainer.loop

    seen = {}
    real_train = rqlm.trainer.loop.train

    def train(model, *args, **kwargs):  # train-vae imports `train` when it runs, so it gets this one
        seen["model"], seen["before"] = model, {n: p.detach().clone() for n, p in model.named_parameters()}
        return real_train(model, *args, **kwargs)

    monkeypatch.setattr(rqlm.trainer.loop, "train", train)
    flags = vae_flags(text_corpus, tmp_path / "out", max_steps=3, lora_r=2, freeze_backbone_steps=1)
    assert cli.main(["train-vae", *flags]) == 0
    model, before = seen["model"], seen["before"]
    after = dict(model.named_parameters())
    layers = [n for n in after if ".layers." in n and n.startswith(("encoder.", "decoder.")) and "lora_" not in n]
    assert layers and all(torch.equal(after[n], before[n]) for n in layers), "a backbone layer weight moved under LoRA"
    assert any(not torch.equal(after[n], before[n]) for n in after if "lora_B" in n), "no LoRA adapter trained"
    for name in ("embed_tokens.weight", "encoder.norm.weight", "decoder.norm.weight", "lm_head.weight"):
        assert not torch.equal(after[name], before[name]), f"{name} did not train under LoRA"
