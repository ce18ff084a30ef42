"""What training clients ask: models made and unloaded, forward_backward, optim_step, saving and loading.

Each method checks what the request names (another tenant's ids read as unknown) and starts one job:
a model's training requests run in its ``seq_id`` order (``Models.ordered``); making or deleting a
model runs on the worker outside any order. The answer is ``{request_id}``; the client polls the
job's future, encoded by the caller's ``encode``.
"""

from __future__ import annotations

import uuid
from concurrent.futures import Future

from tinker import types as tt

from colo.errors import InvalidRequestError
from colo.service.base_model import BaseModel
from colo.service.checkpoint_store import CheckpointStore
from colo.service.checkpoints import Checkpoints
from colo.service.custom_losses import CustomLosses
from colo.service.futures import Encode, Futures
from colo.service.models import Model, Models
from colo.service.sessions import Sessions
from colo.service.stability import StabilityRecords
from colo.service.tinker_wire import ForwardBackwardCall
from colo.trainer import Trainer
from colo.types import AdamParams


class Training:
    def __init__(self, base: BaseModel, sessions: Sessions, models: Models, checkpoints: Checkpoints,
                 stability: StabilityRecords, futures: Futures) -> None:
        self._base, self._sessions, self._models = base, sessions, models
        self._checkpoints, self._stability, self._futures = checkpoints, stability, futures
        self._custom_losses = CustomLosses()

    # ---- models -------------------------------------------------------------------------------------

    def create_model(self, tenant: str, req: tt.CreateModelRequest, encode: Encode) -> dict:
        self._sessions.touch(tenant, req.session_id)
        self._base.check(req.base_model)
        if req.optimizer_config.type != "adamw":
            raise InvalidRequestError(f"optimizer {req.optimizer_config.type!r}; allowed: adamw")
        if req.lora_config is None:
            raise InvalidRequestError("lora_config is missing; colo trains LoRA adapters only")
        model_id = self._models.new_id(req.session_id, req.model_seq_id)
        lora = req.lora_config

        def make(trainer: Trainer) -> str:
            return trainer.create_lora(rank=lora.rank, seed=lora.seed, train_attn=lora.train_attn,
                                       train_mlp=lora.train_mlp, train_unembed=lora.train_unembed)

        return self._futures.submit(tenant, self._models.create(tenant, req.session_id, model_id, make), encode)

    def info(self, tenant: str, model_id: str) -> dict:
        m = self._models.get(tenant, model_id)
        return {"type": "get_info", "model_id": m.model_id, "is_lora": True, "lora_rank": m.rank,
                "model_name": self._base.name, "model_data": self._base.model_data()}

    def unload(self, tenant: str, model_id: str, encode: Encode) -> dict:
        m = self._models.get(tenant, model_id)
        return self._futures.submit(tenant, self._models.drop(m.model_id), encode)

    # ---- custom losses ------------------------------------------------------------------------------

    def create_custom_loss(self, tenant: str, req: tt.CreateCustomLossRequest, encode: Encode) -> dict:
        """Check and keep the session's loss graph now (a bad one answers 400 here); the job is already done,
        its result the loss id, since the SDK polls for it as for any request."""
        self._sessions.touch(tenant, req.session_id)
        loss_id = self._custom_losses.create(tenant, req, lambda: self._sessions.ids(tenant))
        done: Future = Future()
        done.set_result(loss_id)
        return self._futures.submit(tenant, done, encode)

    # ---- training requests --------------------------------------------------------------------------

    def forward_backward(self, tenant: str, call: ForwardBackwardCall, encode: Encode) -> dict:
        verb = "forward" if call.forward_only else "forward_backward"

        def run(trainer: Trainer, model: Model):
            sources = set()
            if call.loss_fn == "stable_reinforce":
                sources = self._stability.use_recorded_logprobs(tenant, call.data, call.spans)
            loss_fn = call.loss_fn
            if call.loss_id is not None:  # looked up in the job, so an unknown one still takes its seq_id's turn
                loss_fn = self._custom_losses.get(tenant, model.session_id, call.loss_id)
            out = getattr(trainer, verb)(model.adapter, call.data, loss_fn, call.loss_fn_config)
            # how many optimizer steps the adapter took since it sampled these sequences (0: on-policy)
            behind = [trainer.version(model.adapter) - v for a, v in sources if a == model.adapter and v is not None]
            if behind:
                out.metrics["sampler_versions_behind:max"] = float(max(behind))
            return out

        return self._models.ordered(tenant, call.model_id, call.seq_id, run, encode)

    def optim_step(self, tenant: str, req: tt.OptimStepRequest, encode: Encode) -> dict:
        self._models.get(tenant, req.model_id)  # an unknown model answers 404 before any other check
        p = req.optim_params
        if not isinstance(p, tt.AdamParams):
            raise InvalidRequestError(f"optimizer {getattr(p, 'type', '?')!r}; allowed: adam_params")
        adam = AdamParams(learning_rate=p.learning_rate, beta1=p.beta1, beta2=p.beta2, eps=p.eps,
                          weight_decay=p.weight_decay, grad_clip_norm=p.grad_clip_norm)
        return self._models.ordered(tenant, req.model_id, req.seq_id, lambda t, m: t.optim_step(m.adapter, adam),
                                    encode)

    def save_state(self, tenant: str, req: tt.SaveWeightsRequest, encode: Encode) -> dict:
        """Weights and optimizer state, for ``load_weights``; the job's result is the ``tinker://`` path."""
        model_id = self._models.get(tenant, req.model_id).model_id
        name = req.path or f"step-{uuid.uuid4().hex[:8]}"
        file = self._checkpoints.store.file(tenant, model_id, "weights", name)
        ttl = CheckpointStore.checked_ttl(req.ttl_seconds)
        overwrite = req.overwrite

        def run(trainer: Trainer, model: Model) -> str:
            if file.exists() and not overwrite:
                raise InvalidRequestError(f"checkpoint {name!r} exists; allowed: a new name, or overwrite=True")
            self._checkpoints.save(trainer, model.adapter, file, ttl, optimizer=True)
            return CheckpointStore.tinker_path(model_id, "weights", name)

        return self._models.ordered(tenant, model_id, req.seq_id, run, encode)

    def load_state(self, tenant: str, req: tt.LoadWeightsRequest, encode: Encode) -> dict:
        """Into a live model (in its order), or into a new one (``session_id``); the job's result is the model id."""
        # the tenant's own checkpoint, or one another tenant published
        file = self._checkpoints.store.locate(tenant, req.path, ("weights", "sampler_weights")).file
        optimizer = req.optimizer
        if req.session_id is not None:
            self._sessions.touch(tenant, req.session_id)
            self._base.check(req.base_model)
            model_id = self._models.new_id(req.session_id, req.model_seq_id)
            made = self._models.create(tenant, req.session_id, model_id,
                                       lambda t: t.load_state(file, optimizer=optimizer))
            return self._futures.submit(tenant, made, encode)
        if req.model_id is None:
            raise InvalidRequestError("load_weights needs model_id (with seq_id) or session_id (with model_seq_id)")

        def run(trainer: Trainer, model: Model) -> str:
            trainer.load_state(file, adapter=model.adapter, optimizer=optimizer)
            return model.model_id

        return self._models.ordered(tenant, req.model_id, req.seq_id, run, encode)
