"""Entry point: ``torchrun --nproc_per_node=1 torchrun_entry.py``.

Reads the ``COLO_*`` configuration (a bad value stops here, with one line) and builds the Trainer
with its engine. The Tinker-API HTTP service that it will serve on COLO_HOST:COLO_PORT is not built
yet; until then this checks that the configured model and engine start.
"""

import sys


def main() -> int:
    from colo.errors import ConfigError

    try:
        from colo.config import Config

        config = Config()
    except ConfigError as e:
        print(f"colo: {e}", file=sys.stderr)
        return 2

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from colo.trainer import Trainer

    with Trainer(config) as trainer:
        print(f"colo: model {trainer.model_path} and engine {trainer.engine.name} are ready; "
              "the HTTP service is not available in this version", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
