"""The ``mlx`` engine: an MLX-LM server (``mlx_lm.server``, Apple silicon), adapters named per request.

MLX-LM takes no adapter-loading call: each request names its adapter directory in ``adapters``, so
each version is written there in MLX-LM's own format (``adapters.safetensors`` with ``lora_a`` (in, r)
and ``lora_b`` (r, out) per layer, and ``adapter_config.json``) under a fresh name, and deleted once
no request uses it. Its server answers token ids and their logprobs (``logprobs.content[].id``), but
takes the prompt as text only: colo decodes the prompt ids and checks that the server counted the
same number of prompt tokens, failing loudly if its re-encoding differs. It gives no prompt logprobs
(the Trainer scores prompts with its own model) and cannot stop on token ids.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from colo.errors import EngineError, InvalidRequestError
from colo.types import SampledSequence
from engines.base import AdapterUpdate, Capabilities, SampleRequest, Samples
from engines.http_client import field
from engines.http_engine import HTTPEngine
from engines.versions import Published

_PEFT_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
_LAYER = re.compile(r"\.layers\.(\d+)\.(.+)$")


class MLXEngine(HTTPEngine):
    name = "mlx"
    start_command = "mlx_lm.server --model MODEL --port 8001"
    capabilities = Capabilities(in_memory_adapter_loading=False, runtime_adapter_loading=True, sleep=False,
                                shares_trainer_weights=False, multi_adapter_batch=False)

    def probe(self) -> None:
        models = field(self.http.get("/v1/models"), "data", url=self.url)
        if not models:
            raise EngineError(f"{self.url}/v1/models lists no model")
        from transformers import AutoConfig

        self.num_layers = AutoConfig.from_pretrained(self.context.model_path).num_hidden_layers

    def write_adapter(self, update: AdapterUpdate, path: Path) -> None:
        config = update.peft_config
        tensors, keys, layers = {}, set(), set()
        for name, value in update.tensors.items():
            m = _PEFT_KEY.match(name)
            if m is None:
                raise EngineError(f"adapter tensor {name!r} is not a PEFT LoRA weight")
            module, which = m.groups()
            layer = _LAYER.search(module)
            if layer is None:
                raise InvalidRequestError(f"the mlx engine applies LoRA to transformer layers only, not {module}")
            layers.add(int(layer.group(1)))
            keys.add(layer.group(2))
            # PEFT: A (r, in), B (out, r); MLX-LM: lora_a (in, r), lora_b (r, out)
            tensors[f"{module}.lora_{which.lower()}"] = value.detach().to("cpu", torch.float32).T.contiguous()
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / "adapters.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps({
            "fine_tune_type": "lora",
            "num_layers": self.num_layers,
            "lora_parameters": {"rank": config["r"], "scale": config["lora_alpha"] / config["r"], "dropout": 0.0,
                                "keys": sorted(keys)},
        }))

    def check(self, request: SampleRequest) -> None:
        if request.params.stop_token_ids:
            raise InvalidRequestError("the mlx engine cannot stop on token ids (MLX-LM's server takes stop strings); "
                                      "allowed: stop strings")

    def sample_one(self, request: SampleRequest, version: Published | None) -> Samples:
        p = request.params
        text = self.context.tokenizer.decode(request.prompt, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        body = {"prompt": text, "max_tokens": self.max_new_tokens(request), "temperature": p.temperature,
                "top_p": p.top_p, "top_k": max(p.top_k, 0), "logprobs": True, "stop": list(p.stop_strings)}
        if version is not None:
            body["adapters"] = str(self.path_of(version))
        sequences = []
        for i in range(request.num_samples):  # one completion a request
            if p.seed is not None:
                body["seed"] = p.seed + i
            out = self.http.post("/v1/completions", body)
            counted = field(out, "usage", "prompt_tokens", url=self.url)
            if counted != len(request.prompt):
                raise EngineError(f"{self.url} read the prompt as {counted} tokens, colo sent {len(request.prompt)}: "
                                  "MLX-LM takes text, and its re-encoding of these ids differs")
            sequences.append(self._sequence(field(out, "choices", 0, url=self.url)))
        return Samples(sequences)

    def _sequence(self, choice: dict) -> SampledSequence:
        steps = field(choice, "logprobs", "content", url=self.url)
        reason = choice.get("finish_reason")
        if reason not in ("stop", "length"):
            raise EngineError(f"{self.url}: finish_reason {reason!r}; expected stop or length")
        try:
            return SampledSequence([int(s["id"]) for s in steps], [float(s["logprob"]) for s in steps], reason)
        except (KeyError, TypeError, ValueError):
            raise EngineError(f"{self.url}: logprobs.content entries are not {{id, logprob}}") from None
