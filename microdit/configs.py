"""What every configuration dataclass shares: the check that a dict names only its fields.

    from microdit.configs import check_fields
    check_fields(TrainConfig, d, "TrainConfig")     # UserError: unknown TrainConfig fields ['stepz']: ...
"""
from __future__ import annotations

from dataclasses import fields

from .cli import UserError


def check_fields(cls, names, what: str) -> None:
    """Raise UserError (a ValueError) when `names` (keys of a dict, say) holds a name that is not a field of
    dataclass `cls`; the message names the unknown and the known fields."""
    known = {f.name for f in fields(cls)}
    unknown = set(names) - known
    if unknown:
        raise UserError(f"unknown {what} fields {sorted(unknown)}: check the spelling; known: {sorted(known)}")
