"""Model flags the latent-LM training commands share (train-lm, train-givt, train-draft-head)."""

from __future__ import annotations

import argparse

from rqlm.modeling.configuration_rq_transformer import DEPTH_MODES
from rqlm.trainer.arguments import add_training_arguments


def add_depth_arguments(model) -> None:
    """The depth transformer's flags (train-lm, train-draft-head)."""
    model.add_argument("--depth_num_layers", type=int, default=1, help="layers of the depth transformer")
    model.add_argument("--depth_hidden_size", type=int, default=256, help="width of the depth transformer")
    model.add_argument("--depth_num_attention_heads", type=int, default=4)
    model.add_argument("--depth_mode", default="autoregressive", choices=DEPTH_MODES,
                       help="depth transformer over the codes chosen so far, all depths at once, or SwiGLU blocks "
                       "on each depth's input (mlp: no attention, the cheapest step)")


def add_spatial_training_arguments(parser: argparse.ArgumentParser, model, output_dir: str) -> None:
    """The flags every latent LM over a frozen VAE shares (train-lm, train-givt): freezing or LoRA on the
    spatial layers, and the training loop's flags with a 10-minute CPU default."""
    model.add_argument("--freeze_backbone_steps", type=int, default=0, help="steps the spatial layers stay frozen")
    model.add_argument("--lora_r", type=int, default=0, help="LoRA rank on the spatial layers; 0 trains them fully")
    model.add_argument("--lora_alpha", type=int, default=16)
    add_training_arguments(
        parser,
        output_dir=output_dir,
        max_steps=100_000,  # the time budget ends a default run
        max_minutes=10,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=16,
        learning_rate=1e-3,
        warmup_steps=50,
        eval_steps=200,
        eval_batches=10,
        save_steps=500,
    )
