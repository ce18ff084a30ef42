import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of waiting on the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_model import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def trainer(tiny_model_dir):
    """One Trainer (pytorch engine, float32) for the whole session; tests delete what they create."""
    from colo import Trainer

    t = Trainer(model=str(tiny_model_dir), dtype="float32", engine="pytorch", device="cpu", max_lora_rank=16)
    yield t
    t.close()


@pytest.fixture
def adapter(trainer):
    adapter_id = trainer.create_lora(rank=8, seed=1)
    yield adapter_id
    if adapter_id in trainer.adapters:
        trainer.delete_lora(adapter_id)


def adapter_factory(trainer):
    """A function that creates adapters on ``trainer``; every one it made is deleted afterwards."""
    made = []

    def make(**kwargs):
        kwargs.setdefault("rank", 8)
        made.append(trainer.create_lora(**kwargs))
        return made[-1]

    yield make
    for a in made:
        if a in trainer.adapters:
            trainer.delete_lora(a)


@pytest.fixture
def make_adapter(trainer):
    yield from adapter_factory(trainer)


@pytest.fixture(scope="session")
def vllm_trainer(tiny_model_dir):
    """One Trainer on the real in-process vLLM engine (CPU build) for the whole session."""
    from colo import Trainer

    t = Trainer(model=str(tiny_model_dir), dtype="float32", engine="vllm", device="cpu", max_lora_rank=16,
                max_loras=3)
    yield t
    t.close()


@pytest.fixture
def make_vllm_adapter(vllm_trainer):
    yield from adapter_factory(vllm_trainer)


ALICE, BOB, CAROL = "tml-alice-key", "tml-bob-key", "tml-carol-key"


@pytest.fixture(scope="session")
def service(tiny_model_dir, tmp_path_factory):
    """The real service (``torchrun torchrun_entry.py``, vLLM engine) on loopback, with two tenants."""
    from service_process import ServiceProcess

    work = tmp_path_factory.mktemp("service")
    proc = ServiceProcess({
        "COLO_MODEL": str(tiny_model_dir), "COLO_ENGINE": "vllm", "COLO_DTYPE": "float32", "COLO_DEVICE": "cpu",
        "COLO_MAX_LORAS": "16", "COLO_MAX_LORA_RANK": "16", "COLO_CHECKPOINT_DIR": str(work / "checkpoints"),
        "COLO_API_KEYS": f"{ALICE}:alice,{BOB}:bob,{CAROL}:carol",
        # the suite's tests share tenant alice and leave their models loaded, as scripts do
        "COLO_MAX_MODELS_PER_TENANT": "32",
    }, work / "service.log")
    proc.wait_ready()
    proc.checkpoint_dir = work / "checkpoints"
    proc.model_name = str(tiny_model_dir)
    yield proc
    proc.stop()
    assert "colo: stopped cleanly" in proc.tail(200), proc.tail()


@pytest.fixture(scope="session")
def default_service(tmp_path_factory):
    """The service as a new user starts it: the embedded default model and every setting at its default
    (engine, dtype, rank limit, an open tenant); only the port and the checkpoint directory are the test's."""
    from service_process import ServiceProcess

    work = tmp_path_factory.mktemp("default-service")
    proc = ServiceProcess({"COLO_CHECKPOINT_DIR": str(work / "checkpoints")}, work / "service.log")
    proc.wait_ready(timeout=900)  # a fresh machine converts the default model first
    proc.checkpoint_dir = work / "checkpoints"
    yield proc
    proc.stop()
    assert "colo: stopped cleanly" in proc.tail(200), proc.tail()
