"""Content ids, exact and near-duplicate removal. The first occurrence (in source order) always wins.

Near duplicates: datasketch MinHash over word shingles + MinHashLSH, then the estimated Jaccard similarity
of each LSH candidate is checked against the threshold (LSH alone also returns some pairs below it).
Cost is linear in the number of words: each word is hashed once (a dict caches word hashes), shingle hashes
are combined with numpy, and datasketch applies its permutations to a whole document in one vectorised call.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Iterator, Sequence

import numpy as np
from datasketch import MinHash, MinHashLSH

from tunelab.data.normalize import Message


def content_id(messages: list[Message]) -> str:
    """Stable 64-bit content hash (hex) of a normalised conversation: the row id, the exact-dedup key and the
    input of the train/val split."""
    canonical = json.dumps(messages, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def exact_duplicates(ids: Sequence[str]) -> list[int]:
    """Indexes of rows whose id was already seen."""
    seen: set[str] = set()
    dups = []
    for i, row_id in enumerate(ids):
        if row_id in seen:
            dups.append(i)
        seen.add(row_id)
    return dups


class _WordHashes(dict):
    """word -> crc32, computed once per distinct word (stable across runs, unlike hash())."""

    def __missing__(self, word: str) -> int:
        value = zlib.crc32(word.encode("utf-8"))
        self[word] = value
        return value


_MIX = np.uint32(0x01000193)  # FNV prime: combines the k word hashes of a shingle


def shingle_hashes(text: str, shingle_words: int, word_hashes: _WordHashes) -> np.ndarray:
    """Distinct 32-bit hashes of the lower-cased `shingle_words`-word windows of `text`."""
    words = text.lower().split()
    hashed = np.fromiter(map(word_hashes.__getitem__, words), dtype=np.uint32, count=len(words))
    k = min(shingle_words, len(hashed))
    if k == 0:
        return np.zeros(1, dtype=np.uint32)
    n = len(hashed) - k + 1
    combined = np.zeros(n, dtype=np.uint32)
    for j in range(k):  # k vectorised passes instead of n*k Python steps
        combined = combined * _MIX ^ hashed[j : j + n]
    return np.unique(combined)


def minhashes(texts: Sequence[str], num_perm: int, shingle_words: int) -> Iterator[MinHash]:
    word_hashes = _WordHashes()
    shingles = (shingle_hashes(t, shingle_words, word_hashes).tolist() for t in texts)
    # The shingles are already 32-bit hashes, so datasketch's hash function is the identity (int).
    return MinHash.generator(shingles, num_perm=num_perm, hashfunc=int)


def near_duplicates(texts: Sequence[str], threshold: float, num_perm: int, shingle_words: int) -> dict[int, int]:
    """{index of a near-duplicate row: index of the earlier row it duplicates}."""
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    kept: dict[int, MinHash] = {}
    dups: dict[int, int] = {}
    for i, signature in enumerate(minhashes(texts, num_perm, shingle_words)):
        match = next(
            (j for j in sorted(lsh.query(signature)) if kept[j].jaccard(signature) >= threshold),
            None,
        )
        if match is None:
            lsh.insert(i, signature)
            kept[i] = signature
        else:
            dups[i] = match
    return dups


def dedup_text(messages: list[Message]) -> str:
    """What near-dedup compares: every message's text (roles do not matter for similarity)."""
    return "\n".join(m["content"] for m in messages)
