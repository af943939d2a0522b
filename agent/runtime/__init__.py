"""Runtime backends behind one small interface (load, describe inputs/outputs, run a batch)."""

from .base import Backend, load_backend, run_in_batches

__all__ = ["Backend", "load_backend", "run_in_batches"]
