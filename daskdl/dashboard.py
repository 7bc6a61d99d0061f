"""The daskdl page on the Dask dashboard (``/daskdl``) and its Prometheus metrics.

:class:`DashboardPlugin` is a ``SchedulerPlugin`` (name ``"daskdl-dashboard"``)
that, when registered, adds a Bokeh page at ``/daskdl`` to the scheduler's own
dashboard (same HTTP server and port as ``/status``) and ``daskdl_*`` metrics to
the scheduler's Prometheus endpoint ``/metrics`` (:mod:`daskdl.prometheus`).
``Trainer`` registers it; registering it again is harmless.

Everything shown is read from the training plugin (``scheduler.extensions
["daskdl"]``, a :class:`daskdl.scheduler.TrainingPlugin`): its ``metrics()`` dict
and the event ``history`` of each run.  Every string put into HTML (run ids,
policy names, reasons, addresses) is escaped.  The training plugin never imports this
module.  The page updates every 500 ms and reads only the events that arrived
since its last update.

Page content, for the run chosen in the selector (several runs and recently
ended ones can be chosen; by default the newest running one is followed):

- loss against round and against wall time, per worker and global (the
  sample-weighted loss of each merge);
- per-worker clock (rounds finished) and staleness (rounds behind the fastest),
  now and over time;
- fraction of time computing vs waiting in barriers, per worker;
- samples/s of the whole run over time;
- divergence ``||theta_i - theta_global||`` of each worker at a sync (the plugin
  measures it at most once a second per run);
- bytes synced per worker (to and from the scheduler, or, sharded, to and from the
  shard owners), seconds transferring shards and merging the worker's own shard, and
  the compression ratio of its updates;
- a table with every per-worker number.
"""

from __future__ import annotations

import logging
import weakref
from html import escape

from distributed.diagnostics.plugin import SchedulerPlugin

from .protocol import DASHBOARD_EXTENSION, EXTENSION

logger = logging.getLogger("daskdl")

PLUGIN_NAME = DASHBOARD_EXTENSION
PAGE = "/daskdl"
TRAINING_PLUGIN = EXTENSION  # scheduler.extensions key of the TrainingPlugin

UPDATE_MS = 500  # default of config daskdl.dashboard.interval: how often the page redraws
_ROLLOVER = 5_000  # points kept per line on the page (older ones scroll out)
_RATE_WINDOW = 2.0  # seconds of arrivals averaged for samples/s


class DashboardPlugin(SchedulerPlugin):
    """Scheduler plugin adding the ``/daskdl`` dashboard page and ``daskdl_*`` metrics.

    Register it once per cluster (``Trainer`` does)::

        client.register_plugin(DashboardPlugin())

    It is idempotent: a second registration, with the same or another instance,
    changes nothing.  The page is added only where the scheduler has a Bokeh
    dashboard (``bokeh`` installed, dashboard not turned off); the Prometheus
    metrics only where ``prometheus_client`` is installed.
    """

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self):
        self.scheduler = None
        self.page = False
        self.metrics = False

    async def start(self, scheduler):
        """Install the page and the metrics collector on ``scheduler``."""
        self.scheduler = scheduler
        scheduler.extensions[PLUGIN_NAME] = self
        try:
            from .prometheus import register_collector

            self.metrics = register_collector(scheduler)
        except Exception:
            logger.exception("daskdl: could not register the Prometheus metrics")
        try:
            self.page = install_page(scheduler)
        except Exception:
            logger.exception("daskdl: could not add the %s dashboard page", PAGE)

    async def close(self):
        """Stop reporting this scheduler's metrics."""
        try:
            from .prometheus import unregister_scheduler

            unregister_scheduler(self.scheduler)
        except ImportError:  # no prometheus_client: nothing was registered
            return


def training_plugin(scheduler):
    """The scheduler's :class:`~daskdl.scheduler.TrainingPlugin`, or ``None`` before the
    first ``Trainer`` registered it."""
    return getattr(scheduler, "extensions", {}).get(TRAINING_PLUGIN)


def _dask_bokeh_app(scheduler):
    """The scheduler's own Bokeh server application (``None``: no dashboard)."""
    app = getattr(scheduler, "http_application", None)
    for sub in getattr(app, "applications", ()):
        if hasattr(sub, "app_paths") and "/status" in sub.app_paths:
            return sub
    return None


def install_page(scheduler) -> bool:
    """Add the ``/daskdl`` Bokeh page to a running scheduler's dashboard.

    Dask builds its pages once, when the scheduler's HTTP server starts
    (``distributed.dashboard.scheduler.connect``).  A page added later is a second
    Bokeh server application on the same HTTP application (Dask's
    ``RoutingApplication`` asks each in turn), built the way Dask builds its own,
    with Dask's page template and navigation bar (which gains a "Daskdl" entry).

    Returns whether the page is there (``False`` where the scheduler has no Bokeh
    dashboard).  Calling it again does nothing.
    """
    dask_app = _dask_bokeh_app(scheduler)
    if dask_app is None:
        return False
    http = scheduler.http_application
    for sub in http.applications:
        if PAGE in getattr(sub, "app_paths", ()):
            return True
    from distributed.dashboard.core import BokehApplication
    from distributed.dashboard.scheduler import template_variables
    from tornado.ioloop import IOLoop

    variables = template_variables(scheduler)  # memoized: the nav bar of every page
    if "daskdl" not in variables["pages"]:
        variables["pages"].append("daskdl")
    prefix = getattr(dask_app, "prefix", "") or ""
    app = BokehApplication({PAGE: training_doc}, scheduler, prefix=prefix,
                           template_variables=variables)
    http.add_application(app)
    app.initialize(IOLoop.current())
    app.start()
    return True


def training_doc(scheduler, extra, doc):
    """Build the ``/daskdl`` Bokeh document (a Dask dashboard application)."""
    from distributed.dashboard.components import add_periodic_callback
    from distributed.dashboard.components.scheduler import BOKEH_THEME, env

    page = TrainingPage(scheduler)
    page.update()
    import dask
    from dask.utils import parse_timedelta

    interval = dask.config.get("daskdl.dashboard.interval", default=f"{UPDATE_MS}ms")
    add_periodic_callback(doc, page, int(1000 * parse_timedelta(interval, default="ms")))
    doc.title = "Dask: daskdl training"
    doc.add_root(page.root)
    doc.template = env.get_template("simple.html")
    doc.template_variables.update(extra)
    doc.theme = BOKEH_THEME


def _state_of(m: dict) -> str:
    if m.get("ended"):
        return "ended"
    if m.get("aborted"):
        return "aborted"
    return "running"


def _worker_table(ranks: list) -> str:
    """The per-worker numbers as an HTML table (strings escaped)."""
    head = ("worker", "address", "clock", "staleness", "rounds", "samples", "samples/s",
            "compute s", "wait s", "transfer s", "shard merge s", "MB sent", "MB received",
            "compression", "loss", "divergence")
    rows = []
    for r, s in ranks:
        busy = s["compute_s"] + s["wait_s"]
        cells = (escape(str(r)), escape(str(s["address"])), s["clock"], s["staleness"],
                 s["rounds"],
                 s["samples"], _fmt(s["samples"] / busy if busy else None, ".0f"),
                 _fmt(s["compute_s"], ".1f"), _fmt(s["wait_s"], ".1f"),
                 _fmt(s.get("transfer_s", 0.0), ".1f"), _fmt(s.get("shard_merge_s", 0.0), ".1f"),
                 _fmt(s["bytes_in"] / 1e6, ".1f"), _fmt(s["bytes_out"] / 1e6, ".1f"),
                 _fmt(s.get("compression", 1.0), ".2f"), _fmt(s["loss"]), _fmt(s["divergence"]))
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return ('<table style="border-collapse:collapse;font-size:12px" cellpadding="4">'
            "<tr>" + "".join(f'<th style="text-align:left">{h}</th>' for h in head)
            + "</tr>" + "".join(rows) + "</table>")


def _label(run: str, m: dict) -> str:
    return f"{run} · {m['policy']} · {m['workers']} workers · {_state_of(m)}"


def _fmt(x, spec=".4g", none="-"):
    return none if x is None else format(x, spec)


class _RankLines:
    """One line (and its streaming data source) per worker rank, made on first use."""

    def __init__(self, fig, name: str, x: str, y: str, palette, step: bool = False):
        self.fig, self.name, self.x, self.y, self.palette = fig, name, x, y, palette
        self.step = step
        self.sources: dict = {}

    def source(self, rank: int):
        from bokeh.models import ColumnDataSource

        src = self.sources.get(rank)
        if src is None:
            src = self.sources[rank] = ColumnDataSource({self.x: [], self.y: []},
                                                        name=f"{self.name}-rank-{rank}")
            color = self.palette[rank % len(self.palette)]
            if self.step:
                self.fig.step(self.x, self.y, source=src, color=color, line_width=1.5,
                              mode="after", legend_label=f"worker {rank}")
            else:
                self.fig.line(self.x, self.y, source=src, color=color, line_width=1.5,
                              legend_label=f"worker {rank}")
        return src

    def stream(self, new: dict) -> None:
        for rank, cols in new.items():
            if cols[self.x]:
                self.source(rank).stream(cols, rollover=_ROLLOVER)

    def clear(self) -> None:
        for src in self.sources.values():
            src.data = {self.x: [], self.y: []}


class TrainingPage:
    """The Bokeh component behind ``/daskdl``: ``root`` (the layout) and ``update()``.

    ``update()`` reads the training plugin's ``metrics()`` and the events added to
    the chosen run's history since the last call; runs may appear and disappear
    between calls, and the training plugin may not be registered yet.
    """

    def __init__(self, scheduler, width: int = 560, height: int = 250):
        from bokeh.layouts import column, row
        from bokeh.models import (
            ColumnDataSource,
            Div,
            FactorRange,
            HoverTool,
            Legend,
            Select,
        )
        from bokeh.palettes import Category10
        from bokeh.plotting import figure

        self.scheduler = scheduler
        palette = Category10[10]
        self.palette = palette
        kw = {"width": width, "height": height, "toolbar_location": "above",
              "tools": "pan,wheel_zoom,box_zoom,reset,save"}

        self.select = Select(title="Training run", options=[], value="", width=420,
                             name="daskdl-run-select")
        self.select.on_change("value", self._on_select)
        # fixed sizes: new text never changes the layout (which would redraw every plot)
        self.summary = Div(text="", width=700, height=56, name="daskdl-summary",
                           styles={"overflow": "hidden"})

        def fig(title, x_label, y_label, **extra):
            f = figure(title=title, **kw, **extra)
            f.xaxis.axis_label, f.yaxis.axis_label = x_label, y_label
            return f

        self.loss_round = fig("Loss per round", "round", "loss")
        self.loss_time = fig("Loss over time", "seconds since the run started", "loss")
        self.staleness_time = fig("Staleness over time (rounds behind the fastest worker)",
                                  "seconds since the run started", "rounds")
        self.rate = fig("Samples/s (all workers)", "seconds since the run started",
                        "samples/s")
        self.divergence = fig("Divergence from the global parameters at a sync",
                              "round", "||θᵢ − θ||")

        self.global_loss_round = ColumnDataSource({"clock": [], "loss": []},
                                                  name="global-loss-round")
        self.global_loss_time = ColumnDataSource({"t": [], "loss": []},
                                                 name="global-loss-time")
        self.rate_source = ColumnDataSource({"t": [], "rate": []}, name="samples-per-s")
        for f, src, x in ((self.loss_round, self.global_loss_round, "clock"),
                          (self.loss_time, self.global_loss_time, "t")):
            f.line(x, "loss", source=src, color="black", line_width=2.5, legend_label="global")
        self.rate.line("t", "rate", source=self.rate_source, color=palette[0], line_width=2)
        self.rank_loss_round = _RankLines(self.loss_round, "loss-round", "clock", "loss",
                                          palette)
        self.rank_loss_time = _RankLines(self.loss_time, "loss-time", "t", "loss", palette)
        self.rank_staleness = _RankLines(self.staleness_time, "staleness", "t", "staleness",
                                         palette, step=True)
        self.rank_divergence = _RankLines(self.divergence, "divergence", "clock",
                                          "divergence", palette)
        for f in (self.loss_round, self.loss_time, self.staleness_time, self.divergence):
            if not f.legend:  # lines (with legend entries) come as workers report
                f.add_layout(Legend(), "center")
            f.legend.location = "top_right"
            f.legend.click_policy = "hide"
            f.add_tools(HoverTool(tooltips=[("x", "$x{0.00}"), ("y", "$y{0.0000}")]))

        # per-worker bars, replaced (a few rows) when they change
        self.workers = ColumnDataSource(
            {"worker": [], "clock": [], "staleness": [], "compute": [], "wait": [],
             "mb_in": [], "mb_out": [], "color": []}, name="workers")
        self.clock_bars = figure(title="Rounds finished per worker (clock)",
                                 x_range=FactorRange(), width=width, height=height,
                                 tools="save", toolbar_location=None)
        self.clock_bars.vbar(x="worker", top="clock", width=0.7, source=self.workers,
                             color="color")
        self.clock_bars.add_tools(HoverTool(tooltips=[("worker", "@worker"),
                                                      ("clock", "@clock"),
                                                      ("staleness", "@staleness")]))
        self.clock_bars.yaxis.axis_label = "rounds"
        self.time_bars = figure(title="Time computing vs waiting", y_range=FactorRange(),
                                width=width, height=height, x_range=(0, 1), tools="save",
                                toolbar_location=None)
        self.time_bars.hbar_stack(["compute", "wait"], y="worker", height=0.7,
                                  source=self.workers, color=[palette[2], palette[3]],
                                  legend_label=["computing", "waiting"])
        self.time_bars.xaxis.axis_label = "fraction of the worker's time"
        self.time_bars.add_tools(HoverTool(tooltips=[("worker", "@worker"),
                                                     ("computing", "@compute{0.0%}"),
                                                     ("waiting", "@wait{0.0%}")]))
        self.bytes_bars = figure(title="Bytes synced per worker", x_range=FactorRange(),
                                 width=width, height=height, tools="save",
                                 toolbar_location=None)
        self.bytes_bars.vbar_stack(["mb_in", "mb_out"], x="worker", width=0.7,
                                   source=self.workers, color=[palette[0], palette[1]],
                                   legend_label=["to the scheduler", "from the scheduler"])
        self.bytes_bars.yaxis.axis_label = "MB"
        self.bytes_bars.legend.location = "top_left"
        self.bytes_bars.add_tools(HoverTool(tooltips=[("worker", "@worker"),
                                                      ("MB sent", "@mb_in{0.0}"),
                                                      ("MB received", "@mb_out{0.0}")]))

        # per-worker numbers: an HTML table (a few rows), replaced when they change
        self.table = Div(text="", name="daskdl-worker-table", width=2 * width,
                         height=40 + 24 * 8, styles={"overflow": "auto"})

        self.root = column(
            row(self.select, self.summary),
            row(self.loss_round, self.loss_time),
            row(self.clock_bars, self.staleness_time),
            row(self.time_bars, self.rate),
            row(self.divergence, self.bytes_bars),
            self.table,
        )
        self.run: str | None = None  # run shown
        self.pinned: str | None = None  # run chosen by the user (else: follow the newest)
        self._setting = False
        self._reset(None)

    # -- run selection -------------------------------------------------------------------
    def _on_select(self, attr, old, new):
        if self._setting:
            return
        self.pinned = new or None
        self.update()

    def _choose(self, metrics: dict) -> str | None:
        if self.pinned in metrics:
            return self.pinned
        self.pinned = None
        if not metrics:
            return None
        running = [r for r, m in metrics.items() if _state_of(m) == "running"]
        pool = running or list(metrics)
        return max(pool, key=lambda r: metrics[r]["started"] or 0)

    def _set_select(self, metrics: dict, run: str | None) -> None:
        order = sorted(metrics, key=lambda r: metrics[r]["started"] or 0, reverse=True)
        options = [(r, _label(r, metrics[r])) for r in order]
        self._setting = True
        try:
            if options != self.select.options:
                self.select.options = options
            if (run or "") != self.select.value:
                self.select.value = run or ""
        finally:
            self._setting = False

    # -- data -----------------------------------------------------------------------------
    def _reset(self, state) -> None:
        """Forget what was shown: a new run (or a restarted one) starts from scratch."""
        self._state = weakref.ref(state) if state is not None else (lambda: None)
        self._last_event = None
        self._t0 = getattr(state, "started", 0.0)
        self._clocks: dict = {}
        self._stale: dict = {}  # rank -> staleness last plotted
        self._arrivals: list = []  # (time, samples) in the last _RATE_WINDOW seconds
        self._workers_data = None
        for src in (self.global_loss_round, self.global_loss_time, self.rate_source):
            src.data = {k: [] for k in src.data}
        for lines in (self.rank_loss_round, self.rank_loss_time, self.rank_staleness,
                      self.rank_divergence):
            lines.clear()
        self.workers.data = {k: [] for k in self.workers.data}
        self.table.text = ""
        for f in (self.clock_bars, self.bytes_bars):
            f.x_range.factors = []
        self.time_bars.y_range.factors = []

    def _new_events(self, state) -> list:
        """Events appended to ``state.history`` since the last call, oldest first."""
        history = state.history
        new = []
        last = self._last_event
        for ev in reversed(history):
            if ev is last:
                break
            new.append(ev)
        if new:
            self._last_event = new[0]
        new.reverse()
        return new

    def update(self) -> None:
        """Read the training plugin and bring the page up to date (incrementally)."""
        try:
            self._update()
        except Exception:  # a broken page must never break the scheduler's loop
            logger.exception("daskdl: updating the dashboard page failed")

    def _update(self) -> None:
        plugin = training_plugin(self.scheduler)
        if plugin is None:
            self._set_select({}, None)
            self.summary.text = ("<p>No daskdl training on this cluster yet: start one with "
                                 "<code>daskdl.Trainer(...).fit(...)</code>.</p>")
            return
        metrics = plugin.metrics()
        run = self._choose(metrics)
        self._set_select(metrics, run)
        if run is None:
            self.summary.text = ("<p>No training run yet: <code>trainer.fit(...)</code> "
                                 "starts one; this page follows it live.</p>")
            if self.run is not None:
                self.run = None
                self._reset(None)
            return
        state = plugin.runs.get(run) or plugin.finished.get(run)
        if state is None:  # ended between metrics() and now
            return
        if run != self.run or state is not self._state():
            self.run = run
            self._reset(state)
        m = metrics[run]
        for rank in sorted(m["ranks"]):  # one line per worker, legends in rank order
            for lines in (self.rank_loss_round, self.rank_loss_time, self.rank_staleness,
                          self.rank_divergence):
                lines.source(rank)
        self._consume(self._new_events(state))
        self._update_workers(m)
        self._update_summary(m)

    def _consume(self, events: list) -> None:
        t0 = self._t0
        loss_round, loss_time, staleness, divergence = {}, {}, {}, {}
        g_round = {"clock": [], "loss": []}
        g_time = {"t": [], "loss": []}
        rate = {"t": [], "rate": []}

        def add(d, rank, x_name, x, y_name, y):
            cols = d.setdefault(rank, {x_name: [], y_name: []})
            cols[x_name].append(x)
            cols[y_name].append(y)

        for ev in events:
            kind = ev.get("kind")
            t = ev.get("time", t0) - t0
            if kind == "arrive":
                rank = ev["rank"]
                if ev.get("loss") is not None:
                    add(loss_round, rank, "clock", ev["clock"], "loss", ev["loss"])
                    add(loss_time, rank, "t", t, "loss", ev["loss"])
                self._clocks[rank] = ev["clock"] + 1
                top = max(self._clocks.values())
                for r, c in self._clocks.items():  # a step plot: points where it changes
                    if self._stale.get(r) != top - c:
                        self._stale[r] = top - c
                        add(staleness, r, "t", t, "staleness", top - c)
                arrivals = self._arrivals
                arrivals.append((t, ev.get("samples", 0)))
                while len(arrivals) > 2 and arrivals[0][0] < t - _RATE_WINDOW:
                    arrivals.pop(0)
            elif kind == "merge":
                if ev.get("loss") is not None:
                    g_round["clock"].append(ev["clock"])
                    g_round["loss"].append(ev["loss"])
                    g_time["t"].append(t)
                    g_time["loss"].append(ev["loss"])
                for rank, d in (ev.get("divergence") or {}).items():
                    add(divergence, rank, "clock", ev["clock"], "divergence", d)
            elif kind == "lost":  # a worker left: no longer behind anyone
                self._clocks.pop(ev.get("rank"), None)
                self._stale.pop(ev.get("rank"), None)
            elif kind == "regroup":  # a new set of workers goes on from ``clock``
                members = [int(r) for r in (ev.get("members") or {})]
                self._clocks = {r: int(ev.get("clock", 0)) for r in members}
                self._stale = {r: v for r, v in self._stale.items() if r in self._clocks}
        if events:
            t = events[-1].get("time", t0) - t0
            for r, v in self._stale.items():  # the step plot reaches the last event
                cols = staleness.get(r)
                if not cols or cols["t"][-1] < t:
                    add(staleness, r, "t", t, "staleness", v)
            arrivals = self._arrivals  # one samples/s point per update
            if len(arrivals) >= 2 and arrivals[-1][0] > arrivals[0][0]:
                rate["t"].append(arrivals[-1][0])
                rate["rate"].append(sum(n for _, n in arrivals[1:])
                                    / (arrivals[-1][0] - arrivals[0][0]))
        self.rank_loss_round.stream(loss_round)
        self.rank_loss_time.stream(loss_time)
        self.rank_staleness.stream(staleness)
        self.rank_divergence.stream(divergence)
        for src, new in ((self.global_loss_round, g_round), (self.global_loss_time, g_time),
                         (self.rate_source, rate)):
            if next(iter(new.values())):
                src.stream(new, rollover=_ROLLOVER)

    def _update_workers(self, m: dict) -> None:
        ranks = sorted(m["ranks"].items())
        names = [f"worker {r}" for r, _ in ranks]
        data = {"worker": names, "clock": [], "staleness": [], "compute": [], "wait": [],
                "mb_in": [], "mb_out": [], "color": []}
        for r, s in ranks:
            busy = s["compute_s"] + s["wait_s"]
            data["clock"].append(s["clock"])
            data["staleness"].append(s["staleness"])
            data["compute"].append(s["compute_s"] / busy if busy else 0.0)
            data["wait"].append(s["wait_s"] / busy if busy else 0.0)
            data["mb_in"].append(s["bytes_in"] / 1e6)
            data["mb_out"].append(s["bytes_out"] / 1e6)
            data["color"].append(self.palette[r % len(self.palette)])
        if data == self._workers_data:
            return
        self._workers_data = data
        if list(self.clock_bars.x_range.factors) != names:
            self.clock_bars.x_range.factors = names
            self.bytes_bars.x_range.factors = names
            self.time_bars.y_range.factors = names
        self.workers.data = data
        self.table.text = _worker_table(ranks)

    def _update_summary(self, m: dict) -> None:
        state = _state_of(m)
        extra = ""
        if state == "aborted":
            extra = f"<br><b>aborted:</b> {escape(str(m['aborted']))}"
        self.summary.text = (
            f"<p><b>run</b> {escape(str(m['run']))} · <b>{escape(str(m['policy']))}</b>"
            f"(every={escape(str(m['every']))}) · "
            f"<b>{state}</b> · {m['workers']} workers · version {m['version']} · "
            f"{m['samples']} samples · {_fmt(m['samples_per_s'], '.0f')} samples/s · "
            f"loss {_fmt(m['loss'])} · rejected updates {m['rejected']} · "
            f"merge time {_fmt(m['merge_seconds'], '.2f')} s{extra}</p>")
