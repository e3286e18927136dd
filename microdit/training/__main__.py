"""`python -m microdit.training`: train the four-stage recipe or one stage (see microdit/training/stages.py)."""
from .stages import main

main()
