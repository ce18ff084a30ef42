"""The Tinker API's wire formats, turned into colo's types and back.

forward_backward requests and the results of forward_backward and sample travel as protobuf, in the
schema the official SDK ships (``tinker.proto.tinker_public_pb2``); everything else is JSON, parsed
with the SDK's own pydantic request types. Parsing only builds numbers and strings: nothing a client
sends is unpickled or executed. Every malformed input raises ``InvalidRequestError`` naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import zstandard
from tinker.proto import tinker_public_pb2 as pb

from colo.errors import InvalidRequestError
from colo.service.stability import Span
from colo.types import Datum, ForwardBackwardOutput, SampleResult, SamplingParams

MAX_DECOMPRESSED_BYTES = 256 * 1024 * 1024

_TENSOR_DTYPES = {pb.DTYPE_FLOAT32: (np.float32, torch.float32), pb.DTYPE_INT64: (np.int64, torch.int64),
                  pb.DTYPE_INT32: (np.int32, torch.int64)}


@dataclass
class ForwardBackwardCall:
    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: dict[str, float] | None
    loss_id: str | None  # loss_fn "custom": the id create_custom_loss gave (the SDK sends it as config text)
    forward_only: bool
    data: list[Datum]
    spans: list[list[Span]]  # per datum: where each target token came from (provenance); may be empty


def decompress(body: bytes, content_encoding: str | None) -> bytes:
    if not content_encoding or content_encoding == "identity":
        return body
    if content_encoding != "zstd":
        raise InvalidRequestError(f"Content-Encoding {content_encoding!r}; allowed: zstd or none")
    try:
        return zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_DECOMPRESSED_BYTES)
    except zstandard.ZstdError as e:
        raise InvalidRequestError(f"the zstd body does not decompress (limit {MAX_DECOMPRESSED_BYTES} bytes): {e}")


def parse_forward_backward(body: bytes) -> ForwardBackwardCall:
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception as e:  # protobuf raises DecodeError, and RuntimeWarning-ish errors on odd input
        raise InvalidRequestError(f"forward_backward body is not a ForwardBackwardRequest protobuf: {e}") from None
    if not msg.model_id:
        raise InvalidRequestError("forward_backward: model_id is missing")
    config: dict[str, float] = {}
    loss_id = None
    for k, v in msg.loss_fn_config_v2.items():
        if k == "loss_id" and msg.loss_fn == "custom" and v.WhichOneof("value") == "text":
            loss_id = v.text
        elif v.WhichOneof("value") != "number":
            raise InvalidRequestError(f"loss_fn_config[{k!r}] is text; allowed: numbers (and loss_id, the text id "
                                      "of a custom loss, with loss_fn 'custom')")
        else:
            config[k] = v.number
    for k, v in msg.loss_fn_config.items():
        config.setdefault(k, v)
    if msg.loss_fn == "custom" and (loss_id is None or config):
        raise InvalidRequestError(f"loss_fn 'custom' with loss_fn_config keys {sorted(config) or 'none'} and loss_id "
                                  f"{loss_id!r}; allowed: loss_id only, the id ServiceClient.create_custom_loss gave")
    data = [_datum(d, i) for i, d in enumerate(msg.data)]
    spans = [[_span(s, f"data[{i}].loss_fn_input_spans") for s in d.loss_fn_input_spans] for i, d in enumerate(msg.data)]
    return ForwardBackwardCall(msg.model_id, msg.seq_id, msg.loss_fn, config or None, loss_id, msg.forward_only, data,
                               spans)


def _span(msg, where: str) -> Span:
    kind = msg.WhichOneof("span")
    if kind is None:
        raise InvalidRequestError(f"{where} has an empty span; allowed: prompt_tokens or sampled_tokens spans")
    arm = getattr(msg, kind)
    if not arm.sequence_id or arm.offset < 0 or arm.length < 0:
        raise InvalidRequestError(f"{where}: span of {arm.sequence_id!r} at {arm.offset}, length {arm.length}; "
                                  "allowed: a sequence_id, offset >= 0, length >= 0")
    return Span("prompt" if kind == "prompt_tokens" else "sampled", arm.sequence_id, arm.offset, arm.length)


def _datum(msg, index: int) -> Datum:
    tokens: list[int] = []
    for chunk in msg.model_input:
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise InvalidRequestError(f"data[{index}].model_input has a {kind or 'empty'} chunk; "
                                      "allowed: encoded_text chunks (colo trains text models)")
        raw = chunk.encoded_text.tokens
        if len(raw) % 4:
            raise InvalidRequestError(f"data[{index}].model_input: token bytes are not int32")
        tokens += np.frombuffer(raw, dtype=np.int32).tolist()
    inputs = {name: _tensor(t, f"data[{index}].loss_fn_inputs[{name!r}]") for name, t in msg.loss_fn_inputs.items()}
    return Datum(model_input=tokens, loss_fn_inputs=inputs)


def _tensor(msg, where: str) -> torch.Tensor:
    if msg.dtype not in _TENSOR_DTYPES:
        raise InvalidRequestError(f"{where}: dtype {msg.dtype}; allowed: float32, int64 or int32")
    np_dtype, torch_dtype = _TENSOR_DTYPES[msg.dtype]
    shape = list(msg.shape)
    if msg.WhichOneof("encoding") == "sparse_csr":
        raise InvalidRequestError(f"{where}: sparse tensors are not supported; allowed: dense tensors")
    raw = msg.dense
    if len(raw) % np.dtype(np_dtype).itemsize:
        raise InvalidRequestError(f"{where}: {len(raw)} bytes is not a whole number of {np.dtype(np_dtype).name}")
    flat = np.frombuffer(raw, dtype=np_dtype)
    if any(n < 0 for n in shape):
        raise InvalidRequestError(f"{where}: shape {shape}; allowed: dimensions >= 0")
    if shape and math.prod(shape) != flat.size:
        raise InvalidRequestError(f"{where}: shape {shape} does not hold {flat.size} values")
    return torch.from_numpy(flat.copy()).to(torch_dtype).reshape(shape or [flat.size])


def forward_backward_output(out: ForwardBackwardOutput) -> bytes:
    """One ArrayRecord holding every datum's fields, as the SDK's proto reader expects."""
    record = pb.ArrayRecord(num_datums=len(out.loss_fn_outputs))
    names = out.loss_fn_outputs[0].keys() if out.loss_fn_outputs else ()
    for name in names:
        arrays = [o[name].detach().to(torch.float32).reshape(-1).numpy() for o in out.loss_fn_outputs]
        offsets = np.cumsum([0] + [a.nbytes for a in arrays]).astype(np.int64)
        record.fields[name].CopyFrom(pb.BatchedTensor(data=b"".join(a.tobytes() for a in arrays),
                                                      offsets=offsets.tobytes(), dtype=pb.DTYPE_FLOAT32))
    msg = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", metrics=out.metrics)
    msg.loss_fn_outputs.append(record)
    return msg.SerializeToString()


def sample_response(result: SampleResult) -> bytes:
    msg = pb.SampleResponse()
    for seq in result.sequences:
        msg.sequences.append(pb.SampledSequence(
            stop_reason=pb.STOP_REASON_STOP if seq.stop_reason == "stop" else pb.STOP_REASON_LENGTH,
            tokens=np.asarray(seq.tokens, dtype=np.int32).tobytes(),
            logprobs=np.asarray(seq.logprobs, dtype=np.float32).tobytes()))
    if result.prompt_logprobs is not None:
        values = [math.nan if v is None else v for v in result.prompt_logprobs]
        msg.prompt_logprobs = np.asarray(values, dtype=np.float32).tobytes()
    return msg.SerializeToString()


def tokens_of(model_input, where: str) -> list[int]:
    """The token ids of a pydantic ``ModelInput``: text chunks only."""
    tokens: list[int] = []
    for chunk in model_input.chunks:
        if getattr(chunk, "type", None) != "encoded_text":
            raise InvalidRequestError(f"{where} has a {getattr(chunk, 'type', '?')} chunk; allowed: encoded_text")
        tokens += [int(t) for t in chunk.tokens]
    return tokens


def sampling_params(p) -> SamplingParams:
    """colo's SamplingParams from the SDK's; ``max_tokens`` None means up to the context (cut later)."""
    stop = p.stop
    if isinstance(stop, str):
        stop = (stop,)
    return SamplingParams(max_tokens=p.max_tokens if p.max_tokens is not None else 1 << 30,
                          temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                          stop=tuple(stop or ()), seed=p.seed)
