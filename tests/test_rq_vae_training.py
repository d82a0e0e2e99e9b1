"""RQVAEModel checkpoints on tiny configs, CPU, offline: save_pretrained -> from_pretrained for every
quantizer family gives identical codes and logits, and codes -> decode equals the forward's logits."""

import pytest
import torch
from conftest import tiny_qwen3_config

from rqlm import RQVAEConfig, RQVAEModel
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
