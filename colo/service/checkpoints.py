"""Checkpoint files as the service writes and deletes them, and what it has loaded from them.

Every write and deletion of a checkpoint file (saves, ``ttl_seconds`` sidecars, expiry, deletion, the
pruning of unnamed sampler saves) runs on the worker, one at a time, so a save and an expiry or a
deletion never meet. Of a file it saved for sampling the service knows the model version it holds (a
sampling session of it samples the live adapter while that version is current), and of a saved version
no longer live, the adapter of its frozen copy. Both belong to the file: when the file goes, they go
with it here, and the frozen copy's adapter is deleted.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

from colo.errors import InvalidRequestError
from colo.service.checkpoint_store import CheckpointStore
from colo.trainer import Trainer

log = logging.getLogger(__name__)

EPHEMERAL_KEPT = 4  # unnamed sampler saves kept per model: they are for the next rollouts only


class Checkpoints:
    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self._lock = threading.Lock()  # saved versions are read on the event loop; all else is the worker's
        self._saved: dict[Path, tuple[str, int]] = {}  # file -> (model_id, version) saved for sampling
        self._frozen: dict[Path, str] = {}  # file -> the adapter holding its version, once not live

    def saved_version(self, file: Path) -> tuple[str | None, int | None]:
        """(model_id, version) of a file this server saved for sampling; (None, None) for any other."""
        with self._lock:
            return self._saved.get(file, (None, None))

    # ---- on the worker ------------------------------------------------------------------------------

    def save(self, trainer: Trainer, adapter: str, file: Path, ttl: int | None, optimizer: bool) -> None:
        self.write(trainer, file, ttl, lambda: trainer.save_state(adapter, file, optimizer=optimizer))

    def write(self, trainer: Trainer, target: Path, ttl: int | None, write: Callable[[], object]) -> None:
        """Write a checkpoint (file or folder) with ``write()``, then give it ``ttl`` seconds."""
        # the saved model's folder only is tidied first (a save is on the training hot path; the
        # housekeeping timer covers every folder): killed saves' leftovers go, and what expired
        folder = target.parent.parent
        self.store.sweep(folder)
        self._expire(trainer, folder)
        write()
        self.store.set_ttl(target, ttl)

    def save_for_sampler(self, trainer: Trainer, model_id: str, adapter: str, file: Path, ttl: int | None) -> int:
        """Save the adapter's weights; the version saved."""
        version = trainer.version(adapter)
        self.save(trainer, adapter, file, ttl, optimizer=False)
        with self._lock:
            self._saved[file] = (model_id, version)
        return version

    def set_ttl(self, file: Path, ttl: int | None) -> None:
        self.store.set_ttl(file, ttl)

    def delete(self, trainer: Trainer, file: Path) -> None:
        self.store.delete(file)
        self._forget(trainer, file)

    def housekeeping(self, trainer: Trainer) -> None:
        """From the service's housekeeping timer: over every folder."""
        self.store.sweep(self.store.root)
        self._expire(trainer)

    def prune_ephemeral(self, trainer: Trainer, folder: Path, keep: int = EPHEMERAL_KEPT) -> None:
        """Keep a model's newest ``keep`` unnamed sampler saves on disk."""
        files = sorted(folder.glob("ephemeral-*.safetensors"), key=lambda f: f.stat().st_mtime, reverse=True)
        for old in files[keep:]:
            self.delete(trainer, old)

    def frozen_copy(self, trainer: Trainer, file: Path, tinker_path: str) -> str:
        """The adapter holding the version saved in ``file``, loaded on first use. One per model: loading
        another of the model's versions deletes the copy before, so snapshots cannot fill the adapters."""
        adapter = self._frozen.get(file)
        if adapter is not None:
            return adapter
        if not file.is_file():
            raise InvalidRequestError(f"checkpoint {tinker_path} no longer exists")
        for old in [f for f in self._frozen if f.parent == file.parent]:
            trainer.delete_lora(self._frozen.pop(old))
        adapter = self._frozen[file] = trainer.load_state(file)
        return adapter

    def drop_frozen(self, trainer: Trainer, model_id: str) -> None:
        """The model was deleted: so is the frozen copy of its versions (the files stay)."""
        for f in [f for f in self._frozen if f.parent.parent.name == model_id]:
            trainer.delete_lora(self._frozen.pop(f))

    def _expire(self, trainer: Trainer, folder: Path | None = None) -> None:
        for file in self.store.expire(folder):
            self._forget(trainer, file)
            log.info("checkpoint %s expired (ttl_seconds); deleted", file)

    def _forget(self, trainer: Trainer, file: Path) -> None:
        with self._lock:
            self._saved.pop(file, None)
        adapter = self._frozen.pop(file, None)
        if adapter is not None:
            trainer.delete_lora(adapter)
