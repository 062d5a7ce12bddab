"""Content ids, exact and near-duplicate removal. The first occurrence (in source order) always wins.

Near duplicates: datasketch MinHash over word shingles + MinHashLSH, then the estimated Jaccard similarity
of each LSH candidate is checked against the threshold (LSH alone also returns some pairs below it).
Cost is linear in the number of words: each word is hashed once (a bounded dict caches word hashes), shingle
hashes are combined with numpy, and datasketch applies its permutations to a whole document in one vectorised
call. Rows stream through NearDuplicateIndex: memory grows by one signature and its LSH keys per kept row.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Sequence

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


WORD_CACHE = 500_000  # distinct words whose hash is cached (~60 MB at most)
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


class NearDuplicateIndex:
    """Streaming near-duplicate check: `add(text)` returns the position (among the texts kept so far) of an
    earlier kept text that `text` duplicates, or None after keeping it. Rows stream through; per kept row it
    holds only the MinHash signature (num_perm uint32 values in one growing array) and one int per LSH band."""

    def __init__(self, threshold: float, num_perm: int, shingle_words: int) -> None:
        self.threshold, self.shingle_words = threshold, shingle_words
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)  # datasketch's choice of bands x rows
        self.bands = [slice(i * lsh.r, (i + 1) * lsh.r) for i in range(lsh.b)]
        # band key -> kept position(s): MinHashLSH's tables hold a set per key (~1.5 KB per row); a plain int
        # (a list only when a key is shared) holds the same candidates in ~0.1 KB per band. Keys are Python hashes
        # of the band's values: a collision only adds a candidate, which the Jaccard check filters.
        self.tables: list[dict[int, int | list[int]]] = [{} for _ in self.bands]
        # The shingles are already 32-bit hashes, so datasketch's hash function is the identity (int).
        self.prototype = MinHash(num_perm=num_perm, hashfunc=int)
        self.word_hashes = _WordHashes()
        self.signatures = np.empty((1024, num_perm), dtype=np.uint32)  # datasketch's hash values fit in 32 bits
        self.kept = 0

    def add(self, text: str) -> int | None:
        if len(self.word_hashes) > WORD_CACHE:  # the cache only saves time: bound its memory
            self.word_hashes.clear()
        signature = self.prototype.copy()
        signature.update_batch(shingle_hashes(text, self.shingle_words, self.word_hashes).tolist())
        values = signature.hashvalues.astype(np.uint32)
        keys = [hash(values[band].tobytes()) for band in self.bands]
        candidates: set[int] = set()
        for table, key in zip(self.tables, keys):
            found = table.get(key)
            if found is not None:
                candidates.update(found) if isinstance(found, list) else candidates.add(found)
        for j in sorted(candidates):
            # the estimated Jaccard similarity, as MinHash.jaccard computes it
            if np.count_nonzero(self.signatures[j] == values) / len(values) >= self.threshold:
                return j
        if self.kept == len(self.signatures):
            self.signatures = np.concatenate([self.signatures, np.empty_like(self.signatures)])
        self.signatures[self.kept] = values
        for table, key in zip(self.tables, keys):
            found = table.get(key)
            if found is None:
                table[key] = self.kept
            elif isinstance(found, list):
                found.append(self.kept)
            else:
                table[key] = [found, self.kept]
        self.kept += 1
        return None


def near_duplicates(texts: Sequence[str], threshold: float, num_perm: int, shingle_words: int) -> dict[int, int]:
    """{index of a near-duplicate row: index of the earlier row it duplicates}."""
    index = NearDuplicateIndex(threshold, num_perm, shingle_words)
    kept: list[int] = []  # text index of each kept text
    dups: dict[int, int] = {}
    for i, text in enumerate(texts):
        match = index.add(text)
        if match is None:
            kept.append(i)
        else:
            dups[i] = kept[match]
    return dups


def dedup_text(messages: list[Message]) -> str:
    """What near-dedup compares: every message's text (roles do not matter for similarity)."""
    return "\n".join(m["content"] for m in messages)
