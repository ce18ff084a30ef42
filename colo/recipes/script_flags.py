"""Command-line flags for the example and benchmark scripts, one per field of a settings dataclass."""

from __future__ import annotations

import argparse
from dataclasses import asdict


def parse_settings(cls, description: str, argv: list[str] | None = None):
    """``cls(**flags)``: ``--some-field VALUE`` for each field ``some_field`` of ``cls``, typed as its default."""
    parser = argparse.ArgumentParser(description=description)
    for name, default in asdict(cls()).items():
        kind = (lambda v: v.lower() in ("1", "true", "yes")) if isinstance(default, bool) else type(default)
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=default)
    return cls(**vars(parser.parse_args(argv)))
