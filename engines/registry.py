"""Engine lookup by name: the built-ins below, plus third-party engines registered under the
entry-point group ``colo.engines`` (``name = "package.module:EngineClass"``)."""

from __future__ import annotations

import importlib
import importlib.util
from importlib.metadata import entry_points

from colo.errors import ConfigError
from engines.base import InferenceEngine

ENTRY_POINT_GROUP = "colo.engines"

BUILTIN: dict[str, str] = {
    "pytorch": "engines.pytorch.engine:PyTorchEngine",
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


def resolve_name(name: str, world: int = 1) -> str:
    """``auto`` is the colocated vLLM engine where it is built in and vLLM imports, else ``pytorch``; under
    several ranks it is ``pytorch``, which runs on each rank (vllm must span them, with
    COLO_TENSOR_PARALLEL_SIZE set to the number of ranks, so it is chosen only by name)."""
    if name != "auto":
        return name
    if world == 1 and "vllm" in BUILTIN and importlib.util.find_spec("vllm") is not None:
        return "vllm"
    return "pytorch"


def engines_for_ranks() -> list[str]:
    """The built-in engines that run under several torchrun ranks (one per rank, or one across them)."""
    names = []
    for name in BUILTIN:
        try:
            caps = engine_class(name).capabilities
        except ConfigError:  # not installed here
            continue
        if caps.per_rank or caps.spans_ranks:
            names.append(name)
    return names


def engine_class(name: str, world: int = 1) -> type[InferenceEngine]:
    name = resolve_name(name, world)
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
