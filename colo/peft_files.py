"""Plain PEFT adapter directories: what ``peft.PeftModel.from_pretrained`` and ``vllm serve
--lora-modules`` load. The Trainer exports adapters in this format, and the engines that hand a
version to a server as files write it here too.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from colo.durable import fsync, swap_in
from colo.errors import CheckpointError


def write_peft(path: str | os.PathLike, peft_config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``adapter_config.json`` (from ``peft_config``, PEFT's ``LoraConfig`` as a dict) and
    ``adapter_model.safetensors`` (keys ``base_model.model....lora_A.weight``); swapped in whole."""
    from peft import LoraConfig

    known = set(LoraConfig.__dataclass_fields__)
    config = LoraConfig(**{k: v for k, v in peft_config.items() if k in known})
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"cannot export to {str(target)!r}: it is a file; allowed: a directory path")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
        try:
            config.save_pretrained(str(tmp))
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                      str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            fsync(tmp / "adapter_model.safetensors")
            swap_in(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        raise CheckpointError(f"cannot export to {str(target)!r}: {e.strerror or e}") from None
    return target
