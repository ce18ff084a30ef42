"""The service: ``torchrun --nproc_per_node=1 torchrun_entry.py`` (or N ranks: rank 0 serves, the others follow).

Reads the ``COLO_*`` configuration (a bad value stops here, with one line), builds the Trainer with
its engine, and serves the Tinker API on COLO_HOST:COLO_PORT (127.0.0.1:8000 by default) until
SIGTERM or Ctrl-C. Shutting down, it stops taking requests, lets the running job finish, answers
the queued ones with an error, and releases the engine; checkpoints are written atomically, so none
is left half-written.
"""

import signal
import sys


def main() -> int:
    from colo.errors import ConfigError

    try:
        from colo.service.checkpoint_store import CheckpointStore
        from colo.config import Config
        from colo.service.tenants import Tenants

        config = Config()
        tenants = Tenants(config.api_key_tenants())
    except ConfigError as e:
        print(f"colo: {e}", file=sys.stderr)
        return 2

    import logging

    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from colo.service import Service, create_app
    from colo.trainer import Trainer

    trainer = Trainer(config)
    if trainer.ranks.world > 1:
        # rank 0 serves; the others make the same Trainer calls in lock step (colo/service/lockstep.py)
        from colo.service import lockstep

        group = lockstep.channel()
        if not trainer.ranks.main:
            # torchrun passes SIGTERM to every rank: a follower stops when rank 0 closes, not before
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            lockstep.follow(trainer, group)
            return 0
        trainer = lockstep.Leader(trainer, group)
    service = Service(trainer, tenants, CheckpointStore(config.checkpoint_dir))
    if tenants.open and config.host not in ("127.0.0.1", "localhost", "::1"):
        logging.warning("colo: serving %s with no COLO_API_KEYS: anyone who reaches it can train and sample",
                        config.host)
    logging.info("colo: serving the Tinker API on http://%s:%d (model %s, engine %s)", config.host, config.port,
                 service.base.name, trainer.engine.name)
    # a long poll still open at shutdown is cut after 5 s
    uvicorn.run(create_app(service), host=config.host, port=config.port, log_level="warning",
                timeout_graceful_shutdown=5)
    return 0 if service.stopped else 1


if __name__ == "__main__":
    sys.exit(main())
