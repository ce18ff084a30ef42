"""Registering a LoRA version with vLLM's worker from tensors in memory: the one place that touches
vLLM's private LoRA internals, checked against the versions it was written for.

vLLM only loads adapters from a directory (``LoRARequest.lora_path``). Its worker, though, skips
the load when the request's ``lora_int_id`` is already in its LoRA cache; this module puts the
version there, built with ``LoRAModel.from_lora_tensors``, before any request names it. Where the
installed vLLM is not one this was checked against, ``supported()`` is False and the engine
writes each version to a directory instead.
"""

from __future__ import annotations

import torch

CHECKED_VERSIONS = ("0.32.",)


def supported() -> bool:
    import vllm

    if not vllm.__version__.startswith(CHECKED_VERSIONS):
        return False
    try:
        from vllm.lora.lora_model import LoRAModel
        from vllm.lora.peft_helper import PEFTHelper
    except ImportError:
        return False
    return hasattr(LoRAModel, "from_lora_tensors") and hasattr(PEFTHelper, "from_dict")


def _manager(worker):
    return worker.model_runner.lora_manager  # LRUCacheWorkerLoRAManager


def register(worker, lora_int_id: int, tensors: dict[str, torch.Tensor], peft_config: dict) -> None:
    """Runs on the worker (through ``LLM.collective_rpc``): add the version to its LoRA cache."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    manager = _manager(worker)
    adapters = manager._adapter_manager
    helper = PEFTHelper.from_dict({**peft_config, "vllm_max_position_embeddings": manager.max_position_embeddings})
    helper.validate_legal(manager.lora_config)
    model = adapters.model
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    lora = LoRAModel.from_lora_tensors(
        lora_model_id=lora_int_id,
        tensors=tensors,
        peft_helper=helper,
        device="cpu",
        dtype=manager.lora_config.lora_dtype,
        model_vocab_size=manager.vocab_size,
        weights_mapper=mapper.get_rename_mapper() if mapper is not None else None,
        skip_prefixes=getattr(model, "lora_skip_prefixes", None),
    )
    if len(adapters) + 1 > adapters.capacity:
        adapters.remove_oldest_adapter()
    adapters.add_adapter(lora)


def unregister(worker, lora_int_id: int) -> None:
    _manager(worker).remove_adapter(lora_int_id)


def registered(worker) -> set[int]:
    return set(_manager(worker).list_adapters())
