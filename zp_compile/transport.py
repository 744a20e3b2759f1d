"""A gather transport for ranks on one host: expert shards in POSIX shared memory, set up once.

Expert weights do not change while serving, so the exchange is set up once instead of moving bytes
through sockets on every gather. ``ShmExpertExchange.create(group, {(layer, slot): shard})`` is a
collective: rank 0 creates one file in ``/dev/shm``; for every key the segment holds the full
``[N * S, ...]`` gathered tensor, and rank ``r`` writes its ``[S, ...]`` shard at rows ``[r*S, (r+1)*S)``.
Every rank maps the whole segment read-only, and the file is unlinked as soon as every rank has it open,
so nothing stays in ``/dev/shm`` even if a process dies later (the kernel frees the memory when the
last mapping goes).

After setup there is no collective at all, so there is no ordering to agree on and nothing to
deadlock:

- ``gather(key)`` copies the ``[N * S, ...]`` rows out of shared memory into a private tensor: a real
  gather (every peer's rows are read), one memcpy on the calling core. The output comes from a small
  pool (see ``_OutputPool``) because a fresh allocation above 32 MiB costs a page fault per 4 KiB page;
  ``gather(key, out=buf)`` copies into a buffer the caller keeps.
- ``view(key)`` is the gathered tensor itself, zero-copy: the full bank exists once per host, in the
  segment. It is read-only (writing into it is a segfault rather than silent corruption of every
  rank's weights). In a compiled graph, pass it as an input (a parameter or buffer): it must not be
  the output of a non-mutating custom op, because Inductor may reuse a dead op output's storage for
  a later buffer.
- ``local(key)`` is this rank's ``[S, ...]`` rows inside the segment; callers can drop their private
  copy of the shard and keep this one.

``torch.ops.zp_compile.shm_gather(shard, exchange_id)`` is ``gather`` as one opaque node in a compiled
graph. ``shard`` is this rank's rows as ``local(key)`` returns them: it supplies the shape and dtype
while tracing, and at run time its address names the key (its data is not read: the rows were copied
into the segment at setup). No layer number is a constant of the graph, so identical decoder layers
compile to identical code (``zp_compile.regions`` compiles them once). The op finds the exchange by
``exchange_id``, which is the same string on every rank, so every rank compiles the same graph.

Memory per host: the whole bank once, like the N shards of AsyncEP together. Each rank's rows are
charged to the rank that wrote them.

Single host only: ranks on another host (or in a container with a private ``/dev/shm``) cannot open
the file, and ``create`` raises on every rank.
"""

from __future__ import annotations

import math
import mmap
import os
import socket
import itertools
import uuid
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .compat import storage_use_count
from .ops import SHM_GATHER

SHM_DIR = "/dev/shm"
SHM_PREFIX = "zp-shm-"
# Each key's region starts on a page, so each is independent of its neighbours (and well aligned).
_ALIGN = mmap.PAGESIZE

Key = tuple[int, int]  # (layer, slot)


@dataclass(frozen=True)
class _Region:
    """Where one key's gathered ``[N * S, ...]`` tensor lives in the segment."""

    offset: int  # bytes from the start of the segment, page aligned
    shard_shape: tuple[int, ...]  # [S, ...]
    dtype: torch.dtype
    world_size: int

    @property
    def shard_nbytes(self) -> int:
        return math.prod(self.shard_shape) * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.world_size * self.shard_nbytes

    @property
    def gathered_shape(self) -> tuple[int, ...]:
        return (self.world_size * self.shard_shape[0], *self.shard_shape[1:])


def _layout(meta: dict[Key, tuple[tuple[int, ...], str]], world_size: int) -> tuple[dict[Key, _Region], int]:
    """Key -> region, and the segment size. Pure arithmetic on data every rank holds: same on every rank."""
    regions, offset = {}, 0
    for key in sorted(meta):
        shape, dtype_name = meta[key]
        region = _Region(offset, shape, getattr(torch, dtype_name), world_size)
        regions[key] = region
        offset += -(-region.nbytes // _ALIGN) * _ALIGN
    return regions, max(offset, _ALIGN)


def _describe(meta_entry: tuple[tuple[int, ...], str] | None) -> str:
    if meta_entry is None:
        return "no tensor"
    shape, dtype = meta_entry
    return f"[{', '.join(map(str, shape))}] {dtype}"


def _free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _all_gather(obj, group) -> list:
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _raise_if_any(errors: list[str | None], what: str) -> None:
    """Every rank holds the same list, so every rank raises (or none does): no rank is left waiting."""
    failed = {r: e for r, e in enumerate(errors) if e}
    if failed:
        raise RuntimeError(f"{what} failed on rank(s) {sorted(failed)}: " + "; ".join(f"rank {r}: {e}" for r, e in failed.items()))


def _pwrite_all(fd: int, data: torch.Tensor, offset: int) -> None:
    buf = memoryview(data.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    while buf:  # pwrite may write less than asked (at most ~2 GiB per call on Linux)
        n = os.pwrite(fd, buf, offset)
        buf, offset = buf[n:], offset + n


class _OutputPool:
    """Gather outputs whose memory is reused once nobody holds them any more.

    A fresh [N*S, ...] output of more than 32 MiB comes from mmap in glibc, and the kernel zero-fills
    each of its pages on first touch: on this machine that made a 256 MiB gather 5x slower than copying
    into a warm buffer (benchmarks/transport_bench.py). So the pool keeps up to ``per_shape`` storages
    for each (shape, dtype) -- layers share them, so it holds about as many banks as are alive at once
    (the layer computing plus the one prefetched) -- and hands one out again only when its use count
    says that the pool's own reference is the last one: no tensor or view of it is alive anywhere,
    including inside an Inductor-generated ``call`` that reuses a dead buffer. The use count is private
    torch API (``torch._C._storage_Use_Count``), the same check that Inductor's cudagraph trees use
    (torch/_inductor/cudagraph_trees.py).
    """

    def __init__(self, per_shape: int):
        self.per_shape = per_shape
        self._storages: dict[tuple[tuple[int, ...], torch.dtype], list[torch.UntypedStorage]] = {}

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        pooled = self._storages.setdefault((tuple(shape), dtype), [])
        for storage in pooled:
            if storage_use_count(storage) == 1:  # only the pool holds it
                return torch.empty(0, dtype=dtype).set_(storage, 0, shape)
        out = torch.empty(shape, dtype=dtype)
        if len(pooled) < self.per_shape:
            pooled.append(out.untyped_storage())
        return out

    def clear(self) -> None:
        self._storages.clear()


class ShmExpertExchange:
    """Every rank's expert shards, mapped by every rank on one host; see the module docstring."""

    def __init__(
        self, exchange_id: str, rank: int, world_size: int, regions: dict[Key, _Region], segment: mmap.mmap, pool: int = 2
    ):
        self.exchange_id = exchange_id
        self.rank = rank
        self.world_size = world_size
        self.nbytes = len(segment)
        with warnings.catch_warnings():
            # The mapping is read-only on purpose; torch warns that it cannot mark the tensor so.
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            base = torch.frombuffer(segment, dtype=torch.uint8)  # keeps the mapping alive
        self._views: dict[Key, torch.Tensor] = {
            key: base[r.offset : r.offset + r.nbytes].view(r.dtype).view(r.gathered_shape) for key, r in regions.items()
        }
        self._shard_rows = {key: r.shard_shape[0] for key, r in regions.items()}
        # The address of this rank's rows of each key -> the key (shm_gather is given the rows).
        self._key_at = {self.local(key).data_ptr(): key for key in self._views}
        self._pool = _OutputPool(pool)

    @classmethod
    def create(
        cls,
        group: dist.ProcessGroup | None,
        tensors: Mapping[Key, torch.Tensor],
        *,
        shm_dir: str = SHM_DIR,
        pool: int = 2,
    ) -> ShmExpertExchange:
        """Collective over ``group``: every rank passes its ``[S, ...]`` shard for the same keys.

        Shapes and dtypes must agree across ranks (they are checked). Every failure, on any rank, raises
        on every rank, so no rank is left in a collective. The shards are copied; the caller may drop them.
        ``pool``: gather outputs kept for reuse per (shape, dtype) (see ``_OutputPool``); 0 disables it.
        """
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        meta = {}
        for key, t in tensors.items():
            if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, int) for k in key)):
                raise TypeError(f"keys are (layer, slot) pairs of ints, got {key!r}")
            if t.dim() < 1 or t.device.type != "cpu":
                raise ValueError(f"key {key}: expected a CPU shard with a row dimension, got {tuple(t.shape)} on {t.device}")
            meta[key] = (tuple(t.shape), str(t.dtype).removeprefix("torch."))

        # 1. Every rank must describe the same keys with the same shard shapes and dtypes.
        infos = _all_gather((socket.gethostname(), meta), group)
        for r, (_, other) in enumerate(infos):
            for key in sorted(set(other) | set(infos[0][1])):
                if other.get(key) != infos[0][1].get(key):
                    raise ValueError(
                        f"key {key}: rank {r} has {_describe(other.get(key))} but rank 0 has "
                        f"{_describe(infos[0][1].get(key))}; every rank must pass the same keys with equal shard shapes"
                    )
        regions, size = _layout(meta, world_size)

        # 2. Rank 0 creates the (sparse) file; each rank's rows are allocated when that rank writes them.
        # 3. Every rank opens it; once all have it open, rank 0 unlinks it (open descriptors and mappings
        #    keep the memory, and with the name gone nothing can leak from then on). Rank 0 unlinks in a
        #    `finally`, so a failure anywhere in between leaves no file either.
        name, fd, error = None, None, None
        try:
            if rank == 0:
                try:
                    name = cls._create_file(shm_dir, size, len(regions), world_size)
                except OSError as e:
                    error = str(e)
            created = _all_gather((name, error), group)
            _raise_if_any([e for _, e in created], f"creating the shared-memory segment in {shm_dir}")
            name, error = created[0][0], None
            try:
                fd = os.open(os.path.join(shm_dir, name), os.O_RDWR)
            except OSError as e:
                error = f"cannot open rank 0's segment on host {socket.gethostname()} (rank 0 is on {infos[0][0]}): {e}"
            _raise_if_any(
                _all_gather(error, group), "opening the shared-memory segment (ranks must share one host and one /dev/shm)"
            )
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        finally:
            if rank == 0 and name is not None:
                os.unlink(os.path.join(shm_dir, name))

        # 4. Each rank writes its own rows and maps the whole segment read-only, pages populated now so
        #    that no gather pays page faults on the source side. The all-gather of errors that follows is
        #    also the barrier: every rank's rows are written before anyone reads them.
        segment, error = None, None
        try:
            for key, t in tensors.items():
                r = regions[key]
                _pwrite_all(fd, t, r.offset + rank * r.shard_nbytes)
                if rank == world_size - 1:  # fill the alignment gap too: no hole that a read would have to allocate
                    os.pwrite(fd, bytes(-r.nbytes % _ALIGN), r.offset + r.nbytes)
            segment = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ)
        except OSError as e:  # ENOSPC when the tmpfs fills up between the check and the write
            error = f"writing or mapping {size / 2**20:.1f} MiB: {e}"
        finally:
            os.close(fd)
        _raise_if_any(_all_gather(error, group), "filling the shared-memory segment")

        # The id is in every compiled graph that reads the exchange (the ops' constant argument), so it is
        # the same at every start: the n-th exchange of a process (created collectively: every rank
        # counts the same), not the file's random name, or no start would ever hit the compile caches.
        exchange = cls(f"x{next(_CREATED)}-w{world_size}", rank, world_size, regions, segment, pool)
        exchange.segment_file = name  # unlinked by now: for error messages and tests
        _EXCHANGES[exchange.exchange_id] = exchange
        return exchange

    @staticmethod
    def _create_file(shm_dir: str, size: int, num_tensors: int, world_size: int) -> str:
        if not os.path.isdir(shm_dir):
            raise FileNotFoundError(f"{shm_dir} does not exist; the shared-memory transport needs a tmpfs there (or pass shm_dir=)")
        free = _free_bytes(shm_dir)
        if free < size:
            raise OSError(
                f"{shm_dir} has {free / 2**20:.1f} MiB free but the exchange needs {size / 2**20:.1f} MiB "
                f"({num_tensors} tensors x {world_size} ranks); enlarge it (docker run --shm-size) or pass shm_dir="
            )
        name = SHM_PREFIX + uuid.uuid4().hex
        fd = os.open(os.path.join(shm_dir, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.unlink(os.path.join(shm_dir, name))
            raise
        finally:
            os.close(fd)
        return name

    def keys(self) -> Iterator[Key]:
        return iter(self._views)

    def view(self, key: Key) -> torch.Tensor:
        """The gathered ``[N * S, ...]`` tensor, zero-copy and read-only (shared by every rank)."""
        return self._views[key]

    def local(self, key: Key) -> torch.Tensor:
        """This rank's own ``[S, ...]`` rows inside the shared segment (read-only)."""
        s = self._shard_rows[key]
        return self._views[key][self.rank * s : (self.rank + 1) * s]

    def gather(self, key: Key, out: torch.Tensor | None = None) -> torch.Tensor:
        """Copy every rank's rows of ``key`` into ``out``: ``[N * S, ...]``. No collective.

        Without ``out`` the result is a tensor no one else holds (from the pool when one is free).
        """
        src = self._views[key]
        if out is None:
            out = self._pool.empty(src.shape, src.dtype)
        elif out.shape != src.shape or out.dtype != src.dtype:
            raise ValueError(f"out is {tuple(out.shape)} {out.dtype}, key {key} gathers to {tuple(src.shape)} {src.dtype}")
        return out.copy_(src)

    def key_of(self, shard: torch.Tensor) -> Key:
        """The key whose rows ``shard`` is (``local(key)``, or a view of it at the same address)."""
        key = self._key_at.get(shard.data_ptr())
        if key is None:
            raise KeyError(f"exchange {self.exchange_id}: a shard of {tuple(shard.shape)} {shard.dtype} is not this rank's rows "
                           "of any key: shm_gather takes the exchange's own view (local(key)), not a copy")  # fmt: skip
        expected = (self._shard_rows[key], *self._views[key].shape[1:])
        if tuple(shard.shape) != expected or shard.dtype != self._views[key].dtype:
            raise ValueError(f"(layer, slot) {key}: shard is {tuple(shard.shape)} {shard.dtype} but the exchange holds "
                             f"shards of {expected} {self._views[key].dtype}")  # fmt: skip
        return key

    def close(self) -> None:
        """Forget this exchange (local, not collective). The memory is freed once no view is alive anywhere."""
        _EXCHANGES.pop(self.exchange_id, None)
        self._views.clear()
        self._key_at.clear()
        self._pool.clear()

    def __enter__(self) -> ShmExpertExchange:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# exchange_id -> live exchange: the op below receives a string, and finds the mapped segment here.
_EXCHANGES: dict[str, ShmExpertExchange] = {}
_CREATED = itertools.count()  # exchanges this process has created: their ids (ShmExpertExchange.create)


def _lookup(exchange_id: str) -> ShmExpertExchange:
    exchange = _EXCHANGES.get(exchange_id)
    if exchange is None:
        raise KeyError(f"no open shared-memory exchange {exchange_id!r} in this process (closed, or created elsewhere)")
    return exchange


# The op's schema is declared in zp_compile/ops.py; this module owns the exchanges it looks up.
@torch.library.impl(SHM_GATHER, "CompositeExplicitAutograd")
def shm_gather(shard: torch.Tensor, exchange_id: str) -> torch.Tensor:
    """[S, ...] this rank's rows of a key -> [N * S, ...] every rank's rows of it, copied from shared memory."""
    exchange = _lookup(exchange_id)
    return exchange.gather(exchange.key_of(shard))


@torch.library.register_fake(SHM_GATHER)
def _(shard: torch.Tensor, exchange_id: str) -> torch.Tensor:
    return shard.new_empty((_lookup(exchange_id).world_size * shard.shape[0], *shard.shape[1:]))
