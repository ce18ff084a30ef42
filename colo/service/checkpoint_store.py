"""Where the service keeps checkpoints, and the ``tinker://`` paths that name them.

``tinker://<model_id>/weights/<name>`` (weights and optimizer state, for ``load_weights``) and
``tinker://<model_id>/sampler_weights/<name>`` (weights only, for sampling) map to
``<COLO_CHECKPOINT_DIR>/<tenant>/<model_id>/<kind>/<name>.safetensors``;
``tinker://<model_id>/external_weights/<name>`` (a PEFT adapter for other programs, fetched through
signed URLs) to the directory ``.../external_weights/<name>.external/``. Names are checked against a
strict pattern (no '/', no leading '.'), and the file always lies under the caller's own tenant
directory, so no path a client sends can reach outside it or into another tenant's checkpoints. The
one way in from another tenant is a checkpoint its owner published (``locate``), and only for reading.

Sidecars beside a checkpoint survive a restart: ``<file>.expires`` holds its expiry time (Unix seconds,
from ``ttl_seconds``; ``expire()`` deletes what is due), and ``<file>.public`` marks it published.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from colo.errors import InvalidRequestError
from colo.service.errors import NotFound

SUFFIXES = {"weights": ".safetensors", "sampler_weights": ".safetensors", "external_weights": ".external"}
KINDS = tuple(SUFFIXES)
EXPIRES = ".expires"
PUBLIC = ".public"
MAX_TTL_SECONDS = 10 * 365 * 86400


@dataclass
class Stored:
    model_id: str
    kind: str
    name: str
    file: Path
    created: float  # Unix seconds
    size_bytes: int
    expires_at: float | None
    public: bool
    owner: str  # the tenant whose directory holds it


_ID = re.compile(r"[A-Za-z0-9_:-]{1,160}")
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


class CheckpointStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.sweep(self.root)

    @staticmethod
    def sweep(folder: Path) -> int:
        """Remove the temporary files of saves that were killed midway (one service owns its directory, and
        its saves run one at a time: any temporary file found before a save is a leftover). Returns how many."""
        stale = list(folder.rglob(".*.tmp-*")) if folder.is_dir() else []
        for p in stale:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        return len(stale)

    def model_dir(self, tenant: str, model_id: str) -> Path:
        """The model's folder; a client's id is checked here, before it becomes part of any path."""
        # fullmatch: ``$`` alone would let an id end in a newline
        if not isinstance(model_id, str) or not _ID.fullmatch(model_id):
            raise InvalidRequestError(f"model id {model_id!r}; allowed: 1-160 letters, digits, '_', ':' or '-'")
        return self.root / tenant / model_id

    def file(self, tenant: str, model_id: str, kind: str, name: str) -> Path:
        folder = self.model_dir(tenant, model_id)
        if kind not in KINDS:
            raise InvalidRequestError(f"checkpoint kind {kind!r}; allowed: {', '.join(KINDS)}")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidRequestError(f"checkpoint name {name!r}; allowed: 1-128 letters, digits, '.', '_' or '-', "
                                      "not starting with '.'")
        path = (folder / kind / f"{name}{SUFFIXES[kind]}").resolve()
        if not path.is_relative_to(self.root / tenant):  # the patterns already rule this out; belt and braces
            raise InvalidRequestError(f"checkpoint name {name!r} leaves the checkpoint directory")
        return path

    def tenant_dir(self, tenant: str) -> Path:
        return self.root / tenant

    def models_on_disk(self, tenant: str) -> list[str]:
        folder = self.tenant_dir(tenant)
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and _ID.fullmatch(p.name)) if folder.is_dir() else []

    def list(self, tenant: str, model_id: str) -> list[Stored]:
        """The model's checkpoints, oldest first."""
        out = []
        model_dir = self.model_dir(tenant, model_id)
        for kind, suffix in SUFFIXES.items():
            folder = model_dir / kind
            for f in folder.glob(f"*{suffix}") if folder.is_dir() else ():
                name = f.name.removesuffix(suffix)
                if _NAME.fullmatch(name) and (stored := self.stored(tenant, model_id, kind, name, f)):
                    out.append(stored)
        return sorted(out, key=lambda c: c.created)

    def stored(self, tenant: str, model_id: str, kind: str, name: str, file: Path) -> Stored | None:
        """What the service shows of one checkpoint; None if it is gone (or, for a folder, not whole)."""
        try:
            st = file.stat()
            size = sum(f.stat().st_size for f in file.iterdir() if f.is_file()) if file.is_dir() else st.st_size
        except FileNotFoundError:  # deleted meanwhile
            return None
        return Stored(model_id, kind, name, file, st.st_mtime, size, self.expiry(file),
                      self.sidecar(file, PUBLIC).exists(), tenant)

    def locate(self, tenant: str, tinker_path: str, kinds: tuple[str, ...] = KINDS) -> Stored:
        """The checkpoint a ``tinker://`` path names, for reading: the tenant's own or, failing that, one
        another tenant published. ``NotFound`` reads the same for a missing and an unpublished one."""
        model_id, kind, name, file = self.parse(tenant, tinker_path)
        if kind not in kinds:
            raise InvalidRequestError(f"path {tinker_path!r} is a {kind} checkpoint; allowed here: "
                                      f"{' or '.join(kinds)}")
        if file.exists():
            return self.stored(tenant, model_id, kind, name, file) or self._missing(tinker_path)
        owners = sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []
        for owner in (o for o in owners if o != tenant):
            other = self.root / owner / model_id / kind / file.name
            if self.sidecar(other, PUBLIC).exists() and other.exists():
                return self.stored(owner, model_id, kind, name, other) or self._missing(tinker_path)
        self._missing(tinker_path)

    @staticmethod
    def _missing(tinker_path: str):
        raise NotFound(f"no checkpoint {tinker_path!r} for this tenant (nor one published by another)")

    @staticmethod
    def sidecar(file: Path, kind: str) -> Path:
        return file.with_name(file.name + kind)

    def set_public(self, file: Path, public: bool) -> None:
        side = self.sidecar(file, PUBLIC)
        if public:
            side.touch()
        else:
            side.unlink(missing_ok=True)

    @staticmethod
    def expiry(file: Path) -> float | None:
        try:
            return float(CheckpointStore.sidecar(file, EXPIRES).read_text())
        except (FileNotFoundError, ValueError):
            return None

    @staticmethod
    def checked_ttl(ttl) -> int | None:
        """A client's ``ttl_seconds``, checked before any job is queued with it."""
        if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool) or not 1 <= ttl <= MAX_TTL_SECONDS):
            raise InvalidRequestError(f"ttl_seconds={ttl!r}; allowed: None (keep) or whole seconds in [1, {MAX_TTL_SECONDS}]")
        return ttl

    @staticmethod
    def set_ttl(file: Path, ttl_seconds: int | None) -> None:
        """Expire ``file`` ``ttl_seconds`` from now (None: never)."""
        side = CheckpointStore.sidecar(file, EXPIRES)
        if ttl_seconds is None:
            side.unlink(missing_ok=True)
            return
        tmp = side.with_name(f".{side.name}.tmp-{os.getpid()}")
        tmp.write_text(repr(time.time() + ttl_seconds))
        os.replace(tmp, side)

    @staticmethod
    def delete(file: Path) -> None:
        if file.is_dir():
            # renamed out of sight first, so a reader never meets half a folder
            gone = file.with_name(f".{file.name}.tmp-deleted-{uuid.uuid4().hex}")
            os.replace(file, gone)
            shutil.rmtree(gone, ignore_errors=True)
        else:
            file.unlink(missing_ok=True)
        for side in (EXPIRES, PUBLIC):
            CheckpointStore.sidecar(file, side).unlink(missing_ok=True)

    def expire(self, folder: Path | None = None, now: float | None = None) -> list[Path]:
        """Delete every checkpoint under ``folder`` (default: all) whose time is up; the deleted files."""
        now = time.time() if now is None else now
        folder = self.root if folder is None else folder
        gone = []
        for side in folder.rglob(f"*{EXPIRES}") if folder.is_dir() else ():
            file = side.with_name(side.name.removesuffix(EXPIRES))
            if not file.name.endswith(tuple(SUFFIXES.values())):
                continue
            when = self.expiry(file)
            if when is not None and when <= now:
                self.delete(file)
                gone.append(file)
        return gone

    def parse(self, tenant: str, tinker_path: str) -> tuple[str, str, str, Path]:
        """``tinker://model/kind/name`` -> (model_id, kind, name, file of this tenant)."""
        if not isinstance(tinker_path, str) or not tinker_path.startswith("tinker://"):
            raise InvalidRequestError(f"path {tinker_path!r}; allowed: tinker://<model_id>/<{'|'.join(KINDS)}>/<name>")
        parts = tinker_path.removeprefix("tinker://").split("/")
        if len(parts) != 3:
            raise InvalidRequestError(f"path {tinker_path!r}; allowed: tinker://<model_id>/<{'|'.join(KINDS)}>/<name>")
        model_id, kind, name = parts
        return model_id, kind, name, self.file(tenant, model_id, kind, name)

    @staticmethod
    def tinker_path(model_id: str, kind: str, name: str) -> str:
        return f"tinker://{model_id}/{kind}/{name}"
