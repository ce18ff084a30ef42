"""The one place that touches vLLM's private LoRA internals, checked against the versions it was
written for.

1. Registering a LoRA version with vLLM's worker from tensors in memory.

vLLM only loads adapters from a directory (``LoRARequest.lora_path``). Its worker, though, skips
the load when the request's ``lora_int_id`` is already in its LoRA cache; this module puts the
version there, built with ``LoRAModel.from_lora_tensors``, before any request names it. Where the
installed vLLM is not one this was checked against, ``supported()`` is False and the engine
writes each version to a directory instead.

2. vLLM's LoRA ops for CPU (``vllm.lora.ops.torch_ops``), replaced by ``install_cpu_ops``. Theirs
gather a copy of the adapter's matrix for every token (``weights[indices]``: tokens x rank x hidden
per layer), which made LoRA prefill 12x slower than the base model's and grew memory by gigabytes,
and they read index -1 ("no LoRA") as the last slot, applying that adapter to base-model requests
batched beside a full set of adapters. Colo's do one matmul per adapter over its tokens and leave
-1 tokens alone.
"""

from __future__ import annotations

import torch

# 0.33.0: the files and names the shim touches compared with 0.32 line by line (identical; see README)
CHECKED_VERSIONS = ("0.32.", "0.33.")


# vLLM versions whose wake, read in their CUDA source, brings every LoRA slot back as it was: 0.33 keeps
# LoRA state in its "runtime" pool, backed up and restored at both sleep levels
# (v1/worker/lora_model_runner_mixin.py: "Keep LoRA state out of the weights pool, which level-2 sleep
# discards"), and its level-2 reload_weights drops every adapter itself (reset_lora_state). 0.32 allocates
# the slots inside the weights pool. Elsewhere colo empties vLLM's LoRA cache after each wake.
WAKE_KEEPS_LORA_SLOTS = ("0.33.",)


def wake_keeps_lora_slots(version: str) -> bool:
    return version.startswith(WAKE_KEEPS_LORA_SLOTS)


# vLLM model classes whose output layer takes a LoRA once it is declared among their embedding modules,
# as Llama's and Qwen3's are: vLLM wraps a module for LoRA only if its class names it
# (lora/utils.get_supported_lora_modules), and these omit lm_head, so vLLM would sample without the output
# layer's LoRA, silently. Declared, the layer is wrapped exactly as Llama's (LogitsProcessorWithLoRA);
# tests/test_model_families.py checks the sampler against the trainer with train_unembed=True for each.
DECLARE_OUTPUT_LAYER_LORA = ("Qwen2ForCausalLM", "MistralForCausalLM", "Gemma3ForCausalLM")


def declare_output_layer_lora(architecture: str) -> None:
    """Before the engine builds the model: let vLLM wrap the output layer of ``architecture`` for LoRA."""
    if architecture not in DECLARE_OUTPUT_LAYER_LORA:
        return
    from vllm import ModelRegistry

    load = getattr(ModelRegistry, "_try_load_model_cls", None)  # 0.32 and 0.33; elsewhere the check after start decides
    cls = load(architecture) if load is not None else None
    if cls is None:
        return
    declared = dict(getattr(cls, "embedding_modules", None) or {})
    if "lm_head" not in declared:
        cls.embedding_modules = {**declared, "lm_head": "output_embeddings"}


def applies_output_layer_lora(worker) -> bool:
    """Runs on the worker: whether vLLM's model applies a LoRA on its output layer when it samples."""
    from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA

    return any(isinstance(m, LogitsProcessorWithLoRA) for m in worker.model_runner.get_model().modules())


def supported() -> bool:
    """The shim is on for the vLLM versions it was checked against, when their interfaces are as expected."""
    import vllm

    return vllm.__version__.startswith(CHECKED_VERSIONS) and not assumption_failures()


# (what, object path, parameter names it must start with, or attributes it must have)
_SIGNATURES = [
    ("vllm.lora.lora_model", "LoRAModel.from_lora_tensors",
     ("lora_model_id", "tensors", "peft_helper", "device", "dtype", "model_vocab_size", "weights_mapper",
      "skip_prefixes")),
    ("vllm.lora.lora_model", "LoRAModel.__init__", ("self", "lora_model_id", "rank", "loras")),
    ("vllm.lora.lora_weights", "LoRALayerWeights.__init__",
     ("self", "module_name", "rank", "lora_alpha", "lora_a", "lora_b", "scaling")),
    ("vllm.lora.peft_helper", "PEFTHelper.from_dict", ()),
    ("vllm.lora.peft_helper", "PEFTHelper.validate_legal", ()),
    ("vllm.v1.engine.llm_engine", "LLMEngine.abort_request", ("self", "request_ids", "internal")),
    ("vllm.entrypoints.llm", "LLM.wake_up", ("self", "tags")),
]
_ATTRIBUTES = [
    ("vllm.lora.model_manager", "LRUCacheLoRAModelManager",
     ("add_adapter", "remove_adapter", "list_adapters", "capacity", "remove_oldest_adapter")),
    ("vllm.utils.cache", "LRUCache", ("order",)),
    ("vllm.entrypoints.llm", "LLM", ("collective_rpc", "sleep", "reset_prefix_cache")),
    ("vllm.v1.engine.llm_engine", "LLMEngine", ("has_unfinished_requests",)),
    ("vllm.lora.punica_wrapper.punica_cpu", "",
     ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")),
]


def assumption_failures() -> list[str]:
    """What this module relies on in the installed vLLM and does not find there: empty when all holds.
    A vLLM upgrade that changes one of them fails ``tests/test_vllm_engine.py`` instead of a user."""
    import importlib
    import inspect

    failures = []

    def resolve(module: str, path: str):
        obj = importlib.import_module(module)
        for part in filter(None, path.split(".")):
            obj = getattr(obj, part)
        return obj

    for module, path, params in _SIGNATURES:
        try:
            names = tuple(inspect.signature(resolve(module, path)).parameters)
        except (ImportError, AttributeError, TypeError, ValueError) as e:
            failures.append(f"{module}.{path}: {type(e).__name__}: {e}")
            continue
        if names[: len(params)] != params:
            failures.append(f"{module}.{path}{names}: expected parameters starting {params}")
    for module, path, attributes in _ATTRIBUTES:
        try:
            obj = resolve(module, path)
        except (ImportError, AttributeError) as e:
            failures.append(f"{module}.{path}: {type(e).__name__}: {e}")
            continue
        failures += [f"{module}.{path or '<module>'} has no {a}" for a in attributes if not hasattr(obj, a)]
    return failures


def _manager(worker):
    return worker.model_runner.lora_manager  # LRUCacheWorkerLoRAManager


def register(worker, lora_int_id: int, tensors: dict[str, torch.Tensor], peft_config: dict,
             keep: frozenset[int] = frozenset()) -> None:
    """Runs on the worker (through ``LLM.collective_rpc``): add the version to its LoRA cache, making
    room by dropping its least recently used versions other than ``keep`` (the ones a batch is about
    to use; colo holds a copy of every version and registers a dropped one again when it is named)."""
    manager = _manager(worker)
    adapters = manager._adapter_manager
    lora = _build(manager, lora_int_id, tensors, peft_config)
    while len(adapters) + 1 > adapters.capacity:
        oldest = next((i for i in adapters._registered_adapters.order if i not in keep), None)
        if oldest is None:
            raise RuntimeError(f"vLLM's LoRA cache holds {len(adapters)} versions, all needed by this batch")
        adapters.remove_adapter(oldest)
    adapters.add_adapter(lora)


# Every version of an adapter has the same tensor names and shapes: the first one is parsed by
# vLLM's from_lora_tensors (2 ms for a 135M model, most of what registering costs), and its layout,
# which module takes which tensors at which rank and scale, builds the later ones directly.
_layouts: dict[tuple, list[tuple[str, str, str, int, float, float]]] = {}


def _build(manager, lora_int_id: int, tensors: dict[str, torch.Tensor], peft_config: dict):
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.lora_weights import LoRALayerWeights
    from vllm.lora.peft_helper import PEFTHelper

    key = (tuple(sorted(tensors)), peft_config["r"], peft_config["lora_alpha"])
    layout = _layouts.get(key)
    if layout is not None:
        loras = {name: LoRALayerWeights(name, rank, alpha, tensors[a], tensors[b], scaling)
                 for name, a, b, rank, alpha, scaling in layout}
        return LoRAModel(lora_int_id, peft_config["r"], loras)

    helper = PEFTHelper.from_dict({**peft_config, "vllm_max_position_embeddings": manager.max_position_embeddings})
    helper.validate_legal(manager.lora_config)
    model = manager._adapter_manager.model
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
    # which tensor went to which module, by vLLM's own name parsing (not by tensor identity: on CUDA vLLM
    # copies the tensors into pinned memory)
    from vllm.lora.utils import parse_fine_tuned_lora_name

    rename = mapper.get_rename_mapper() if mapper is not None else None
    keys: dict[str, dict[bool, str]] = {}
    for k in tensors:
        module, is_a = parse_fine_tuned_lora_name(k, rename)
        keys.setdefault(module, {})[is_a] = k
    layout = [(name, keys.get(name, {}).get(True), keys.get(name, {}).get(False), w.rank, w.lora_alpha, w.scaling)
              for name, w in lora.loras.items()]
    # kept only when every module took exactly one A and one B of colo's tensors, and nothing else
    if not lora.modules_to_save and all(a and b for _, a, b, *_ in layout) and \
            sum(len(v) for v in keys.values()) == 2 * len(layout):
        _layouts[key] = layout
    return lora


def unregister(worker, lora_int_id: int) -> None:
    _manager(worker).remove_adapter(lora_int_id)


def registered(worker) -> set[int]:
    return set(_manager(worker).list_adapters())


# ---- CPU LoRA ops -------------------------------------------------------------------------------

def _lora_matmul(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``out[t] = weights[indices[t]] @ inputs[t]``, zero where ``indices[t] < 0``; weights (L, [1,] O, I)."""
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    x = inputs.to(dtype)
    out = torch.zeros(x.shape[0], weights.shape[1], dtype=dtype, device=x.device)
    if indices.shape[0] != x.shape[0]:
        # vLLM scores a request's prompt logprobs with the batch's per-request indices, so rows and
        # indices do not correspond. Only the output layer's LoRA does this; while any adapter has one,
        # the engine computes prompt logprobs with the trainer's model instead, so here every slot of
        # that layer holds zeros, which any row gets.
        if bool(weights.any()):
            raise RuntimeError("LoRA rows and adapter indices differ in number and the weights are not zero")
        return out
    for index in torch.unique(indices).tolist():
        if index < 0:
            continue
        w = weights[index].to(dtype)
        if x.shape[0] == indices.shape[0] and bool((indices == index).all()):
            return x @ w.T
        rows = (indices == index).nonzero().squeeze(1)
        out[rows] = x[rows] @ w.T
    return out


def _bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling=1.0):
    outputs = _lora_matmul(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def _bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
    outputs = _lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = 1 if outputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    common = min(outputs.shape[1], output_tensor.shape[1])  # the two may pad differently
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def _bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size,
                       add_inputs=True):
    outputs = _lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs


def _per_token(indices: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(indices, seq_lens)


def _sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                 batches, max_seq_length, token_nums, scaling):
    _bgmv_shrink(inputs, lora_a_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor), scaling)


def _sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                 batches, max_seq_length, token_nums, add_inputs=False):
    _bgmv_expand(inputs, lora_b_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor), add_inputs)


def _sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                       batches, max_seq_length, token_nums, slice_offset, slice_size, add_inputs=False):
    _bgmv_expand_slice(inputs, lora_b_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor),
                       slice_offset, slice_size, add_inputs)


CPU_OPS = {
    "bgmv_shrink": _bgmv_shrink, "bgmv_expand": _bgmv_expand, "bgmv_expand_slice": _bgmv_expand_slice,
    "sgmv_shrink": _sgmv_shrink, "sgmv_expand": _sgmv_expand, "sgmv_expand_slice": _sgmv_expand_slice,
}


def install_cpu_ops() -> bool:
    """Point vLLM's CPU punica wrapper at colo's LoRA ops; False where this vLLM was not checked."""
    if not supported():
        return False
    from vllm.lora.punica_wrapper import punica_cpu

    if not all(callable(getattr(punica_cpu, name, None)) for name in CPU_OPS):
        return False
    for name, fn in CPU_OPS.items():
        setattr(punica_cpu, name, fn)
    return True
