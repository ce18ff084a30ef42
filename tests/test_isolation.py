"""One request, one tenant, one adapter cannot harm the others: bad values fail alone before they join a
batch, a failure inside vLLM leaves the engine serving, and a diverged adapter cannot reach other rows."""

import threading

import pytest
import torch
from transformers import AutoConfig

from colo import AdamParams, Datum, LoraConfig, SampleJob, SamplingParams, capacity
from colo.checkpoint import load_checkpoint, save_checkpoint
from colo.errors import CheckpointError, EngineError, InvalidRequestError
from colo.service.worker import Worker
from engines.base import SampleRequest
from helpers import assert_same_snapshot, encode, overfit, snapshot

PROMPT_TEXT = "the cat sat on a mat and"
GREEDY = SamplingParams(max_tokens=6, temperature=0)


def within(seconds: float, fn):
    """``fn()``'s result, or a test failure if it has not returned in ``seconds`` (a stalled engine)."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # re-raised in the test's thread
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"no answer in {seconds} s: the engine is stalled"
    if "error" in out:
        raise out["error"]
    return out["value"]


def greedy_tokens(trainer, adapter, prompt):
    return [s.tokens for s in trainer.sample(adapter, [prompt], 1, GREEDY)[0].sequences]


@pytest.mark.parametrize("field, value, allowed", [
    ("seed", 2**64, "2**63 - 1"), ("seed", -1, "2**63 - 1"), ("temperature", float("inf"), "finite"),
    ("temperature", float("nan"), "finite"), ("top_p", float("nan"), "(0, 1]"), ("max_tokens", 2.5, "integer"),
])
def test_bad_sampling_values_are_refused_before_the_engine(vllm_trainer, field, value, allowed):
    prompt = encode(vllm_trainer, PROMPT_TEXT)
    with pytest.raises(InvalidRequestError, match=rf"SamplingParams\.{field}=.*allowed: .*{__import__('re').escape(allowed)}"):
        vllm_trainer.sample(None, [prompt], 1, SamplingParams(**{field: value}))


def test_num_samples_above_the_cap_is_refused(vllm_trainer):
    with pytest.raises(InvalidRequestError, match=r"num_samples=1000000; allowed: an integer in \[1, 1024\]"):
        vllm_trainer.sample(None, [encode(vllm_trainer, PROMPT_TEXT)], 1_000_000, GREEDY)


def test_what_only_vllm_refuses_is_refused_per_request(vllm_trainer):
    # vLLM takes temperatures up to 2; colo's own rule (finite, >= 0) lets 5 through to the engine check
    job = SampleJob(None, encode(vllm_trainer, PROMPT_TEXT), 1, SamplingParams(temperature=5.0))
    with pytest.raises(InvalidRequestError, match="vllm engine refuses these sampling parameters.*temperature"):
        vllm_trainer.check_sample_job(job)


def test_a_failure_inside_vllm_leaves_the_engine_serving(vllm_trainer):
    prompt = encode(vllm_trainer, PROMPT_TEXT)
    before = greedy_tokens(vllm_trainer, None, prompt)
    # straight to the engine, past colo's checks: vLLM fails inside its step ("Overflow when unpacking long long")
    bad = SampleRequest(prompt, 1, SamplingParams(max_tokens=4, seed=2**64), None)
    with pytest.raises(EngineError, match="requests were aborted"):
        within(120, lambda: vllm_trainer.engine.sample([bad]))
    assert within(120, lambda: greedy_tokens(vllm_trainer, None, prompt)) == before


def test_a_bad_request_fails_alone_in_the_worker_and_the_others_are_served(vllm_trainer, make_vllm_adapter):
    a = make_vllm_adapter(seed=3)
    prompt = encode(vllm_trainer, PROMPT_TEXT)
    expected = greedy_tokens(vllm_trainer, a, prompt)
    worker = Worker(vllm_trainer)
    try:
        release, started = threading.Event(), threading.Event()
        worker.call(lambda t: (started.set(), release.wait(30)))
        assert started.wait(30)  # the next three requests wait together and go in one batch
        good = worker.sample("bob", lambda t: SampleJob(a, prompt, 1, GREEDY))
        bad = worker.sample("mallory", lambda t: SampleJob(None, prompt, 1, SamplingParams(temperature=9.0)))
        also_good = worker.sample("carol", lambda t: SampleJob(None, prompt, 2, SamplingParams(max_tokens=3, seed=1)))
        release.set()
        assert [s.tokens for s in good.result(120).sequences] == expected
        assert len(also_good.result(120).sequences) == 2
        with pytest.raises(InvalidRequestError, match="temperature"):
            bad.result(120)
    finally:
        worker.stop()


def test_prompt_logprobs_with_more_samples_than_prompt_tokens(vllm_trainer, make_vllm_adapter):
    a = make_vllm_adapter(seed=4)
    overfit(vllm_trainer, a, encode(vllm_trainer, PROMPT_TEXT), steps=3)
    prompt = encode(vllm_trainer, "the cat sat")
    assert len(prompt) < 12
    result = within(120, lambda: vllm_trainer.sample_batch(
        [SampleJob(a, prompt, 12, SamplingParams(max_tokens=2, seed=0), prompt_logprobs=True)])[0])
    assert len(result.sequences) == 12
    expected = vllm_trainer.compute_logprobs(a, prompt)
    assert result.prompt_logprobs[0] is None and expected[0] is None
    assert max(abs(x - y) for x, y in zip(result.prompt_logprobs[1:], expected[1:])) < 1e-4


def test_learning_rate_above_one_is_refused_and_changes_nothing(trainer, adapter):
    trainer.forward_backward(adapter, [Datum.from_sequence(encode(trainer, PROMPT_TEXT))])
    before = snapshot(trainer)
    with pytest.raises(InvalidRequestError, match=r"learning_rate=1e\+30; allowed: in \[0, 1\]"):
        trainer.optim_step(adapter, AdamParams(learning_rate=1e30))
    assert_same_snapshot(before, snapshot(trainer))


def test_a_step_that_would_make_weights_infinite_is_undone(trainer, adapter):
    state = trainer.adapters[adapter]
    trainer.forward_backward(adapter, [Datum.from_sequence(encode(trainer, PROMPT_TEXT))])
    trainer.optim_step(adapter, AdamParams(learning_rate=1e-3))
    # AdamW's state as huge gradients followed by vanishing ones leave it: the next update overflows
    for p in state.params.values():
        state.optimizer.state[p]["exp_avg"].fill_(1e38)
        state.optimizer.state[p]["exp_avg_sq"].zero_()
        p.grad = torch.zeros_like(p)
    before = snapshot(trainer)
    with pytest.raises(InvalidRequestError, match="NaN or infinite.*undone"):
        trainer.optim_step(adapter, AdamParams(learning_rate=1e-3, beta2=0.0))
    after = snapshot(trainer)
    version, weights, optim, _ = before[adapter]
    assert after[adapter][0] == version
    assert all(torch.equal(weights[k], after[adapter][1][k]) for k in weights)
    assert all(torch.equal(optim[k], after[adapter][2][k]) for k in optim)
    assert all(p.grad is None for p in state.params.values())


def test_a_checkpoint_with_nan_weights_is_refused(trainer, adapter, tmp_path):
    path = trainer.save_state(adapter, tmp_path / "ok.safetensors")
    ckpt = load_checkpoint(path)
    key = next(iter(ckpt.weights))
    ckpt.weights[key] = torch.full_like(ckpt.weights[key], float("nan"))
    save_checkpoint(tmp_path / "nan.safetensors", ckpt)
    adapters = set(trainer.adapters)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        trainer.load_state(tmp_path / "nan.safetensors")
    assert set(trainer.adapters) == adapters


def test_a_diverged_adapter_cannot_change_other_rows(vllm_trainer, make_vllm_adapter, tmp_path):
    healthy, source = make_vllm_adapter(seed=5), make_vllm_adapter(seed=6)
    overfit(vllm_trainer, healthy, encode(vllm_trainer, PROMPT_TEXT), steps=3)
    overfit(vllm_trainer, source, encode(vllm_trainer, "hello world what is one"), steps=3)
    prompt = encode(vllm_trainer, PROMPT_TEXT)
    control = {a: vllm_trainer.sample_batch([SampleJob(a, prompt, 1, GREEDY, prompt_logprobs=True)])[0]
               for a in (healthy, None)}
    # a diverged adapter: finite weights so large that its activations overflow
    ckpt = load_checkpoint(vllm_trainer.save_state(source, tmp_path / "src.safetensors"))
    ckpt.weights = {k: v * 1e30 for k, v in ckpt.weights.items()}
    save_checkpoint(tmp_path / "diverged.safetensors", ckpt)
    diverged = vllm_trainer.load_state(tmp_path / "diverged.safetensors")
    try:
        for _ in range(3):  # together with it, and after it ran
            jobs = [SampleJob(diverged, prompt, 4, SamplingParams(max_tokens=6, seed=0))]
            jobs += [SampleJob(a, prompt, 1, GREEDY, prompt_logprobs=True) for a in (healthy, None)]
            results = vllm_trainer.sample_batch(jobs)
            for a, got in zip((healthy, None), results[1:]):
                assert got.sequences[0].tokens == control[a].sequences[0].tokens, a
                gap = max(abs(x - y) for x, y in zip(got.sequences[0].logprobs, control[a].sequences[0].logprobs))
                assert gap < 1e-4, (a, got.sequences[0].logprobs)
    finally:
        vllm_trainer.delete_lora(diverged)
    after = vllm_trainer.sample_batch([SampleJob(a, prompt, 1, GREEDY) for a in (healthy, None)])
    assert [r.sequences[0].tokens for r in after] == [control[a].sequences[0].tokens for a in (healthy, None)]


def test_live_adapters_are_bounded_by_the_setting_and_changes_nothing(trainer, make_adapter, monkeypatch):
    make_adapter()
    monkeypatch.setattr(trainer.config, "max_adapters", len(trainer.adapters))
    before = snapshot(trainer)
    with pytest.raises(InvalidRequestError, match=rf"{len(trainer.adapters)} adapters are live; allowed: at most "
                                                  rf"{len(trainer.adapters)} \(COLO_MAX_ADAPTERS\)"):
        trainer.create_lora(rank=4)
    assert_same_snapshot(before, snapshot(trainer))


def test_an_adapter_that_does_not_fit_in_free_memory_is_refused():
    free = capacity.free_bytes(torch.device("cpu"))
    assert free > 0
    capacity.check_room(0, 10, values=1_000_000, element_size=4, device=torch.device("cpu"))  # 32 MB fits
    too_many = free // (4 * capacity.COPIES) + 1
    with pytest.raises(InvalidRequestError, match=r"a new adapter needs about \d+ MiB .* MiB of cpu memory is free"):
        capacity.check_room(0, 10, values=too_many, element_size=4, device=torch.device("cpu"))


def test_lora_values_count_every_target_layer(trainer):
    # written out from the tiny model's config: q,k,v,o and gate,up,down projections of each layer
    cfg = AutoConfig.from_pretrained(trainer.model_path)
    h, kv, inter, layers = cfg.hidden_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads), \
        cfg.intermediate_size, cfg.num_hidden_layers
    attn = (h + h) + (h + kv) * 2 + (h + h)
    mlp = (h + inter) * 2 + (inter + h)
    assert trainer.policy.lora_values(LoraConfig(rank=4)) == 4 * layers * (attn + mlp)
    assert trainer.policy.lora_values(LoraConfig(rank=4, train_mlp=False)) == 4 * layers * attn


def test_a_request_over_the_token_budget_is_refused_and_changes_nothing(trainer, adapter, monkeypatch):
    datum = Datum.from_sequence(encode(trainer, PROMPT_TEXT))  # 5 tokens of input
    monkeypatch.setattr(trainer.config, "max_request_tokens", 3 * len(datum.model_input))
    trainer.forward(adapter, [datum] * 3)  # at the budget
    before = snapshot(trainer)
    with pytest.raises(InvalidRequestError, match=rf"data holds {4 * len(datum.model_input)} tokens in 4 datums; "
                                                  rf"allowed: at most {3 * len(datum.model_input)} a request "
                                                  r"\(COLO_MAX_REQUEST_TOKENS\)"):
        trainer.forward_backward(adapter, [datum] * 4)
    assert_same_snapshot(before, snapshot(trainer))
