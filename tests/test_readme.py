"""The README's promises: its configuration table is what Config does, every COLO_ variable it names
exists, and its two opening commands are targets that make can run."""

import re
import subprocess
from pathlib import Path

import pytest

from colo.config import Config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TABLE = {m[1]: (m[2], m[3]) for m in re.finditer(r"^\| `(COLO_\w+)` \| `([^`]*)` \| (.*) \|$", README, re.M)}


def test_the_table_lists_every_setting_with_its_real_default():
    fields = {var: (default, description) for var, default, description in Config.field_docs()}
    assert TABLE.keys() == fields.keys()
    defaults = Config(_env_file=None)
    for var, (default, description) in TABLE.items():
        assert (default, description) == fields[var], var
        assert repr(getattr(defaults, var.removeprefix("COLO_").lower())) == default, var


# a valid value other than the default for every setting: a new setting must be added here
OTHER_VALUES = {
    "COLO_MODEL": ("/models/x", "/models/x"), "COLO_MODEL_CACHE_DIR": ("/tmp/m", "/tmp/m"),
    "COLO_ENGINE": ("pytorch", "pytorch"), "COLO_ENGINE_URL": ("http://h:1", "http://h:1"),
    "COLO_ENGINE_ADAPTER_DIR": ("/tmp/a", "/tmp/a"), "COLO_ENGINE_TIMEOUT_SECONDS": ("7.5", 7.5),
    "COLO_DEVICE": ("cpu", "cpu"), "COLO_DTYPE": ("float32", "float32"),
    "COLO_GPU_MEMORY_UTILIZATION": ("0.5", 0.5), "COLO_CPU_KVCACHE_SPACE_GIB": ("2", 2),
    "COLO_MAX_LORAS": ("8", 8), "COLO_MAX_LORA_RANK": ("64", 64), "COLO_MAX_MODEL_LEN": ("512", 512), "COLO_MAX_SAMPLES_PER_REQUEST": ("8", 8),
    "COLO_MICROBATCH_TOKENS": ("1024", 1024), "COLO_GRADIENT_CHECKPOINTING": ("false", False),
    "COLO_SHARE_PREFIXES": ("false", False), "COLO_SHARD_BASE": ("true", True), "COLO_SAMPLER_GAP_WARN": ("0.5", 0.5),
    "COLO_SLEEP_LEVEL": ("2", 2), "COLO_TENSOR_PARALLEL_SIZE": ("2", 2), "COLO_HOST": ("0.0.0.0", "0.0.0.0"),
    "COLO_PORT": ("8123", 8123), "COLO_API_KEYS": ("k:t", "k:t"), "COLO_CHECKPOINT_DIR": ("/tmp/c", "/tmp/c"),
    "COLO_SEED": ("5", 5), "COLO_MAX_ADAPTERS": ("9", 9), "COLO_MAX_MODELS_PER_TENANT": ("3", 3),
    "COLO_MAX_BODY_MIB": ("8", 8), "COLO_MAX_REQUEST_TOKENS": ("4096", 4096),
    "COLO_VLLM_ENGINE_ARGS": ('{"max_num_seqs": 8}', {"max_num_seqs": 8}),
    "COLO_VLLM_KV_CACHE_DTYPE": ("fp8", "fp8"), "COLO_VLLM_PREFIX_CACHING": ("false", False),
    "COLO_VLLM_MAX_NUM_SEQS": ("64", 64), "COLO_VLLM_MAX_NUM_BATCHED_TOKENS": ("8192", 8192),
    "COLO_PYTORCH_COMPILE": ("on", "on"), "COLO_COLLECTIVE_TIMEOUT_SECONDS": ("30", 30.0), "COLO_VLLM_ENFORCE_EAGER": ("true", True), "COLO_VLLM_QUANTIZATION": ("fp8", "fp8"),
    "COLO_VLLM_ATTENTION_BACKEND": ("FLASH_ATTN", "FLASH_ATTN"), "COLO_VLLM_SLEEP_OFFLOAD_CUDAGRAPHS": ("false", False),
    "COLO_STALL_SECONDS": ("30", 30.0),
}


@pytest.mark.parametrize("var", sorted(TABLE))
def test_each_documented_variable_is_read_from_the_environment(var, monkeypatch):
    text, value = OTHER_VALUES[var]
    name = var.removeprefix("COLO_").lower()
    assert value != getattr(Config(), name)
    monkeypatch.setenv(var, text)
    assert getattr(Config(), name) == value


def test_every_colo_variable_the_readme_mentions_exists():
    mentioned = set(re.findall(r"\bCOLO_[A-Z_]+[A-Z]\b", README)) - {"COLO_CONFIG"}
    assert mentioned <= set(TABLE), mentioned - set(TABLE)


def test_readme_starts_with_the_two_commands_that_make_can_run_and_ci_runs_the_test_one():
    first_block = README.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    for command in commands:  # a dry run: the target and what it depends on exist
        proc = subprocess.run([*command.split(), "-n"], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    assert (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == "make test"
