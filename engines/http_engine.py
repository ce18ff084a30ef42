"""What every engine that samples on a server shares: the server's URL and a probe of what it can do,
adapter versions written as files where the server can read them, and requests sent concurrently.

A subclass says how to probe (``probe``), how to write and load a version (``write_adapter``,
``load_adapter``, ``unload_adapter``) and how to sample one request (``sample_one``). Versions
follow ``engines.versions``: each gets a fresh name on the server, and a replaced version is
unloaded and its files deleted once no request uses it. The server sees token ids only; nothing
is decoded and re-encoded on the way (MLX-LM, whose server takes text, is the declared exception).
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from abc import abstractmethod
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

from dataclasses import dataclass

from colo.errors import ConfigError, EngineError, InvalidRequestError
from colo.peft_files import write_peft
from engines.base import AdapterUpdate, EngineContext, EngineSettings, InferenceEngine, SampleRequest, Samples
from engines.http_client import HTTPJSON
from engines.versions import Published, VersionTable

log = logging.getLogger(__name__)

MAX_CONCURRENT_REQUESTS = 64  # the server batches what arrives together


@dataclass(frozen=True)
class HTTPSettings(EngineSettings):
    engine_url: str | None = None
    engine_adapter_dir: str | None = None  # where versions are written; the server must read the same path
    engine_timeout_seconds: float = 300.0


class HTTPEngine(InferenceEngine):
    start_command: ClassVar[str]  # shown when COLO_ENGINE_URL is missing
    settings_class = HTTPSettings

    def __init__(self, context: EngineContext) -> None:
        super().__init__(context)
        config = context.settings
        if not config.engine_url:
            raise ConfigError(f"COLO_ENGINE={self.name} needs COLO_ENGINE_URL, the server's address, e.g. "
                              f"http://127.0.0.1:8000 for a server started with: {self.start_command}")
        self.url = config.engine_url.rstrip("/")
        self.http = HTTPJSON(self.url, timeout=config.engine_timeout_seconds)
        own_dir = config.engine_adapter_dir is None
        self.adapter_dir = Path(tempfile.mkdtemp(prefix="colo-adapters-") if own_dir
                                else Path(config.engine_adapter_dir).expanduser())
        self._own_dir = own_dir
        self.adapter_dir.mkdir(parents=True, exist_ok=True)
        self.versions = VersionTable(release=self._release_version)
        self.max_model_len = context.max_model_len
        self.probe()

    # ---- what a server engine defines -------------------------------------------------------------

    @abstractmethod
    def probe(self) -> None:
        """Check once at start-up that the server is up and can serve what colo needs; say what is missing."""

    @abstractmethod
    def sample_one(self, request: SampleRequest, version: Published | None) -> Samples:
        """Sample one request (all its samples) on the server."""

    def write_adapter(self, update: AdapterUpdate, path: Path) -> None:
        """A PEFT directory, which vLLM and SGLang load as is."""
        write_peft(path, update.peft_config, update.tensors)

    def load_adapter(self, version: Published, path: Path) -> None:
        """Tell the server about a new version (engines that name the adapter per request do nothing)."""

    def unload_adapter(self, version: Published) -> None:
        """Tell the server a version is gone."""

    # ---- the engine interface ---------------------------------------------------------------------

    def publish(self, update: AdapterUpdate) -> None:
        if not self.capabilities.runtime_adapter_loading:
            self.versions.add(update.key)  # known, so that sampling it fails with a clear message
            return
        version = self.versions.add(update.key)
        path = self.path_of(version)
        self.write_adapter(update, path)  # copies the tensors: the trainer changes them at the next step
        try:
            self.load_adapter(version, path)
        except Exception:
            self.versions.drop(update.key.adapter)
            raise

    def release(self, adapter: str) -> None:
        self.versions.drop(adapter)

    def sample(self, requests: list[SampleRequest]) -> list[Samples]:
        if not self.capabilities.runtime_adapter_loading:
            for r in requests:
                if r.adapter is not None:
                    raise InvalidRequestError(
                        f"the {self.name} engine samples only the server's base model, not adapter {r.adapter.adapter}; "
                        "allowed: the base model (adapter None), or an engine that loads adapters: vllm-http, sglang, mlx")
        with self.versions.using([r.adapter for r in requests]) as held:
            workers = max(1, min(MAX_CONCURRENT_REQUESTS, len(requests)))
            with ThreadPoolExecutor(workers, thread_name_prefix=f"colo-{self.name}") as pool:
                return list(pool.map(self.sample_one, requests, held))

    def shutdown(self) -> None:
        for version in self.versions.live():
            self._release_version(version)
        if self._own_dir:
            shutil.rmtree(self.adapter_dir, ignore_errors=True)
        self.http.close()

    # ---- helpers ----------------------------------------------------------------------------------

    def path_of(self, version: Published) -> Path:
        return self.adapter_dir / re.sub(r"[^A-Za-z0-9._-]", "-", version.name)

    def max_new_tokens(self, request: SampleRequest) -> int:
        return min(request.params.max_tokens, self.max_model_len - len(request.prompt))

    def _release_version(self, version: Published) -> None:
        try:
            if self.capabilities.runtime_adapter_loading:
                self.unload_adapter(version)
        except EngineError as e:  # a server that is gone has nothing left to unload
            log.warning("%s: could not unload %s: %s", self.url, version.name, e)
        finally:
            shutil.rmtree(self.path_of(version), ignore_errors=True)
