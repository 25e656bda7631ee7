"""Renames between our parameter names and a release's, shared by VAR and Infinity.

Both families keep the release's raw tensors in leaf modules (arbooth/models/leaf_params.py), which
renames a few keys; each lists its pairs once (`var._RENAMES`, `infinity_keys._RENAMES`) and converts
with a `KeyRenames` of them. `{i}` in a name stands for a block index.
"""
from __future__ import annotations

import re
from collections.abc import Sequence


def name_pattern(name: str) -> re.Pattern:
    """`name` as a regex matching the whole key, with `{i}` a captured block index."""
    return re.compile(re.escape(name).replace(r"\{i\}", r"(?P<i>\d+)"))


class KeyRenames:
    """(our name, released name) pairs -> both directions of the conversion; other keys pass unchanged."""

    def __init__(self, pairs: Sequence[tuple[str, str]]):
        self.pairs = tuple(pairs)
        self._patterns = tuple((name_pattern(ours), name_pattern(theirs)) for ours, theirs in self.pairs)

    def _rename(self, key: str, src: int) -> str:
        for pair, pats in zip(self.pairs, self._patterns):
            m = pats[src].fullmatch(key)
            if m:
                return pair[1 - src].format(**m.groupdict())
        return key

    def to_official(self, key: str) -> str:
        return self._rename(key, 0)

    def from_official(self, key: str) -> str:
        return self._rename(key, 1)
