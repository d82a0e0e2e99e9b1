"""rqlm: a Qwen language model generating text in a residual-quantized (or continuous) latent space.

Importing rqlm registers its configurations and models with transformers' Auto classes,
and marks them for `trust_remote_code` saving (a saved folder carries the modeling files).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from . import kernels  # noqa: F401  (rqlm.kernels.cpu_kernels: the opt-in CPU kernels)
from .modeling.configuration_givt import GIVTConfig
from .modeling.configuration_rq_draft_head import RQDraftHeadConfig
from .modeling.configuration_rq_transformer import RQTransformerConfig
from .modeling.configuration_rq_vae import RQVAEConfig
from .modeling.modeling_givt import GIVTForCausalLM, GIVTOutput
from .modeling.modeling_rq_draft_head import RQDraftHead, RQDraftHeadOutput
from .modeling.modeling_rq_transformer import RQTransformerForCausalLM, RQTransformerOutput
from .modeling.modeling_rq_vae import RQVAEEncoderOutput, RQVAEModel, RQVAEOutput

__version__ = "0.1.0"

AutoConfig.register(RQVAEConfig.model_type, RQVAEConfig, exist_ok=True)
AutoModel.register(RQVAEConfig, RQVAEModel, exist_ok=True)
RQVAEConfig.register_for_auto_class()
RQVAEModel.register_for_auto_class("AutoModel")

AutoConfig.register(RQTransformerConfig.model_type, RQTransformerConfig, exist_ok=True)
AutoModelForCausalLM.register(RQTransformerConfig, RQTransformerForCausalLM, exist_ok=True)
RQTransformerConfig.register_for_auto_class()
RQTransformerForCausalLM.register_for_auto_class("AutoModelForCausalLM")

AutoConfig.register(GIVTConfig.model_type, GIVTConfig, exist_ok=True)
AutoModelForCausalLM.register(GIVTConfig, GIVTForCausalLM, exist_ok=True)
GIVTConfig.register_for_auto_class()
GIVTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

AutoConfig.register(RQDraftHeadConfig.model_type, RQDraftHeadConfig, exist_ok=True)
AutoModel.register(RQDraftHeadConfig, RQDraftHead, exist_ok=True)
RQDraftHeadConfig.register_for_auto_class()
RQDraftHead.register_for_auto_class("AutoModel")

__all__ = [
    "GIVTConfig",
    "GIVTForCausalLM",
    "GIVTOutput",
    "RQDraftHead",
    "RQDraftHeadConfig",
    "RQDraftHeadOutput",
    "RQTransformerConfig",
    "RQTransformerForCausalLM",
    "RQTransformerOutput",
    "RQVAEConfig",
    "RQVAEEncoderOutput",
    "RQVAEModel",
    "RQVAEOutput",
]
