"""Training: `python -m microdit.training` (`stages.py`: the command, stages in order), one stage's
loop (`loop.py`), configuration and stage presets, optimisation (AdamW groups, schedules, EMA),
checkpoints and exact resume, distributed wrappers, monitoring and validation."""
from .config import CPU_STAGES, PAPER_STAGES, STAGES, TrainConfig, stage_configs

__all__ = ["CPU_STAGES", "PAPER_STAGES", "STAGES", "TrainConfig", "stage_configs"]
