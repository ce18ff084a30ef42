"""The Trainer: one base model, many LoRA adapters, and a sampler that always sees the newest weights.

Shaped like the Tinker API (create_lora, forward_backward, optim_step, sample), so the HTTP service
is a thin layer over it. Every method validates its whole request before it changes anything.
The Trainer owns adapters and their versions: it stamps the version on every sample, and scores
prompt logprobs with its own model where the engine declares it cannot. Each public method is
declared ``@collective`` (every torchrun rank makes the call) or ``@local`` (``colo.collective``).
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import math
import os
import time
import traceback
from collections import defaultdict
from typing import Sequence

import torch

from colo import allocator, capacity, packing
from colo.adapters import Adapter
from colo.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from colo.collective import collective, local
from colo.config import Config
from colo.custom_loss import CustomLoss
from colo.default_model import resolve_model
from colo.distributed import Ranks, launched_by_torchrun
from colo.errors import CheckpointError, ConfigError, EngineError, InvalidRequestError, UnknownAdapterError
from colo.losses import sampler_gap
from colo.model import PolicyModel, resolve_device, resolve_dtype
from colo.peft_files import write_peft
from colo.sleep import SleepControl
from colo.types import (AdamParams, Datum, ForwardBackwardOutput, LoraConfig, OptimStepOutput, SampleJob,
                        SampleResult, SamplingParams)
from colo.validation import (MAX_SEED, as_tokens, check_adam, check_context, check_data, check_loss, check_sampling,
                             check_tokens)
from engines.base import AdapterUpdate, AdapterVersion, EngineContext, InferenceEngine, SampleRequest
from engines.registry import engine_class, engines_for_ranks

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, config: Config | None = None, **overrides) -> None:
        """``Trainer()`` reads ``COLO_*``; keyword arguments override single settings."""
        if config is None:
            config = Config(**overrides)
        elif overrides:
            config = config.replace(**overrides)
        self.config = config
        device = resolve_device(config.device)
        self.ranks = Ranks.from_env(device, config.collective_timeout_seconds)
        if self.ranks.world > 1 and device.type == "cuda":
            device = torch.device("cuda", self.ranks.local_rank)
        self.model_path = resolve_model(config.model, config.model_cache_dir)
        self.policy = PolicyModel(self.model_path, device, resolve_dtype(config.dtype, device),
                                  config.microbatch_tokens, config.gradient_checkpointing, config.share_prefixes)
        if config.shard_base:
            if self.ranks.world > 1:
                self.policy.shard(self.ranks.world)
            else:
                log.info("colo: COLO_SHARD_BASE with one rank: the base stays whole (it shards across torchrun's ranks)")
        self.max_len = min(config.max_model_len, self.policy.max_positions)
        self.adapters: dict[str, Adapter] = {}
        self._ids = itertools.count(1)
        self._use_engine(self._start_engine(config), config)
        log.info("colo: model %s on %s (%s), engine %s", self.model_path, device, self.policy.dtype, self.engine.name)
        if device.type == "cpu" and allocator.preloaded() == "glibc malloc":
            log.warning("colo: training on CPU with the C library's malloc, which fragments: peak memory can be "
                        "twice what the tensors need. Preload mimalloc, as `make demo` does: "
                        "LD_PRELOAD=$(colo allocator) python your_script.py")

    @classmethod
    def from_env(cls, **overrides) -> Trainer:
        return cls(None, **overrides)

    @property
    def tokenizer(self):
        return self.policy.tokenizer

    # ---- adapters -------------------------------------------------------------------------------

    @collective
    def create_lora(self, rank: int = 16, alpha: float | None = None, seed: int | None = None,
                    train_attn: bool = True, train_mlp: bool = True, train_unembed: bool = False) -> str:
        lora = LoraConfig(rank=rank, alpha=alpha, train_attn=train_attn, train_mlp=train_mlp,
                          train_unembed=train_unembed)
        self._check_lora(lora)
        if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= MAX_SEED):
            raise InvalidRequestError(f"LoRA seed {seed!r}; allowed: None or an integer in [0, 2**63 - 1]")
        self._check_room(lora)
        n = next(self._ids)
        # without a seed, adapter n of a run is still reproducible from COLO_SEED
        return self._add(f"lora-{n}", lora, seed if seed is not None else self.config.seed * 1_000_003 + n)

    @collective
    def delete_lora(self, adapter: str) -> None:
        self._adapter(adapter)
        self.engine.release(adapter)
        self.policy.delete_adapter(adapter)
        del self.adapters[adapter]

    @local
    def list_loras(self) -> dict[str, int]:
        """Adapter id -> current version."""
        return {a.id: a.version for a in self.adapters.values()}

    @local
    def version(self, adapter: str) -> int:
        return self._adapter(adapter).version

    # ---- training -------------------------------------------------------------------------------

    @collective
    def forward(self, adapter: str, data: Sequence[Datum], loss_fn: str | CustomLoss = "cross_entropy",
                loss_fn_config: dict | None = None) -> ForwardBackwardOutput:
        with torch.no_grad():
            return self._run_loss(adapter, data, loss_fn, loss_fn_config, backward=False)

    @collective
    def forward_backward(self, adapter: str, data: Sequence[Datum], loss_fn: str | CustomLoss = "cross_entropy",
                         loss_fn_config: dict | None = None) -> ForwardBackwardOutput:
        """Compute the loss (a sum over data and tokens) and add its gradients to the adapter's.

        ``loss_fn`` names a built-in loss (``colo.losses``), or is a ``CustomLoss`` (``colo.custom_loss``): a
        loss graph a client sent as data, run per datum; its metrics join the output."""
        return self._run_loss(adapter, data, loss_fn, loss_fn_config, backward=True)

    @collective
    def optim_step(self, adapter: str, adam: AdamParams = AdamParams()) -> OptimStepOutput:
        """One AdamW step on the accumulated gradients; the new version is servable when this returns."""
        state = self._adapter(adapter)
        check_adam(adam)
        self.sleep.before_training()
        params = list(state.params.values())
        self.ranks.sum_gradients(params)  # each rank holds the gradient of its share of the data
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        if not math.isfinite(grad_norm):
            for p in params:
                p.grad = None
            raise InvalidRequestError(f"gradient norm of {adapter} is {grad_norm}; the step was skipped and the "
                                      "gradients dropped (weights unchanged); allowed: finite losses")
        if adam.grad_clip_norm > 0 and grads:
            torch.nn.utils.clip_grads_with_norm_(params, adam.grad_clip_norm, torch.tensor(grad_norm))
        state.set_hyperparameters(adam)
        before = state.snapshot()
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        if not all(bool(torch.isfinite(p).all()) for p in params):
            # a NaN or inf weight would poison every later sample of this adapter: undo the whole step
            state.restore(before)
            raise InvalidRequestError(f"this step would make weights of {adapter} NaN or infinite (gradient norm "
                                      f"{grad_norm:.3g}, learning rate {adam.learning_rate}); it was undone and the "
                                      "gradients dropped; allowed: steps that keep the weights finite")
        state.version += 1
        started = time.perf_counter()
        self._publish(state)
        return OptimStepOutput(adapter, state.version, {
            "grad_norm:mean": grad_norm,
            "learning_rate:mean": adam.learning_rate,
            "publish_seconds:sum": time.perf_counter() - started,
        })

    # ---- sampling and scoring -------------------------------------------------------------------

    @collective
    def sample(self, adapter: str | None, prompts: Sequence[Sequence[int]], num_samples: int = 1,
               params: SamplingParams = SamplingParams()) -> list[SampleResult]:
        """``num_samples`` completions of each prompt, from ``adapter``'s newest version (None: base model)."""
        if adapter is not None:
            self._adapter(adapter)
        return self.sample_batch([SampleJob(adapter, p, num_samples, params) for p in prompts])

    @collective
    def sample_batch(self, jobs: Sequence[SampleJob]) -> list[SampleResult]:
        """Jobs of several adapters (and the base model) in one engine call; one result per job."""
        if not jobs:
            raise InvalidRequestError("prompts is empty; allowed: a list of at least one prompt (token ids)")
        requests = [self._sample_request(job, i) for i, job in enumerate(jobs)]
        self.sleep.before_sampling()
        if self.ranks.world == 1 or self.engine.capabilities.spans_ranks:
            return self._sample(requests)  # one rank, or one engine across the ranks that every rank drives
        mine = self.ranks.share([r.num_samples * (len(r.prompt) + r.params.max_tokens) for r in requests])
        results = self._sample([requests[i] for i in mine]) if mine else []
        return self.ranks.gather(dict(zip(mine, results)), len(requests))

    def _sample(self, requests: list[SampleRequest]) -> list[SampleResult]:
        """The engine's samples, each stamped with the adapter version its request named (engines serve exactly
        that version); prompt logprobs the engine cannot give are scored here, with the training model."""
        asked = [i for i, r in enumerate(requests) if r.prompt_logprobs]
        here = asked if asked and self._scores_prompts() else []
        sent = [dataclasses.replace(r, prompt_logprobs=False) for r in requests] if here else requests
        answers = self.engine.sample(sent)
        if len(answers) != len(requests):
            raise EngineError(f"the {self.engine.name} engine answered {len(answers)} of {len(requests)} requests")
        names = [r.adapter.adapter if r.adapter else None for r in requests]
        scored = dict(zip(here, self._score([(names[i], requests[i].prompt) for i in here])))
        return [SampleResult(answer.sequences, names[i], r.adapter.version if r.adapter else None,
                             scored.get(i, answer.prompt_logprobs) if r.prompt_logprobs else None)
                for i, (r, answer) in enumerate(zip(requests, answers))]

    def _scores_prompts(self) -> bool:
        """Whether prompt logprobs come from this Trainer's model rather than the engine (its capabilities)."""
        caps = self.engine.capabilities
        return not caps.prompt_logprobs or (not caps.unembed_prompt_logprobs and
                                            any(a.lora.train_unembed for a in self.adapters.values()))

    def _score(self, sequences: list[tuple[str | None, list[int]]]) -> list[list[float | None]]:
        """logprob of each token of each sequence given those before it (the first has none), one adapter's
        sequences at a time (None: the base model)."""
        out: list[list[float | None]] = [[None] for _ in sequences]
        by_adapter: dict[str | None, list[int]] = defaultdict(list)
        for i, (adapter, tokens) in enumerate(sequences):
            if len(tokens) > 1:
                by_adapter[adapter].append(i)
        for adapter, indices in by_adapter.items():
            with self.policy.active(adapter) as model:
                lps = self.policy.score(model, [sequences[i][1][:-1] for i in indices],
                                        [sequences[i][1][1:] for i in indices])
            for i, lp in zip(indices, lps):
                out[i] = [None, *lp.tolist()]
        return out

    @local
    def check_sample_job(self, job: SampleJob) -> None:
        """Raise the error ``sample_batch`` would raise for this job alone."""
        self._sample_request(job, 0)

    def _sample_request(self, job: SampleJob, i: int) -> SampleRequest:
        key = AdapterVersion(job.adapter, self._adapter(job.adapter).version) if job.adapter is not None else None
        prompt = as_tokens(job.prompt, f"prompts[{i}]")
        check_sampling([prompt], job.num_samples, job.params, self.policy.vocab_size, self.max_len,
                       self.config.max_samples_per_request, index=i)
        request = SampleRequest(prompt, job.num_samples, job.params, key, job.prompt_logprobs)
        self.engine.check(request)  # what this engine refuses fails this job, not the batch it joins
        return request

    @collective
    def compute_logprobs(self, adapter: str | None, tokens: Sequence[int]) -> list[float | None]:
        """logprob of each token given those before it; the first has none."""
        tokens = as_tokens(tokens, "tokens")
        if adapter is not None:
            self._adapter(adapter)
        check_tokens(tokens, self.policy.vocab_size, "tokens")
        check_context(len(tokens), self.max_len, "tokens")
        return self._score([(adapter, tokens)])[0]

    # ---- persistence ----------------------------------------------------------------------------

    @collective
    def save_state(self, adapter: str, path: str | os.PathLike, optimizer: bool = True) -> str:
        """Write the adapter's weights (and AdamW state) to one file, atomically."""
        state = self._adapter(adapter)
        ckpt = Checkpoint(lora=state.lora, seed=state.seed, version=state.version, base_model=self.model_path,
                          weights={k: p.data for k, p in state.params.items()},
                          optimizer=state.optimizer_tensors() if optimizer else {})
        return self._on_main(lambda: str(save_checkpoint(path, ckpt)))

    @collective
    def load_state(self, path: str | os.PathLike, adapter: str | None = None, optimizer: bool = True) -> str:
        """Load a checkpoint into a new adapter (or over ``adapter``, which must have the same shape).

        ``optimizer=False`` takes the weights only and starts AdamW afresh.
        """
        ckpt = load_checkpoint(path)
        if not optimizer:
            ckpt.optimizer = {}
        self._check_lora(ckpt.lora)
        if adapter is not None:
            state = self._adapter(adapter)
            if state.lora != ckpt.lora:
                raise CheckpointError(f"checkpoint {str(path)!r} has LoRA {ckpt.lora}; {adapter} has {state.lora}")
            self._check_keys(path, ckpt, state)
            self._restore(state, ckpt)
            return adapter
        self._check_room(ckpt.lora)
        adapter_id = self._add(f"lora-{next(self._ids)}", ckpt.lora, ckpt.seed, publish=False)
        state = self.adapters[adapter_id]
        try:
            self._check_keys(path, ckpt, state)
        except CheckpointError:
            self.delete_lora(adapter_id)
            raise
        self._restore(state, ckpt)
        return adapter_id

    @collective
    def export_adapter(self, adapter: str, path: str | os.PathLike) -> str:
        """Write a plain PEFT adapter directory (``PeftModel.from_pretrained``, ``vllm --lora-modules``)."""
        state = self._adapter(adapter)
        return self._on_main(lambda: str(write_peft(path, self.policy.peft_config(state.lora).to_dict(),
                                                    {k: p.data for k, p in state.params.items()})))

    @collective
    def set_engine(self, engine: str, **overrides) -> None:
        """Sample through another engine from now on (say, after a server died); every adapter's newest
        version is published to it. ``overrides`` are config settings, e.g. ``engine_url``."""
        config = self.config.replace(**{**overrides, "engine": engine})
        old = self.engine
        # the old engine goes first: two vLLM engines cannot share a process (their parallel state and,
        # on CUDA, the sleep allocator are process-wide)
        try:
            old.shutdown()
        except Exception as e:  # the old engine may be what failed; the Trainer does not depend on it
            log.warning("colo: shutting down engine %s failed: %s", old.name, e)
        try:
            new = self._start_engine(config)
        except Exception as error:
            log.error("colo: engine %s did not start; starting %s again", engine, old.name)
            # the failed start's frames still hold what it allocated, and a vLLM engine's sleep allocator takes
            # one engine per process: let them go before the old engine starts again
            traceback.clear_frames(error.__traceback__)
            gc.collect()
            self._use_engine(self._start_engine(self.config), self.config)
            raise
        self._use_engine(new, config)

    def _start_engine(self, config: Config) -> InferenceEngine:
        """The engine ``config`` names, built from what an engine may see; only an engine that samples from the
        training model itself is handed that model."""
        cls = engine_class(config.engine, self.ranks.world)
        caps = cls.capabilities
        if self.ranks.world > 1 and not (caps.per_rank or caps.spans_ranks):
            raise ConfigError(f"COLO_ENGINE={config.engine!r} under torchrun with WORLD_SIZE={self.ranks.world}: the "
                              f"{cls.name} engine runs in one process only; allowed with several ranks: "
                              f"{', '.join(engines_for_ranks())}")
        if caps.shares_trainer_weights and self.policy.sharded:
            raise ConfigError(f"COLO_ENGINE={config.engine!r} with COLO_SHARD_BASE=true: the {cls.name} engine samples "
                              f"from the training model, whose base no rank holds whole; allowed with a sharded base: "
                              "vllm (tensor parallel over the same ranks)")
        context = EngineContext(cls.settings_class.of(config), self.model_path, self.policy.dtype, self.policy.device,
                                self.policy.tokenizer, self.max_len, self.ranks.world, launched_by_torchrun())
        engine = cls(context, self.policy) if caps.shares_trainer_weights else cls(context)
        # what an engine can apply may depend on the model (vLLM's output-layer LoRA): known once it has started
        unembed = sorted(a for a, state in self.adapters.items() if state.lora.train_unembed)
        if unembed and not engine.capabilities.unembed_lora:
            engine.shutdown()
            raise ConfigError(f"COLO_ENGINE={config.engine!r}: the {engine.name} engine does not apply LoRA to the "
                              f"output layer of {self.policy.architecture}, which adapter(s) {', '.join(unembed)} "
                              "train; allowed: an engine that does (pytorch), or delete those adapters first")
        return engine

    def _use_engine(self, engine: InferenceEngine, config: Config) -> None:
        """Sample through ``engine`` from now on, with every adapter's newest version published to it."""
        self.engine, self.config = engine, config
        self.sleep = SleepControl(engine, config.sleep_level)
        for state in self.adapters.values():
            self._publish(state)

    @collective
    def close(self) -> None:
        self.engine.shutdown()
        self.ranks.close()

    def _on_main(self, write):
        """Files are written once, by rank 0; every rank returns when they are there. (Ranks hold the same
        adapters, so rank 0's copy is everyone's.)"""
        if self.ranks.world == 1:
            return write()
        return self.ranks.gather({0: write()} if self.ranks.main else {}, 1)[0]

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals ------------------------------------------------------------------------------

    def _adapter(self, adapter: str) -> Adapter:
        try:
            return self.adapters[adapter]
        except (KeyError, TypeError):
            known = ", ".join(self.adapters) or "none yet (create_lora makes one)"
            raise UnknownAdapterError(f"unknown adapter {adapter!r}; known adapters: {known}") from None

    def _check_room(self, lora: LoraConfig) -> None:
        # PEFT keeps LoRA weights in float32 on a bf16/fp16 base (autocast_adapter_dtype)
        capacity.check_room(len(self.adapters), self.config.max_adapters, self.policy.lora_values(lora),
                            4 if self.policy.dtype.itemsize < 4 else self.policy.dtype.itemsize, self.policy.device)

    def _check_lora(self, lora: LoraConfig) -> None:
        if not isinstance(lora.rank, int) or not 1 <= lora.rank <= self.config.max_lora_rank:
            raise InvalidRequestError(f"LoRA rank {lora.rank!r}; allowed: an integer in [1, "
                                      f"{self.config.max_lora_rank}] (COLO_MAX_LORA_RANK)")
        if lora.alpha is not None and not (isinstance(lora.alpha, (int, float)) and lora.alpha > 0):
            raise InvalidRequestError(f"LoRA alpha {lora.alpha!r}; allowed: a number > 0, or None (= rank)")
        if lora.train_unembed and not self.engine.capabilities.unembed_lora:
            raise InvalidRequestError(f"train_unembed=True: the {self.engine.name} engine does not apply LoRA to the "
                                      f"output layer of {self.policy.architecture}, so its samples would ignore "
                                      "those weights; allowed: train_unembed=False, or an engine that does (pytorch)")
        experts = (f"; {self.policy.architecture}'s MLP is fused experts, which colo does not train (its engines "
                   "cannot serve LoRA on them), so train_mlp adds nothing on it" if self.policy.fused_experts else "")
        if not self.policy.target_modules(lora):
            raise InvalidRequestError("the LoRA trains no layer; allowed: at least one of train_attn, train_mlp, "
                                      f"train_unembed that this model has{experts}")
        if lora.train_mlp and self.policy.fused_experts and not self.policy.target_modules(
                dataclasses.replace(lora, train_attn=False, train_unembed=False)):
            log.warning("colo: train_mlp=True trains no MLP layer of this model%s", experts)

    def _check_keys(self, path, ckpt: Checkpoint, state: Adapter) -> None:
        if set(ckpt.weights) != set(state.params):
            raise CheckpointError(f"checkpoint {str(path)!r} does not fit this model "
                                  f"(saved from {ckpt.base_model!r}, loaded on {self.model_path!r})")
        for k, p in state.params.items():
            if ckpt.weights[k].shape != p.shape:
                raise CheckpointError(f"checkpoint {str(path)!r}: {k} has shape {tuple(ckpt.weights[k].shape)}, "
                                      f"this model needs {tuple(p.shape)}")
            if not bool(torch.isfinite(ckpt.weights[k]).all()):
                raise CheckpointError(f"checkpoint {str(path)!r}: {k} holds NaN or infinite values; allowed: "
                                      "finite weights")

    def _add(self, adapter_id: str, lora: LoraConfig, seed: int, publish: bool = True) -> str:
        self.policy.add_adapter(adapter_id, lora, seed)
        self.adapters[adapter_id] = Adapter.create(adapter_id, lora, seed, self.policy.parameters(adapter_id))
        if publish:
            self._publish(self.adapters[adapter_id])
        return adapter_id

    def _restore(self, state: Adapter, ckpt: Checkpoint) -> None:
        with torch.no_grad():
            for k, p in state.params.items():
                p.copy_(ckpt.weights[k])
        state.optimizer.state.clear()
        state.load_optimizer_tensors(ckpt.optimizer)
        state.version = ckpt.version
        for p in state.params.values():
            p.grad = None
        self._publish(state)

    def _publish(self, state: Adapter) -> None:
        update = AdapterUpdate(key=AdapterVersion(state.id, state.version),
                               peft_config=self.policy.peft_config(state.lora).to_dict(),
                               tensors={k: p.detach() for k, p in state.params.items()})
        self.engine.publish(update)

    def _run_loss(self, adapter: str, data: Sequence[Datum], loss_fn: str | CustomLoss, loss_fn_config: dict | None,
                  backward: bool) -> ForwardBackwardOutput:
        self._adapter(adapter)
        custom = loss_fn if isinstance(loss_fn, CustomLoss) else None
        custom_sums: dict[str, torch.Tensor] = {}  # a custom loss's metrics, summed over this rank's datums
        datum_loss, needs_sampler = self._checked_loss(data, loss_fn, loss_fn_config, backward, custom_sums)
        reclaimed = self.sleep.before_training() if backward else None
        device = self.policy.device
        sequences = [d.model_input for d in data]
        logprobs: dict[int, torch.Tensor] = {}
        total = torch.zeros((), device=device)
        computed = 0
        share = self.policy.share_prefixes
        # each datum on one rank, datums sharing a prefix on the same one where the balance allows
        units = packing.units(sequences, self.ranks.world * 4, share)
        mine = [i for u in self.ranks.share([packing.computed_tokens([sequences[i] for i in unit], share)
                                             for unit in units]) for i in units[u]]
        # the loss is a sum over data, so each micro-batch's backward adds its share of the gradient
        with self.policy.active(adapter, train=backward) as model:
            batches = self.policy.micro_batches([sequences[i] for i in mine])
            if self.policy.sharded:  # each pass gathers every layer, with every rank: all run as many
                for _ in range(self.ranks.most(len(batches)) - len(batches)):
                    self.policy.empty_pass(model, backward)
            for indices in batches:
                group = [mine[j] for j in indices]
                batch = [data[i] for i in group]
                computed += packing.computed_tokens([d.model_input for d in batch], share)
                lps = self.policy.token_logprobs(model, [d.model_input for d in batch],
                                                 [d.loss_fn_inputs["target_tokens"].tolist() for d in batch])
                loss = torch.zeros((), device=device)
                for i, lp, datum in zip(group, lps, batch):
                    loss = loss + datum_loss(lp, datum.loss_fn_inputs, i)
                    logprobs[i] = lp.detach()
                if backward:
                    loss.backward()
                total += loss.detach()
        keys = custom.metric_keys if custom is not None else ()
        loss_sum, computed, *custom_metrics = self.ranks.sum(
            [float(total), float(computed), *(float(custom_sums.get(k, 0.0)) for k in keys)])
        lengths = [len(s) for s in sequences]
        metrics = {"loss:sum": loss_sum, "tokens_computed:sum": computed, "tokens_unshared:sum": float(sum(lengths)),
                   "tokens_padded:sum": float(packing.padded_tokens(lengths, self.policy.microbatch_tokens))}
        if custom is not None:
            metrics.update(custom.reduce(custom_metrics, len(data)))
        if reclaimed is not None:
            metrics["engine_sleep_reclaimed_bytes:sum"] = float(reclaimed)
        outputs = self.ranks.gather({i: lp.cpu() for i, lp in logprobs.items()}, len(data))
        if needs_sampler:
            gap = sampler_gap([d.loss_fn_inputs for d in data], outputs)
            metrics.update(gap)
            self._warn_if_stale(adapter, gap)
        return ForwardBackwardOutput(loss_fn_outputs=[{"logprobs": lp} for lp in outputs], metrics=metrics)

    def _checked_loss(self, data: Sequence[Datum], loss_fn: str | CustomLoss, loss_fn_config: dict | None,
                      backward: bool, custom_sums: dict[str, torch.Tensor]):
        """(the loss of one datum: (logprobs, its loss_fn_inputs, its index) -> scalar, whether the loss reads the
        sampler's logprobs), once ``data`` has passed the loss's checks."""
        if isinstance(loss_fn, CustomLoss):
            if loss_fn_config:
                raise InvalidRequestError(f"loss_fn_config {sorted(loss_fn_config)} with custom loss {loss_fn.name!r}; "
                                          "allowed: none (a custom loss takes its values from loss_fn_inputs)")
            loss_fn.check_data(data, self.policy.vocab_size, self.max_len, self.config.max_request_tokens, backward)

            # the datum's tensors as they came (ints stay ints), as the SDK passes them when it runs the loss
            def custom(lp: torch.Tensor, inputs: dict[str, torch.Tensor], i: int) -> torch.Tensor:
                return loss_fn.datum_loss(lp, inputs, custom_sums, f"data[{i}]")

            return custom, False
        spec, config = check_loss(loss_fn, loss_fn_config)
        check_data(data, spec, loss_fn, self.policy.vocab_size, self.max_len, self.config.max_request_tokens)

        def builtin(lp: torch.Tensor, inputs: dict[str, torch.Tensor], i: int) -> torch.Tensor:
            return spec.fn(lp, {k: v.to(lp.device, torch.float32) for k, v in inputs.items() if k != "target_tokens"},
                           config)

        return builtin, "logprobs" in spec.required

    def _warn_if_stale(self, adapter: str, gap: dict[str, float]) -> None:
        threshold = self.config.sampler_gap_warn
        figure = gap.get("kl_sample_train_v2:mean")
        if threshold > 0 and figure is not None and figure > threshold and self.ranks.main:
            log.warning("colo: adapter %s: the sampler's logprobs differ from the trainer's by kl_sample_train_v2 = "
                        "%.3g (above COLO_SAMPLER_GAP_WARN=%g; v1 %.3g, largest difference %.3g). Likely causes: "
                        "samples drawn by an older version of the adapter (off-policy data, or weights not published "
                        "to the sampler), a sampler on another base model, dtype or quantization, or sampler "
                        "logprobs taken at a temperature other than 1", adapter, figure, threshold,
                        gap["kl_sample_train_v1:mean"], gap["sampler_gap_max:max"])
