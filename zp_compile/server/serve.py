"""Run the front end under uvicorn, with a drain on the first SIGTERM/SIGINT."""

from __future__ import annotations

import gc
import logging
import signal

import uvicorn

from .app import create_app
from .ranks import Ranks
from .settings import ServeSettings

log = logging.getLogger("zp_compile.server")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, except that the first SIGTERM/SIGINT drains: new requests get 503, accepted
    ones finish, then the server stops and exits 0. A second signal stops at once."""

    def handle_exit(self, sig, frame) -> None:  # replaces uvicorn's, which re-raises the signal at exit
        state = getattr(self.config.app.state, "zp", None)
        if state is None or state.draining:
            self.force_exit = self.should_exit
            self.should_exit = True
            return
        log.info("zp-compile: %s received: draining", signal.Signals(sig).name)
        state.begin_drain()

    async def on_tick(self, counter: int) -> bool:
        state = getattr(self.config.app.state, "zp", None)
        if state is not None and (state.exit_requested or (state.draining and state.inflight == 0)):
            return True
        return await super().on_tick(counter)


def run(settings: ServeSettings, ranks: Ranks) -> int:
    """Serve until drained (exit status 0) or until the ranks fail with ``on_worker_failure="exit"``
    or cannot start (status 1). Returns the exit status."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(settings.tokenizer or settings.model)
    config = AutoConfig.from_pretrained(settings.model)
    app = create_app(settings, ranks, tokenizer, config)
    # Everything imported so far (torch, transformers, the tokenizer) lives as long as the server: keep it
    # out of the cyclic GC, whose full passes over it stalled the event loop for ~0.3 s under load.
    gc.collect()
    gc.freeze()
    # Keep-alive longer than clients' idle-connection expiry (httpx 5 s, aiohttp 15 s): with uvicorn's 5 s
    # default, a pooled connection idle while steps run could be closed just as a client sent on it, and
    # that request failed with no response (seen in the load test).
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level, timeout_graceful_shutdown=30,
                            timeout_keep_alive=75)  # fmt: skip
    server = DrainingServer(config)
    server.run()
    state = getattr(app.state, "zp", None)
    return state.exit_code if state is not None else 1
