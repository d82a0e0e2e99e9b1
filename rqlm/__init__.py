"""rqlm: a Qwen language model generating text in a residual-quantized latent space."""

__version__ = "0.1.0"
