"""The cost model: what a MoE model is (``spec``), what a request costs (``flops``), what a device
offers (``hardware``), and what a deployment needs and reaches (``planning``; ``calibrate`` measures the
compute efficiency on a CPU). The server imports ``spec`` and ``flops`` only; the planner CLI all of it.
"""
