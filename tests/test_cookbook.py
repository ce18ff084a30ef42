"""Real tinker-cookbook recipes, unmodified, against the service with its defaults on the default model.

Each recipe runs as its own process, as a user runs it (`python -m tinker_cookbook.recipes...`), with the
cookbook's defaults: LoRA rank 32, the SDK's train_unembed=True, math_rl's stable_reinforce loss. What is
passed is what any small run passes (the service URL, the model, a short run) and the renderer, which the
cookbook cannot guess for a model outside its list (SmolLM2-Instruct's chat format is ChatML, which its
`qwen3_instruct` renderer writes). tinker-cookbook is installed without its dependency tml-renderers,
which the registry lacks and which serves only other models' tokenizers (see the README).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def recipe(service, module: str, log_path: Path, *args: str, timeout: int = 600) -> str:
    env = {**os.environ, "TINKER_API_KEY": "tml-cookbook", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", f"tinker_cookbook.recipes.{module}", f"model_name={MODEL}",
                           "renderer_name=qwen3_instruct", f"base_url={service.url}", f"log_path={log_path}", *args],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=log_path.parent)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Training completed successfully" in out, out[-4000:]
    return out


def metrics(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def math_rl_run(default_service, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("math_rl") / "run"
    out = recipe(default_service, "math_rl.train", log_path, "env=arithmetic", "groups_per_batch=4", "group_size=4",
                 "max_steps=3", "behavior_if_log_dir_exists=delete")
    return log_path, out


def test_math_rl_trains_with_stable_reinforce_and_exits_0(math_rl_run):
    log_path, out = math_rl_run
    rows = [r for r in metrics(log_path) if "optim/kl_sample_train_v1" in r]
    assert [r["step"] for r in rows] == [0, 1, 2]
    # the sampler's logprobs and the trainer's agree (bf16 on both sides): a small sample/train KL
    assert all(abs(r["optim/kl_sample_train_v1"]) < 0.1 for r in rows), rows
    assert "Saved checkpoints" in out


def test_math_rl_resumes_from_its_checkpoint_with_the_optimizer_state(default_service, math_rl_run):
    log_path, _ = math_rl_run
    out = recipe(default_service, "math_rl.train", log_path, "env=arithmetic", "groups_per_batch=4", "group_size=4",
                 "max_steps=5", "behavior_if_log_dir_exists=resume")
    assert "Resumed training from tinker://" in out, out[-3000:]
    steps = [r["step"] for r in metrics(log_path) if "optim/kl_sample_train_v1" in r]
    assert steps == [0, 1, 2, 3, 4]


def test_chat_sl_trains_on_a_local_file_and_rolls_its_checkpoints(default_service, tmp_path):
    import tinker_cookbook

    data = Path(tinker_cookbook.__file__).parent / "example_data" / "conversations.jsonl"
    log_path = tmp_path / "run"
    out = recipe(default_service, "chat_sl.train", log_path, f"dataset={data}", "batch_size=8", "max_steps=4",
                 "save_every=2", "rolling_save_every=1", "eval_every=0", "infrequent_eval_every=0",
                 "behavior_if_log_dir_exists=delete")
    assert "Deleted rolling checkpoint" in out, out[-3000:]  # DELETE .../checkpoints/... is served
    losses = [r["train_mean_nll"] for r in metrics(log_path) if "train_mean_nll" in r]
    assert len(losses) == 4 and all(0 < x < 20 for x in losses), losses
