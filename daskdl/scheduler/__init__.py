"""The scheduler side of training (adapter over the single-module plugin until it is split by concern)."""
from ..plugin import TrainingPlugin as _Old, get_plugin, RunState  # noqa
from .. import protocol


class TrainingPlugin(_Old):
    async def start(self, scheduler):
        await super().start(scheduler)
        scheduler.handlers.update({
            "daskdl_start": self.n_start, "daskdl_sync": self.n_sync,
            "daskdl_params": self.n_params, "daskdl_freeze": self.n_freeze,
            "daskdl_regroup": self.n_regroup, "daskdl_checkpoint_meta": self.n_meta,
            "daskdl_checkpoint_flush": self.n_flush, "daskdl_abort": self.n_abort,
            "daskdl_info": self.n_info, "daskdl_end": self.n_end,
            "daskdl_locations": self.n_loc})

    def n_start(self, secret=None, max_samples=None, checkpoint_clocks=(), **kw):
        return self.start_run(**kw)

    async def n_sync(self, secret=None, **kw):
        r = await self.sync(**kw)
        r = dict(r)
        if r.pop("same", False):
            r["params"] = None
        return r

    def n_params(self, run, secret=None, rank=None):
        return self.get_params(run, rank)

    def n_freeze(self, run, secret=None):
        return self.freeze(run)

    def n_regroup(self, run, members, clock, secret=None, checkpoint_clocks=()):
        return self.regroup(run, members, clock)

    def n_meta(self, run, clock, meta, secret=None):
        return self.checkpoint_meta(run, clock, meta)

    async def n_flush(self, run, secret=None):
        return await self.checkpoint_flush(run)

    def n_abort(self, run, reason, secret=None):
        return self.abort(run, reason)

    def n_info(self, run):
        st = self.runs.get(run) or self.finished.get(run)
        return protocol.refused("unknown") if st is None else st.info()

    def n_end(self, run, secret=None, wait_checkpoints=True):
        return self.end_run(run, wait_checkpoints)

    def n_loc(self, keys):
        out = {}
        for k in keys:
            ts = self.scheduler.tasks.get(k)
            if ts is not None and ts.who_has:
                out[k] = sorted(ws.address for ws in ts.who_has)[0]
        return protocol.ok(where=[out.get(k) for k in keys])
