"""The pytorch engine: raw logprobs that agree with the trainer, and every sampling parameter."""

import pytest

from colo import SamplingParams
from colo.types import SampleJob
from engines.pytorch import engine as pytorch_engine
from engines.pytorch import generation
from helpers import assert_same_draws, encode, overfit

PROMPTS = ["the cat", "one two three", "what is", "hello world apple"]


@pytest.fixture(scope="module")
def trained(trainer):
    a = trainer.create_lora(rank=8, seed=21)
    overfit(trainer, a, encode(trainer, "the cat sat on a mat and ran to the big red tree"), steps=5, lr=5e-3)
    yield a
    trainer.delete_lora(a)


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=12, temperature=1.0, seed=0),
    SamplingParams(max_tokens=12, temperature=0.7, top_k=20, top_p=0.9, seed=1),
], ids=["plain", "top_k_top_p"])
def test_sampler_logprobs_equal_trainer_logprobs(trainer, trained, params):
    prompts = [encode(trainer, p) for p in PROMPTS]
    results = trainer.sample(trained, prompts, num_samples=3, params=params)
    gaps = []
    for prompt, result in zip(prompts, results):
        assert len(result.sequences) == 3
        for seq in result.sequences:
            ours = trainer.compute_logprobs(trained, prompt + seq.tokens)[len(prompt):]
            gaps += [abs(a - b) for a, b in zip(ours, seq.logprobs)]
    # float32 everywhere; the only difference is KV-cached left-padded decoding vs one full forward
    assert sum(gaps) / len(gaps) < 1e-3
    assert max(gaps) < 1e-2


def test_seed_makes_sampling_reproducible_and_batch_independent(trainer, trained):
    p = encode(trainer, "the cat")
    params = SamplingParams(max_tokens=10, seed=123)
    alone = trainer.sample(trained, [p], 2, params)[0]
    crowded = trainer.sample(trained, [encode(trainer, "one two three four five"), p], 2, params)[1]
    assert [s.tokens for s in alone.sequences] == [s.tokens for s in crowded.sequences]
    other = trainer.sample(trained, [p], 2, SamplingParams(max_tokens=10, seed=124))[0]
    assert [s.tokens for s in other.sequences] != [s.tokens for s in alone.sequences]


def test_top_k_one_is_greedy(trainer, trained):
    p = [encode(trainer, "hello world")]
    greedy = trainer.sample(trained, p, 1, SamplingParams(max_tokens=8, temperature=0))[0].sequences[0]
    top1 = trainer.sample(trained, p, 2, SamplingParams(max_tokens=8, temperature=1.5, top_k=1, seed=3))[0]
    assert all(s.tokens == greedy.tokens for s in top1.sequences)


def test_max_tokens_and_length_stop(trainer, trained):
    result = trainer.sample(trained, [encode(trainer, "the cat")], 2, SamplingParams(max_tokens=5, seed=0))[0]
    for seq in result.sequences:
        assert len(seq.tokens) <= 5
        assert seq.stop_reason == ("length" if len(seq.tokens) == 5 else "stop")


def test_stop_token_ends_the_sequence_and_is_kept(trainer, trained):
    prompt = encode(trainer, "the cat")
    greedy = trainer.sample(trained, [prompt], 1, SamplingParams(max_tokens=10, temperature=0))[0].sequences[0]
    stop_token = greedy.tokens[3]
    stopped = trainer.sample(trained, [prompt], 1,
                             SamplingParams(max_tokens=10, temperature=0, stop=[stop_token]))[0].sequences[0]
    first = greedy.tokens.index(stop_token)
    assert stopped.tokens == greedy.tokens[: first + 1]
    assert stopped.stop_reason == "stop"


def test_stop_string_ends_the_sequence(trainer, trained):
    prompt = encode(trainer, "the cat")
    greedy = trainer.sample(trained, [prompt], 1, SamplingParams(max_tokens=10, temperature=0))[0].sequences[0]
    text = trainer.tokenizer.decode(greedy.tokens)
    stop = text.strip().split()[1]  # the second word the model writes
    stopped = trainer.sample(trained, [prompt], 1,
                             SamplingParams(max_tokens=10, temperature=0, stop=stop))[0].sequences[0]
    assert stopped.stop_reason == "stop"
    assert stop in trainer.tokenizer.decode(stopped.tokens)
    assert stop not in trainer.tokenizer.decode(stopped.tokens[:-1])
    assert stopped.tokens == greedy.tokens[: len(stopped.tokens)]


def test_generation_stops_at_the_context_length(trainer, trained):
    prompt = [5] * (trainer.max_len - 3)
    seq = trainer.sample(trained, [prompt], 1, SamplingParams(max_tokens=50, seed=0))[0].sequences[0]
    assert len(seq.tokens) <= 3


def test_base_model_sampling_reports_no_adapter(trainer, trained):
    result = trainer.sample(None, [encode(trainer, "the cat")], 1, SamplingParams(max_tokens=4, temperature=0))[0]
    assert result.adapter is None and result.adapter_version is None
    base = trainer.compute_logprobs(None, encode(trainer, "the cat") + result.sequences[0].tokens)
    assert base[-4:] == pytest.approx(result.sequences[0].logprobs, abs=1e-4)


@pytest.mark.parametrize("limit", [("max_batch_rows", 4), ("max_batch_tokens", 30)], ids=["rows", "kv positions"])
def test_large_batches_are_split_without_losing_requests(trainer, trained, monkeypatch, limit):
    prompts = [encode(trainer, p) for p in PROMPTS]
    whole = trainer.sample(trained, prompts, 3, SamplingParams(max_tokens=3, seed=5))
    batches = []
    original = generation.generate
    monkeypatch.setattr(pytorch_engine, "generate",
                        lambda model, rows, *a, **k: (batches.append(rows), original(model, rows, *a, **k))[1])
    monkeypatch.setattr(trainer.engine, *limit)
    results = trainer.sample(trained, prompts, 3, SamplingParams(max_tokens=3, seed=5))
    assert len(batches) > 1
    if limit[0] == "max_batch_rows":
        assert max(len(rows) for rows in batches) <= 4
    else:
        assert max(len(rows) * max(len(r.prompt) + r.max_new for r in rows) for rows in batches) <= 30
    assert [[s.tokens for s in r.sequences] for r in results] == [[s.tokens for s in r.sequences] for r in whole]


@pytest.fixture(scope="module")
def second(trainer):
    """Another adapter of another rank and other layers (attention only), trained on other text."""
    a = trainer.create_lora(rank=4, seed=22, train_mlp=False)
    overfit(trainer, a, encode(trainer, "one two three four five six seven eight nine"), steps=5, lr=5e-3)
    yield a
    trainer.delete_lora(a)


def _mixed_jobs(trainer, trained, second):
    return [
        SampleJob(trained, encode(trainer, "the cat"), 2, SamplingParams(max_tokens=10, seed=1)),
        SampleJob(second, encode(trainer, "one two three"), 1, SamplingParams(max_tokens=10, seed=2)),
        SampleJob(None, encode(trainer, "what is"), 1, SamplingParams(max_tokens=10, seed=3)),
        SampleJob(trained, encode(trainer, "hello world apple"), 1, SamplingParams(max_tokens=10, temperature=0)),
        SampleJob(second, encode(trainer, "the"), 2,
                  SamplingParams(max_tokens=10, temperature=0.8, top_k=30, top_p=0.9, seed=4)),
    ]


def test_mixed_adapter_batch_equals_each_adapter_alone(trainer, trained, second):
    assert trainer.engine.capabilities.multi_adapter_batch
    jobs = _mixed_jobs(trainer, trained, second)
    mixed = trainer.sample_batch(jobs)
    for job, together in zip(jobs, mixed):
        alone = trainer.sample_batch([job])[0]
        assert together.adapter == job.adapter
        assert [s.tokens for s in together.sequences] == [s.tokens for s in alone.sequences]
        for a, b in zip(together.sequences, alone.sequences):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    # and the adapters really differ: the neighbour's weights would have given other logprobs
    seq = mixed[0].sequences[0]
    neighbours = trainer.compute_logprobs(second, list(jobs[0].prompt) + seq.tokens)[len(jobs[0].prompt):]
    assert max(abs(a - b) for a, b in zip(neighbours, seq.logprobs)) > 1e-2


def test_mixed_batch_logprobs_agree_with_the_trainer_after_optimizer_steps(trainer, make_adapter):
    a, b = make_adapter(seed=31), make_adapter(rank=4, seed=32, train_attn=False)
    overfit(trainer, a, encode(trainer, "red green blue red green blue"), steps=4, lr=1e-2)
    overfit(trainer, b, encode(trainer, "a b c d e f g"), steps=4, lr=1e-2)
    jobs = [SampleJob(adapter, encode(trainer, text), 2, SamplingParams(max_tokens=12, seed=i))
            for i, (adapter, text) in enumerate([(a, "red"), (b, "a b"), (None, "the cat"), (a, "blue green")])]
    gaps = []
    for job, result in zip(jobs, trainer.sample_batch(jobs)):
        assert result.adapter_version == (trainer.adapters[job.adapter].version if job.adapter else None)
        for seq in result.sequences:
            ours = trainer.compute_logprobs(job.adapter, list(job.prompt) + seq.tokens)[len(job.prompt):]
            gaps += [abs(x - y) for x, y in zip(ours, seq.logprobs)]
    assert max(gaps) < 1e-4  # float32: the stacked LoRA and KV-cached decoding change only rounding


def test_seeded_draws_do_not_depend_on_the_batch(trainer, trained, second):
    job = SampleJob(trained, encode(trainer, "the cat"), 3, SamplingParams(max_tokens=10, seed=77))
    alone = trainer.sample_batch([job])[0]
    others = _mixed_jobs(trainer, trained, second)
    for batch in ([*others, job], [job, *others], others[:2] + [job] + others[2:]):
        result = trainer.sample_batch(batch)[batch.index(job)]
        assert [s.tokens for s in result.sequences] == [s.tokens for s in alone.sequences]
    # a request's samples differ from one another, and so does another seed
    assert len({tuple(s.tokens) for s in alone.sequences}) > 1
    reseeded = trainer.sample_batch([SampleJob(job.adapter, job.prompt, 3, SamplingParams(max_tokens=10, seed=78))])[0]
    assert [s.tokens for s in reseeded.sequences] != [s.tokens for s in alone.sequences]


def test_a_requests_samples_share_one_prefill_and_draw_what_rows_prefilled_alone_draw(trainer, trained, monkeypatch):
    prompt = encode(trainer, "the cat sat on")
    job = SampleJob(trained, prompt, 4, SamplingParams(max_tokens=10, seed=5))
    shared = trainer.sample_batch([job])
    assert trainer.engine.last_prefill_tokens == (len(prompt), 4 * len(prompt))
    monkeypatch.setattr(trainer.engine, "share_prefill", False)
    unshared = trainer.sample_batch([job])
    assert trainer.engine.last_prefill_tokens == (4 * len(prompt), 4 * len(prompt))
    assert_same_draws(shared, unshared)
    assert len({tuple(s.tokens) for s in shared[0].sequences}) > 1  # the rows draw apart after the shared prefill


def test_rows_share_a_prefill_only_with_rows_of_the_same_prompt_and_adapter(trainer, trained, second, monkeypatch):
    """Two prompts of different lengths, and one prompt under two adapters and the base model: a copy of
    another prompt's or another adapter's cache rows, or a prefill under another row's adapter, would draw
    other tokens or logprobs than the unshared batch."""
    cat, count = encode(trainer, "the cat"), encode(trainer, "one two three four")
    jobs = [SampleJob(trained, cat, 3, SamplingParams(max_tokens=10, seed=1)),
            SampleJob(trained, count, 2, SamplingParams(max_tokens=10, seed=2)),
            SampleJob(second, cat, 2, SamplingParams(max_tokens=10, seed=3)),
            SampleJob(None, cat, 1, SamplingParams(max_tokens=10, seed=4))]
    shared = trainer.sample_batch(jobs)
    assert trainer.engine.last_prefill_tokens == (3 * len(cat) + len(count), 6 * len(cat) + 2 * len(count))
    monkeypatch.setattr(trainer.engine, "share_prefill", False)
    unshared = trainer.sample_batch(jobs)
    assert_same_draws(shared, unshared)
    # and the adapters really differ on this prompt: the other one's cache rows would have given other logprobs
    seq = shared[0].sequences[0]
    neighbours = trainer.compute_logprobs(second, cat + seq.tokens)[len(cat):]
    assert max(abs(a - b) for a, b in zip(neighbours, seq.logprobs)) > 1e-2


def test_compiled_decoding_gives_the_eager_tokens_and_serves_new_batches_without_recompiling(
        trainer, trained, second, monkeypatch):
    """COLO_PYTORCH_COMPILE=on (the default on CUDA only): torch.compile of the decode step, here on CPU."""
    import torch._dynamo

    jobs = _mixed_jobs(trainer, trained, second)
    eager = trainer.sample_batch(jobs)
    monkeypatch.setattr(trainer.engine, "compiled", True)
    monkeypatch.setattr(trainer.engine, "_decode", None)
    compiled = trainer.sample_batch(jobs)
    assert not trainer.engine._decode.failed
    assert_same_draws(eager, compiled)
    # another mix of adapters and prompts, the same row bucket (7 rows -> 8): no new graph
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    other = [SampleJob(second, encode(trainer, "a b c d e"), 4, SamplingParams(max_tokens=6, seed=9)),
             SampleJob(None, encode(trainer, "the"), 3, SamplingParams(max_tokens=6, seed=10))]
    again = trainer.sample_batch(other)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
    monkeypatch.setattr(trainer.engine, "compiled", False)
    assert [s.tokens for r in again for s in r.sequences] == [s.tokens for r in trainer.sample_batch(other) for s in r.sequences]
