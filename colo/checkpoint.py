"""Checkpoints, written so that a crash mid-write loses nothing.

A checkpoint is one safetensors file holding the adapter's weights, its AdamW state and a JSON
header: written to a temporary file beside the target, flushed to disk, then renamed over the
target (atomic on POSIX), so the previous checkpoint stays loadable until the new one is whole.
Nothing in it is pickled. Exported adapters (plain PEFT directories) are ``colo.peft_files``.
"""

from __future__ import annotations

import glob
import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from colo.durable import fsync
from colo.errors import CheckpointError
from colo.types import LoraConfig

FORMAT = "colo-checkpoint-v1"
_WEIGHT = "weights/"
_OPTIM = "optimizer/"


@dataclass
class Checkpoint:
    lora: LoraConfig
    seed: int
    version: int
    base_model: str
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]  # empty when saved without optimizer state


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint) -> Path:
    target = Path(path).expanduser()
    tensors = {_WEIGHT + k: v.detach().cpu().contiguous() for k, v in ckpt.weights.items()}
    tensors.update({_OPTIM + k: v.detach().cpu().contiguous() for k, v in ckpt.optimizer.items()})
    header = {"format": FORMAT, "lora": json.dumps(asdict(ckpt.lora)), "seed": str(ckpt.seed),
              "version": str(ckpt.version), "base_model": ckpt.base_model}
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir():
            raise CheckpointError(f"cannot save a checkpoint to {str(target)!r}: it is a directory; allowed: a file path")
        for stale in target.parent.glob(f".{glob.escape(target.name)}.tmp-*"):
            stale.unlink(missing_ok=True)  # left by a save of this target that was killed midway
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
        try:
            save_file(tensors, str(tmp), metadata=header)
            fsync(tmp)
            os.replace(tmp, target)
            fsync(target.parent)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot save a checkpoint to {str(target)!r}: {e.strerror or e}") from None
    return target


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    source = Path(path).expanduser()
    if not source.is_file():
        raise CheckpointError(f"no checkpoint at {str(source)!r}: allowed: a file written by save_state")
    try:
        with safe_open(str(source), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT:
                raise CheckpointError(f"{str(source)!r} is not a colo checkpoint (format {header.get('format')!r})")
            weights, optimizer = {}, {}
            for key in f.keys():
                if key.startswith(_WEIGHT):
                    weights[key[len(_WEIGHT):]] = f.get_tensor(key)
                elif key.startswith(_OPTIM):
                    optimizer[key[len(_OPTIM):]] = f.get_tensor(key)
            return Checkpoint(lora=LoraConfig(**json.loads(header["lora"])), seed=int(header["seed"]),
                              version=int(header["version"]), base_model=header["base_model"],
                              weights=weights, optimizer=optimizer)
    except CheckpointError:
        raise
    except Exception as e:  # a truncated or foreign file: safetensors/json raise many types
        raise CheckpointError(f"cannot read checkpoint {str(source)!r}: {e}") from None


def read_lora(path: str | os.PathLike) -> LoraConfig | None:
    """The LoRA shape in a checkpoint's header, without reading its tensors; None if it is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        return LoraConfig(**json.loads(header["lora"])) if header.get("format") == FORMAT else None
    except Exception:  # a file being replaced, truncated or foreign: no header to report
        return None
