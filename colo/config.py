"""colo's configuration: ``COLO_*`` environment variables, an optional TOML file, explicit arguments.

Precedence, highest first: arguments to ``Config(...)``, environment variables, the TOML file named
by ``COLO_CONFIG`` (keys are the field names: ``model = "..."``), the defaults below.
A bad value raises ``ConfigError`` with one line naming the variable, the value and what is allowed.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from colo.errors import ConfigError

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
ENV_PREFIX = "COLO_"


class Config(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    model: str = Field(DEFAULT_MODEL, description=(
        "Base model: the embedded default `HuggingFaceTB/SmolLM2-135M-Instruct` (also `SmolLM2-135M-Instruct`; "
        "converted once into the model cache from a registry package, no hub needed, and linked into the Hugging "
        "Face cache under its hub id), a local Hugging Face model directory, or a hub id."))
    model_cache_dir: str = Field("~/.cache/colo/models", description="Where the embedded default model is converted to.")
    engine: str = Field("auto", description=(
        "Sampler: `auto` (vllm where it imports, else pytorch), `pytorch`, `vllm`, the server engines "
        "`vllm-http`, `sglang`, `mlx`, `openai` (with COLO_ENGINE_URL), or a third-party engine registered "
        "under the entry-point group `colo.engines`."))
    engine_url: str | None = Field(None, description=(
        "Server URL for the HTTP engines `vllm-http`, `sglang`, `mlx`, `openai`, e.g. `http://127.0.0.1:8001`."))
    engine_adapter_dir: str | None = Field(None, description=(
        "Where the HTTP engines write each adapter version for the server to load; the server must read the same "
        "path. Default: a fresh temporary directory, right for a server on this machine."))
    engine_timeout_seconds: float = Field(300.0, gt=0, description=(
        "How long an HTTP engine waits for one server answer; connection errors are retried 3 times with backoff."))
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Training device: `auto` picks cuda when available.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights dtype: `auto` is bfloat16 (float32 where the device lacks bfloat16).")
    gpu_memory_utilization: float = Field(0.3, gt=0.0, le=1.0, description="Share of GPU memory the vLLM engine may take.")
    cpu_kvcache_space_gib: int = Field(1, ge=1, description="KV cache size of the vLLM engine on CPU, in whole GiB (passed on as VLLM_CPU_KVCACHE_SPACE).")
    max_loras: int = Field(4, ge=1, description=(
        "Adapters one vLLM batch holds (vLLM's `max_loras`, the LoRA slots in GPU memory). A sample call naming "
        "more adapters is split into several engine batches; it does not limit how many adapters exist "
        "(COLO_MAX_ADAPTERS)."))
    max_adapters: int = Field(64, ge=1, description=(
        "Most adapters alive at once, whatever their tenant. Each new one must also fit in free memory: it costs "
        "about 8 copies of its LoRA weights (weights, gradients, AdamW state, undo snapshot, sampler copy), and "
        "creating one that does not fit is refused with what it needs and what is free."))
    max_models_per_tenant: int = Field(16, ge=1, description=(
        "Most training models (adapters) one tenant of the HTTP service may hold at once, so no tenant can take "
        "all of COLO_MAX_ADAPTERS; the SDK's `unload_model` frees one."))
    max_lora_rank: int = Field(32, ge=1, le=512, description=(
        "Largest LoRA rank `create_lora` accepts; 32 is tinker-cookbook's default rank. vLLM sizes every LoRA "
        "slot to it: on the 2-core CPU measured, rank-16 adapters sampled 6% slower in 32-slots than in 16-slots "
        "(15% in 64-slots), and rank-32 adapters in 32-slots as fast as rank-16 in 16-slots (BENCHMARKS.md)."))
    max_samples_per_request: int = Field(1024, ge=1, description=(
        "Most samples one request may ask for (`num_samples`): a bound that keeps one request from holding "
        "the sampler for long."))
    max_request_tokens: int = Field(1 << 21, ge=1, description=(
        "Most tokens one `forward_backward` or `forward` request may hold, all datums together (2,097,152: "
        "1,024 sequences of 2,048). Memory follows COLO_MICROBATCH_TOKENS whatever this is; the bound keeps one "
        "request from holding the worker for long."))
    max_model_len: int = Field(2048, ge=16, description="Longest sequence (prompt + completion) in tokens.")
    microbatch_tokens: int = Field(4096, ge=1, description=(
        "Token budget of one training micro-batch: `forward_backward` and `forward` split their data into "
        "micro-batches of at most this many computed tokens (packed without padding, a prefix shared by several "
        "datums counted once) and add up the gradients, so memory follows this budget, not the batch. A longer "
        "single sequence gets a micro-batch of its own. Raise it on a large GPU for speed; lower it if training "
        "runs out of memory."))
    share_prefixes: bool = Field(True, description=(
        "`forward_backward` and `forward` find datums whose tokens start alike (the samples of one prompt, turns "
        "of one conversation, a common system prompt) and compute each shared prefix once per micro-batch; the "
        "logprobs and gradients are those of each datum alone. Off: every datum computed in full (still packed "
        "without padding), for comparison or as a safety valve. The metrics `tokens_computed`, `tokens_unshared` "
        "and `tokens_padded` say what it saved."))
    sampler_gap_warn: float = Field(0.05, ge=0, description=(
        "A `forward_backward` or `forward` whose loss takes sampler logprobs reports how far they are from the "
        "trainer's (`kl_sample_train_v1`, `kl_sample_train_v2`, `sampler_gap_max` in its metrics); above this "
        "`kl_sample_train_v2` colo logs a warning naming the adapter and the likely causes (a stale sampler, "
        "off-policy data, another dtype or quantization). bf16 rounding alone (the vllm engine beside the "
        "trainer, the default model on CPU) reached 0.013 in one of `make demo`'s steps. 0: never warn."))
    shard_base: bool = Field(False, description=(
        "Under torchrun with several ranks: shard the frozen base model's weights across the ranks (FSDP2), each "
        "decoder layer gathered just before it runs and freed after, so a base larger than one device fits "
        "(a rank holds about 1/N of it plus one layer). LoRA weights stay whole on every rank; training stays "
        "data parallel with the same results. Sampling needs the vllm engine (tensor parallel over the same "
        "ranks): the pytorch engine samples from the training model, which no rank holds whole."))
    gradient_checkpointing: bool = Field(True, description=(
        "Recompute each decoder layer's activations in backward instead of keeping them (the default model, "
        "3,520 tokens: +0.8 GiB instead of +4.5 GiB), for about a third more training compute on a GPU (on the "
        "2-core CPU measured, no slower). Turn it off where memory is plentiful and speed counts."))
    sleep_level: int = Field(
        1, ge=0, le=2, description=("vLLM sleep level while training (CUDA): 0 pauses scheduling only; 1 offloads the weights "
                        "to CPU and drops the KV cache (the default: nothing to reload); 2 drops both, and "
                        "waking reloads the weights from disk (less host memory, slower wake)."))
    tensor_parallel_size: int = Field(1, ge=1, description=(
        "vLLM tensor parallel size; under torchrun it must equal the number of processes (vLLM's ranks are "
        "torchrun's): with several ranks and COLO_ENGINE=vllm, one engine spans them all."))
    vllm_kv_cache_dtype: str = Field("auto", description=(
        "vllm engine: KV cache dtype (`auto`: the model's; `fp8` halves its memory on GPUs that have it)."))
    vllm_prefix_caching: bool = Field(True, description=(
        "vllm engine: reuse the KV cache of shared prompt prefixes (keyed by adapter version, never stale)."))
    vllm_max_num_seqs: int | None = Field(None, ge=1, description=(
        "vllm engine: most sequences in one scheduler step (None: vLLM's default)."))
    vllm_max_num_batched_tokens: int | None = Field(None, ge=1, description=(
        "vllm engine: most tokens in one scheduler step (None: vLLM's default; on CPU colo schedules whole "
        "prompts, at least 4096)."))
    collective_timeout_seconds: float = Field(900.0, gt=0, description=(
        "Under torchrun with several ranks: how long a rank waits for the others in one collective (gradient sum, "
        "gathering results) before the job ends with an error; a dead or hung rank cannot stall the rest longer."))
    pytorch_compile: Literal["auto", "on", "off"] = Field("auto", description=(
        "pytorch engine: compile the decode step (`torch.compile`, CUDA graphs on CUDA). `auto`: on CUDA only; on "
        "the 2-core CPU measured, compiling took 39 s per batch shape for 1.23x per step. A compile failure "
        "is logged and decoding goes on eagerly."))
    vllm_enforce_eager: bool = Field(False, description=(
        "vllm engine: no CUDA graphs (slower decoding, faster start-up, less memory)."))
    vllm_quantization: str | None = Field(None, description=(
        "vllm engine: quantization of the sampler's base weights (e.g. `fp8`); the trainer's stay as loaded, "
        "so sampler and trainer logprobs then differ by the quantization error."))
    vllm_attention_backend: str | None = Field(None, description=(
        "vllm engine: attention backend name (e.g. `FLASH_ATTN`, `FLASHINFER`; None: vLLM chooses)."))
    vllm_sleep_offload_cudagraphs: bool = Field(True, description=(
        "vllm engine on CUDA: while asleep, back up CUDA-graph memory to the host too (vLLM's "
        "`sleep_mode_offload_cudagraph`), so sleep frees it for training and the reclaimed bytes count it; "
        "restored in place on wake (it costs a copy each way; with tensor parallelism vLLM's all-reduce then "
        "copies graph buffers instead of registering them). Used where the installed vLLM has the option "
        "(0.32 and later)."))
    vllm_engine_args: dict[str, Any] = Field(default_factory=dict, description=(
        "More arguments for the vllm engine, a JSON object of `vllm.EngineArgs` fields: the tuning knobs, e.g. "
        "`{\"kv_cache_dtype\": \"fp8\", \"max_num_seqs\": 128, \"enforce_eager\": true, "
        "\"quantization\": \"fp8\", \"attention_backend\": \"FLASHINFER\"}`. They win over colo's "
        "platform defaults; a key also given by a COLO_VLLM_* setting changed from its default is refused. "
        "Unknown keys, and "
        "keys colo sets itself (model, dtype, LoRA, memory share, sleep, seed), stop start-up with a message "
        "naming the key."))
    host: str = Field("127.0.0.1", description="HTTP service bind address.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP service port.")
    api_keys: str = Field("", description="Comma-separated `key:tenant` pairs for the HTTP service; empty: one open tenant.")
    max_body_mib: int = Field(64, ge=1, le=4096, description=(
        "Largest HTTP request body the service reads, in MiB (a forward_backward batch travels in one body); "
        "a larger one gets 413 before it is read."))
    stall_seconds: float = Field(600.0, gt=0, description=(
        "The service's health check (`/api/v1/healthz`) answers 503 when its worker has work and has finished "
        "none of it for this long (one job running longer, or nothing moving); shutdown waits this long for the "
        "running job."))
    checkpoint_dir: str = Field("~/.cache/colo/checkpoints", description="Where the service writes checkpoints.")
    seed: int = Field(0, ge=0, description="Seed of adapters created without one (adapter n gets a seed derived from it).")

    @field_validator("engine")
    @classmethod
    def _engine_name(cls, v: str) -> str:
        if not v or not v.replace("-", "").replace("_", "").isalnum():
            raise ValueError("an engine name of letters, digits, '-' or '_'")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = os.environ.get(ENV_PREFIX + "CONFIG")
        if toml_path:
            if not os.path.isfile(toml_path):
                raise ConfigError(f"COLO_CONFIG={toml_path!r}: no such file; allowed: the path of a TOML file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise ConfigError(_one_line(e, values)) from None
        except ValueError as e:  # a TOML file that does not parse
            raise ConfigError(f"COLO_CONFIG={os.environ.get('COLO_CONFIG')!r}: {e}") from None

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied, validated as any value is."""
        return Config(**{**self.model_dump(), **changes})

    @classmethod
    def field_docs(cls) -> list[tuple[str, str, str]]:
        """(variable, default, description) for every field: the README's reference is built from it."""
        return [(ENV_PREFIX + name.upper(), repr(f.get_default(call_default_factory=True)), f.description or "")
                for name, f in cls.model_fields.items()]

    def api_key_tenants(self) -> dict[str, str]:
        pairs = [p.strip() for p in self.api_keys.split(",") if p.strip()]
        out = {}
        for p in pairs:
            key, sep, tenant = p.partition(":")
            if not sep or not key or not tenant:
                raise ConfigError(f"COLO_API_KEYS={self.api_keys!r}: allowed: comma-separated key:tenant pairs")
            out[key] = tenant
        return out


def _one_line(e: ValidationError, init_values: dict[str, Any]) -> str:
    err = e.errors()[0]
    field = str(err["loc"][0]) if err["loc"] else "?"
    where = field if field in init_values else ENV_PREFIX + field.upper()
    value = err.get("input")
    allowed = err["msg"]
    allowed = allowed.removeprefix("Value error, ")
    extra = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown setting; allowed: {', '.join(Config.model_fields)}"
    return f"{where}={value!r}: {allowed}{extra}"
