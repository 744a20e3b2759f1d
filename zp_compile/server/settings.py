"""``ServeSettings``: everything ``zp-compile serve`` takes, in one object; the settings of each part
(what the ranks load, the router's) are derived from it by function, never filled in by hand."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..contract import TRANSPORTS, RankSettings
from .policies import POLICIES
from .routing import FILLS, RouterSettings
from .scheduler import FIFO

SCHEDULING = (FIFO, *POLICIES)  # --policy
ON_WORKER_FAILURE = ("restart", "exit")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ServeSettings:
    """The CLI's flags are these fields (``--max-tokens-per-rank`` is ``max_tokens_per_rank``), with
    these defaults; ``--served-model-name`` is ``model_name``."""

    model: str
    model_name: str
    tokenizer: str | None = None  # default: the model directory
    labels: list[str] = field(default_factory=list)
    # The ranks
    nproc: int = 2
    backend: str = "inductor"
    prefetch: int = 1
    regional_compile: bool = True  # a decoder layer at a time, once per distinct layer (zp_compile.regions)
    transport: str = "auto"
    device: str = "auto"  # auto, cpu, cuda or cuda:N (zp_compile.devices.resolve_device, run on every rank)
    dtype: str | None = None  # default: the checkpoint's
    threads_per_rank: int | None = None  # default: cores / ranks
    external_ranks: bool = False  # wait for ranks started by torchrun elsewhere instead of starting them
    worker_host: str = "127.0.0.1"
    worker_port: int = 0  # the rendezvous store; the data socket takes worker_port + 1 (any free port when 0)
    start_timeout: float = 900.0
    step_timeout: float = 120.0
    heartbeat_timeout: float = 5.0
    on_worker_failure: str = "restart"
    restart_wait: float = 60.0  # how long requests queue while the ranks restart; then what is queued gets 503
    # Steps
    max_model_len: int | None = None  # default: the config's max_position_embeddings
    max_tokens_per_rank: int = 8192  # tokens one rank's forward processes per step (packed: its computed tokens)
    max_seqs_per_rank: int = 256
    # "fifo" (FifoScheduler) or a routing policy of server/policies.py: round_robin, least_flops,
    # cache_aware, zero_prefill (ThresholdScheduler: per-rank queues, steps filled to T).
    policy: str = FIFO
    threshold_flops: float | None = None  # T per rank per step; None: measured by the ranks at start-up
    max_wait_ms: float = 50.0  # the longest a step is held back for more work while every rank is under T
    fill: str = "threshold"  # routed steps: filled to T, or to a share of the waiting work (routing.RouterSettings)
    cache_tokens: int = 0  # each rank's prefix KV cache budget in tokens, mirrored by the router's view
    # HTTP
    host: str = "127.0.0.1"
    port: int = 8000
    max_waiting: int = 4096  # sequences queued; beyond: 429
    max_items: int = 256  # inputs / items / documents in one request
    max_body_bytes: int = 4 << 20
    request_timeout: float = 600.0
    api_key: str | None = None
    log_level: str = "info"

    def __post_init__(self) -> None:
        for name, value, known in (("policy", self.policy, SCHEDULING), ("transport", self.transport, TRANSPORTS),
                                   ("on_worker_failure", self.on_worker_failure, ON_WORKER_FAILURE), ("fill", self.fill, FILLS)):  # fmt: skip
            if value not in known:
                raise ValueError(f"--{name.replace('_', '-')} {value!r}: expected one of {', '.join(known)}")
        if self.nproc < 1:
            raise ValueError(f"--nproc must be at least 1, got {self.nproc}")
        if self.external_ranks and not self.worker_port:
            raise ValueError("--external-ranks needs a fixed --worker-port for the ranks to join")
        if self.external_ranks and self.on_worker_failure == "restart":
            raise ValueError("--external-ranks needs --on-worker-failure exit: the front end cannot restart ranks it did not "
                             "start; let the process manager that runs the server and torchrun restart both")  # fmt: skip
        if self.cache_tokens < 0:
            raise ValueError(f"--cache-tokens must be >= 0, got {self.cache_tokens}")
        for name in ("request_timeout", "step_timeout", "start_timeout", "heartbeat_timeout", "restart_wait"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0 seconds, got {getattr(self, name)}")
        if self.max_items > self.max_waiting:
            raise ValueError(f"--max-items {self.max_items} exceeds --max-waiting {self.max_waiting}: such a request could never be queued")

    @property
    def routed(self) -> bool:
        """A routing policy with threshold admission (``ThresholdScheduler``), not first come, first served."""
        return self.policy != FIFO


def rank_settings(s: ServeSettings, data_address: str) -> RankSettings:
    """What every rank loads, for ranks that reach the front end's data socket at ``data_address``."""
    return RankSettings(model=s.model, ranks=s.nproc, data_address=data_address, backend=s.backend, prefetch=s.prefetch, regional=s.regional_compile,
                        transport=s.transport, device=s.device, dtype=s.dtype, threads=s.threads_per_rank,
                        measure_threshold=s.routed and s.threshold_flops is None, cache_tokens=s.cache_tokens,
                        max_tokens=s.max_tokens_per_rank)  # fmt: skip


def router_settings(s: ServeSettings, threshold_flops: float) -> RouterSettings:
    """The threshold scheduler's settings, with T = ``threshold_flops`` (measured or given)."""
    return RouterSettings(threshold_flops, s.max_tokens_per_rank, s.max_seqs_per_rank, s.max_wait_ms, s.cache_tokens, policy=s.policy, fill=s.fill)
