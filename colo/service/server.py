"""The service's parts put together, each the one owner of its concept:

- ``sessions``: the SDK's sessions, their heartbeats, and what goes when one ends;
- ``models``: each training model's adapter, request order and de-duplication;
- ``training``: the training clients' requests; ``sampling``: sampling sessions and sample requests;
- ``runs``: the REST side's training runs and checkpoints; ``checkpoints``: every checkpoint write;
- ``external``: exports for other programs and the signed URLs they are fetched by;
- ``worker``: the thread that owns the Trainer; ``futures``: the jobs' results the clients poll.

A route parses its request, makes one call on one of them, and encodes the answer.
"""

from __future__ import annotations

from colo.service.base_model import BaseModel
from colo.losses import LOSSES
from colo.service.checkpoint_store import KINDS, MAX_TTL_SECONDS, CheckpointStore
from colo.service.checkpoints import Checkpoints
from colo.service.external_weights import ExternalWeights
from colo.service.futures import Futures
from colo.service.models import Models
from colo.service.runs import Runs
from colo.service.sampling import Sampling
from colo.service.sessions import Sessions
from colo.service.signed_urls import URL_SECONDS
from colo.service.stability import StabilityRecords
from colo.service.tenants import Tenants
from colo.service.training import Training
from colo.service.worker import Worker
from colo.trainer import Trainer


class Service:
    def __init__(self, trainer: Trainer, tenants: Tenants, store: CheckpointStore,
                 model_name: str | None = None) -> None:
        self.trainer = trainer
        self.tenants = tenants
        self.base = BaseModel(trainer, model_name)
        self.worker = Worker(trainer)
        self.futures = Futures()
        self.checkpoints = Checkpoints(store)
        self.models = Models(self.worker, self.futures, self.checkpoints, trainer.config.max_models_per_tenant)
        self.sessions = Sessions(self.models)
        stability = StabilityRecords()
        self.training = Training(self.base, self.sessions, self.models, self.checkpoints, stability, self.futures)
        self.sampling = Sampling(self.base, self.sessions, self.models, self.checkpoints, self.worker, self.futures,
                                 stability)
        self.runs = Runs(self.base, self.models, self.checkpoints, self.worker)
        self.external = ExternalWeights(self.models, self.checkpoints)
        self.stopping = False
        self.stopped = False  # cleanly: torchrun_entry's exit status says so
        self.routes: list[str] = []  # "METHOD /path" of every route served, set by ``create_app``
        self.refused: list[str] = []  # "METHOD /path: what (why)" of the SDK's routes that colo refuses

    def capabilities(self) -> dict:
        """``get_server_capabilities``: the SDK reads ``supported_models``; the rest says exactly what else this
        service takes (losses, LoRA limits, the sampler's abilities, routes served and refused)."""
        config, caps = self.trainer.config, self.trainer.engine.capabilities
        return {**self.base.capabilities(),
                "losses": sorted([*LOSSES, "custom"]),
                "lora": {"max_rank": config.max_lora_rank, "train_attn": True, "train_mlp": True,
                         "train_unembed": caps.unembed_lora, "max_models_per_tenant": config.max_models_per_tenant},
                "optimizers": ["adamw"],
                "sampler": {"engine": self.trainer.engine.name, "prompt_logprobs": True,
                            "several_adapters_per_batch": caps.multi_adapter_batch, "sleep": caps.sleep},
                "checkpoints": {"kinds": list(KINDS), "age_encryption": True, "signed_url_seconds": URL_SECONDS,
                                "max_ttl_seconds": MAX_TTL_SECONDS},
                "routes": self.routes, "refused": self.refused}

    def housekeeping(self) -> None:
        """From the app's timer: silent sessions lose their models; expired checkpoints go (on the worker)."""
        self.sessions.reap()
        self.worker.call(self.checkpoints.housekeeping)

    def health(self) -> tuple[int, dict]:
        """200 while the worker moves; 503 with a reason when it has work and finished none of it for
        COLO_STALL_SECONDS, or when the service is stopping. The body shows what runs and what waits."""
        st = self.worker.status()
        limit = self.trainer.config.stall_seconds
        view = {"running": st.running, "running_seconds": round(st.running_seconds, 1), "queued": st.queued,
                "seconds_since_progress": round(st.seconds_since_progress, 1)}
        if self.stopping:
            return 503, {"status": "stopping", "reason": "the service is shutting down", "worker": view}
        if st.stalled(limit):
            what = f"a {st.running} job has run for {st.running_seconds:.0f} s" if st.running else "nothing ran"
            return 503, {"status": "stalled", "worker": view,
                         "reason": f"the worker has queued work and finished none of it for "
                                   f"{st.seconds_since_progress:.0f} s ({what}); allowed: {limit:.0f} s "
                                   "(COLO_STALL_SECONDS)"}
        return 200, {"status": "ok", "worker": view}

    def stop(self) -> bool:
        """Refuse new work, answer what waits, let the running job finish, then release the engine; False
        if the running job did not finish in COLO_STALL_SECONDS (the engine is then left as it is)."""
        self.stopping = True
        self.models.close()
        if not self.worker.stop(timeout=self.trainer.config.stall_seconds):
            return False
        self.trainer.close()
        self.stopped = True
        return True
