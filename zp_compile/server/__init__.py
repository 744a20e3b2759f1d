"""The front end of ``zp-compile serve``: an asyncio HTTP server over N lockstep ranks (``zp_compile.rank``).

- ``app.py``: the FastAPI app and its thin routes; ``serving.py``: what each task route does;
  ``protocol.py``: request/response bodies; ``errors.py``: the error shape; ``guard.py``: auth, body limit,
  request counter; ``inputs.py``: tokenizing and checking prompts;
- ``engine.py``: the server's state, the step loop, faults and drain; ``ranks.py``: starting the ranks
  and running steps on them; ``serve.py``: running it all under uvicorn; ``settings.py``: the one
  settings object and what is derived from it;
- ``scheduler.py``: what each step runs (the ``Scheduler`` protocol, first come first served);
  ``routing.py``: threshold admission over per-rank queues; ``policies.py``: routing policies;
  ``replay.py``: the scheduler under a cost model;
- ``metrics.py``: Prometheus metrics.

It reaches the ranks only through ``zp_compile.contract`` (and ``zp_compile.prefix``, the cache rules
both sides run), and the model only through the cost model (``zp_compile.costmodel``).
"""
