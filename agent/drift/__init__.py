"""On-device drift: how far live inputs and predictions are from the data the model was validated on.

``features`` says what is measured per sample, ``reference`` what the converter stores, ``stattests``
the tests, ``monitor`` the sliding windows and verdicts, ``psi`` the score older bundles have.
``benchmarks/drift.py`` measures false alarms, detection and the cost per request.
"""

from .monitor import DriftMonitor, monitor_for
from .psi import psi
from .reference import drift_reference

__all__ = ["DriftMonitor", "monitor_for", "psi", "drift_reference"]
