"""One serving rank: ``torchrun ... -m zp_compile.rank --frontend HOST:PORT``.

``zp-compile serve`` starts these itself on one host (through torchrun). On several hosts, start them with
torchrun on each host and point them at the front end's worker port; they read the model and settings
from the front end, so every rank serves the same thing. What crosses between a rank and the front end,
and where: ``zp_compile/contract.py``.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import threading
import time
import traceback
from datetime import timedelta

import msgspec
import torch
import torch.distributed as dist

from .. import contract
from ..contract import Failed, Keys, RankSettings, Ready, StepDone, Stop
from ..devices import process_group_backend, resolve_device
from ..startup import PhaseClock
from .step import run_step
from .warmup import prepare

# oneDNN (torch's CPU matmul for bf16 and fp32) JIT-compiles a kernel per matmul shape and keeps 1,024 in
# its cache by default. The CPU grouped_mm of a MoE layer is one matmul per expert, M = the tokens routed
# to it, so every step brings new shapes: with the default the cache thrashes for good (steady-state
# steps 1.5x slower on the 82M benchmark model, docs/platform.md). Read by oneDNN at its first matmul.
ONEDNN_CACHE_CAPACITY = "16384"
_IDLE = timedelta(days=7)  # the rendezvous store's timeout for a rank's reads; a dead front end fails it at once
_LINGER_MS = 2000  # how long a failing rank's socket may take to deliver its Failed message


def connect(address: str, timeout: timedelta = _IDLE) -> dist.TCPStore:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"--frontend must be HOST:PORT, got {address!r}")
    return dist.TCPStore(host, int(port), is_master=False, timeout=timeout)


class Heartbeat:
    """A thread adding 1 to the rank's beat key every 0.5 s, stopped and joined before the rank returns.
    A daemon thread still running when the interpreter finalises is ended by ``pthread_exit`` as it takes
    the GIL back (Python 3.11); inside the store's C++ call that unwind can meet a noexcept frame, and the
    rank can abort ("terminate called without an active exception") after a clean stop."""

    def __init__(self, address: str):
        self.address, self.stopping, self.thread = address, threading.Event(), None

    def start(self, key: str) -> None:
        self.thread = threading.Thread(target=self._run, args=(key,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=5)  # one store round trip; a hung front end is no reason to hang here

    def _run(self, key: str) -> None:
        store = connect(self.address, timedelta(seconds=30))
        while not self.stopping.is_set():
            try:
                store.add(key, 1)
            except Exception:
                # The front end is gone (killed, crashed): nobody will ever send another step. Exit now;
                # the main thread may be blocked in a read or in a collective with a peer that never returns.
                os._exit(3)
            self.stopping.wait(0.5)


def resolve_transport(requested: str, device: torch.device, world: int, local: int) -> str:
    """``auto``: shared memory when every rank is a CPU process on one host (``local`` ranks on this
    host == ``world``), else collectives. Every rank decides alike without asking the others: torchrun
    gives all the same world size, local == world on one host only, and a GPU world is all NCCL."""
    if requested != "auto":
        return requested
    return "shm" if device.type == "cpu" and local == world else "collective"


def load(settings: RankSettings, device: torch.device):
    """The optimized model as ``settings`` say (its transport already resolved), loaded onto ``device``."""
    import zp_compile

    dtype = getattr(torch, settings.dtype) if settings.dtype else None
    return zp_compile.from_pretrained(
        settings.model,
        dtype=dtype,
        device=device,
        prefetch=settings.prefetch,
        backend=settings.backend,
        regional=settings.regional,
        transport=settings.transport,
        # One compile for every batch shape: the warm-up pays it before the rank reports ready.
        dynamic=True,
    )


def serve(address: str) -> None:
    import zmq

    store = connect(address)
    generation = int(store.get(contract.GENERATION_KEY))
    keys = Keys(generation)
    settings = contract.decode_settings(store.get(keys.settings))
    rank = int(os.environ.get("RANK", 0))  # torchrun's; the process group's rank once it is up
    # The data channel: a DEALER whose identity names this generation and rank. Opened first, so that a
    # rank which cannot even start its process group reports why.
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, contract.identity(generation, rank))
    sock.setsockopt(zmq.LINGER, _LINGER_MS)
    sock.connect(settings.data_address)
    heartbeat = Heartbeat(address)
    try:
        device = resolve_device(settings.device)  # cuda asked for and not usable: an error, never the CPU instead
        if device.type == "cuda":
            torch.cuda.set_device(device)  # before NCCL starts: its communicator and every launch use this GPU
        dist.init_process_group(process_group_backend(device))
        world = dist.get_world_size()
        store.set(keys.pid(rank), str(os.getpid()))  # lets the front end kill a hung rank on this host
        if world != settings.ranks:
            raise RuntimeError(f"the front end expects {settings.ranks} ranks but torchrun started {world}")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if device.type == "cpu":
            torch.set_num_threads(settings.threads or max(1, (os.cpu_count() or 1) // local))
        heartbeat.start(keys.beat(rank))
        transport = resolve_transport(settings.transport, device, world, local)
        settings = msgspec.structs.replace(settings, transport=transport)
        clock = PhaseClock(lambda record: store.set(keys.startup(rank), record))  # the front end shows them
        with clock.phase("load"):
            model = load(settings, device)
        vocab = model.get_output_embeddings().weight.shape[0]
        with clock.warm_up():  # and the compile, which torch.compile runs at the warm-up's first calls
            kv = prepare(model, device, vocab, settings.cache_tokens, settings.max_tokens)
        threshold = None
        if settings.measure_threshold:  # collective: every rank measures, all get the same T
            from ..threshold import measure_threshold

            with clock.phase("threshold"):
                threshold = measure_threshold(model)
        sock.send(contract.encode(Ready(rank, vocab, model.zero_prefill.expert_bytes, str(device), transport, kv is not None, threshold)))
        while True:
            msg = contract.decode_to_rank(sock.recv())  # blocks until the front end sends: no polling
            if isinstance(msg, Stop):
                break
            started = time.perf_counter()
            readouts = run_step(model, msg.seqs, device, kv)
            sock.send(contract.encode(StepDone(msg.n, rank, readouts, time.perf_counter() - started)))
    except Exception as e:
        sock.send(contract.encode(Failed(rank, f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}")))
        sock.close()  # delivers Failed within the linger time
        raise
    finally:
        heartbeat.stop()
    sock.close()
    dist.destroy_process_group()


def configure_process() -> None:
    """Process-wide settings a serving rank wants before its first matmul (a user's own value wins)."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE_CAPACITY)


def main(argv: list[str] | None = None) -> None:
    configure_process()
    parser = argparse.ArgumentParser(prog="python -m zp_compile.rank", description="One zp-compile serving rank (start under torchrun).")
    parser.add_argument("--frontend", required=True, help="HOST:PORT of the front end's worker port")
    # A crash in native code (a kernel, a transport) then leaves every thread's Python stack in the log.
    faulthandler.enable()
    # And on SIGUSR1 (sent before the front end kills a hung rank): every thread's stack, then run on.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    serve(parser.parse_args(argv).frontend)
