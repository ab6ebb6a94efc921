"""Integrations: thin adapters that run healthmon's one driver inside a training loop.

- :mod:`healthmon.integrations.lightning`: ``HealthMonitor`` and the monitors as Lightning callbacks;
- :mod:`healthmon.integrations.loop`: :func:`healthmon.watch` for plain PyTorch and Fabric loops;
- :mod:`healthmon.integrations.hf`: ``HFHealthCallback`` for the Hugging Face ``Trainer``.

Each adapter keeps a :class:`~healthmon.engine.run.Run` up to date and calls the
:class:`~healthmon.engine.driver.Driver` at the points of a step; no monitor logic lives here.
"""
