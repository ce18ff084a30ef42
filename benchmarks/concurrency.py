"""Concurrency through the service: 1, 4 and 8 official-SDK clients sampling their own adapters at
once, against the same requests sent one at a time.

Each client owns a LoRA adapter (``save_weights_and_get_sampling_client``) and sends ``--requests``
sample requests of ``--samples`` samples, at most 64 new tokens, temperature 1. "together": every
client's requests are in flight at once, so the service's worker batches them into shared engine
calls across adapters; "one at a time": the same requests, each awaited before the next is sent.
Aggregate generated tokens per second of wall time.

    .venv/bin/python benchmarks/concurrency.py [--clients 1,4,8] [--requests 4] [--samples 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import service_process  # noqa: E402
from benchmarks.report import machine, table, write_section  # noqa: E402

NEW_TOKENS = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4)
    args = parser.parse_args()
    counts = [int(x) for x in args.clients.split(",")]
    os.environ.setdefault("TINKER_API_KEY", "tml-bench")
    import tinker
    from tinker import types

    port = service_process.free_port()
    work = Path(tempfile.mkdtemp(prefix="colo-bench-"))
    proc = service_process.colo_service(port, work / "service.log", COLO_MAX_LORAS=str(max(counts)),
                                        COLO_CHECKPOINT_DIR=str(work / "checkpoints"))
    url = f"http://127.0.0.1:{port}"
    try:
        service = tinker.ServiceClient(base_url=url)
        model = tinker.RestClient(base_url=url).get_server_capabilities().result().supported_models[0].model_name
        samplers, prompts = [], []
        for i in range(max(counts)):
            training = service.create_lora_training_client(base_model=model, rank=16, seed=i,
                                                           train_unembed=False).result()
            tok = training.get_tokenizer()
            tokens = tok.encode(f"client {i} writes a story")
            datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                                loss_fn_inputs={"target_tokens": tokens[1:]})
            training.forward_backward([datum], "cross_entropy").result()
            training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
            samplers.append(training.save_weights_and_get_sampling_client().result())
            prompts.append(types.ModelInput.from_ints(tok.apply_chat_template(
                [{"role": "user", "content": f"Tell me a story about the number {i}."}],
                add_generation_prompt=True, return_dict=False)))

        def params(seed: int):
            return types.SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, seed=seed)

        def together(n: int) -> tuple[float, int]:
            counted = [0] * n

            def client(i: int) -> None:
                futures = [samplers[i].sample(prompts[i], args.samples, params(r)) for r in range(args.requests)]
                counted[i] = sum(len(s.tokens) for f in futures for s in f.result().sequences)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return time.perf_counter() - started, sum(counted)

        def one_at_a_time(n: int) -> tuple[float, int]:
            tokens = 0
            started = time.perf_counter()
            for i in range(n):
                for r in range(args.requests):
                    result = samplers[i].sample(prompts[i], args.samples, params(r)).result()
                    tokens += sum(len(s.tokens) for s in result.sequences)
            return time.perf_counter() - started, tokens

        together(1)  # warm-up
        one_at_a_time(1)
        rows = []
        for n in counts:
            seq_s, seq_tokens = one_at_a_time(n)
            con_s, con_tokens = together(n)
            seq_rate, con_rate = seq_tokens / seq_s, con_tokens / con_s
            rows.append([n, n * args.requests, f"{seq_rate:.0f}", f"{con_rate:.0f}", f"{con_rate / seq_rate:.2f}x"])
            print(rows[-1], flush=True)
    finally:
        service_process.stop(proc)
    headers = ["clients", "requests", "one at a time tok/s", "together tok/s", "together / one at a time"]
    print(table(headers, rows))
    write_section("concurrency", f"""
## Concurrency through the service

{', '.join(map(str, counts))} official-SDK clients (threads), each sampling its own LoRA adapter (rank 16) of {model}
through `torchrun_entry.py` (vllm engine, `COLO_MAX_LORAS={max(counts)}`): {args.requests} requests a client, each
{args.samples} samples of at most {NEW_TOKENS} new tokens, temperature 1. Aggregate generated tokens per second,
all requests in flight together vs the same requests sent one at a time, in one run.

Machine: {machine()}.

{table(headers, rows)}

Command: `.venv/bin/python benchmarks/concurrency.py --clients {args.clients} --requests {args.requests} --samples {args.samples}`
""")


if __name__ == "__main__":
    main()
