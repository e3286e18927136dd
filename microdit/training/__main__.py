"""`python -m microdit.training`: train the four-stage recipe or one stage (see microdit/training/stages.py)."""
from ..cli import run_cli
from .stages import main

run_cli(main)
