"""Where the service keeps checkpoints, and the ``tinker://`` paths that name them.

``tinker://<model_id>/weights/<name>`` (weights and optimizer state, for ``load_weights``) and
``tinker://<model_id>/sampler_weights/<name>`` (weights only, for sampling) map to
``<COLO_CHECKPOINT_DIR>/<tenant>/<model_id>/<kind>/<name>.safetensors``. Names are checked against a
strict pattern (no '/', no leading '.'), and the file always lies under the caller's own tenant
directory, so no path a client sends can reach outside it or into another tenant's checkpoints.

A checkpoint saved with ``ttl_seconds`` gets a sidecar ``<name>.safetensors.expires`` holding its
expiry time (Unix seconds), so expiry survives a restart; ``expire()`` deletes what is due.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from colo.errors import InvalidRequestError

KINDS = ("weights", "sampler_weights")
SUFFIX = ".safetensors"
EXPIRES = ".expires"
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
        stale = [p for p in folder.rglob(".*.tmp-*") if p.is_file()] if folder.is_dir() else []
        for p in stale:
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
        path = (folder / kind / f"{name}{SUFFIX}").resolve()
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
        for kind in KINDS:
            folder = model_dir / kind
            for f in folder.glob(f"*{SUFFIX}") if folder.is_dir() else ():
                name = f.name.removesuffix(SUFFIX)
                if not _NAME.fullmatch(name):
                    continue
                try:
                    st = f.stat()
                except FileNotFoundError:  # deleted meanwhile
                    continue
                out.append(Stored(model_id, kind, name, f, st.st_mtime, st.st_size, self.expiry(f)))
        return sorted(out, key=lambda c: c.created)

    @staticmethod
    def expiry(file: Path) -> float | None:
        try:
            return float(file.with_name(file.name + EXPIRES).read_text())
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
        side = file.with_name(file.name + EXPIRES)
        if ttl_seconds is None:
            side.unlink(missing_ok=True)
            return
        tmp = side.with_name(f".{side.name}.tmp-{os.getpid()}")
        tmp.write_text(repr(time.time() + ttl_seconds))
        os.replace(tmp, side)

    @staticmethod
    def delete(file: Path) -> None:
        file.unlink(missing_ok=True)
        file.with_name(file.name + EXPIRES).unlink(missing_ok=True)

    def expire(self, folder: Path | None = None, now: float | None = None) -> list[Path]:
        """Delete every checkpoint under ``folder`` (default: all) whose time is up; the deleted files."""
        now = time.time() if now is None else now
        folder = self.root if folder is None else folder
        gone = []
        for side in folder.rglob(f"*{SUFFIX}{EXPIRES}") if folder.is_dir() else ():
            file = side.with_name(side.name.removesuffix(EXPIRES))
            when = self.expiry(file)
            if when is not None and when <= now:
                self.delete(file)
                gone.append(file)
        return gone

    def parse(self, tenant: str, tinker_path: str) -> tuple[str, str, str, Path]:
        """``tinker://model/kind/name`` -> (model_id, kind, name, file of this tenant)."""
        if not isinstance(tinker_path, str) or not tinker_path.startswith("tinker://"):
            raise InvalidRequestError(f"path {tinker_path!r}; allowed: tinker://<model_id>/<weights|sampler_weights>/<name>")
        parts = tinker_path.removeprefix("tinker://").split("/")
        if len(parts) != 3:
            raise InvalidRequestError(f"path {tinker_path!r}; allowed: tinker://<model_id>/<weights|sampler_weights>/<name>")
        model_id, kind, name = parts
        return model_id, kind, name, self.file(tenant, model_id, kind, name)

    @staticmethod
    def tinker_path(model_id: str, kind: str, name: str) -> str:
        return f"tinker://{model_id}/{kind}/{name}"
