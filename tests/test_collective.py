"""Trainer methods declare whether every rank must make the call (colo.collective); the service's lock step
under several ranks mirrors exactly the collective ones, so none can be left out by mistake."""

import pytest

from colo.collective import check_declared, collective, collective_methods, local
from colo.service.lockstep import Leader
from colo.trainer import Trainer


def test_every_public_trainer_method_is_declared():
    check_declared(Trainer)


def test_the_mirrored_calls_are_the_ones_that_change_or_read_every_ranks_state():
    assert collective_methods(Trainer) == {
        "create_lora", "delete_lora", "forward", "forward_backward", "optim_step", "sample", "sample_batch",
        "compute_logprobs", "save_state", "load_state", "export_adapter", "set_engine", "close"}


class _Grown:
    @collective
    def train(self):
        return "trained"

    @local
    def peek(self):
        return "peeked"

    def new_verb(self):  # added later, declared neither way
        return "?"


def test_a_method_declared_neither_way_stops_the_leader_at_start_up():
    with pytest.raises(TypeError, match="new_verb must be declared @collective or @local"):
        check_declared(_Grown)
    with pytest.raises(TypeError, match="new_verb"):
        Leader(_Grown(), group=None)


def test_the_leader_announces_collective_calls_only(monkeypatch):
    class Declared(_Grown):
        @local
        def new_verb(self):
            return super().new_verb()

    announced = []
    monkeypatch.setattr("torch.distributed.broadcast_object_list",
                        lambda box, src, group: announced.append(box[0][0]))
    leader = Leader(Declared(), group=None)
    assert (leader.train(), leader.peek(), leader.new_verb()) == ("trained", "peeked", "?")
    assert announced == ["train"]
