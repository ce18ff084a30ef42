"""The ``sglang`` engine: an SGLang server's native ``/generate``, each adapter version loaded at run time.

Start the server with ``--enable-lora`` (and ``--max-lora-rank`` at least colo's ranks). Prompts go
as ``input_ids``; the sampled ids and their logprobs come back in ``meta_info.output_token_logprobs``
(``[logprob, token_id, text]`` triples; text is not asked for). Versions are loaded with
``/load_lora_adapter`` under a fresh name, named per request in ``lora_path``, and unloaded with
``/unload_lora_adapter`` once no request of colo's uses them.
"""

from __future__ import annotations

from pathlib import Path

from colo.errors import EngineError
from colo.types import SampledSequence
from engines.base import Capabilities, SampleRequest, Samples
from engines.http_client import field
from engines.http_engine import HTTPEngine
from engines.versions import Published


class SGLangEngine(HTTPEngine):
    name = "sglang"
    start_command = "python -m sglang.launch_server --model-path MODEL --enable-lora --max-lora-rank 16"
    capabilities = Capabilities(in_memory_adapter_loading=False, runtime_adapter_loading=True, sleep=False,
                                shares_trainer_weights=False, multi_adapter_batch=True,
                                prompt_logprobs=True)

    def probe(self) -> None:
        info = self.http.get("/get_model_info")
        if not info.get("is_generation", True):
            raise EngineError(f"{self.url} serves {info.get('model_path')!r}, which does not generate text")
        server = self.http.get("/get_server_info")
        if not server.get("enable_lora"):
            raise EngineError(f"{self.url} was started without --enable-lora; colo loads each adapter version "
                              f"at run time: {self.start_command}")
        context = server.get("context_length") or info.get("context_length")
        if isinstance(context, int):
            self.max_model_len = min(self.max_model_len, context)

    def load_adapter(self, version: Published, path: Path) -> None:
        out = self.http.post("/load_lora_adapter", {"lora_name": version.name, "lora_path": str(path)})
        if isinstance(out, dict) and out.get("success") is False:
            raise EngineError(f"{self.url}/load_lora_adapter refused {version.name}: {out.get('error_message')}")

    def unload_adapter(self, version: Published) -> None:
        self.http.post("/unload_lora_adapter", {"lora_name": version.name})

    def sample_one(self, request: SampleRequest, version: Published | None) -> Samples:
        p = request.params
        params = {"max_new_tokens": self.max_new_tokens(request), "temperature": p.temperature, "top_p": p.top_p,
                  "top_k": p.top_k if p.top_k > 0 else -1, "skip_special_tokens": False}
        if p.stop_strings:
            params["stop"] = list(p.stop_strings)
        if p.stop_token_ids:
            params["stop_token_ids"] = list(p.stop_token_ids)
        if p.seed is not None:
            params["sampling_seed"] = p.seed
        # one batch of num_samples copies of the prompt: SGLang shares their prefix in its radix cache
        body = {"input_ids": [request.prompt] * request.num_samples, "sampling_params": params,
                "return_logprob": True, "logprob_start_len": 0 if request.prompt_logprobs else -1,
                "return_text_in_logprobs": False}
        if version is not None:
            body["lora_path"] = [version.name] * request.num_samples
        out = self.http.post("/generate", body)
        if not isinstance(out, list) or len(out) != request.num_samples:
            raise EngineError(f"{self.url}/generate: expected a list of {request.num_samples} results")
        sequences = [self._sequence(o) for o in out]
        prompt_logprobs = self._prompt_logprobs(out[0], request.prompt) if request.prompt_logprobs else None
        return Samples(sequences, prompt_logprobs)

    def _sequence(self, out: dict) -> SampledSequence:
        steps = field(out, "meta_info", "output_token_logprobs", url=self.url)
        reason = field(out, "meta_info", "finish_reason", url=self.url)
        kind = reason.get("type") if isinstance(reason, dict) else reason
        if kind not in ("stop", "length"):
            raise EngineError(f"{self.url}/generate: finish_reason {reason!r}; expected stop or length")
        try:
            return SampledSequence([int(s[1]) for s in steps], [float(s[0]) for s in steps], kind)
        except (TypeError, ValueError, IndexError):
            raise EngineError(f"{self.url}/generate: output_token_logprobs are not [logprob, token_id, ...]") from None

    def _prompt_logprobs(self, out: dict, prompt: list[int]) -> list[float | None]:
        steps = field(out, "meta_info", "input_token_logprobs", url=self.url)
        if len(steps) != len(prompt) or any(int(s[1]) != t for s, t in zip(steps, prompt)):
            raise EngineError(f"{self.url}/generate: input_token_logprobs do not match the prompt")
        return [None] + [float(s[0]) for s in steps[1:]]
