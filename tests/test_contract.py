"""The front end <-> rank contract: every message survives the wire typed, a malformed one is refused,
and the front end's handle on the ranks (``server.ranks.Ranks``) over real ZeroMQ sockets: answers of
steps in flight taken in order, a rank's failure raised with its message."""

from __future__ import annotations

import msgspec
import pytest
import zmq

from zp_compile import contract
from zp_compile.contract import Failed, RankSettings, Readout, Ready, Sample, Seq, Step, StepDone, Stop, Wants
from zp_compile.threshold import MeasuredThreshold


def test_messages_round_trip_typed():
    seq = Seq([1, 2, 3], Wants(top=2, tokens=[5, 6], sample=Sample(0.7, 0.9, 3)), cached=16)
    for msg in (Step(4, [seq, Seq([7], Wants())]), Stop()):
        assert contract.decode_to_rank(contract.encode(msg)) == msg
    th = MeasuredThreshold(0.01, 5e11, 1.2, 2048, 6e9, 1234.5, 7e9)
    for msg in (Ready(1, 256, 1 << 20, "cpu", "shm", True, th), Ready(0, 256, 0, "cuda:0", "collective", False),
                StepDone(4, 1, [Readout([(3, -0.1), (9, -2.5)], [-1.0], (3, -0.1))], 0.25), Failed(1, "rank 1: ValueError: x")):
        assert contract.decode_from_rank(contract.encode(msg)) == msg
    settings = RankSettings(model="/m", ranks=2, data_address="tcp://127.0.0.1:5", cache_tokens=64)
    assert contract.decode_settings(contract.encode_settings(settings)) == settings


def test_a_malformed_message_is_refused_not_guessed():
    with pytest.raises(msgspec.ValidationError):
        contract.decode_to_rank(msgspec.msgpack.encode({"type": "step", "n": "four", "seqs": []}))
    with pytest.raises(msgspec.ValidationError):  # a front end's message is no answer
        contract.decode_from_rank(contract.encode(Stop()))


@pytest.fixture
def ranks():
    from zp_compile.server.ranks import Ranks
    from zp_compile.server.settings import ServeSettings

    r = Ranks(ServeSettings(model="/m", model_name="m", nproc=2, step_timeout=5.0))
    r.generation = 0  # as start() sets it, without starting processes
    ctx = zmq.Context()
    fakes = []
    for rank in range(2):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.IDENTITY, contract.identity(0, rank))
        s.setsockopt(zmq.LINGER, 0)
        s.connect(r.data_address)
        fakes.append(s)
    for rank, s in enumerate(fakes):  # connected: the ROUTER knows them (as after their Ready)
        s.send(contract.encode(Ready(rank, 8, 0, "cpu", "shm", True)))
    r._collect(Ready, float("inf"), "start", beats=False)
    yield r, fakes
    for s in fakes:
        s.close()
    ctx.term()


def _answer(fake, rank: int):
    step = contract.decode_to_rank(fake.recv())
    assert isinstance(step, Step)
    fake.send(contract.encode(StepDone(step.n, rank, [Readout([], [], (len(s.ids), 0.0)) for s in step.seqs], 0.1)))


def test_steps_in_flight_are_received_in_order_whatever_order_the_ranks_answer(ranks):
    r, fakes = ranks
    a = r.send([[Seq([1], Wants())], []])
    b = r.send([[Seq([1, 2], Wants())], [Seq([1, 2, 3], Wants())]])
    _answer(fakes[0], 0)  # rank 0 answers both steps before rank 1 answers the first
    _answer(fakes[0], 0)
    _answer(fakes[1], 1)
    _answer(fakes[1], 1)
    with pytest.raises(ValueError, match="out of order"):
        r.receive(b)
    out_a, seconds_a = r.receive(a)
    out_b, _ = r.receive(b)
    assert [[x.next[0] for x in rank] for rank in out_a] == [[1], []] and seconds_a == [0.1, 0.1]
    assert [[x.next[0] for x in rank] for rank in out_b] == [[2], [3]]


def test_a_rank_failure_is_raised_with_its_message(ranks):
    from zp_compile.server.ranks import RankFailure

    r, fakes = ranks
    n = r.send([[], []])
    _answer(fakes[0], 0)
    fakes[1].recv()
    fakes[1].send(contract.encode(Failed(1, "rank 1: RuntimeError: out of memory\ntraceback...")))
    with pytest.raises(RankFailure, match="^rank 1: RuntimeError: out of memory$"):
        r.receive(n)


def test_an_old_generation_cannot_answer_for_the_new_one(ranks):
    r, fakes = ranks
    old = zmq.Context.instance().socket(zmq.DEALER)
    old.setsockopt(zmq.IDENTITY, contract.identity(-1, 0))  # a rank of before a restart
    old.setsockopt(zmq.LINGER, 0)
    old.connect(r.data_address)
    n = r.send([[Seq([1], Wants())], [Seq([1], Wants())]])
    old.send(contract.encode(StepDone(n, 0, [Readout([], [], (99, 0.0))], 0.1)))
    _answer(fakes[0], 0)
    _answer(fakes[1], 1)
    out, _ = r.receive(n)
    assert [rank[0].next[0] for rank in out] == [1, 1]
    old.close()


@pytest.mark.parametrize("flags, regional", [([], True), (["--no-regional-compile"], False)])
def test_the_regional_compile_flag_reaches_the_ranks(flags, regional):
    """``serve``'s flag is a ServeSettings field, and the ranks' settings carry it (default: on)."""
    import argparse
    import dataclasses

    from zp_compile import cli
    from zp_compile.server.settings import ServeSettings, rank_settings

    parser = argparse.ArgumentParser()
    cli._add_serve(parser.add_subparsers(dest="command"))
    args = vars(parser.parse_args(["serve", "--model", "/m", "--served-model-name", "m", *flags]))
    settings = ServeSettings(**{f.name: args[f.name] for f in dataclasses.fields(ServeSettings) if f.name != "labels"})
    assert settings.regional_compile is regional
    assert rank_settings(settings, "tcp://127.0.0.1:1").regional is regional
    assert contract.decode_settings(contract.encode_settings(rank_settings(settings, "tcp://127.0.0.1:1"))).regional is regional
