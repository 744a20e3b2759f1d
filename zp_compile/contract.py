"""The contract between the serving front end (``zp_compile.server``) and its ranks (``zp_compile.rank``).

Neither side imports the other; both import this module (and ``zp_compile.prefix``, the prefix-cache
rules both run). Everything that crosses between them is declared here: what a rank loads, every
message, the block size, and where each thing lives.

Two channels, both hosted by the front end:

- **Rendezvous**: a ``torch.distributed.TCPStore`` (the address ranks are given, ``--frontend
  HOST:PORT``). Keys (``Keys``) live under ``g{generation}/`` so that ranks from before a restart can
  never be taken for the new ones: ``generation`` (set last), ``settings`` (``RankSettings``, JSON),
  ``pid/{rank}`` (set first: the front end kills a hung local rank by pid) and ``beat/{rank}`` (a
  counter each rank bumps every 0.5 s from a side thread: liveness) and ``startup/{rank}`` (its start-up
  phases as they happen, ``zp_compile.startup``).
- **Data**: a ZeroMQ ROUTER socket (``RankSettings.data_address``); every rank connects a DEALER with
  the identity ``identity(generation, rank)``. Front end -> rank: ``Step`` (one per rank per step;
  every rank runs every step: with collective gathers all ranks must enter the forward) or ``Stop``.
  Rank -> front end: ``Ready`` once loaded and compiled, ``StepDone`` per step, ``Failed`` before a
  rank exits on an exception. Messages are msgpack (msgspec structs, typed on decode; the port carries
  no code, never pickle).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import msgspec
import numpy as np

from .threshold import MeasuredThreshold

BLOCK = 8  # tokens per prefix-cache block (zp_compile/prefix.py); also the padded batches' length multiple
PROMPT_TOP = 20  # the most likely tokens a rank reads at each prompt position (the API's logprobs limit)
TRANSPORTS = ("auto", "collective", "shm")  # --transport: auto is resolved by each rank (rank.worker.resolve_transport)
GENERATION_KEY = "generation"


class RankSettings(msgspec.Struct, frozen=True, kw_only=True):
    """What every rank loads and how it serves (the front end writes it before ``generation``)."""

    model: str
    ranks: int
    data_address: str = ""  # tcp://HOST:PORT of the front end's ROUTER socket
    backend: str = "inductor"
    prefetch: int = 1
    regional: bool = True  # compile a decoder layer at a time, once per distinct layer (zp_compile.regions)
    transport: str = "auto"
    device: str = "auto"  # auto: cuda:LOCAL_RANK when CUDA works, else cpu; cuda: cuda:LOCAL_RANK or fail (zp_compile.devices)
    dtype: str | None = None
    threads: int | None = None  # CPU threads per rank; None: cores / local ranks
    measure_threshold: bool = False  # ranks measure T at start-up (zp_compile.measure_threshold)
    cache_tokens: int = 0  # each rank's prefix KV cache budget in tokens; 0: KV-cache-free
    max_tokens: int = 0  # the most tokens a step gives one rank (its forward's size): compiled at warm-up


class Sample(msgspec.Struct, frozen=True):
    """Draw the next token from softmax(logits / temperature) within the top_p nucleus (None: 1)."""

    temperature: float
    top_p: float | None = None
    seed: int | None = None


class Wants(msgspec.Struct, frozen=True):
    """What a sequence's answer reads from its next-token distribution."""

    top: int = 0  # the k most likely tokens with their log-probabilities
    tokens: list[int] = []  # log-probabilities of these token ids
    sample: Sample | None = None  # the next token: sampled, or greedy when None
    # Prompt logprobs (``echo`` with ``logprobs``): None, none; k (0..PROMPT_TOP): at every prompt
    # position from 1, the prompt token's log-probability given the tokens before it and the k most
    # likely tokens there. Such a sequence's prefix blocks are their own kind (``prefix.hash_salt``).
    prompt: int | None = None


class Seq(msgspec.Struct, frozen=True, array_like=True):
    """One prompt of a step."""

    ids: list[int]
    wants: Wants
    cached: int | None = None  # prompt tokens the front end counted as reused (routed steps): the rank checks it


class Readout(msgspec.Struct, frozen=True, array_like=True):
    """A sequence's answer, in the order of ``Wants``."""

    top: list[tuple[int, float]]  # (token id, log-probability), most likely first
    tokens: list[float]  # log-probability of each of ``Wants.tokens``
    next: tuple[int, float]  # the chosen next token and its log-probability
    # With ``Wants.prompt`` (k): one entry per prompt position 1..n-1 (position 0 has nothing before
    # it), as little-endian arrays rather than lists: an evaluation's prompts are hundreds of positions
    # each, and as msgpack lists of pairs they cost both sides more CPU than the rest of the step's readouts.
    prompt_lp: bytes = b""  # float32 [n-1]: the prompt token's log-probability given the tokens before it
    prompt_top_id: bytes = b""  # int32 [n-1, k]: the k most likely tokens there, most likely first
    prompt_top_lp: bytes = b""  # float32 [n-1, k]: their log-probabilities

    def prompt_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(logprobs [n-1] float32, top ids [n-1, k] int32, top logprobs [n-1, k] float32)."""
        lp = np.frombuffer(self.prompt_lp, "<f4")
        ids, top_lp = np.frombuffer(self.prompt_top_id, "<i4"), np.frombuffer(self.prompt_top_lp, "<f4")
        m = len(lp)
        return lp, ids.reshape(m, len(ids) // m if m else 0), top_lp.reshape(m, len(top_lp) // m if m else 0)

    @property
    def prompt_logprobs(self) -> list[float]:
        return self.prompt_arrays()[0].tolist()  # float32 -> float: exact

    @property
    def prompt_top(self) -> list[list[tuple[int, float]]]:
        _, ids, lps = self.prompt_arrays()
        return [list(zip(i, v)) for i, v in zip(ids.tolist(), lps.tolist())]


class Step(msgspec.Struct, frozen=True, tag="step"):
    n: int  # 0, 1, ... within a generation
    seqs: list[Seq]  # this rank's batch (possibly empty)


class Stop(msgspec.Struct, frozen=True, tag="stop"):
    """Exit after the current step."""


class Ready(msgspec.Struct, frozen=True, tag="ready"):
    rank: int
    vocab: int
    expert_bytes: int  # this rank's expert shards
    device: str
    transport: str  # as resolved (auto -> shm or collective)
    packed: bool  # steps run packed (no padding); False: left-padded batches (rank.packed.unsupported)
    threshold: MeasuredThreshold | None = None  # when RankSettings.measure_threshold


class StepDone(msgspec.Struct, frozen=True, tag="done"):
    n: int
    rank: int
    readouts: list[Readout]  # one per Seq of the step, in order
    seconds: float  # the rank's own time for the step (forward and readouts)


class Failed(msgspec.Struct, frozen=True, tag="failed"):
    rank: int
    message: str  # "rank R: Type: message", then the traceback


ToRank = Union[Step, Stop]
FromRank = Union[Ready, StepDone, Failed]

_encoder = msgspec.msgpack.Encoder()
_to_rank = msgspec.msgpack.Decoder(ToRank)
_from_rank = msgspec.msgpack.Decoder(FromRank)


def encode(message: ToRank | FromRank) -> bytes:
    return _encoder.encode(message)


def decode_to_rank(data: bytes) -> ToRank:
    return _to_rank.decode(data)


def decode_from_rank(data: bytes) -> FromRank:
    return _from_rank.decode(data)


def encode_settings(settings: RankSettings) -> bytes:
    return msgspec.json.encode(settings)


def decode_settings(data: bytes) -> RankSettings:
    return msgspec.json.decode(data, type=RankSettings)


@dataclass(frozen=True)
class Keys:
    """The rendezvous store's keys of one generation of ranks."""

    generation: int

    @property
    def settings(self) -> str:
        return f"g{self.generation}/settings"

    def pid(self, rank: int) -> str:
        return f"g{self.generation}/pid/{rank}"

    def beat(self, rank: int) -> str:
        return f"g{self.generation}/beat/{rank}"

    def startup(self, rank: int) -> str:
        """A rank's start-up record (``zp_compile.startup.PhaseClock``: seconds per phase so far)."""
        return f"g{self.generation}/startup/{rank}"


def identity(generation: int, rank: int) -> bytes:
    """A rank's ZeroMQ identity: a message from another generation's rank is never taken for this one's."""
    return f"g{generation}/r{rank}".encode()
