"""Custom losses sent as data: the per-datum loss graph the tinker SDK traces with torch.fx, rebuilt and run here.

The SDK (``ServiceClient.create_custom_loss``) sends each node as plain data: its op (placeholder,
call_function, call_method, output), a name, a target (``torch.exp``, ``operator.mul``, ``sum``...) and
arguments encoded as JSON (``{"ref": node}``, ``{"tuple": [...]}``, ``{"slice": [...]}``...). ``build`` checks
all of it once, when the loss is created, and keeps only what it understood: every target is looked up in
this module's own tables (``FUNCTIONS``, ``METHODS``, ``ATTRIBUTES``), so nothing the client sends is
executed, imported or unpickled, and whatever touches files, processes, host values, other objects'
attributes or its inputs in place is simply not in the tables. Running the graph is a loop over the nodes
(no generated Python code), with bounds on what a node may make: tensors no larger than a multiple of the
datum's inputs, Python ints below 2**63.

A loss takes ``logprobs`` (the datum's target-token logprobs, with gradient) then the ``loss_fn_inputs``
it names, and returns ``(scalar loss, {"custom/<name>:sum" | "custom/<name>:mean": scalar})``. The
Trainer sums the losses over the data; metrics are summed, and ``:mean`` ones divided by the datum count,
as the SDK reduces them when it runs the same loss client-side.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from colo.errors import InvalidRequestError
from colo.types import Datum
from colo.validation import check_context, check_tokens

# ---- limits, all checked when the loss is created -------------------------------------------------------
MAX_NODES = 512
MAX_INPUTS = 16  # logprobs included, as the SDK allows
MAX_METRICS = 32
MAX_DEPTH = 8  # nesting of one argument (a list in a tuple in a dict...)
MAX_ITEMS = 64  # entries of one list, tuple or dict literal; characters of one string
MAX_LITERALS = 4096  # encoded values in the whole graph
MAX_INT = 2**63  # literal ints, and every Python int a node makes, stay below this in magnitude
MAX_EXPONENT = 64  # Python-number ** Python-int: a larger exponent could take the host's memory
# a node's tensors hold at most this many times the elements of the datum's inputs (at least MIN_ELEMENTS):
# room for any per-token loss, none for a [T, T] product of a long sequence
ELEMENT_FACTOR, MIN_ELEMENTS = 64, 1 << 16

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  # node names and keyword names (torch.fx makes these)
_INPUT_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")  # as the SDK checks them
_LOSS_NAME = re.compile(r"[A-Za-z0-9_.<>-]{1,128}")  # a Python function's __name__ (<lambda> included)
_METRIC_KEY = re.compile(r"custom/[a-z0-9_./-]{1,64}:(sum|mean)")  # as the SDK checks them
_FORBIDDEN_KWARGS = {"out": "writes into an existing tensor", "inplace": "changes its input in place",
                     "device": "moves tensors off the server's device"}


# ---- what a loss may call -------------------------------------------------------------------------------
def _wire_name(fn: Callable) -> str:
    """The name the SDK sends for ``fn`` (torch.fx's qualified name; Python operators under ``operator``)."""
    from torch.fx.node import _get_qualified_name

    name = _get_qualified_name(fn)
    return "operator." + name.removeprefix("_operator.") if name.startswith("_operator.") else name


def _table(public: dict[str, Callable]) -> dict[str, Callable]:
    """Each function under its public name and under the name torch.fx gives it (``torch._C._nn.softplus``
    for ``torch.nn.functional.softplus``), so either spelling is understood and nothing else."""
    table = dict(public)
    for fn in public.values():
        table.setdefault(_wire_name(fn), fn)
    return table


_TORCH = ("abs absolute add all amax amin any argmax argmin cat ceil clamp clamp_max clamp_min clip concat "
          "count_nonzero cumsum div divide eq exp expm1 flatten floor fmax fmin full_like gather ge gt index_select "
          "isfinite isinf isnan le lerp log log10 log1p log2 logaddexp logcumsumexp logical_and logical_not "
          "logical_or logical_xor logsumexp lt masked_fill masked_select max maximum mean min minimum mul multiply "
          "nan_to_num nanmean nansum ne neg negative numel ones_like pow prod reciprocal relu reshape round rsqrt "
          "sigmoid sign softmax log_softmax sort sqrt square squeeze stack std sub subtract sum tanh topk transpose "
          "true_divide trunc unsqueeze var where xlogy zeros_like").split()
_FUNCTIONAL = ("binary_cross_entropy_with_logits huber_loss kl_div l1_loss log_softmax logsigmoid mse_loss sigmoid "
               "smooth_l1_loss softmax softplus").split()  # none of them has an in-place or out argument
_SPECIAL = "entr expit logit xlogy".split()
# Python operators as torch.fx records them; no setitem (in place), no shifts (unbounded ints)
_OPERATORS = ("abs add and_ eq floordiv ge getitem gt invert le lt mod mul ne neg or_ pos pow sub truediv "
              "xor").split()

FUNCTIONS: dict[str, Callable] = _table({
    **{f"torch.{n}": getattr(torch, n) for n in _TORCH},
    **{f"torch.nn.functional.{n}": getattr(F, n) for n in _FUNCTIONAL},
    **{f"torch.special.{n}": getattr(torch.special, n) for n in _SPECIAL},
    **{f"operator.{n}": getattr(operator, n) for n in _OPERATORS},
})
GETATTR = "getattr"  # how torch.fx records ``x.shape``: allowed on tensors, for ATTRIBUTES only
ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "T", "mT"})
# torch.Tensor methods, called as torch.Tensor.<name> on a tensor; none works in place (no trailing _), none
# leaves torch (item, tolist, numpy), moves devices (cpu, cuda) or grows a tensor from a literal size
# (expand, repeat); new_* take sizes that are checked before they run, ``to`` takes dtypes only
METHODS = frozenset(("abs add all amax amin any argmax argmin bool ceil clamp clamp_max clamp_min clip clone "
                     "contiguous count_nonzero cumsum detach dim div double eq exp expand_as expm1 flatten float "
                     "floor gather ge gt index_select int isfinite isinf isnan le lerp log log10 log1p log2 "
                     "logaddexp logical_and logical_not logical_or logsumexp long lt masked_fill masked_select max "
                     "maximum mean min minimum mul nan_to_num nanmean nansum ne neg new_full new_ones new_zeros "
                     "numel permute pow prod reciprocal relu reshape reshape_as round rsqrt sigmoid sign size "
                     "softmax log_softmax sort sqrt square squeeze std sub sum t tanh to topk transpose true_divide "
                     "trunc type_as unsqueeze var view view_as where xlogy").split())
_SIZED_METHODS = frozenset({"new_zeros", "new_ones", "new_full"})
DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                                      torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                                                      torch.bool)}


def allowed() -> str:
    """Everything a custom loss may use, for error messages: the whole list, grouped by module."""
    groups: dict[str, list[str]] = {}
    for name in FUNCTIONS:
        if not name.startswith("torch._C"):
            module, _, fn = name.rpartition(".")
            groups.setdefault(module, []).append(fn)
    functions = "; ".join(f"{m}.{{{', '.join(sorted(fns))}}}" for m, fns in sorted(groups.items()))
    return (f"functions {functions}; getattr of a tensor's {', '.join(sorted(ATTRIBUTES))}; tensor methods "
            f"{{{', '.join(sorted(METHODS))}}}")


# ---- the graph, once checked ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Ref:
    """An argument that is an earlier node's value."""

    name: str


@dataclass(frozen=True)
class Node:
    op: str  # placeholder, call_function, call_method or output
    name: str
    target: str
    args: tuple
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class CustomLoss:
    """A checked loss graph: plain data (it crosses ranks as the service's own object), run by ``datum_loss``."""

    name: str
    inputs: tuple[tuple[str, int], ...]  # (name, rank), logprobs first
    nodes: tuple[Node, ...]  # placeholders, then the calls; the output node is split into loss and metrics
    loss: Ref
    metrics: tuple[tuple[str, Ref], ...]

    @property
    def metric_keys(self) -> tuple[str, ...]:
        return tuple(key for key, _ in self.metrics)

    def check_data(self, data: Sequence[Datum], vocab_size: int, max_len: int, max_tokens: int,
                   backward: bool) -> None:
        """What the Trainer's checks do for a built-in loss, with this loss's inputs and ranks; then the loss
        runs once on every datum (on its own CPU tensors, logprobs made up) so that a loss that does not fit
        the data fails here, before any gradient is added."""
        if not data:
            raise InvalidRequestError("data is empty; allowed: a list of at least one Datum")
        total = sum(len(d.model_input) for d in data if isinstance(d, Datum))
        if total > max_tokens:
            raise InvalidRequestError(f"data holds {total} tokens in {len(data)} datums; allowed: at most "
                                      f"{max_tokens} a request (COLO_MAX_REQUEST_TOKENS): send it as several requests")
        for i, datum in enumerate(data):
            if not isinstance(datum, Datum):
                raise InvalidRequestError(f"data[{i}] is a {type(datum).__name__}; allowed: colo.Datum")
            n = len(datum.model_input)
            check_tokens(datum.model_input, vocab_size, f"data[{i}].model_input")
            check_context(n, max_len, f"data[{i}].model_input")
            targets = datum.loss_fn_inputs.get("target_tokens")
            if targets is None or targets.is_floating_point() or tuple(targets.shape) != (n,):
                got = "missing" if targets is None else f"{targets.dtype} of shape {tuple(targets.shape)}"
                raise InvalidRequestError(f"data[{i}].loss_fn_inputs['target_tokens'] is {got}; allowed: ({n},) "
                                          "integer token ids, one per input token")
            check_tokens(targets.tolist(), vocab_size, f"data[{i}].loss_fn_inputs['target_tokens']")
            for name, rank in self.inputs[1:]:
                self._check_input(datum.loss_fn_inputs.get(name), name, rank, n, f"data[{i}]")
        for i, datum in enumerate(data):
            logprobs = torch.full((len(datum.model_input),), -1.0, requires_grad=True)
            loss = self.datum_loss(logprobs, datum.loss_fn_inputs, {}, f"data[{i}]")
            if backward and not loss.requires_grad:
                raise InvalidRequestError(f"custom loss {self.name!r} does not depend on logprobs (or detaches "
                                          "them), so it has no gradient; allowed: a loss computed from logprobs")

    def reduce(self, sums: Sequence[float], count: int) -> dict[str, float]:
        """The metrics of ``count`` datums from their sums, in ``metric_keys`` order: ``:mean`` divided by count."""
        return {k: s / count if k.endswith(":mean") else s for k, s in zip(self.metric_keys, sums)}

    # ---- running --------------------------------------------------------------------------------------
    def _check_input(self, value: torch.Tensor | None, name: str, rank: int, n: int, where: str) -> None:
        shapes = {0: "one value (shape [] or [1])", 1: f"({n},), one value per input token",
                  2: f"({n}, K), K values per input token"}
        if value is None:
            raise InvalidRequestError(f"{where}.loss_fn_inputs lacks {name!r}, which custom loss {self.name!r} "
                                      f"takes with rank {rank}: {shapes[rank]}")
        # the wire gives a rank-0 tensor one dimension
        ok = value.numel() == 1 if rank == 0 else (value.dim() == rank and value.shape[0] == n and value.numel() > 0)
        if not ok:
            raise InvalidRequestError(f"{where}.loss_fn_inputs[{name!r}] has shape {tuple(value.shape)}; custom loss "
                                      f"{self.name!r} takes {name} with rank {rank}: allowed {shapes[rank]}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise InvalidRequestError(f"{where}.loss_fn_inputs[{name!r}] has NaN or inf; allowed: finite numbers")

    def datum_loss(self, logprobs: torch.Tensor, inputs: dict[str, torch.Tensor], sums: dict[str, torch.Tensor],
                   where: str = "a datum") -> torch.Tensor:
        """The loss of one datum (after ``check_data``); its metrics are added into ``sums`` (on the loss's
        device, so that reading them costs one transfer per request, not one per datum)."""
        args = [logprobs] + [(inputs[name].reshape(()) if rank == 0 else inputs[name]).to(logprobs.device)
                             for name, rank in self.inputs[1:]]
        limit = max(MIN_ELEMENTS, ELEMENT_FACTOR * sum(a.numel() for a in args))
        env: dict[str, Any] = {}
        for node in self.nodes:
            if node.op == "placeholder":
                env[node.name] = args[len(env)]
                continue
            call_args, call_kwargs = _resolve(node.args, env), _resolve(node.kwargs, env)
            try:
                env[node.name] = _call(node, call_args, call_kwargs, limit)
            except InvalidRequestError as e:
                raise InvalidRequestError(f"custom loss {self.name!r}, node {node.name!r} ({node.target}) on "
                                          f"{where}: {e}") from None
            except (RuntimeError, TypeError, ValueError, IndexError, KeyError, ZeroDivisionError,
                    OverflowError) as e:
                raise InvalidRequestError(f"custom loss {self.name!r}, node {node.name!r} ({node.target}) fails on "
                                          f"{where}: {type(e).__name__}: {e}") from None
        loss = env[self.loss.name]
        if not (isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.is_floating_point()):
            got = f"shape {tuple(loss.shape)} {loss.dtype}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise InvalidRequestError(f"custom loss {self.name!r} returns a loss of {got} on {where}; allowed: a "
                                      "floating-point scalar tensor (e.g. .sum() of per-token terms)")
        for key, ref in self.metrics:
            value = env[ref.name]
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.detach().reshape(()).float()
            elif isinstance(value, (int, float)):
                value = torch.tensor(float(value), device=logprobs.device)
            else:
                got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
                raise InvalidRequestError(f"custom loss {self.name!r} metric {key!r} is a {got} on {where}; "
                                          "allowed: a scalar")
            sums[key] = sums[key] + value if key in sums else value
        return loss


def _resolve(value: Any, env: dict[str, Any]) -> Any:
    if isinstance(value, Ref):
        return env[value.name]
    if isinstance(value, tuple):
        return tuple(_resolve(v, env) for v in value)
    if isinstance(value, list):
        return [_resolve(v, env) for v in value]  # a new list each run: a call cannot change the graph
    if isinstance(value, dict):
        return {k: _resolve(v, env) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_resolve(value.start, env), _resolve(value.stop, env), _resolve(value.step, env))
    return value


_NUMBER = (bool, int, float)


def _call(node: Node, args: tuple, kwargs: dict, limit: int) -> Any:
    """One node's value, computed only through the tables, with the bounds checked around it."""
    if node.op == "call_method":
        receiver = args[0] if args else None
        if not isinstance(receiver, torch.Tensor):
            raise InvalidRequestError(f"method {node.target} is called on a {type(receiver).__name__}; "
                                      "allowed: tensor methods on tensors")
        if node.target == "to" and not all(isinstance(a, torch.dtype) for a in (*args[1:], *kwargs.values())):
            raise InvalidRequestError("to() takes a dtype only; allowed: x.to(torch.float32) and the like")
        if node.target in _SIZED_METHODS:  # new_full(size, value); new_zeros(size) or new_zeros(*size)
            sizes = args[1:2] if node.target == "new_full" or len(args) == 2 else (args[1:] or (kwargs.get("size"),))
            _check_size(sizes[0] if len(sizes) == 1 else tuple(sizes), limit)
        fn = getattr(torch.Tensor, node.target)
    elif node.target == GETATTR:
        receiver, attribute = args
        if not isinstance(receiver, torch.Tensor):
            raise InvalidRequestError(f"getattr on a {type(receiver).__name__}; allowed: a tensor's "
                                      f"{', '.join(sorted(ATTRIBUTES))}")
        return getattr(receiver, attribute)
    else:
        fn = FUNCTIONS[node.target]
        if node.target.startswith("operator.") and node.target != "operator.getitem":
            _check_operands(node.target, args)
        if node.target == "operator.getitem" and not isinstance(args[0], (torch.Tensor, torch.Size, tuple, list)):
            raise InvalidRequestError(f"indexing a {type(args[0]).__name__}; allowed: tensors, shapes and tuples")
    shapes = [a.shape for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if len(shapes) > 1:
        try:
            _check_elements(math.prod(torch.broadcast_shapes(*shapes)), limit)
        except RuntimeError:
            pass  # shapes that do not broadcast: the call itself says so
    out = fn(*args, **kwargs)
    for value in out if isinstance(out, tuple) else (out,):
        if isinstance(value, torch.Tensor):
            _check_elements(value.numel(), limit)
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= MAX_INT:
            raise InvalidRequestError(f"makes the Python int {value:.3g}; allowed: magnitudes below 2**63")
    return out


def _check_operands(target: str, args: tuple) -> None:
    """Python operators on Python values stay arithmetic on numbers: no repeated strings or lists, no pow that
    could make an int of any size."""
    for a in args:
        if not isinstance(a, (torch.Tensor, *_NUMBER)):
            raise InvalidRequestError(f"{target} on a {type(a).__name__}; allowed: tensors and numbers")
    if target == "operator.pow" and not any(isinstance(a, torch.Tensor) for a in args):
        exponent = args[1]
        if isinstance(exponent, int) and abs(exponent) > MAX_EXPONENT:
            raise InvalidRequestError(f"a Python number to the power {exponent}; allowed: exponents in "
                                      f"[-{MAX_EXPONENT}, {MAX_EXPONENT}]")


def _check_size(size: Any, limit: int) -> None:
    dims = size if isinstance(size, (tuple, list, torch.Size)) else (size,)
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d for d in dims):
        raise InvalidRequestError(f"size {size!r}; allowed: a tuple of integers >= 0")
    _check_elements(math.prod(dims), limit)


def _check_elements(count: int, limit: int) -> None:
    if count > limit:
        raise InvalidRequestError(f"makes a tensor of {count} elements; allowed: at most {limit} ({ELEMENT_FACTOR} "
                                  f"times the elements of the datum's inputs, at least {MIN_ELEMENTS})")


# ---- building: every check of the graph, once ----------------------------------------------------------
def build(name: str, inputs: Sequence[dict], nodes: Sequence[dict]) -> CustomLoss:
    """The loss ``CreateCustomLossRequest`` describes (``inputs`` and ``graph.nodes`` as JSON-like dicts), or an
    ``InvalidRequestError`` that names what is wrong and what is allowed."""
    if not isinstance(name, str) or not _LOSS_NAME.fullmatch(name):
        raise InvalidRequestError(f"custom loss name {name!r}; allowed: 1 to 128 letters, digits, _ . < > -")
    what = f"custom loss {name!r}"
    checked_inputs = _inputs(what, inputs)
    if not 2 <= len(nodes) <= MAX_NODES:
        raise InvalidRequestError(f"{what} has {len(nodes)} nodes; allowed: 2 to {MAX_NODES}")
    literals = [0]
    done: list[Node] = []
    defined: set[str] = set()
    output = None
    for i, raw in enumerate(nodes):
        node = _node(what, i, raw, checked_inputs, defined, literals)
        if node.op == "output":
            if i != len(nodes) - 1:
                raise InvalidRequestError(f"{what}: node {i} is the output but is not last; allowed: one output "
                                          "node, at the end")
            output = node
        else:
            done.append(node)
            defined.add(node.name)
    if output is None:
        raise InvalidRequestError(f"{what} has no output node; allowed: one output node, at the end")
    if len(done) == len(checked_inputs):
        raise InvalidRequestError(f"{what} computes nothing; allowed: a loss computed from logprobs")
    loss, metrics = _output(what, output)
    return CustomLoss(name, checked_inputs, tuple(done), loss, metrics)


def _inputs(what: str, inputs: Sequence[dict]) -> tuple[tuple[str, int], ...]:
    if not 1 <= len(inputs) <= MAX_INPUTS:
        raise InvalidRequestError(f"{what} has {len(inputs)} inputs; allowed: 1 to {MAX_INPUTS}, logprobs first")
    out: list[tuple[str, int]] = []
    for i, item in enumerate(inputs):
        name, rank = item.get("name"), item.get("rank")
        if not (isinstance(name, str) and _INPUT_NAME.fullmatch(name)) or name in dict(out):
            raise InvalidRequestError(f"{what}: input {i} is named {name!r}; allowed: distinct lowercase names of "
                                      "letters, digits and _ (up to 64), the loss_fn_inputs keys the loss reads")
        if rank not in (0, 1, 2) or isinstance(rank, bool):
            raise InvalidRequestError(f"{what}: input {name!r} has rank {rank!r}; allowed: 0, 1 ([T]) or 2 ([T, K])")
        out.append((name, rank))
    if out[0] != ("logprobs", 1):
        raise InvalidRequestError(f"{what}: the first input is {out[0][0]!r} with rank {out[0][1]}; allowed: "
                                  "logprobs with rank 1 (colo trains one target token per position)")
    return tuple(out)


def _node(what: str, i: int, raw: dict, inputs: tuple[tuple[str, int], ...], defined: set[str],
          literals: list[int]) -> Node:
    op, name, target = raw.get("op"), raw.get("name"), raw.get("target")
    args, kwargs = raw.get("args", []), raw.get("kwargs", {})
    if not (isinstance(name, str) and _NAME.fullmatch(name)) or name in defined:
        raise InvalidRequestError(f"{what}: node {i} is named {name!r}; allowed: a new name of letters, digits "
                                  "and _ (up to 64), unique in the graph")
    where = f"{what}: node {name!r}"
    if not isinstance(target, str) or not isinstance(args, list) or not isinstance(kwargs, dict):
        raise InvalidRequestError(f"{where} has a malformed target, args or kwargs; allowed: a string, a list "
                                  "and an object")
    placeholders = len(inputs)
    if op == "placeholder":
        if i >= placeholders or target != inputs[i][0] or args or kwargs:
            raise InvalidRequestError(f"{where}: placeholder {target!r} at position {i}; allowed: one placeholder "
                                      f"per input, in order ({', '.join(n for n, _ in inputs)}), without arguments")
        return Node(op, name, target, (), {})
    if i < placeholders:
        raise InvalidRequestError(f"{where} comes before the placeholder of input {inputs[i][0]!r}; allowed: the "
                                  "placeholders first")
    if op in ("get_attr", "call_module"):
        raise InvalidRequestError(f"{where} is a {op} of {target!r}; a custom loss may not read tensors or modules "
                                  "captured from outside the function: it reads only logprobs and the "
                                  "loss_fn_inputs it names, and calls only what is allowed: " + allowed())
    decoded_args = tuple(_decode(where, a, defined, 0, literals) for a in args)
    decoded_kwargs = {}
    if len(kwargs) > MAX_ITEMS:
        raise InvalidRequestError(f"{where} has {len(kwargs)} keyword arguments; allowed: at most {MAX_ITEMS}")
    for key, value in kwargs.items():
        if not _NAME.fullmatch(key):
            raise InvalidRequestError(f"{where}: keyword {key!r}; allowed: a Python identifier")
        if key in _FORBIDDEN_KWARGS:
            raise InvalidRequestError(f"{where} passes {key}=, which {_FORBIDDEN_KWARGS[key]}; allowed: calls "
                                      "without " + ", ".join(f"{k}=" for k in _FORBIDDEN_KWARGS))
        decoded_kwargs[key] = _decode(where, value, defined, 0, literals)
    if op == "output":
        return Node(op, name, target, decoded_args, decoded_kwargs)
    if op == "call_function":
        if target == GETATTR:
            if len(decoded_args) != 2 or not isinstance(decoded_args[0], Ref) or decoded_kwargs \
                    or not (isinstance(decoded_args[1], str) and decoded_args[1] in ATTRIBUTES):
                attribute = decoded_args[1] if len(decoded_args) == 2 else "?"
                raise InvalidRequestError(f"{where} reads attribute {attribute!r}; allowed: a tensor's "
                                          f"{', '.join(sorted(ATTRIBUTES))}")
        elif target not in FUNCTIONS:
            raise InvalidRequestError(f"{where} calls {target!r}, which a custom loss may not call; allowed: "
                                      + allowed())
    elif op == "call_method":
        if target not in METHODS:
            why = " (in place)" if target.endswith("_") else ""
            raise InvalidRequestError(f"{where} calls method {target!r}{why}, which a custom loss may not call; "
                                      "allowed: " + allowed())
        if not decoded_args or not isinstance(decoded_args[0], Ref):
            raise InvalidRequestError(f"{where} calls method {target!r} on no node; allowed: a method of an earlier "
                                      "node's tensor")
        if target == "to" and not all(isinstance(a, (torch.dtype, Ref)) for a in (*decoded_args[1:],
                                                                                   *decoded_kwargs.values())):
            raise InvalidRequestError(f"{where}: to() with other than a dtype; allowed: x.to(torch.float32) and "
                                      "the like (tensors stay on the server's device)")
    else:
        raise InvalidRequestError(f"{where} has op {op!r}; allowed: placeholder, call_function, call_method, output")
    return Node(op, name, target, decoded_args, decoded_kwargs)


def _decode(where: str, value: Any, defined: set[str], depth: int, literals: list[int]) -> Any:
    """One encoded argument (``CustomLossNode.args``' encoding) as a Python value, its node references as Refs."""
    literals[0] += 1
    if literals[0] > MAX_LITERALS:
        raise InvalidRequestError(f"{where}: the graph holds more than {MAX_LITERALS} argument values; allowed: "
                                  f"at most {MAX_LITERALS}")
    if depth > MAX_DEPTH:
        raise InvalidRequestError(f"{where}: arguments nested deeper than {MAX_DEPTH}; allowed: at most {MAX_DEPTH}")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) >= MAX_INT:
            raise InvalidRequestError(f"{where}: the int {value:.3g}; allowed: magnitudes below 2**63")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidRequestError(f'{where}: a bare {value}; allowed: {{"float": "inf" | "-inf" | "nan"}}')
        return value
    if isinstance(value, str):
        if len(value) > MAX_ITEMS:
            raise InvalidRequestError(f"{where}: a string of {len(value)} characters; allowed: at most {MAX_ITEMS}")
        return value
    if isinstance(value, list):
        if len(value) > MAX_ITEMS:
            raise InvalidRequestError(f"{where}: a list of {len(value)} items; allowed: at most {MAX_ITEMS}")
        return [_decode(where, v, defined, depth + 1, literals) for v in value]
    if not (isinstance(value, dict) and len(value) == 1):
        raise InvalidRequestError(f"{where}: malformed argument {_short(value)}; allowed: JSON scalars, lists, and "
                                  "one-key objects ref, tuple, dict, slice, ellipsis, float, dtype")
    (kind, body), = value.items()
    if kind == "ref":
        if not isinstance(body, str) or body not in defined:
            raise InvalidRequestError(f"{where} refers to {_short(body)}, which is no earlier node; allowed: the "
                                      "name of a node before it")
        return Ref(body)
    if kind == "tuple" and isinstance(body, list):
        if len(body) > MAX_ITEMS:
            raise InvalidRequestError(f"{where}: a tuple of {len(body)} items; allowed: at most {MAX_ITEMS}")
        return tuple(_decode(where, v, defined, depth + 1, literals) for v in body)
    if kind == "dict" and isinstance(body, dict):
        if len(body) > MAX_ITEMS or not all(isinstance(k, str) and len(k) <= 2 * MAX_ITEMS for k in body):
            raise InvalidRequestError(f"{where}: a dict of {len(body)} items; allowed: at most {MAX_ITEMS}, with "
                                      f"string keys of at most {2 * MAX_ITEMS} characters")
        return {k: _decode(where, v, defined, depth + 1, literals) for k, v in body.items()}
    if kind == "slice" and isinstance(body, list) and len(body) == 3:
        parts = [_decode(where, v, defined, depth + 1, literals) for v in body]
        if not all(p is None or isinstance(p, Ref) or (isinstance(p, int) and not isinstance(p, bool)) for p in parts):
            raise InvalidRequestError(f"{where}: slice {_short(body)}; allowed: ints, None or node references")
        return slice(*parts)
    if kind == "ellipsis" and body is True:
        return Ellipsis
    if kind == "float" and body in ("inf", "-inf", "nan"):
        return float(body)
    if kind == "dtype" and body in DTYPES:
        return DTYPES[body]
    if kind in ("device", "layout", "memory_format"):
        raise InvalidRequestError(f"{where} passes a {kind} ({_short(body)}); allowed: none (tensors stay on the "
                                  "server's device, in their layout)")
    raise InvalidRequestError(f"{where}: malformed argument {_short(value)}; allowed: ref (a node name), tuple "
                              "(a list), dict (an object), slice ([start, stop, step]), ellipsis (true), float "
                              f"(inf, -inf or nan), dtype ({', '.join(DTYPES)})")


def _output(what: str, node: Node) -> tuple[Ref, tuple[tuple[str, Ref], ...]]:
    pair = node.args[0] if len(node.args) == 1 and not node.kwargs else None
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], Ref)
            and isinstance(pair[1], dict)):
        raise InvalidRequestError(f"{what} returns {_short(node.args)}; allowed: (loss, metrics), the loss a node "
                                  "and metrics a dict of nodes")
    loss, metrics = pair
    if len(metrics) > MAX_METRICS:
        raise InvalidRequestError(f"{what} returns {len(metrics)} metrics; allowed: at most {MAX_METRICS}")
    for key, value in metrics.items():
        if not _METRIC_KEY.fullmatch(key):
            raise InvalidRequestError(f"{what}: metric {key!r}; allowed: custom/<name>:sum or custom/<name>:mean, "
                                      "<name> of lowercase letters, digits and _ . / - (up to 64)")
        if not isinstance(value, Ref):
            raise InvalidRequestError(f"{what}: metric {key!r} is {_short(value)}; allowed: a node (a tensor)")
    return loss, tuple(metrics.items())


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
