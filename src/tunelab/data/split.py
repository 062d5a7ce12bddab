"""Deterministic mixing and train/val split, both decided by the row's content id alone.

Because each decision depends only on the row itself, adding data never moves an old row between train and
val, and subsampling a source keeps the same rows when that source grows.
"""

from __future__ import annotations

import hashlib
import math


def unit_hash(row_id: str, salt: str) -> float:
    """A number in [0, 1) fixed by (salt, row id). Different salts give independent decisions."""
    digest = hashlib.blake2b(f"{salt}:{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def is_validation(row_id: str, val_fraction: float) -> bool:
    return unit_hash(row_id, "split") < val_fraction


def copies_for_weight(row_id: str, weight: float) -> int:
    """How many times a row appears in train: floor(weight), plus one more with probability frac(weight).
    So weight 0.3 keeps ~30% of a source, weight 2.5 repeats every row 2 or 3 times (~2.5x on average)."""
    whole = math.floor(weight)
    return whole + (unit_hash(row_id, "mix") < weight - whole)
