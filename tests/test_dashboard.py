"""The /daskdl dashboard page and the daskdl_* Prometheus metrics.

Three levels: the page component driven by a stand-in training plugin (no Dask),
the page and /metrics served by a real scheduler (gen_cluster, then a process
cluster after a real run), and the page in a real browser (headless Chromium via
selenium) during a training run.
"""

import asyncio
import collections
import os
import shutil
import threading
import urllib.request
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from distributed.utils_test import gen_cluster

import daskdl as ddl
from daskdl.dashboard import PAGE, DashboardPlugin, TrainingPage
from daskdl.scheduler import TrainingPlugin, get_plugin
from daskdl.prometheus import register_collector
from daskdl.protocol import SyncRequest

from .conftest import init_mlp, loss_fn

ROOT = Path(__file__).resolve().parents[1]


# -- the page component, fed by a stand-in training plugin --------------------------------
class FakeRun:
    def __init__(self, run, started, policy="BSP", ranks=2):
        self.run, self.started, self.policy = run, started, policy
        self.ended = None
        self.history = collections.deque(maxlen=50)
        self.ranks = ranks

    def metrics(self):
        ranks = {r: {"address": f"tcp://w{r}", "clock": 3, "staleness": 0, "active": True,
                     "rounds": 3, "samples": 30, "compute_s": 1.5, "wait_s": 0.5,
                     "bytes_in": 1000, "bytes_out": 1000, "loss": 0.5, "divergence": 0.1}
                 for r in range(self.ranks)}
        return {"run": self.run, "policy": self.policy, "every": 4, "active": not self.ended,
                "aborted": "the run ended" if self.ended else None, "started": self.started,
                "ended": self.ended, "workers": self.ranks, "version": 3, "samples": 60,
                "samples_per_s": 12.0, "loss": 0.5, "rejected": 0, "merge_seconds": 0.01,
                "ranks": ranks}

    def round(self, clock):
        t = self.started + 1 + clock
        for r in range(self.ranks):
            self.history.append({"kind": "arrive", "rank": r, "clock": clock, "time": t,
                                 "loss": 1.0 / (clock + 1), "samples": 10, "compute": 0.1,
                                 "version": clock, "bytes": 100})
        self.history.append({"kind": "merge", "clock": clock, "version": clock + 1,
                             "time": t, "ranks": list(range(self.ranks)), "samples": 20,
                             "loss": 1.0 / (clock + 1),
                             "divergence": {r: 0.1 * r for r in range(self.ranks)}})
        for r in range(self.ranks):
            self.history.append({"kind": "release", "rank": r, "clock": clock + 1,
                                 "slowest": clock + 1, "time": t})


class FakePlugin:
    def __init__(self):
        self.runs, self.finished = {}, {}

    def metrics(self):
        out = {r: st.metrics() for r, st in self.finished.items()}
        out.update({r: st.metrics() for r, st in self.runs.items()})
        return out


class FakeScheduler:
    def __init__(self):
        self.extensions = {}


def points(page, name):
    srcs = {"global-loss-round": page.global_loss_round, "samples-per-s": page.rate_source}
    if name in srcs:
        return len(srcs[name].data[next(iter(srcs[name].data))])
    kind, rank = name.rsplit("-rank-", 1)
    lines = {"loss-round": page.rank_loss_round, "staleness": page.rank_staleness,
             "divergence": page.rank_divergence}[kind]
    src = lines.sources.get(int(rank))
    return 0 if src is None else len(src.data[lines.x])


def test_page_follows_runs_as_they_come_end_and_go():
    s = FakeScheduler()
    page = TrainingPage(s)
    page.update()  # no training plugin yet
    assert "No daskdl training" in page.summary.text and page.select.options == []

    plugin = s.extensions["daskdl"] = FakePlugin()
    page.update()  # a plugin without runs
    assert "No training run yet" in page.summary.text

    a = plugin.runs["a"] = FakeRun("a", 100.0)
    for clock in range(3):
        a.round(clock)
    page.update()
    assert page.select.value == "a"
    assert points(page, "loss-round-rank-0") == 3 and points(page, "global-loss-round") == 3
    assert points(page, "divergence-rank-1") == 3 and points(page, "staleness-rank-0") > 0
    assert points(page, "samples-per-s") == 1  # one point per update
    page.update()  # nothing new: nothing added
    assert points(page, "loss-round-rank-0") == 3
    a.round(3)
    page.update()  # only the new round's events
    assert points(page, "loss-round-rank-0") == 4 and points(page, "global-loss-round") == 4
    for clock in range(4, 30):  # the history (50 events: 10 rounds) rolls over: the page
        a.round(clock)          # gets the 10 rounds still there, none twice
    page.update()
    assert points(page, "loss-round-rank-0") == 4 + 10
    assert "tcp://w0" in page.table.text and "tcp://w1" in page.table.text

    # a second, newer run is followed; the first stays selectable after it ended
    b = plugin.runs["b"] = FakeRun("b", 200.0, policy="SSP(s=2)", ranks=3)
    b.round(0)
    a.ended = 300.0
    plugin.finished["a"] = plugin.runs.pop("a")
    page.update()
    assert [v for v, _ in page.select.options] == ["b", "a"]
    assert "ended" in dict(page.select.options)["a"]
    assert page.select.value == "b" and points(page, "loss-round-rank-2") == 1
    assert points(page, "loss-round-rank-0") == 1  # the first run's lines were cleared

    page.select.value = "a"  # the user picks the ended run: its kept history is shown
    assert page.pinned == "a" and points(page, "loss-round-rank-0") == 10
    b.round(1)
    page.update()
    assert page.select.value == "a" and points(page, "loss-round-rank-0") == 10

    del plugin.finished["a"]  # dropped by the plugin: back to following the newest
    page.update()
    assert page.select.value == "b" and page.pinned is None
    assert points(page, "loss-round-rank-0") == 2
    plugin.runs.clear()
    page.update()
    assert page.select.options == [] and points(page, "loss-round-rank-0") == 0


def test_page_handles_workers_lost_and_regrouped():
    s = FakeScheduler()
    plugin = s.extensions["daskdl"] = FakePlugin()
    run = plugin.runs["a"] = FakeRun("a", 100.0)
    page = TrainingPage(s)
    run.round(0)
    run.history.append({"kind": "arrive", "rank": 0, "clock": 1, "time": 102.0, "loss": 0.5,
                        "samples": 10, "compute": 0.1, "version": 1, "bytes": 100})
    page.update()
    assert page._stale == {0: 0, 1: 1}  # rank 1 is one round behind
    run.history.append({"kind": "lost", "rank": 1, "worker": "tcp://w1", "time": 103.0,
                        "reason": "it left"})
    run.history.append({"kind": "arrive", "rank": 0, "clock": 2, "time": 104.0, "loss": 0.4,
                        "samples": 10, "compute": 0.1, "version": 2, "bytes": 100})
    page.update()
    assert page._stale == {0: 0}  # the lost worker is behind no one
    run.history.append({"kind": "regroup", "generation": 1, "clock": 3,
                        "members": {0: "tcp://w0", 2: "tcp://w2"}, "time": 105.0})
    run.history.append({"kind": "arrive", "rank": 2, "clock": 3, "time": 106.0, "loss": 0.3,
                        "samples": 10, "compute": 0.1, "version": 3, "bytes": 100})
    page.update()
    assert page._stale == {0: 1, 2: 0} and points(page, "loss-round-rank-2") == 1


def test_prometheus_collector_registers_once_and_reports_every_number():
    import prometheus_client

    s1, s2 = FakeScheduler(), FakeScheduler()
    assert register_collector(s1) and register_collector(s2) and register_collector(s1)
    plugin = s2.extensions["daskdl"] = FakePlugin()
    plugin.runs["zz9"] = FakeRun("zz9", 1.0)
    text = prometheus_client.generate_latest().decode()
    lines = [x for x in text.splitlines() if 'run="zz9"' in x]
    assert 'daskdl_run_samples_total{policy="BSP",run="zz9"} 60.0' in lines
    assert 'daskdl_run_samples_per_second{policy="BSP",run="zz9"} 12.0' in lines
    for name in ("run_active", "run_version", "run_loss", "run_rejected_updates_total",
                 "worker_clock", "worker_staleness", "worker_compute_seconds_total",
                 "worker_wait_seconds_total", "worker_sent_bytes_total",
                 "worker_received_bytes_total", "worker_divergence", "worker_loss"):
        assert any(x.startswith(f"daskdl_{name}{{") for x in lines), name
    assert ('daskdl_worker_wait_seconds_total{policy="BSP",rank="1",run="zz9",'
            'worker="tcp://w1"} 0.5') in lines


def test_prometheus_skips_values_that_are_not_finite_numbers_and_the_page_escapes_html():
    import prometheus_client

    s = FakeScheduler()
    register_collector(s)
    plugin = s.extensions["daskdl"] = FakePlugin()
    run = plugin.runs["<b>x</b>"] = FakeRun("<b>x</b>", 1.0, policy="P<i>")
    good = run.metrics
    run.metrics = lambda: dict(good(), loss=float("nan"), version="abc", samples=float("inf"))
    text = prometheus_client.generate_latest().decode()
    mine = [x for x in text.splitlines() if "<b>x</b>" in x]
    assert any(x.startswith("daskdl_run_workers{") for x in mine)  # the rest is there
    assert not any(x.startswith(("daskdl_run_loss{", "daskdl_run_version{",
                                 "daskdl_run_samples_total{")) for x in mine)
    page = TrainingPage(s)
    run.round(0)
    page.update()
    assert "<b>x</b>" not in page.summary.text and "&lt;b&gt;x&lt;/b&gt;" in page.summary.text
    assert "P&lt;i&gt;" in page.summary.text
    s.extensions.clear()


# -- served by a real scheduler -------------------------------------------------------------
def leaves(v):
    return [np.full((2, 3), v, np.float32), np.full(4, v, np.float32)]


# no worker processes here: the check for leaked processes would only catch other tests'
@gen_cluster(client=True, nthreads=[], scheduler_kwargs={"dashboard": True},
             clean_kwargs={"processes": False})
async def test_page_and_metrics_on_the_scheduler_http_server(c, s):
    from tornado.httpclient import AsyncHTTPClient

    await c.register_plugin(DashboardPlugin())  # before any training plugin: no error
    await c.register_plugin(DashboardPlugin())  # idempotent
    assert sum(PAGE in getattr(a, "app_paths", ()) for a in s.http_application.applications) == 1
    http = AsyncHTTPClient()
    base = f"http://localhost:{s.http_server.port}"
    page = await http.fetch(base + PAGE)
    assert page.code == 200 and b"Bokeh" in page.body and b"daskdl" in page.body

    await c.register_plugin(TrainingPlugin())
    plugin = get_plugin(s)
    plugin.start_run(run="r1", secret="k", params=leaves(0.0), policy=ddl.BSP(every=1),
                     members={"0": "w0", "1": "w1"}, timeout=5.0)
    await asyncio.gather(*(plugin.sync(**SyncRequest(
        run="r1", rank=r, clock=0, gen=0, samples=n, version=0, params=leaves(v),
        loss=lo).to_msg("k")) for r, n, v, lo in ((0, 30, 1.0, 2.0), (1, 10, 3.0, 1.0))))
    await plugin.end_run(run="r1", secret="k")
    metrics = (await http.fetch(base + "/metrics")).body.decode()
    got = {x.rsplit(" ", 1)[0]: float(x.rsplit(" ", 1)[1]) for x in metrics.splitlines()
           if x.startswith("daskdl_") and 'run="r1"' in x}
    assert got['daskdl_run_samples_total{policy="BSP",run="r1"}'] == 40
    assert got['daskdl_run_version{policy="BSP",run="r1"}'] == 1
    assert got['daskdl_run_active{policy="BSP",run="r1"}'] == 0
    assert got['daskdl_run_loss{policy="BSP",run="r1"}'] == pytest.approx(1.75)  # weighted
    assert got['daskdl_worker_clock{policy="BSP",rank="1",run="r1",worker="w1"}'] == 1
    assert got['daskdl_worker_sent_bytes_total{policy="BSP",rank="0",run="r1",worker="w0"}'] \
        == sum(x.nbytes for x in leaves(0.0))
    # the page still shows the ended run
    page = TrainingPage(s)
    page.update()
    assert page.select.value == "r1" and "ended" in page.select.options[0][1]
    assert len(page.global_loss_round.data["loss"]) == 1


def _task_prefixes(dask_scheduler=None):
    return sorted(dask_scheduler.task_prefixes)


def test_trainer_installs_page_and_metrics(client2, digits):
    x, y = digits
    ds = ddl.Dataset.from_arrays(x=x[:512], y=y[:512], chunk_size=128)
    with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(1e-2),
                     policy=ddl.SSP(every=2, staleness=1), batch_size=32,
                     client=client2) as tr:
        tr.fit(ds, epochs=1, verbose=False)
        base = client2.dashboard_link.rsplit("/", 1)[0]
        with urllib.request.urlopen(base + PAGE) as r:
            assert r.status == 200 and b"Bokeh" in r.read()
        with urllib.request.urlopen(base + "/metrics") as r:
            text = r.read().decode()
        m = tr.info()["metrics"]
        mine = [x for x in text.splitlines() if f'run="{tr.run}"' in x]
        assert f'daskdl_run_samples_total{{policy="SSP(s=1)",run="{tr.run}"}} ' \
               f'{float(m["samples"])}' in mine
        assert m["samples"] == sum(h["samples"] for h in tr.history)
        # the task stream groups tasks by key_split: the rounds show as "daskdl-round"
        # (a run id of letters only, 1 in 20,000, would show as "daskdl-round-<run>")
        prefixes = client2.run_on_scheduler(_task_prefixes)
        assert "daskdl-round" in prefixes or tr.run.isalpha()
        for rank, st in m["ranks"].items():
            assert (f'daskdl_worker_clock{{policy="SSP(s=1)",rank="{rank}",run="{tr.run}",'
                    f'worker="{st["address"]}"}} {float(st["clock"])}') in mine


# -- in a real browser --------------------------------------------------------------------------
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

# the page's Bokeh document: points in each named data source, and the run selector
DOC_STATE = """
const doc = window.Bokeh && Bokeh.documents[0];
if (!doc) return null;
const sources = {};
for (const m of doc.all_models) {
  if (m.type === "ColumnDataSource" && m.name) sources[m.name] = m.get_length() || 0;
}
const titles = [];
for (const m of doc.all_models) if (m.type === "Title" && m.text) titles.push(m.text);
const select = doc.get_model_by_name("daskdl-run-select");
return {sources: sources, titles: titles, options: select ? select.options : [],
        value: select && select.value};
"""


def chrome():
    """Headless Debian Chromium driven by its chromedriver (skip the test without them)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.skip(f"{' and '.join(missing)} missing: apt-get install chromium "
                    "chromium-driver (.ci/run installs them when run as root)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1400", "--hide-scrollbars"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def _metrics_of(run, dask_scheduler=None):
    plugin = get_plugin(dask_scheduler)
    return plugin and plugin.metrics().get(run)


def test_page_in_a_real_browser_during_training(client2, digits, tmp_path):
    import dask
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chrome()
    x, y = digits
    ds = ddl.Dataset.from_arrays(x=x, y=y)
    # worker 1 twice as slow, under SSP: the staleness plot has something to show
    with dask.config.set({"daskdl.testing.slowdown": {1: 2.0}}):
        tr = ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(3e-3),
                         policy=ddl.SSP(every=4, staleness=2), batch_size=32, client=client2)
    done = threading.Event()
    errors = []

    def fit():
        try:
            tr.fit(ds, epochs=30, verbose=False)
        except Exception as e:  # noqa: BLE001  (reported by the test below)
            errors.append(e)
        finally:
            done.set()

    thread = threading.Thread(target=fit, daemon=True)
    try:
        thread.start()
        driver.get(client2.dashboard_link.rsplit("/", 1)[0] + PAGE)
        plots = ("loss-round-rank-0", "loss-round-rank-1", "loss-time-rank-0",
                 "global-loss-round", "staleness-rank-1", "samples-per-s", "workers")
        # divergence is measured at most once a second, on whichever rank's update
        # comes then (per-arrival merges under SSP): some rank has points
        divergence = ("divergence-rank-0", "divergence-rank-1")

        last = {}

        def has_data(d):
            state = last["state"] = d.execute_script(DOC_STATE)
            if state and all(state["sources"].get(p, 0) > 0 for p in plots) and any(
                    state["sources"].get(p, 0) > 0 for p in divergence):
                return state
            return False

        try:
            state = WebDriverWait(driver, 240, poll_frequency=0.5).until(has_data)
        except TimeoutException:
            pytest.fail(f"the page's plots got no data in 240 s; the page: {last}, "
                        f"training done: {done.is_set()}, errors: {errors}, "
                        f"plugin: {client2.run_on_scheduler(_metrics_of, tr.run)}")
        if not done.is_set():  # mid-training: let a few more rounds arrive for the picture
            done.wait(3)
        state = driver.execute_script(DOC_STATE)
        shot = os.environ.get("DASKDL_DASHBOARD_SCREENSHOT") or str(tmp_path / "daskdl.png")
        assert driver.save_screenshot(shot) and Path(shot).stat().st_size > 10_000
        assert tr.run in [value for value, _ in state["options"]]
        assert state["value"] == tr.run
        assert all(state["sources"][p] > 0 for p in plots)
        assert {"Loss per round", "Loss over time", "Time computing vs waiting",
                "Samples/s (all workers)", "Bytes synced per worker"} <= set(state["titles"])
        text = driver.find_element("tag name", "body").text  # HTML parts (plots: canvas)
        assert "Training run" in text and "Daskdl" in text  # the selector, Dask's nav bar
        assert "SSP(s=2)" in text and "tcp://" in text  # the per-worker table
    finally:
        driver.quit()
        done.wait(300)
        tr.close()
    assert not errors, errors
