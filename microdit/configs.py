"""What every configuration dataclass shares: the check that a dict names only its fields.

    from microdit.configs import check_fields
    check_fields(TrainConfig, d, "TrainConfig")     # ValueError: unknown TrainConfig fields ['stepz']; known: [...]
"""
from __future__ import annotations

from dataclasses import fields


def check_fields(cls, names, what: str) -> None:
    """Raise ValueError when `names` (keys of a dict, say) holds a name that is not a field of dataclass `cls`."""
    known = {f.name for f in fields(cls)}
    unknown = set(names) - known
    if unknown:
        raise ValueError(f"unknown {what} fields {sorted(unknown)}; known: {sorted(known)}")
