"""The cloud's rounds for a fleet: many devices, a pool of workers, on Ray (no rclpy).

The embedded default runs every device's rounds in the cloud node's process, one after
another (:class:`~cdcca_ros.core.cloud_runtime.CloudRuntime`). ``cloud_node`` with
``backend:=ray`` hands them to this package instead:

- :mod:`~cdcca_ros.core.fleet.store`: device state in a store every worker reaches (a
  directory on shared storage): uplink inboxes, state generations, and a commit per round
  that is created exactly once (a retried round returns the committed result, never a second
  delta);
- :mod:`~cdcca_ros.core.fleet.worker`: a student worker: one student base, the devices'
  adapters and memories loaded from the store task by task, the guarded round
  (:class:`~cdcca_ros.core.rounds.round.RoundRunner`) run unchanged;
- :mod:`~cdcca_ros.core.fleet.teacher`: the teacher as a service that batches the label and
  AKD-target requests of many rounds into shared forwards, and the proxy rounds use;
- :mod:`~cdcca_ros.core.fleet.scheduler`: fair scheduling of due rounds (start-time fair
  queuing, weights by estimated gain and refusals, bounded);
- :mod:`~cdcca_ros.core.fleet.grouping`: devices whose uplinks stack alike, served together so
  their teacher requests share batches;
- :mod:`~cdcca_ros.core.fleet.engine`: the front the node talks to (samples in, events out)
  and the Ray side (actors, placement group, failures).

Nothing here imports Ray at module level: only :class:`~cdcca_ros.core.fleet.engine.FleetEngine`
does, when it starts.
"""
