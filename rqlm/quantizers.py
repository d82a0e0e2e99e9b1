"""Every quantizer rqlm ships, with vector-quantize-pytorch's names and keywords (see rqlm.modeling)."""

from .modeling.finite_scalar_quantization import FSQ
from .modeling.latent_quantization import LatentQuantize
from .modeling.lookup_free_quantization import LFQ
from .modeling.quantizer_registry import (
    QUANTIZER_CLASSES,
    build_quantizer,
    code_depth,
    codebook_stats,
    codes_to_quantized,
    quantize,
)
from .modeling.random_projection_quantizer import RandomProjectionQuantizer
from .modeling.residual_fsq import ResidualFSQ
from .modeling.residual_lfq import ResidualLFQ
from .modeling.residual_vq import GroupedResidualVQ, ResidualVQ
from .modeling.sim_vq import ResidualSimVQ, SimVQ
from .modeling.vector_quantize import VectorQuantize

__all__ = [
    "FSQ",
    "LFQ",
    "QUANTIZER_CLASSES",
    "GroupedResidualVQ",
    "LatentQuantize",
    "RandomProjectionQuantizer",
    "ResidualFSQ",
    "ResidualLFQ",
    "ResidualSimVQ",
    "ResidualVQ",
    "SimVQ",
    "VectorQuantize",
    "build_quantizer",
    "code_depth",
    "codebook_stats",
    "codes_to_quantized",
    "quantize",
]
