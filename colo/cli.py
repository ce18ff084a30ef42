"""The ``colo`` command: prepare the default model, show the configuration, list engines, find the allocator,
check the install (``doctor``)."""

from __future__ import annotations

import argparse
import sys

from colo.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="colo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare-model", help="convert the default model into the model cache once; print its path")
    sub.add_parser("config", help="print the effective configuration (COLO_* and COLO_CONFIG applied)")
    sub.add_parser("engines", help="list the engines that COLO_ENGINE can name")
    doctor = sub.add_parser("doctor", help="check this install with the configured model and engine: versions, "
                            "fast paths, publish latency, sleep/wake cycles, sampler vs trainer logprobs")
    doctor.add_argument("--gpu", action="store_true", help="prove the whole colocated path on this machine (a few "
                        "minutes on a GPU): vLLM's memory share, fresh weights over many train/publish/sample "
                        "cycles, sleep/wake at levels 1 and 2 with reclaimed memory and timings, logprob gap, an "
                        "engine restart, torch's thread count; a table, and JSON in --json")
    doctor.add_argument("--cycles", type=int, default=50, help="train/publish/sample cycles of --gpu (default 50)")
    doctor.add_argument("--json", default="colo-gpu-check.json", help="where --gpu writes its results")
    sub.add_parser("allocator", help="print the path of the mimalloc library to preload for CPU training "
                   "(LD_PRELOAD=$(colo allocator) python train.py)")
    args = parser.parse_args(argv)

    if args.command == "allocator":
        from colo.allocator import mimalloc_path

        path = mimalloc_path()
        if path is None:
            print("colo: mimalloc is not installed (it comes with colo's cpu extra: pip install 'colo[cpu]')",
                  file=sys.stderr)
            return 1
        print(path)
        return 0

    try:
        from colo.config import Config

        config = Config()
    except ConfigError as e:
        print(f"colo: {e}", file=sys.stderr)
        return 2

    if args.command == "prepare-model":
        from colo.default_model import ensure_default_model

        print(ensure_default_model(config.model_cache_dir))
    elif args.command == "config":
        for name, value in config.model_dump().items():
            print(f"COLO_{name.upper()}={value}")
    elif args.command == "doctor" and args.gpu:
        from colo.gpu_check import run

        if args.cycles < 1:
            print(f"colo: --cycles {args.cycles}; allowed: an integer of at least 1", file=sys.stderr)
            return 2
        return run(config, cycles=args.cycles, json_path=args.json)
    elif args.command == "doctor":
        from colo.doctor import run

        return run(config)
    elif args.command == "engines":
        from engines.registry import engine_class, engine_names

        for name in engine_names():
            try:
                caps = engine_class(name).capabilities
                print(f"{name}: {caps}")
            except Exception as e:  # a third-party engine that fails to import is listed, not fatal
                print(f"{name}: cannot be loaded ({e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

