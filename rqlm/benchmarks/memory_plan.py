"""Training memory per GPU of the VAE, the latent LM and the baseline at a Qwen3 size, from configs alone.

    plan = memory_plan("Qwen/Qwen3-8B", gpu_counts=(1, 8, 64))   # offline: models built on the meta device
    plan.rows  # one PlanRow per (model, LoRA or full, GPU count)

Parameter counts are exact: every model is built from its config on the meta device (no memory, no
weights, no hub). The bytes around them are the standard mixed-precision accounting of the shared
loop under `accelerate launch --mixed_precision bf16`:

- weights: fp32, 4 bytes per parameter (autocast computes in bf16; frozen weights are held the same way)
- gradients: fp32, 4 bytes per trainable parameter
- optimizer: AdamW's exp_avg and exp_avg_sq, 8 bytes per trainable parameter
- FSDP full shard on N GPUs divides all three by N; one GPU (or DDP, which replicates) does not
- activations: an estimate per micro-batch (bf16 tensors autograd keeps, see `layer_activation_elements`),
  not sharded; with gradient checkpointing a layer keeps only its input, and one layer is recomputed at a time

The Qwen3 configs of the released sizes are written here, so `rqlm plan --backbone Qwen/Qwen3-8B`
needs no hub access.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from transformers import Qwen3Config

GB = 1e9
WEIGHT_BYTES = 4  # fp32 master weights
GRADIENT_BYTES = 4  # fp32 gradients
OPTIMIZER_BYTES = 8  # AdamW: two fp32 moments
ACTIVATION_BYTES = 2  # bf16 under autocast
LOGIT_BYTES = 2 + 4 + 4  # bf16 logits, their fp32 upcast for the loss, the fp32 log-softmax autograd keeps

# the released Qwen3 dense models (their hub config.json), so planning needs no hub
_QWEN3_SHARED = {
    "head_dim": 128,
    "num_key_value_heads": 8,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
QWEN3_CONFIGS = {
    "Qwen/Qwen3-0.6B": {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                        "num_attention_heads": 16, "tie_word_embeddings": True},
    "Qwen/Qwen3-1.7B": {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
                        "num_attention_heads": 16, "tie_word_embeddings": True},
    "Qwen/Qwen3-4B": {"hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
                      "num_attention_heads": 32, "tie_word_embeddings": True},
    "Qwen/Qwen3-8B": {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                      "num_attention_heads": 32, "tie_word_embeddings": False},
}  # fmt: skip

# the models planned around the backbone: train-vae's and train-lm's defaults (a pretrained backbone's VAE
# keeps two of its layers on each side, as `RQVAEModel.from_backbone` does by default)
VAE_FIELDS = {
    "num_encoder_layers": 2,
    "num_decoder_layers": 2,
    "num_latent_layers": 0,
    "latent_dim": 64,
    "num_quantizers": 8,
    "codebook_size": 1024,
    "compression_factor": 4,
    "quantizer_kwargs": {"kmeans_init": True, "threshold_ema_dead_code": 2, "decay": 0.8, "commitment_weight": 0.25},
}
# the LM as `rqlm train-lm` builds it by default: the tokens mode (its 4-layer token decoder and P by the config's
# defaults); `--depth_output codes` in a plan would add the codes mode's D x K logits instead of C x V
LM_FIELDS = {"depth_output": "tokens", "depth_hidden_size": 256, "depth_num_attention_heads": 4}
MODELS = ("vae", "lm", "baseline")

# which configs/accelerate file runs a plan row
ACCELERATE_CONFIGS = {1: "configs/accelerate/single_gpu_bf16.yaml", 8: "configs/accelerate/fsdp.yaml"}
MULTI_MACHINE_CONFIG = "configs/accelerate/fsdp_two_machines.yaml"
GPUS_PER_MACHINE = 8


def qwen3_config(name: str) -> Qwen3Config:
    """The `Qwen3Config` of a released Qwen3 ('Qwen/Qwen3-8B' or '8B'), written in code (no hub)."""
    key = name if name in QWEN3_CONFIGS else f"Qwen/Qwen3-{name.removeprefix('Qwen3-').upper()}"
    if key not in QWEN3_CONFIGS:
        raise ValueError(f"no written-in config for backbone {name!r}; choose from {', '.join(QWEN3_CONFIGS)}")
    return Qwen3Config(**_QWEN3_SHARED, **QWEN3_CONFIGS[key])


def build_model(
    model: str, backbone: Qwen3Config, lora_r: int = 0, vae_fields: dict | None = None, device: str = "meta"
) -> torch.nn.Module:
    """The model `model` ('vae', 'lm', 'baseline') around `backbone`, on the meta device by default (no memory).
    The baseline under LoRA trains its adapters only, as a peft fine-tune does."""
    from transformers import Qwen3ForCausalLM

    from rqlm import RQTransformerConfig, RQTransformerForCausalLM, RQVAEConfig, RQVAEModel

    vae_fields = {**VAE_FIELDS, **(vae_fields or {})}
    with torch.device(device):
        if model == "baseline":
            if lora_r:
                from rqlm.modeling.lora import add_lora

                baseline = Qwen3ForCausalLM(copy.deepcopy(backbone))
                baseline.requires_grad_(False)
                add_lora(baseline.model.layers, r=lora_r)
                return baseline
            return Qwen3ForCausalLM(copy.deepcopy(backbone))
        vae_config = RQVAEConfig(backbone_config=backbone.to_dict(), lora_r=lora_r if model == "vae" else 0, **vae_fields)
        if model == "vae":
            return RQVAEModel(vae_config)
        if model == "lm":
            config = RQTransformerConfig(backbone_config=backbone.to_dict(), vae_config=vae_config.to_dict(),
                                         lora_r=lora_r, **LM_FIELDS)
            return RQTransformerForCausalLM(config)
    raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")


def count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters) of a model; the LM's frozen VAE counts as not trainable."""
    total = sum(p.numel() for p in module.parameters())
    frozen_vae = {id(p) for p in module.vae.parameters()} if hasattr(module, "vae") else set()
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad and id(p) not in frozen_vae)
    return total, trainable


def layer_activation_elements(config: Qwen3Config) -> int:
    """Elements autograd keeps per token in one Qwen3 decoder layer (SDPA/flash attention: no T x T matrix):
    layer input, norm output, q/k before and after their norm + rotary, v, attention output, the second
    norm's input and output, and gate, up, act(gate), act(gate) * up of the MLP."""
    h, i = config.hidden_size, config.intermediate_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    return 4 * h + 3 * q + 3 * kv + 4 * i


def stack_activation_bytes(config: Qwen3Config, layers: int, positions: int, checkpointing: bool) -> int:
    """Activation bytes of `layers` Qwen3 layers over `positions` positions (batch x length)."""
    if layers == 0:
        return 0
    full = layer_activation_elements(config) * positions * ACTIVATION_BYTES
    if not checkpointing:
        return layers * full
    return layers * config.hidden_size * positions * ACTIVATION_BYTES + full  # inputs kept + one recomputed


def activation_bytes(model: torch.nn.Module, kind: str, tokens: int, checkpointing: bool) -> int:
    """Activation bytes of one micro-batch of `tokens` tokens (batch x block size) of a meta-built model."""
    from rqlm.modeling.layers import small_stack_config

    if kind == "baseline":
        config = model.config
        return stack_activation_bytes(config, config.num_hidden_layers, tokens, checkpointing) + (
            tokens * config.vocab_size * LOGIT_BYTES
        )
    if kind == "vae":
        config, backbone = model.config, model.config.backbone_config
        layers = config.num_encoder_layers + config.num_decoder_layers
        return stack_activation_bytes(backbone, layers, tokens, checkpointing) + tokens * backbone.vocab_size * LOGIT_BYTES
    config = model.config  # the LM: spatial layers over L = T / C positions, then its depth decoder per position
    positions = tokens // config.compression_factor
    if config.depth_output == "tokens":  # the token decoder over L x (P + C) slots, then the C x V logits
        depth_positions = positions * ((config.token_decoder_context or 0) + config.compression_factor)
        vocab = config.vae_config.backbone_config.vocab_size
        outputs = tokens * vocab
    else:  # the codes mode: depth layers over L x D, then D x K logits
        depth_positions = positions * config.num_quantizers
        outputs = depth_positions * config.codebook_size
    depth = small_stack_config(config.depth_hidden_size, config.depth_intermediate_size, config.depth_num_layers,
                               config.depth_num_attention_heads, config.backbone_config.max_position_embeddings,
                               like=config.backbone_config)
    return (
        stack_activation_bytes(config.backbone_config, config.backbone_config.num_hidden_layers, positions, checkpointing)
        + stack_activation_bytes(depth, config.depth_num_layers, depth_positions, checkpointing)
        + outputs * LOGIT_BYTES
    )


@dataclass
class PlanRow:
    """Memory per GPU of one model trained one way on `gpus` GPUs (bytes; parameters as counts)."""

    model: str
    lora: bool
    gpus: int
    parameters: int
    trainable_parameters: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    activations_checkpointed: float
    accelerate_config: str

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def total_checkpointed(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations_checkpointed


@dataclass
class MemoryPlan:
    backbone: str
    block_size: int
    per_device_train_batch_size: int
    lora_r: int
    rows: list[PlanRow] = field(default_factory=list)


def accelerate_config(gpus: int) -> str:
    """The configs/accelerate file for `gpus` GPUs: one GPU, one machine of 8 (FSDP), or several machines."""
    if gpus in ACCELERATE_CONFIGS:
        return ACCELERATE_CONFIGS[gpus]
    if gpus <= GPUS_PER_MACHINE:
        return f"{ACCELERATE_CONFIGS[8]} --num_processes {gpus}"
    machines = -(-gpus // GPUS_PER_MACHINE)
    return f"{MULTI_MACHINE_CONFIG} --num_machines {machines} --num_processes {gpus}"


def memory_plan(
    backbone: str = "Qwen/Qwen3-8B",
    gpu_counts: tuple[int, ...] = (1, 8, 64),
    block_size: int = 2048,
    per_device_train_batch_size: int = 1,
    lora_r: int = 16,
    vae_fields: dict | None = None,
) -> MemoryPlan:
    """Every (model, full or LoRA, GPU count) row for a released Qwen3 `backbone` (see the module docstring)."""
    if any(g < 1 for g in gpu_counts):
        raise ValueError(f"GPU counts must be >= 1, got {list(gpu_counts)}")
    if block_size < 1 or per_device_train_batch_size < 1 or lora_r < 1:
        raise ValueError("block_size, per_device_train_batch_size and lora_r must be >= 1")
    config = qwen3_config(backbone)
    compression = {**VAE_FIELDS, **(vae_fields or {})}["compression_factor"]
    if block_size % compression:
        raise ValueError(f"block_size {block_size} is not a multiple of compression {compression}; pass a multiple")
    plan = MemoryPlan(backbone, block_size, per_device_train_batch_size, lora_r)
    tokens = block_size * per_device_train_batch_size
    for kind in MODELS:
        for r in (0, lora_r):
            model = build_model(kind, config, lora_r=r, vae_fields=vae_fields)
            total, trainable = count_parameters(model)
            activations = activation_bytes(model, kind, tokens, checkpointing=False)
            checkpointed = activation_bytes(model, kind, tokens, checkpointing=True)
            for gpus in gpu_counts:
                plan.rows.append(PlanRow(
                    model=kind, lora=bool(r), gpus=gpus, parameters=total, trainable_parameters=trainable,
                    weights=total * WEIGHT_BYTES / gpus, gradients=trainable * GRADIENT_BYTES / gpus,
                    optimizer=trainable * OPTIMIZER_BYTES / gpus, activations=activations,
                    activations_checkpointed=checkpointed, accelerate_config=accelerate_config(gpus),
                ))  # fmt: skip
    return plan


def plan_table(plan: MemoryPlan, gpu_memory_gb: float = 80.0) -> str:
    """The plan as a markdown table, GB per GPU, with whether each row fits a GPU of `gpu_memory_gb`."""
    lines = [
        (f"Training memory per GPU around {plan.backbone}: block {plan.block_size} tokens x micro-batch "
        f"{plan.per_device_train_batch_size}, bf16 autocast over fp32 weights, AdamW; more than one GPU = FSDP full "
        f"shard; LoRA r={plan.lora_r} on the Qwen3 layers. GB = 1e9 bytes; activations are an estimate."),
        "",
        ("| model | training | GPUs | parameters | trainable | weights | gradients | optimizer | activations "
        "| activations (checkpointed) | total | total (checkpointed) | fits " f"{gpu_memory_gb:g} GB | accelerate config |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in plan.rows:
        fits = "yes" if r.total <= gpu_memory_gb * GB else "with checkpointing" if r.total_checkpointed <= gpu_memory_gb * GB else "no"
        lines.append(
            f"| {r.model} | {'LoRA' if r.lora else 'full'} | {r.gpus} | {r.parameters / 1e9:.3f}B "
            f"| {r.trainable_parameters / 1e6:,.1f}M | {r.weights / GB:.2f} | {r.gradients / GB:.2f} "
            f"| {r.optimizer / GB:.2f} | {r.activations / GB:.2f} | {r.activations_checkpointed / GB:.2f} "
            f"| {r.total / GB:.2f} | {r.total_checkpointed / GB:.2f} | {fits} | {r.accelerate_config} |"
        )
    lines += ["", ("vae: the RQ-VAE (train-vae); lm: the latent LM with its frozen VAE (train-lm; the VAE counts in "
              "weights only); baseline: the plain Qwen3ForCausalLM (train-baseline). Checkpointed: activations with "
              "`model.gradient_checkpointing_enable()` (every rqlm model supports it; the training commands have no "
              "flag for it yet).")]
    return "\n".join(lines)


__all__ = ["QWEN3_CONFIGS", "MemoryPlan", "PlanRow", "build_model", "memory_plan", "plan_table", "qwen3_config"]
