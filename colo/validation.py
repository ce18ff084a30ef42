"""Checks of every request, run before the Trainer touches any state.

Each failure raises one typed error whose message says what was wrong and what is allowed.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from colo.errors import ContextLengthError, InvalidRequestError
from colo.losses import LOSSES, LossSpec
from colo.types import AdamParams, Datum, SamplingParams


def as_tokens(values: Any, what: str) -> list[int]:
    """``values`` as a list of int token ids, or an InvalidRequestError that says why not."""
    try:
        tokens = [int(v) for v in values]
    except (TypeError, ValueError):
        raise InvalidRequestError(f"{what} is not a list of token ids ({type(values).__name__}); "
                                  "allowed: a list of integers") from None
    if any(isinstance(v, float) and v != int(v) for v in values):
        raise InvalidRequestError(f"{what} has a non-integer token id; allowed: integers")
    return tokens


def check_tokens(tokens: Sequence[int], vocab_size: int, what: str) -> None:
    if len(tokens) == 0:
        raise InvalidRequestError(f"{what} is empty; allowed: at least one token id")
    bad = next((t for t in tokens if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(f"{what} has token id {bad}; allowed: token ids in [0, {vocab_size})")


def check_context(length: int, max_len: int, what: str) -> None:
    if length > max_len:
        raise ContextLengthError(f"{what} is {length} tokens long; allowed: at most {max_len} (the context length)")


def check_loss(loss_fn: str, loss_fn_config: dict[str, Any] | None) -> tuple[LossSpec, dict[str, float]]:
    spec = LOSSES.get(loss_fn)
    if spec is None:
        raise InvalidRequestError(f"unknown loss_fn {loss_fn!r}; allowed: {', '.join(LOSSES)}")
    config = dict(spec.defaults)
    for key, value in (loss_fn_config or {}).items():
        if key not in config:
            allowed = ", ".join(config) or "none"
            raise InvalidRequestError(f"loss_fn_config key {key!r} is not used by {loss_fn}; allowed: {allowed}")
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidRequestError(f"loss_fn_config[{key!r}]={value!r}; allowed: a finite number")
        config[key] = float(value)
    return spec, config


def check_data(data: Sequence[Datum], spec: LossSpec, loss_fn: str, vocab_size: int, max_len: int,
               max_tokens: int) -> None:
    if not data:
        raise InvalidRequestError("data is empty; allowed: a list of at least one Datum")
    total = sum(len(d.model_input) for d in data if isinstance(d, Datum))
    if total > max_tokens:
        raise InvalidRequestError(f"data holds {total} tokens in {len(data)} datums; allowed: at most {max_tokens} "
                                  "a request (COLO_MAX_REQUEST_TOKENS): send it as several requests")
    allowed = {"target_tokens", *spec.required, *spec.optional}
    for i, datum in enumerate(data):
        if not isinstance(datum, Datum):
            raise InvalidRequestError(f"data[{i}] is a {type(datum).__name__}; allowed: colo.Datum")
        check_tokens(datum.model_input, vocab_size, f"data[{i}].model_input")
        check_context(len(datum.model_input), max_len, f"data[{i}].model_input")
        inputs = datum.loss_fn_inputs
        missing = [k for k in ("target_tokens", *spec.required) if k not in inputs]
        if missing:
            raise InvalidRequestError(f"data[{i}].loss_fn_inputs lacks {', '.join(missing)}; {loss_fn} needs "
                                      f"{', '.join(sorted(allowed - set(spec.optional)))}")
        for key, tensor in inputs.items():
            if key not in allowed:
                raise InvalidRequestError(f"data[{i}].loss_fn_inputs has {key!r}; allowed for {loss_fn}: "
                                          f"{', '.join(sorted(allowed))}")
            if tensor.dim() != 1 or tensor.shape[0] != len(datum.model_input):
                raise InvalidRequestError(f"data[{i}].loss_fn_inputs[{key!r}] has shape {tuple(tensor.shape)}; "
                                          f"allowed: ({len(datum.model_input)},), one value per input token")
            if key == "target_tokens":
                if tensor.is_floating_point():
                    raise InvalidRequestError(f"data[{i}].loss_fn_inputs['target_tokens'] is {tensor.dtype}; "
                                              "allowed: integer token ids")
                check_tokens(tensor.tolist(), vocab_size, f"data[{i}].loss_fn_inputs['target_tokens']")
            elif not torch.isfinite(tensor.float()).all():
                raise InvalidRequestError(f"data[{i}].loss_fn_inputs[{key!r}] has NaN or inf; allowed: finite numbers")


def check_adam(adam: AdamParams) -> None:
    rules = [
        # Adam moves each weight by about the learning rate a step: above 1 a LoRA only diverges
        ("learning_rate", lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("eps", lambda v: v > 0, "> 0"),
        ("weight_decay", lambda v: v >= 0, ">= 0"),
        ("grad_clip_norm", lambda v: v >= 0, ">= 0 (0: no clipping)"),
    ]
    for name, ok, allowed in rules:
        value = getattr(adam, name)
        if not (_is_number(value) and math.isfinite(value) and ok(value)):
            raise InvalidRequestError(f"AdamParams.{name}={value!r}; allowed: {allowed}")


MAX_SEED = 2**63 - 1  # seeds become torch generator seeds: a signed 64-bit integer


def check_sampling(prompts: Sequence[Sequence[int]], num_samples: int, params: SamplingParams,
                   vocab_size: int, max_len: int, max_samples: int, index: int = 0) -> None:
    """``index`` is the position of ``prompts[0]`` in the caller's list, for the messages."""
    if not _is_int(num_samples) or not 1 <= num_samples <= max_samples:
        raise InvalidRequestError(f"num_samples={num_samples!r}; allowed: an integer in [1, {max_samples}] "
                                  "(COLO_MAX_SAMPLES_PER_REQUEST)")
    seed = params.seed
    rules = [
        ("max_tokens", _is_int(params.max_tokens) and params.max_tokens >= 1, "an integer >= 1"),
        ("temperature", _is_number(params.temperature) and 0 <= params.temperature < math.inf,
         "a finite number >= 0 (0: greedy)"),
        ("top_p", _is_number(params.top_p) and 0 < params.top_p <= 1, "in (0, 1]"),
        ("top_k", _is_int(params.top_k) and (params.top_k == -1 or params.top_k >= 1), "-1 (all) or >= 1"),
        ("seed", seed is None or (_is_int(seed) and 0 <= seed <= MAX_SEED), "None or an integer in [0, 2**63 - 1]"),
    ]
    for name, ok, allowed in rules:
        if not ok:
            raise InvalidRequestError(f"SamplingParams.{name}={getattr(params, name)!r}; allowed: {allowed}")
    for s in params.stop:
        if isinstance(s, str) and not s:
            raise InvalidRequestError("SamplingParams.stop has an empty string; allowed: non-empty strings or token ids")
    if params.stop_token_ids:
        check_tokens(params.stop_token_ids, vocab_size, "SamplingParams.stop")
    for i, prompt in enumerate(prompts, start=index):
        check_tokens(prompt, vocab_size, f"prompts[{i}]")
        # at least one position must be left to sample into
        check_context(len(prompt), max_len - 1, f"prompts[{i}]")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
