"""``zp-compile serve``: an asyncio HTTP front end over N lockstep ranks running the optimized model.

- ``app.py``: FastAPI routes, the step loop, faults, drain; ``protocol.py``: request/response bodies;
- ``scheduler.py``: what each step runs (the ``Scheduler`` protocol and a first-come scheduler);
- ``ranks.py``: starting the ranks (torchrun) and running steps on them; ``worker.py``: one rank;
- ``metrics.py``: Prometheus metrics; ``serve.py``: running it all under uvicorn.

The server knows the model only through the ranks' step function; nothing here imports the passes.
"""
