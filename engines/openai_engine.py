"""The ``openai`` engine: any OpenAI-compatible server's ``/v1/completions``, base model only.

Token ids go in as the prompt (the completions API takes a list of ids) and come back through the
``return_tokens_as_token_ids`` extension (vLLM's; the probe checks the server honours it, since the
plain API answers text, and text would have to be re-encoded). It cannot load adapters, and says so.
"""

from __future__ import annotations

from colo.errors import EngineError
from colo.types import SampledSequence
from engines.base import Capabilities, SampleRequest, Samples
from engines.http_client import field
from engines.http_engine import HTTPEngine
from engines.versions import Published


class OpenAIEngine(HTTPEngine):
    name = "openai"
    start_command = "any OpenAI-compatible server, e.g. python -m vllm.entrypoints.openai.api_server --model DIR"
    capabilities = Capabilities(in_memory_adapter_loading=False, runtime_adapter_loading=False, sleep=False,
                                shares_trainer_weights=False, multi_adapter_batch=False,
                                prompt_logprobs=True)

    def probe(self) -> None:
        models = field(self.http.get("/v1/models"), "data", url=self.url)
        if not models:
            raise EngineError(f"{self.url}/v1/models lists no model; start the server with the base model")
        self.served_model = field(models, 0, "id", url=self.url)
        server_len = models[0].get("max_model_len")
        if isinstance(server_len, int):
            self.max_model_len = min(self.max_model_len, server_len)
        out = self.http.post("/v1/completions", {"model": self.served_model, "prompt": [0], "max_tokens": 1,
                                                 "temperature": 0, "logprobs": 0, "return_tokens_as_token_ids": True})
        tokens = field(out, "choices", 0, "logprobs", "tokens", url=self.url)
        if not tokens or not str(tokens[0]).startswith("token_id:"):
            raise EngineError(f"{self.url} answers tokens as text ({tokens[:1]}), not ids; colo needs token ids "
                              "(vLLM's return_tokens_as_token_ids); for SGLang use COLO_ENGINE=sglang")

    def model_name(self, version: Published | None) -> str:
        return self.served_model if version is None else version.name

    def sample_one(self, request: SampleRequest, version: Published | None) -> Samples:
        p = request.params
        greedy = p.temperature == 0
        body = {
            "model": self.model_name(version),
            "prompt": request.prompt,
            "n": 1 if greedy else request.num_samples,  # greedy samples are all the same
            "max_tokens": self.max_new_tokens(request),
            "temperature": p.temperature,
            "top_p": p.top_p,
            "top_k": p.top_k if p.top_k > 0 else -1,
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
            "skip_special_tokens": False,
        }
        if p.seed is not None:
            body["seed"] = p.seed
        if p.stop_strings:
            body["stop"] = list(p.stop_strings)
        if p.stop_token_ids:
            body["stop_token_ids"] = list(p.stop_token_ids)
        if request.prompt_logprobs:
            body["prompt_logprobs"] = 0
        out = self.http.post("/v1/completions", body)
        choices = field(out, "choices", url=self.url)
        sequences = [self._sequence(c) for c in sorted(choices, key=lambda c: c.get("index", 0))]
        if greedy:
            sequences = sequences * request.num_samples
        if len(sequences) != request.num_samples:
            raise EngineError(f"{self.url}: asked for {request.num_samples} samples, got {len(sequences)}")
        prompt_logprobs = self._prompt_logprobs(choices[0], request.prompt) if request.prompt_logprobs else None
        return Samples(sequences, prompt_logprobs)

    def _sequence(self, choice: dict) -> SampledSequence:
        logprobs = field(choice, "logprobs", url=self.url)
        tokens = [_token_id(t, self.url) for t in field(logprobs, "tokens", url=self.url)]
        values = [float(v) for v in field(logprobs, "token_logprobs", url=self.url)]
        reason = choice.get("finish_reason")
        if reason not in ("stop", "length") or len(values) != len(tokens):
            raise EngineError(f"{self.url}: unexpected completion (finish_reason {reason!r}, "
                              f"{len(tokens)} tokens, {len(values)} logprobs)")
        return SampledSequence(tokens, values, reason)

    def _prompt_logprobs(self, choice: dict, prompt: list[int]) -> list[float | None]:
        steps = field(choice, "prompt_logprobs", url=self.url)
        if not isinstance(steps, list) or len(steps) != len(prompt):
            raise EngineError(f"{self.url}: prompt_logprobs missing or of the wrong length")
        return [None] + [float(field(step, str(token), "logprob", url=self.url))
                         for token, step in zip(prompt[1:], steps[1:])]


def _token_id(token: str, url: str) -> int:
    if not isinstance(token, str) or not token.startswith("token_id:"):
        raise EngineError(f"{url}: token {token!r} is not 'token_id:N'")
    try:
        return int(token.removeprefix("token_id:"))
    except ValueError:
        raise EngineError(f"{url}: token {token!r} is not 'token_id:N'") from None
