"""The scheduler side of training: global parameters, clocks, barriers.

:class:`TrainingPlugin` is a ``SchedulerPlugin`` registered once per scheduler (name
:data:`daskdl.protocol.EXTENSION`, also its ``scheduler.extensions`` key).  It keeps
one :class:`RunState` per training run and serves these handlers (messages and
replies: :mod:`daskdl.protocol`)::

    daskdl_start(run, secret, params, policy, members, timeout, clock=0, version=0,
                 policy_state=None, restore=None, checkpoint=None,
                 max_rejections=None, max_samples=None, checkpoint_clocks=())
                                                    start or restart a run      -> ok
    daskdl_sync(**SyncRequest(...).to_msg(secret))  a worker's end of round     -> SyncReply
    daskdl_params(run, secret, rank=None)           global params (+ restored)  -> params, version
    daskdl_freeze(run, secret)                      end a generation            -> done, lost, ...
    daskdl_regroup(run, secret, members, clock, checkpoint_clocks=())
                                                    start the next generation   -> generation
    daskdl_checkpoint_meta(run, secret, clock, meta)  data position of a checkpoint
    daskdl_checkpoint_flush(run, secret)            wait for checkpoint writes  -> errors
    daskdl_abort(run, secret, reason)               fail every waiting worker
    daskdl_end(run, secret, wait_checkpoints=True)  end the run                 -> checkpoint_errors
    daskdl_info(run)                                read only, no secret        -> the info dict
    daskdl_locations(keys)                          read only, no secret        -> where

Every handler looks the run up and checks its secret first, parses its message with
:mod:`daskdl.protocol`'s checks, and only then changes state: a malformed or
unauthenticated message is answered ``refused`` and changes nothing.

Which module owns what:

- :mod:`.plugin`: the handlers, cluster events (workers leaving, paused, joining),
  merges, the bound on runs kept (``daskdl.max-runs``);
- :mod:`.run`: :class:`RunState`, one run: parameters, version, policy, secret;
- :mod:`.membership`: generations, ranks, clocks, ``done``/``lost``, freeze and
  regroup, membership events;
- :mod:`.barrier`: waiting workers, pending group merges, release, the two-stage
  sync timeout;
- :mod:`.stats`: per-rank counters, history, ``metrics()``, divergence;
- :class:`daskdl.checkpoint.CheckpointCut`: which clocks are checkpointed, the
  ranks' optimizer states for them, handing snapshots to the writer.

Waiting in a barrier is an ``await`` on the scheduler's event loop, with a timeout
(``daskdl.sync-timeout``) after which the workers waited for count as lost, so a
failing worker can never leave the others blocked.  Workers that leave the cluster,
or that Dask pauses for memory, are dropped from the barriers at once.  Large merges
run in a thread, off the event loop.

Like ``distributed.Variable``, the parameters travel through the scheduler: each
synchronisation sends every worker's parameters to the scheduler and the merged
ones back.  That is cheap for small and medium models (a few MB); for large models
use a larger ``every`` so that syncs are rarer.
"""

from .plugin import TrainingPlugin, get_plugin
from .run import RunState

__all__ = [
    "RunState",
    "TrainingPlugin",
    "get_plugin",
]
