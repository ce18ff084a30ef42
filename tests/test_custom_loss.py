"""Custom losses run on the server (``ServiceClient.create_custom_loss``, SDK 0.38), with the real SDK against the
real service: the same loss, metrics and step as the same function run client-side; a graph with anything outside
colo's allow-list refused when it is created; a loss usable by its own session only."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import tinker
import torch
from conftest import ALICE, BOB
from test_service import client, post, tokens  # noqa: F401 (tokens is a fixture)
from tinker import types
from tinker.lib.public_interfaces.custom_loss import encode_graph, trace_loss

RANKS = {"logprobs": 1, "sampler_logprobs": 1, "advantages": 1, "scale": 0}
INPUTS = ["sampler_logprobs", "advantages", "scale"]


def ppo_like(logprobs, sampler_logprobs, advantages, scale):
    """PPO's clipped objective, scaled by a per-datum number (rank 0), with metrics of both reductions."""
    ratio = torch.exp(logprobs - sampler_logprobs)
    clipped = torch.clamp(ratio, 0.8, 1.2)
    loss = -torch.min(ratio * advantages, clipped * advantages).sum() * scale
    return loss, {"custom/ratio:mean": ratio.mean(), "custom/clipped:sum": (ratio != clipped).float().sum(),
                  "custom/tokens:sum": logprobs.new_zeros(()) + logprobs.shape[0]}


def client_side(fn, names):
    """``fn`` as the SDK's plain client-side custom loss: per datum, summed; metrics summed, :mean ones averaged."""
    def loss_fn(data, logprobs_list):
        total, sums = 0.0, {}
        for d, lp in zip(data, logprobs_list, strict=True):
            loss, metrics = fn(lp, *[d.loss_fn_inputs[n].to_torch() for n in names])
            total = total + loss
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
        return total, {k: v / len(data) if k.endswith(":mean") else v for k, v in sums.items()}

    return loss_fn


def rl_data(tokens) -> list[types.Datum]:
    out = []
    cases = [("the quick brown fox jumps", 1.0, 0.5), ("over the lazy dog again and again", -0.5, 2.0)]
    for text, advantage, scale in cases:
        seq = tokens(text)
        n = len(seq) - 1
        rng = np.random.default_rng(n)
        out.append(types.Datum(
            model_input=types.ModelInput.from_ints(seq[:-1]),
            loss_fn_inputs={"target_tokens": np.array(seq[1:], dtype=np.int64),
                            "sampler_logprobs": (-3.0 + rng.normal(0, 0.5, n)).astype(np.float32),
                            "advantages": np.full(n, advantage, dtype=np.float32),
                            "scale": types.TensorData(data=[scale], dtype="float32", shape=[])}))
    return out


def ce(data):
    return [types.Datum(model_input=d.model_input, loss_fn_inputs={"target_tokens": d.loss_fn_inputs["target_tokens"]})
            for d in data]


def test_server_side_loss_matches_the_same_function_run_client_side(service, tokens):
    sc = client(service)
    assert sc.holder.get_client_config().custom_loss_server_side
    handle = sc.create_custom_loss(ppo_like, RANKS).result()
    assert handle.loss_id is not None and handle.name == "ppo_like"
    on_server, in_client = (sc.create_lora_training_client(base_model=service.model_name, rank=8, seed=11,
                                                           train_unembed=False).result() for _ in range(2))
    data = rl_data(tokens)

    served = on_server.forward_backward_custom(data, handle)
    step_a = on_server.optim_step(types.AdamParams(learning_rate=1e-2))
    local = in_client.forward_backward_custom(data, client_side(ppo_like, INPUTS))
    step_b = in_client.optim_step(types.AdamParams(learning_rate=1e-2))
    served, local = served.result(), local.result()
    step_a.result(), step_b.result()

    assert "surrogate_loss:sum" in local.metrics and "surrogate_loss:sum" not in served.metrics  # one server pass
    for key in ("loss:sum", "custom/ratio:mean", "custom/clipped:sum", "custom/tokens:sum"):
        assert served.metrics[key] == pytest.approx(local.metrics[key], rel=1e-5, abs=1e-5), key
    n = sum(len(d.loss_fn_inputs["target_tokens"].data) for d in data)
    assert served.metrics["custom/tokens:sum"] == n and served.metrics["loss:sum"] != 0
    for a, b in zip(served.loss_fn_outputs, local.loss_fn_outputs, strict=True):
        np.testing.assert_allclose(a["logprobs"].to_numpy(), b["logprobs"].to_numpy(), atol=1e-5)

    # the same gradient, so the same step: both models score the data alike afterwards, and not as before
    after_a = on_server.forward(ce(data), "cross_entropy").result()
    after_b = in_client.forward(ce(data), "cross_entropy").result()
    for a, b, before in zip(after_a.loss_fn_outputs, after_b.loss_fn_outputs, served.loss_fn_outputs, strict=True):
        np.testing.assert_allclose(a["logprobs"].to_numpy(), b["logprobs"].to_numpy(), atol=1e-4)
        assert np.abs(a["logprobs"].to_numpy() - before["logprobs"].to_numpy()).max() > 1e-3

    # forward with the loss: its loss and metrics, no step
    scored = on_server.forward(data, "custom", {"loss_id": handle.loss_id}).result()
    assert set(scored.metrics) >= {"loss:sum", "custom/ratio:mean", "custom/clipped:sum", "custom/tokens:sum"}

    # a datum without an input the loss takes is refused before anything runs
    missing = [types.Datum(model_input=d.model_input, loss_fn_inputs={k: v for k, v in d.loss_fn_inputs.items()
                                                                      if k != "advantages"}) for d in data]
    with pytest.raises(Exception, match="lacks 'advantages'"):
        on_server.forward_backward(missing, "custom", {"loss_id": handle.loss_id}).result()
    sc.close("success").result()


def create(service, session_id: str, nodes: list[dict], seq: int, inputs=None, key: str = ALICE):
    body = {"session_id": session_id, "custom_loss_seq_id": seq, "name": "probe", "type": "create_custom_loss",
            "inputs": inputs or [{"name": "logprobs", "rank": 1}], "graph": {"format": 1, "nodes": nodes}}
    return post(service, "/api/v1/create_custom_loss", key=key, json=body)


def plain(logprobs):
    total = -logprobs.sum()
    return total, {"custom/total:sum": total}


def test_a_graph_outside_the_allow_list_is_refused_when_created(service):
    sc = client(service)
    session_id = sc.holder.get_session_id()
    good = [n.model_dump() for n in encode_graph(trace_loss(plain, {"logprobs": 1}, session_id)).nodes]
    # good: placeholder logprobs, call_method sum, call_function operator.neg, output
    assert [n["op"] for n in good] == ["placeholder", "call_method", "call_function", "output"]
    r = create(service, session_id, good, 0)
    assert r.status_code == 200 and "request_id" in r.json()
    assert create(service, session_id, good, 0).json() != {}  # the same POST again: answered, the same loss

    def with_node(i: int, **fields) -> list[dict]:
        nodes = copy.deepcopy(good)
        nodes[i].update(fields)
        return nodes

    refused = {
        "'os.system'": with_node(2, target="os.system"),
        "'builtins.open'": with_node(2, target="builtins.open"),
        "'torch.load'": with_node(2, target="torch.load"),
        "'eval'": with_node(2, target="eval"),
        "method 'numpy'": with_node(1, target="numpy"),
        "method 'item'": with_node(1, target="item"),
        "method 'add_' (in place)": with_node(1, target="add_", args=[{"ref": "logprobs"}, 1.0]),
        "get_attr of '_tensor_constant0'": with_node(1, op="get_attr", target="_tensor_constant0", args=[]),
        "call_module of 'linear'": with_node(1, op="call_module", target="linear"),
        "attribute '__class__'": with_node(2, target="getattr", args=[{"ref": "sum_1"}, "__class__"]),
        "refers to 'nope'": with_node(2, args=[{"ref": "nope"}]),
        "refers to 'output'": with_node(2, args=[{"ref": "output"}]),
        "malformed argument {'pickle'": with_node(2, args=[{"pickle": "gASVAAAA"}]),
        "malformed argument {'ref': 'sum_1', 'x': 1}": with_node(2, args=[{"ref": "sum_1", "x": 1}]),
        "passes a device": with_node(1, kwargs={"dtype": {"device": "cpu"}}),
        "passes out=": with_node(1, kwargs={"out": {"ref": "logprobs"}}),
        "nested deeper than 8": with_node(2, args=[{"ref": "sum_1"}, [[[[[[[[[[1]]]]]]]]]]]),
        "a list of 65 items": with_node(2, args=[{"ref": "sum_1"}, [0] * 65]),
        "metric 'loss'": with_node(3, args=[{"tuple": [{"ref": "neg"}, {"dict": {"loss": {"ref": "neg"}}}]}]),
        "is named 'a b'": with_node(1, name="a b"),
        "graph.nodes.2.op: Input should be 'placeholder'": with_node(2, op="exec"),  # the SDK's own type says
        "has 513 nodes": good[:1] + [{"op": "call_method", "name": f"n{i}", "target": "sum",
                                      "args": [{"ref": "logprobs"}], "kwargs": {}} for i in range(511)] + good[3:],
    }
    for i, (message, nodes) in enumerate(refused.items(), start=1):
        r = create(service, session_id, nodes, i)
        assert r.status_code == 400, (message, r.status_code, r.text)
        assert message in r.json()["detail"], (message, r.json()["detail"])
        if "may not call" in r.json()["detail"]:  # it says what is allowed
            assert "torch.{abs" in r.json()["detail"] and "operator.{" in r.json()["detail"]
    r = create(service, session_id, good, 99, inputs=[{"name": "logprobs", "rank": 2}])
    assert r.status_code == 400 and "allowed: logprobs with rank 1" in r.json()["detail"]
    assert create(service, "no-such-session", good, 0).status_code == 404
    assert create(service, session_id, good, 0, key=BOB).status_code == 404  # alice's session, for bob
    sc.close("success").result()


def test_a_loss_serves_its_own_session_only(service, tokens):
    owner = client(service)
    handle = owner.create_custom_loss(plain, {"logprobs": 1}).result()
    data = ce(rl_data(tokens))
    mine = owner.create_lora_training_client(base_model=service.model_name, rank=8, train_unembed=False).result()
    assert mine.forward_backward_custom(data, handle).result().metrics["loss:sum"] > 0
    for other in (client(service), client(service, BOB)):  # another session of the same tenant; another tenant
        tc = other.create_lora_training_client(base_model=service.model_name, rank=8, train_unembed=False).result()
        with pytest.raises(ValueError, match="can only be used by clients of that session"):
            tc.forward_backward_custom(data, handle)  # the SDK's own check
        with pytest.raises(tinker.RequestFailedError, match="unknown custom loss"):
            tc.forward_backward(data, "custom", {"loss_id": handle.loss_id}).result()  # past it: the server's
        # the refused request took its turn: the next one runs
        assert tc.forward_backward(data, "cross_entropy").result().metrics["loss:sum"] > 0
        other.close("success").result()
    owner.close("success").result()


# ---- the bounds a running loss keeps (colo.custom_loss directly: no service needed) -------------------------


def built(fn, ranks=None):
    from colo.custom_loss import build

    handle = trace_loss(fn, ranks or {"logprobs": 1}, "local")
    return build(handle.name, [i.model_dump() for i in handle.inputs],
                 [n.model_dump() for n in encode_graph(handle).nodes])


def outer(logprobs):
    return (logprobs.unsqueeze(0) * logprobs.unsqueeze(1)).sum(), {}


def squares(logprobs):
    n = logprobs.shape[0]
    for _ in range(6):
        n = n * n
    return logprobs.sum() * n, {}


def power(logprobs):
    return logprobs.sum() * logprobs.shape[0] ** 100, {}


def allocates(logprobs):
    return logprobs.sum() + logprobs.new_zeros(1000, 1000000).sum(), {}


def past_the_end(logprobs):
    return -logprobs[400], {}


def detached(logprobs):
    return logprobs.detach().sum(), {}


def vector(logprobs):
    return -logprobs, {}


@pytest.mark.parametrize("fn, message", [
    (outer, "makes a tensor of 90000 elements; allowed: at most 65536"),
    (squares, "makes the Python int"),
    (power, "to the power 100"),
    (allocates, "makes a tensor of 1000000000 elements"),
    (past_the_end, "fails on data[0]: IndexError"),
    (detached, "does not depend on logprobs"),
    (vector, "returns a loss of shape (300,)"),
])
def test_a_loss_that_breaks_a_bound_is_refused_before_any_gradient(fn, message):
    from colo.errors import InvalidRequestError
    from colo.types import Datum

    loss = built(fn)
    data = [Datum(model_input=[1] * 300, loss_fn_inputs={"target_tokens": torch.ones(300, dtype=torch.int64)})]
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        loss.check_data(data, vocab_size=10, max_len=1000, max_tokens=1000, backward=True)
