"""Start-up checks of the vllm engine's settings: what vLLM would refuse late, or wait on forever, is refused
before vLLM starts, with one line naming the setting and what is allowed."""

import subprocess
import sys

import pytest

from colo import Config, ConfigError
from engines.vllm_engine import check_settings
from engines.vllm_memory import check_memory_share


@pytest.mark.parametrize("rank", [24, 2, 500])
def test_a_lora_slot_rank_vllm_does_not_take_is_refused(rank):
    with pytest.raises(ConfigError, match=rf"COLO_MAX_LORA_RANK={rank}: the vllm engine sizes its LoRA slots to one "
                                          r"of 1, 8, 16, 32, 64, 128, 256, 320, 512"):
        check_settings(Config(max_lora_rank=rank), under_torchrun=False, world_size=1)


def test_the_ranks_vllm_takes_pass():
    for rank in (8, 16, 32, 64):
        check_settings(Config(max_lora_rank=rank), under_torchrun=False, world_size=1)


def test_tensor_parallel_size_must_match_torchruns_processes():
    with pytest.raises(ConfigError, match=r"COLO_TENSOR_PARALLEL_SIZE=2, but torchrun started 1 process\(es\).*"
                                          r"allowed: 1, or torchrun --nproc_per_node=2"):
        check_settings(Config(tensor_parallel_size=2), under_torchrun=True, world_size=1)
    check_settings(Config(tensor_parallel_size=2), under_torchrun=True, world_size=2)


@pytest.mark.parametrize("key, hint", [("max_lora_rank", "COLO_MAX_LORA_RANK"), ("dtype", "COLO_DTYPE"),
                                       ("gpu_memory_utilization", "COLO_GPU_MEMORY_UTILIZATION"),
                                       ("enable_sleep_mode", "COLO_SLEEP_LEVEL")])
def test_engine_args_colo_sets_itself_are_refused(key, hint):
    with pytest.raises(ConfigError, match=rf"COLO_VLLM_ENGINE_ARGS: '{key}' is set by colo; allowed: {hint} instead"):
        check_settings(Config(vllm_engine_args={key: 1}), under_torchrun=False, world_size=1)


def test_unknown_engine_args_are_refused_and_known_ones_pass():
    with pytest.raises(ConfigError, match=r"COLO_VLLM_ENGINE_ARGS: 'max_num_seq' is not an argument of vLLM"):
        check_settings(Config(vllm_engine_args={"max_num_seq": 8}), under_torchrun=False, world_size=1)
    check_settings(Config(vllm_engine_args={"max_num_seqs": 8, "kv_cache_dtype": "auto", "enforce_eager": True}),
                   under_torchrun=False, world_size=1)


def test_a_memory_share_that_is_not_free_names_the_largest_that_fits():
    gib = 2**30
    with pytest.raises(ConfigError, match=r"COLO_GPU_MEMORY_UTILIZATION=0.9: vLLM would take 72.0 GiB and 30.0 GiB "
                                          r"of 80.0 GiB are free .*allowed: at most 0.36"):
        check_memory_share(0.9, free=30 * gib, total=80 * gib)
    check_memory_share(0.36, free=30 * gib, total=80 * gib)
    # 29.6 GiB fit in 30 GiB, but not with vLLM's own start-up work beside them (its check comes after it)
    with pytest.raises(ConfigError, match=r"512 MiB stay aside for vLLM's start-up\); allowed: at most 0.36"):
        check_memory_share(0.37, free=30 * gib, total=80 * gib)


def test_engine_args_must_be_a_json_object(monkeypatch):
    monkeypatch.setenv("COLO_VLLM_ENGINE_ARGS", "[1, 2]")
    with pytest.raises(ConfigError, match=r"COLO_VLLM_ENGINE_ARGS=.*valid dictionary"):
        Config()


def test_engine_args_reach_vllm(tiny_model_dir):
    # in a process of its own: one vLLM engine per process
    code = (f"from colo import Trainer; t = Trainer(model={str(tiny_model_dir)!r}, engine='vllm', dtype='float32', "
            "vllm_engine_args={'max_num_seqs': 7}, vllm_prefix_caching=False); "
            "c = t.engine.llm.llm_engine.vllm_config; "
            "print('MAX_NUM_SEQS', c.scheduler_config.max_num_seqs, 'PREFIX', c.cache_config.enable_prefix_caching)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "MAX_NUM_SEQS 7 PREFIX False" in proc.stdout, proc.stderr[-3000:]


SWITCH = """
import gc, weakref
from colo import ConfigError, SamplingParams, Trainer
t = Trainer(model={model!r}, engine="vllm", dtype="float32", max_lora_rank=16)
a = t.create_lora(rank=8, seed=1)
greedy = SamplingParams(max_tokens=4, temperature=0)
first = t.sample(a, [[5, 6, 7]], 1, greedy)[0].sequences[0].tokens
old = t.engine
old.sleep(1)  # asleep at the switch: on CUDA vLLM would free its unmapped memory as if mapped
woken = []
real_wake = old.wake
old.wake = lambda: (woken.append(old.sleep_level), real_wake())
llm = weakref.ref(old.llm)
t.set_engine("vllm")  # a second vLLM engine in this process, after the first is released
gc.collect()
print("WOKEN", woken, "RELEASED", llm() is None)
assert t.sample(a, [[5, 6, 7]], 1, greedy)[0].sequences[0].tokens == first
try:
    t.set_engine("vllm", max_lora_rank=24)  # refused at start-up: the previous engine comes back
except ConfigError as e:
    print("REFUSED", e)
assert t.engine.name == "vllm" and t.config.max_lora_rank == 16
assert t.sample(a, [[5, 6, 7]], 1, greedy)[0].sequences[0].tokens == first
print("SWITCHED")
"""


def test_a_new_vllm_engine_starts_in_the_same_process_and_a_failed_switch_keeps_the_old(tiny_model_dir):
    proc = subprocess.run([sys.executable, "-c", SWITCH.format(model=str(tiny_model_dir))], capture_output=True,
                          text=True, timeout=300)
    assert "SWITCHED" in proc.stdout, proc.stderr[-3000:]
    assert "WOKEN [1] RELEASED True" in proc.stdout  # woken before its shutdown, then let go of entirely
    assert "REFUSED COLO_MAX_LORA_RANK=24" in proc.stdout


def test_a_knob_set_both_as_a_setting_and_in_engine_args_is_refused():
    with pytest.raises(ConfigError, match=r"'max_num_seqs' is also set by COLO_VLLM_MAX_NUM_SEQS"):
        check_settings(Config(vllm_max_num_seqs=4, vllm_engine_args={"max_num_seqs": 8}), under_torchrun=False,
                       world_size=1)
    check_settings(Config(vllm_engine_args={"max_num_seqs": 8}), under_torchrun=False, world_size=1)


def test_heads_that_do_not_divide_over_the_ranks_are_refused_before_vllm_starts():
    from engines.vllm_engine import check_heads_split

    smollm2 = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 9}
    check_heads_split(smollm2, 3)
    with pytest.raises(ConfigError, match=r"LlamaForCausalLM has 9 attention heads, which vLLM cannot split over 2 "
                                          r"ranks; allowed: torchrun --nproc_per_node in \[1, 3, 9\]"):
        check_heads_split(smollm2, 2)
