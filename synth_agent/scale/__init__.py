"""Scale-out mode: N stateless ``synth-agent serve`` replicas and M ``synth-agent worker`` processes
sharing a Chroma server (votes, personas) and Postgres (job queue, synthesis checkpoints,
persona version counters). See docs/deploy.md.

| module | holds |
|---|---|
| :mod:`~synth_agent.scale.queue` | the procrastinate queue: schema, ``QueueScheduler`` (proxy side: enqueue, forget) |
| :mod:`~synth_agent.scale.worker` | ``QueueWorker`` (``synth-agent worker --queue``): jobs, run records, dead-worker reaper |
| :mod:`~synth_agent.scale.versions` | persona versions allocated under a Postgres row lock |
| :mod:`~synth_agent.scale.checkpoints` | a user's synthesis threads in the Postgres checkpointer |
| :mod:`~synth_agent.scale.postgres` | ``LocalPostgres``: a real PostgreSQL from pinned wheels (tests, one machine) |
| :mod:`~synth_agent.scale.settings` | env vars of the mode |
"""
