"""Engine-side identities of adapter versions.

Every published version gets a fresh integer id and a fresh name, never reused, even when the same
(adapter, version) pair is published again (``load_state`` can rewind a version number). Engines
key their caches by these, so no cache can serve an older version's weights under a newer name.
A version replaced by a newer one is released once no in-flight request uses it.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from colo.errors import EngineError
from engines.base import AdapterVersion


@dataclass
class Published:
    key: AdapterVersion
    int_id: int
    name: str
    refs: int = 0
    retired: bool = False


class VersionTable:
    def __init__(self, release: Callable[[Published], None]) -> None:
        self._release = release  # called once per version, when it is retired and unused
        self._ids = itertools.count(1)
        self._latest: dict[str, Published] = {}
        self._retired: dict[int, Published] = {}

    def add(self, key: AdapterVersion) -> Published:
        int_id = next(self._ids)
        new = Published(key, int_id, f"{key.adapter}@v{key.version}#{int_id}")
        old = self._latest.get(key.adapter)
        self._latest[key.adapter] = new
        if old is not None:
            self._retire(old)
        return new

    def drop(self, adapter: str) -> None:
        old = self._latest.pop(adapter, None)
        if old is not None:
            self._retire(old)

    def live(self) -> list[Published]:
        """Every version still held: the newest of each adapter, and older ones still in use."""
        return [*self._latest.values(), *self._retired.values()]

    def latest(self, adapter: str) -> Published | None:
        return self._latest.get(adapter)

    @contextmanager
    def using(self, keys: list[AdapterVersion | None]) -> Iterator[list[Published | None]]:
        """The published versions for ``keys`` (None stays None), held until the block ends."""
        held = [None if k is None else self._resolve(k) for k in keys]
        for p in held:
            if p is not None:
                p.refs += 1
        try:
            yield held
        finally:
            for p in held:
                if p is not None:
                    p.refs -= 1
                    if p.retired and p.refs == 0 and p.int_id in self._retired:
                        del self._retired[p.int_id]
                        self._release(p)

    def _resolve(self, key: AdapterVersion) -> Published:
        p = self._latest.get(key.adapter)
        if p is None or p.key.version != key.version:
            have = "nothing" if p is None else f"version {p.key.version}"
            raise EngineError(f"adapter {key.adapter} version {key.version} is not published (the engine has {have})")
        return p

    def _retire(self, p: Published) -> None:
        p.retired = True
        if p.refs == 0:
            self._release(p)
        else:
            self._retired[p.int_id] = p
