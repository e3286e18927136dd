"""MicroDiT: sparse diffusion transformer, EDM diffusion, encoders, training and evaluation."""
from .edm import EDMConfig
from .model import PRESETS, MicroDiT, MicroDiTConfig, create_model, estimate_flops

__all__ = ["EDMConfig", "PRESETS", "MicroDiT", "MicroDiTConfig", "create_model", "estimate_flops",
           "load_model", "save_model", "MicroDiTPipeline"]


def __getattr__(name):  # heavy imports only when asked for
    if name in ("load_model", "save_model"):
        from . import checkpoint
        return getattr(checkpoint, name)
    if name == "MicroDiTPipeline":
        from .pipeline import MicroDiTPipeline
        return MicroDiTPipeline
    raise AttributeError(name)
