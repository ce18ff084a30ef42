"""Sampling: sampling sessions, the versions saved for them, and the sample requests of both APIs.

A sampling session names what it samples: the base model, a model's live weights, or a version saved
for sampling. The worker resolves that to an adapter when the request joins a batch (``_resolve``), so
a snapshot keeps sampling exactly its version while training goes on: the model's live adapter while
that version is current, else a frozen copy loaded from the saved file (``Checkpoints.frozen_copy``; a
file from an earlier run is always sampled that way). With ``record_stability_info`` each sampled
sequence is recorded for ``stable_reinforce`` (``stability``).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path

from tinker import types as tt

from colo.errors import InvalidRequestError
from colo.service import tinker_wire
from colo.service.base_model import BaseModel
from colo.service.checkpoint_store import CheckpointStore
from colo.service.checkpoints import Checkpoints
from colo.service.errors import NotFound
from colo.service.futures import Encode, Futures, queue_of
from colo.service.models import Model, Models
from colo.service.sessions import Sessions
from colo.service.stability import StabilityRecords
from colo.service.worker import Worker
from colo.trainer import Trainer
from colo.types import SampleJob, SampleResult, SamplingParams


@dataclass
class Sampler:
    """What a sampling session samples: the base model, a model's live weights, or a saved version."""

    tenant: str
    sampler_id: str
    model_path: str | None = None
    model_id: str | None = None
    version: int | None = None  # the version saved at model_path (None: follow the live weights)
    file: Path | None = None
    clients: int = 0


class Sampling:
    def __init__(self, base: BaseModel, sessions: Sessions, models: Models, checkpoints: Checkpoints,
                 worker: Worker, futures: Futures, stability: StabilityRecords) -> None:
        self._base, self._sessions, self._models = base, sessions, models
        self._checkpoints, self._worker, self._futures, self._stability = checkpoints, worker, futures, stability
        self._lock = threading.Lock()
        self._samplers: dict[str, Sampler] = {}

    # ---- sampling sessions --------------------------------------------------------------------------

    def create_session(self, tenant: str, req: tt.CreateSamplingSessionRequest) -> str:
        session = self._sessions.touch(tenant, req.session_id)
        sampler_id = uuid.uuid4().hex
        if req.model_path is None:
            self._base.check(req.base_model)
            sampler = Sampler(tenant, sampler_id)
        else:
            sampler = self._saved(tenant, sampler_id, req.model_path)
        self._add(sampler)
        self._sessions.add_sampler(session, sampler_id)
        return sampler_id

    def get(self, tenant: str, sampler_id: str) -> Sampler:
        with self._lock:
            s = self._samplers.get(sampler_id)
            if s is None or s.tenant != tenant:
                raise NotFound(f"unknown sampling session {sampler_id!r}; create_sampling_session makes one")
            return s

    def join(self, tenant: str, sampler_id: str) -> int:
        s = self.get(tenant, sampler_id)
        with self._lock:
            s.clients += 1
            return s.clients

    def save_for_sampler(self, tenant: str, req: tt.SaveWeightsForSamplerRequest, encode: Encode) -> dict:
        """Save the model's weights for sampling, in its ``seq_id`` order. A named save answers its path;
        an unnamed one (``save_weights_and_get_sampling_client``) a sampling session of it."""
        model_id = self._models.get(tenant, req.model_id).model_id
        named = req.path is not None
        name = req.path if named else f"ephemeral-{uuid.uuid4().hex[:12]}"
        file = self._checkpoints.store.file(tenant, model_id, "sampler_weights", name)
        path = CheckpointStore.tinker_path(model_id, "sampler_weights", name)
        ttl = CheckpointStore.checked_ttl(req.ttl_seconds)
        inflight = req.kind == "inflight"  # follows the live weights rather than this version

        def run(trainer: Trainer, model: Model) -> tt.SaveWeightsForSamplerResponseInternal:
            version = self._checkpoints.save_for_sampler(trainer, model_id, model.adapter, file, ttl)
            if named:
                return tt.SaveWeightsForSamplerResponseInternal(path=path)
            self._checkpoints.prune_ephemeral(trainer, file.parent)
            sampler = Sampler(tenant, uuid.uuid4().hex, path, model_id, None if inflight else version, file)
            self._add(sampler)
            return tt.SaveWeightsForSamplerResponseInternal(sampling_session_id=sampler.sampler_id)

        return self._models.ordered(tenant, model_id, req.seq_id, run, encode)

    # ---- requests -----------------------------------------------------------------------------------

    def sample(self, tenant: str, req: tt.SampleRequest, encode: Encode) -> dict:
        """The Tinker API's ``asample``: ``{request_id, sample_sequence_ids}``."""
        unsupported = [name for name, on in (
            ("topk_prompt_logprobs", req.topk_prompt_logprobs > 0), ("topk_sample_logprobs", req.topk_sample_logprobs > 0),
            ("target_prompt_logprobs", req.target_prompt_logprobs is not None),
            ("prompt_alt_tokens_k", req.prompt_alt_tokens_k > 0),
            ("prompt_logprobs_last_n", req.prompt_logprobs_last_n is not None)) if on]
        if unsupported:
            raise InvalidRequestError(f"{', '.join(unsupported)}: not supported by colo; allowed: prompt_logprobs")
        if req.sampling_session_id is not None:
            s = self.get(tenant, req.sampling_session_id)
        else:  # an ad-hoc request names its weights itself
            if req.model_path is not None:
                raise InvalidRequestError("sampling by model_path needs a sampling session; create_sampling_session")
            self._base.check(req.base_model)
            s = Sampler(tenant, "base")
        prompt = tinker_wire.tokens_of(req.prompt, "prompt")
        future = self._submit(s, SampleJob(None, prompt, req.num_samples, tinker_wire.sampling_params(req.sampling_params),
                                           bool(req.prompt_logprobs)))
        queue = queue_of(s.sampler_id, req.seq_id) if req.sampling_session_id is not None else None
        answer = self._futures.submit(tenant, future, encode, queue)  # queue: for retrieve_futures
        ids = [f"{answer['request_id']}:{i}" for i in range(req.num_samples)]
        answer["sample_sequence_ids"] = ids  # the SDK expects them on every sample, recorded or not
        if req.record_stability_info:
            def record(done: Future) -> None:
                if done.exception() is None:
                    result = done.result()
                    for sequence_id, seq in zip(ids, result.sequences):
                        self._stability.record(tenant, sequence_id, prompt, seq.tokens, seq.logprobs,
                                               result.adapter, result.adapter_version)

            future.add_done_callback(record)
        return answer

    async def complete(self, tenant: str, name: str, prompt: list[int], n: int,
                       params: SamplingParams) -> tuple[SampleResult, str]:
        """The OpenAI routes' sample of what ``name`` names: the result, and which version answered
        (``<model_id>@v<version>``, or ``base``)."""
        s = self._named(tenant, name)
        result: SampleResult = await asyncio.wrap_future(self._submit(s, SampleJob(None, prompt, n, params)))
        answered = "base" if result.adapter is None else f"{s.model_id or name}@v{result.adapter_version}"
        return result, answered

    def names(self, tenant: str) -> list[str]:
        """What the tenant may name as an OpenAI ``model``: the base model, its live models, its sampler saves."""
        store = self._checkpoints.store
        return [self._base.name] + self._models.ids(tenant) + [
            CheckpointStore.tinker_path(c.model_id, c.kind, c.name)
            for m in store.models_on_disk(tenant) for c in store.list(tenant, m) if c.kind == "sampler_weights"]

    # ---- what a request samples ---------------------------------------------------------------------

    def _add(self, sampler: Sampler) -> None:
        with self._lock:
            self._samplers[sampler.sampler_id] = sampler

    def _saved(self, tenant: str, sampler_id: str, tinker_path: str) -> Sampler:
        """A sampling session of the version saved at ``tinker_path`` (the tenant's own, or one published)."""
        file = self._checkpoints.store.locate(tenant, tinker_path, ("weights", "sampler_weights")).file
        saved_model, version = self._checkpoints.saved_version(file)
        return Sampler(tenant, sampler_id, tinker_path, saved_model, version, file)

    def _named(self, tenant: str, name: str) -> Sampler:
        """What an OpenAI ``model`` names; the sampler id keys the worker's round-robin."""
        if name in self._base.names:
            return Sampler(tenant, f"openai-base:{tenant}")
        if name.startswith("tinker://"):
            return self._saved(tenant, f"openai:{tenant}:{name}", name)
        return Sampler(tenant, f"openai:{tenant}:{name}", model_id=self._models.get(tenant, name).model_id)

    def _submit(self, s: Sampler, job: SampleJob) -> Future:
        """``job`` (its adapter left None) to the worker, which fills in the adapter ``s`` samples."""
        def resolve(trainer: Trainer) -> SampleJob:
            return replace(job, adapter=self._resolve(trainer, s))

        return self._worker.sample(s.sampler_id, resolve)

    def _resolve(self, trainer: Trainer, s: Sampler) -> str | None:
        """On the worker: the adapter that holds exactly the weights ``s`` samples."""
        if s.model_id is None and s.file is None:
            return None
        m = self._models.find(s.tenant, s.model_id) if s.model_id else None
        if m is not None and (s.version is None or trainer.version(m.adapter) == s.version):
            return m.adapter
        if s.file is None:
            raise InvalidRequestError(f"model {s.model_id} of this sampling session was deleted")
        return self._checkpoints.frozen_copy(trainer, s.file, s.model_path)
