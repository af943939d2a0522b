"""Over-the-air model updates, in one place (built the way Mender's client is):

- :mod:`.lifecycle`: the persisted state enum, the event enum, the transition table and the resume
  table (what a restart in each state does, and why), with a restart counter against boot loops;
- :mod:`.record`: the anti-replay memory (accepted versions, wanted targets, failures), failing closed;
- :mod:`.slots`: the slot operations, one verb each (stage, switch, reactivate, commit, regress,
  stop_probation, rollback, install), mixed into :class:`agent.store.ModelStore`;
- :mod:`.download`: a bundle arriving in chunks, each checked against the signed chunk list;
- :mod:`.probation`: the pure verdict on a new version (commit, roll back, or keep watching);
- :mod:`.updater`: takes signed desired states and drives each through the lifecycle;
- :mod:`.errors`: :class:`~.errors.TransientUpdateError` (back off, retry) and
  :class:`~.errors.FatalUpdateError` (this target fails here).

The store (:mod:`agent.store`) owns the lock, the state files and recovery; the daemon's
:class:`agent.serving.registry.ModelRegistry` loads what the store says is active and the updater
awaits it (:meth:`~agent.serving.registry.ModelRegistry.activate`). ``agent/fleet/`` keeps only the
MQTT link (transport, spool, telemetry, streaming).
"""
