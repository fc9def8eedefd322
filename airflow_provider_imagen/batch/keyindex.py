"""A compact map from string keys to integers: sorted 64-bit hashes beside their values, in numpy arrays.

Why not a ``dict``: a batch of 10^5 rows kept a dict of every key (the window index's key → position,
the journal's key → level row), each entry a key string, a boxed integer or a tuple and a slot of the
table: 150-200 bytes a row for the whole run. Here a row costs 16 bytes (its key's hash and its value);
the key itself stays where it already is (an Arrow column, mapped from a file) and is read back only to
confirm a hash match, so two keys whose hashes collide are still told apart.

Hashes are Python's ``hash`` of the key: salted per process, which is all an index built and used in one
process needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final

import numpy as np

#: Keys hashed per slice when a column is indexed (their strings are held one slice at a time).
SLICE: Final = 8192


def key_hashes(keys: Iterable[str], count: int = -1) -> np.ndarray:
    """Return the hashes of ``keys`` as an int64 array (``count``: their number, when known)."""
    return np.fromiter(map(hash, keys), dtype=np.int64, count=count)


class KeyIndex:
    """Keys → non-negative integers, looked up by hash, each match confirmed by ``key_of(value)``.

    :param hashes: the hash of each key (see :func:`key_hashes`).
    :param values: each key's value, in the same order.
    :param key_of: the key a value stands for (read from where the keys are kept).

    Where several entries hold the same key, the one given first wins (callers put the newest first).
    """

    def __init__(self, hashes: np.ndarray, values: np.ndarray, key_of: Callable[[int], str]) -> None:
        order = np.argsort(hashes, kind="stable")
        self.hashes: np.ndarray = hashes[order]
        self.values: np.ndarray = values[order]
        self._key_of = key_of

    def __len__(self) -> int:
        return len(self.hashes)

    def laid_over(self, hashes: np.ndarray, values: np.ndarray, keep: np.ndarray) -> KeyIndex:
        """Return this index with only its entries in ``keep`` (a mask), the new entries in front of them.

        A new entry comes before an older one of the same hash, so it wins a lookup of its key. The
        entries here are sorted already: merging the new ones in costs a copy, not a sort.
        """
        order = np.argsort(hashes, kind="stable")
        hashes, values = hashes[order], values[order]
        kept_hashes, kept_values = self.hashes[keep], self.values[keep]
        at = kept_hashes.searchsorted(hashes, side="left")
        merged = KeyIndex.__new__(KeyIndex)
        merged.hashes = np.insert(kept_hashes, at, hashes)
        merged.values = np.insert(kept_values, at, values)
        merged._key_of = self._key_of
        return merged

    def get(self, key: str) -> int | None:
        """Return the value of ``key``, or ``None`` when it is not indexed."""
        h = hash(key)
        hashes = self.hashes
        j = int(hashes.searchsorted(h))
        end = len(hashes)
        while j < end and hashes[j] == h:
            value = int(self.values[j])
            if self._key_of(value) == key:
                return value
            j += 1
        return None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def __getitem__(self, key: str) -> int:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def first_values(self) -> np.ndarray:
        """Return a mask of the entries that are their key's first (the others are shadowed by it).

        Only entries sharing a hash have their keys read (a few in a run).
        """
        hashes = self.hashes
        keep = np.ones(len(hashes), dtype=bool)
        shared = np.flatnonzero(hashes[1:] == hashes[:-1])
        j, end = 0, len(shared)
        while j < end:
            start = stop = int(shared[j])
            while j < end and int(shared[j]) == stop:  # one run of equal hashes: start .. stop + 1
                stop += 1
                j += 1
            seen: set[str] = set()
            for k in range(start, stop + 1):
                key = self._key_of(int(self.values[k]))
                if key in seen:
                    keep[k] = False
                seen.add(key)
        return keep
