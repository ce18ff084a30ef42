"""Engine lookup by name: the built-ins below, plus third-party engines registered under the
entry-point group ``colo.engines`` (``name = "package.module:EngineClass"``)."""

from __future__ import annotations

import importlib
import importlib.util
from importlib.metadata import entry_points

from colo.errors import ConfigError
from engines.base import EngineContext, InferenceEngine

ENTRY_POINT_GROUP = "colo.engines"

BUILTIN: dict[str, str] = {
    "pytorch": "engines.pytorch_engine:PyTorchEngine",
    "vllm": "engines.vllm_engine:VLLMEngine",
    "vllm-http": "engines.vllm_http_engine:VLLMHTTPEngine",
    "sglang": "engines.sglang_engine:SGLangEngine",
    "mlx": "engines.mlx_engine:MLXEngine",
    "openai": "engines.openai_engine:OpenAIEngine",
}


def _entry_points() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def engine_names() -> list[str]:
    return sorted({**_entry_points(), **BUILTIN})


def resolve_name(name: str) -> str:
    """``auto`` is the colocated vLLM engine where it is built in and vLLM imports, else ``pytorch``."""
    if name != "auto":
        return name
    if "vllm" in BUILTIN and importlib.util.find_spec("vllm") is not None:
        return "vllm"
    return "pytorch"


def engine_class(name: str) -> type[InferenceEngine]:
    name = resolve_name(name)
    target = BUILTIN.get(name) or _entry_points().get(name)
    if target is None:
        raise ConfigError(f"COLO_ENGINE={name!r}: unknown engine; allowed: auto, {', '.join(engine_names())}")
    module_name, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"COLO_ENGINE={name!r}: cannot load {target}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, InferenceEngine)):
        raise ConfigError(f"COLO_ENGINE={name!r}: {target} is not an InferenceEngine subclass")
    return cls


def create_engine(name: str, context: EngineContext) -> InferenceEngine:
    return engine_class(name)(context)
