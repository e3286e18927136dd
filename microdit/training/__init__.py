"""Training internals behind `python -m microdit.train`: one stage's loop (`loop.py`), configuration
and stage presets, optimisation (AdamW groups, schedules, EMA), checkpoints and exact resume,
distributed wrappers, monitoring, validation, and small latent sets for tests and the CPU demo."""
from .config import CPU_STAGES, PAPER_STAGES, STAGES, TrainConfig, stage_configs

__all__ = ["CPU_STAGES", "PAPER_STAGES", "STAGES", "TrainConfig", "stage_configs"]
