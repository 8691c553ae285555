"""Test-only machinery, kept out of the runtime modules: imported by tests/ and tools/gpu_check.py, and by train.py
only when ``ONLINE_AUG_INJECT_FAULT`` is set. No module of the runtime imports it (tests/test_architecture.py).

- :mod:`~online_aug.testing.hazards`: fake streams and the stream-hazard checker (the CUDA path's ordering on CPU);
- :mod:`~online_aug.testing.sync`: the host-device sync detector (by name on any device, or from CUDA's sync-debug
  mode);
- :mod:`~online_aug.testing.faults`: fault injectors for real ``train.py`` processes.

The runtime offers two seams and never imports this package: :data:`online_aug.streams._fake` (the fake device
:func:`~online_aug.testing.hazards.checking` installs) and :data:`online_aug.faults.INJECTORS` (filled by
:func:`~online_aug.testing.faults.install`).
"""
