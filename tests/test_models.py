"""Models people bring: model state (BatchNorm), random keys (dropout), Equinox
modules, Flax NNX, global step counts, and the errors before anything runs."""

import cloudpickle
import dask
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import daskdl as ddl
from daskdl.model import ModelError, Template
from daskdl.plan import make_plan
from daskdl.policies import Contribution, state_mean
from daskdl.protocol import RoundSpec
from daskdl.replica import gather_batches, replica_name
from daskdl.step import init_state, make_train_steps, step_counts, step_key


# -- a small Flax CNN with BatchNorm and Dropout -------------------------------------------
class BNNet(nn.Module):
    rate: float = 0.1

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(32)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        x = nn.Dropout(self.rate, deterministic=not train)(x)
        return nn.Dense(10)(x)


BN = BNNet()


def bn_variables():
    return BN.init(jax.random.PRNGKey(0), jnp.zeros((2, 64)), train=False)


def bn_loss(params, state, batch, key):
    logits, upd = BN.apply({"params": params, "batch_stats": state}, batch["x"], train=True,
                           rngs={"dropout": key}, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return loss, upd["batch_stats"]


def bn_accuracy(params, state, batch):
    logits = BN.apply({"params": params, "batch_stats": state}, batch["x"], train=False)
    return {"accuracy": (logits.argmax(-1) == batch["y"]).mean()}


# -- an Equinox MLP ------------------------------------------------------------------------
class EqxMLP(eqx.Module):
    layers: list
    activation: callable = eqx.field(static=True)

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.layers = [eqx.nn.Linear(64, 32, key=k1), eqx.nn.Linear(32, 10, key=k2)]
        self.activation = jax.nn.relu

    def __call__(self, x):
        return self.layers[1](self.activation(self.layers[0](x)))


def eqx_loss(model, batch):
    logits = jax.vmap(model)(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def eqx_accuracy(model, batch):
    return {"accuracy": (jax.vmap(model)(batch["x"]).argmax(-1) == batch["y"]).mean()}


def mse(params, batch):
    return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)


def _ds(digits, n=400):
    x, y = digits
    return ddl.Dataset.from_arrays(x=x[:n], y=y[:n], chunk_size=100)


# -- pure ----------------------------------------------------------------------------------
def test_state_mean_is_sample_weighted_with_integers_from_the_lowest_rank():
    c = [Contribution(1, [], 30, 0, state=[np.array([5.0, 1.0], np.float32), np.array(9)]),
         Contribution(0, [], 10, 0, state=[np.array([1.0, 1.0], np.float32), np.array(2)])]
    mean, count = state_mean(c)
    np.testing.assert_allclose(mean, [4.0, 1.0])
    assert mean.dtype == np.float32 and int(count) == 2
    assert state_mean([Contribution(0, [], 1, 0)]) is None


def test_keys_differ_across_ranks_and_steps_and_repeat():
    keys = {(r, c, i): jax.random.key_data(step_key(3, r, c, i)).tobytes()
            for r in range(2) for c in range(2) for i in range(3)}
    assert len(set(keys.values())) == len(keys)
    again = jax.random.key_data(step_key(3, 1, 1, 2)).tobytes()
    assert again == keys[(1, 1, 2)]


def test_equinox_template_in_and_out_and_pickled():
    model = EqxMLP(jax.random.PRNGKey(0))
    tpl, leaves = Template.of(model)
    assert len(leaves) == 4  # two weights, two biases; the activation is static
    back = cloudpickle.loads(cloudpickle.dumps(tpl)).build(leaves)
    assert type(back) is EqxMLP and float(back.activation(jnp.float32(-1.0))) == 0.0
    x = jnp.ones(64)
    np.testing.assert_allclose(back(x), model(x))
    trainable = tpl.trainable(leaves)
    assert jax.tree_util.tree_structure(trainable) == jax.tree_util.tree_structure(
        eqx.filter(model, eqx.is_inexact_array))


def test_steps_with_state_carry_it_and_count_from_a_global_step():
    opt = optax.adam(optax.linear_schedule(1.0, 0.0, 100))
    variables = bn_variables()
    steps = make_train_steps(bn_loss, opt, model=Template.of(variables["params"])[0],
                             has_state=True, wants_key=True)
    st = init_state(variables["params"], opt, variables["batch_stats"], step=40)
    batches = {"x": np.random.rand(3, 8, 64).astype(np.float32),
               "y": np.zeros((3, 8), np.int32)}
    new, (losses, _) = steps(st, batches, np.array([0, 0], np.int32))
    assert losses.shape == (3,) and step_counts(new.opt_state) == [43, 43]
    before = jax.tree_util.tree_leaves(st.state)
    assert any(not np.allclose(a, b) for a, b in zip(before,
                                                     jax.tree_util.tree_leaves(new.state)))


# -- errors before anything runs -----------------------------------------------------------
def test_integer_leaf_in_params_names_it_and_says_where_it_belongs():
    with pytest.raises(ModelError, match=r"\['step'\].*int32.*state="):
        ddl.Trainer(mse, {"w": np.zeros((2, 1), np.float32), "step": np.int32(0)},
                    optax.sgd(0.1), client=object())


def test_equinox_class_defined_in_main_is_refused_with_the_fix():
    Main = type("MainNet", (eqx.Module,), {"__annotations__": {"w": jax.Array},
                                          "__module__": "__main__"})
    with pytest.raises(ModelError, match="module file.*from model import"):
        ddl.Trainer(lambda m, b: jnp.sum(m.w), Main(w=jnp.ones(3)), optax.sgd(0.1),
                    client=object())


def _fit_error(client, loss, params, digits, **kw):
    with ddl.Trainer(loss, params, optax.sgd(0.1), batch_size=16, client=client, **kw) as tr:
        tr.fit(_ds(digits, 200), epochs=1, verbose=False)


def test_errors_before_anything_runs(client1, digits):
    variables = bn_variables()
    p, s = variables["params"], variables["batch_stats"]

    def logits_too(params, state, batch, key):
        loss, new = bn_loss(params, state, batch, key)
        return loss, (new, jnp.zeros(3))  # (logits, updates): not a state

    def not_a_dict(params, batch):
        return mse_like(params, batch), jnp.zeros(3)

    def shape_changes(params, state, batch, key):
        loss, new = bn_loss(params, state, batch, key)
        return loss, jax.tree_util.tree_map(lambda v: v[:3], new)

    def mse_like(params, batch):
        return eqx_loss(EqxMLP(jax.random.PRNGKey(0)), batch) + 0 * jnp.sum(params["w"])

    with pytest.raises(ModelError, match="second value must be a dict of metrics"):
        _fit_error(client1, not_a_dict, {"w": np.zeros(3, np.float32)}, digits)
    with pytest.raises(ModelError, match="another structure"):
        _fit_error(client1, logits_too, p, digits, state=s)
    with pytest.raises(ModelError, match=r"new_state leaf .*\['mean'\].*float32\[3\]"):
        _fit_error(client1, shape_changes, p, digits, state=s)
    with pytest.raises(ModelError, match="must return.*loss, new_state"):
        _fit_error(client1, lambda p_, s_, b: bn_loss(p_, s_, b, jax.random.key(0))[0],
                   p, digits, state=s)
    with ddl.Trainer(bn_loss, p, optax.sgd(0.1), state=s, client=client1) as tr:
        with pytest.raises(ModelError, match="key=None"):
            tr.evaluate(_ds(digits, 200), lambda p_, s_, b, key: {"a": 0.0})


def test_a_failing_loss_is_one_clear_error_without_worker_tracebacks(client2, digits, capfd):
    def fails_on_workers(params, batch):
        from distributed import get_worker

        try:
            get_worker()
        except ValueError:  # the client checks the step: fine there
            return mse_like(params, batch)
        # on a worker: fails while tracing (a host callback raising inside compiled
        # code can take the worker process down with it)
        raise RuntimeError("boom on a worker")

    def mse_like(params, batch):
        return jnp.mean((batch["x"] @ params["w"]) ** 2)

    with pytest.raises(Exception, match="boom on a worker"):
        _fit_error(client2, fails_on_workers, {"w": np.zeros((64, 1), np.float32)}, digits)
    assert "Compute Failed" not in capfd.readouterr().err


# -- on a cluster ----------------------------------------------------------------------------
def _same_batches(ds, bs, every, seed, epochs):
    """The batches a 1-worker run trains on, with each round's clock."""
    clock = 0
    for e in range(epochs):
        plan = make_plan(ds.chunks, 1, bs, every, seed, e, owners=[0] * ds.nchunks)
        for r in range(plan.rounds):
            segs = plan.round_segments(0, r)
            chunks = list(dict.fromkeys(s.chunk for s in segs))
            spec = RoundSpec(run="ref", fit=1, gen=0, epoch=e, round=r, rank=0, clock=clock,
                             first_clock=0, steps=plan.round_steps(r), batch_size=bs,
                             segments=tuple((s.chunk, s.start, s.stop, s.epoch) for s in segs),
                             chunks=tuple(chunks), names=("x", "y"), timeout=1.0)
            yield clock, gather_batches(seed, spec, [ds.block(c)[n] for c in chunks
                                                     for n in ("x", "y")])
            clock += 1


def test_batchnorm_and_dropout_on_a_worker_equal_a_single_process_run(client1, digits):
    ds = _ds(digits, 300)
    variables = bn_variables()
    opt = optax.adam(optax.cosine_decay_schedule(1e-2, 40))
    every, bs, seed = 2, 32, 4
    with ddl.Trainer(bn_loss, variables["params"], opt, state=variables["batch_stats"],
                     policy=ddl.BSP(every=every), batch_size=bs, client=client1,
                     seed=seed) as tr:
        tr.fit(ds, epochs=2, verbose=False)
        got_p, got_s = tr.params, tr.state
        acc = tr.evaluate(ds, bn_accuracy)["accuracy"]
        assert tr.steps == 2 * tr.steps_per_epoch(ds)

    steps = make_train_steps(bn_loss, opt, has_state=True, wants_key=True, seed=seed)
    st = init_state(variables["params"], opt, variables["batch_stats"])
    for clock, batches in _same_batches(ds, bs, every, seed, 2):
        st, _ = steps(st, batches, np.array([0, clock], np.int32))
    for a, b in zip(jax.tree_util.tree_leaves((got_p, got_s)),
                    jax.tree_util.tree_leaves((st.params, st.state))):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    assert acc > 0.5


def test_state_is_averaged_over_two_workers_and_keys_repeat(client2, digits):
    ds = _ds(digits, 400)
    variables = bn_variables()

    def run():
        with ddl.Trainer(bn_loss, variables["params"], optax.adam(1e-2),
                         state=variables["batch_stats"], policy=ddl.BSP(every=2),
                         batch_size=16, client=client2, seed=1) as tr:
            tr.fit(ds, epochs=1, verbose=False)
            return tr.params, tr.state

    (p1, s1), (p2, s2) = run(), run()
    for a, b in zip(jax.tree_util.tree_leaves((p1, s1)), jax.tree_util.tree_leaves((p2, s2))):
        np.testing.assert_array_equal(a, b)  # keys and states repeat bit for bit
    s0 = variables["batch_stats"]
    assert not np.allclose(s1["BatchNorm_0"]["mean"], s0["BatchNorm_0"]["mean"])


def test_random_keys_differ_across_workers_and_steps(client2, digits):
    def loss_with_key(params, batch, key):
        u = jax.random.uniform(key)
        return jnp.mean((batch["x"] @ params["w"]) ** 2), {"u": u}

    with ddl.Trainer(loss_with_key, {"w": np.zeros((64, 1), np.float32)}, optax.sgd(0.01),
                     policy=ddl.BSP(every=1), batch_size=16, client=client2) as tr:
        tr.fit(_ds(digits, 400), epochs=1, verbose=False)
        us = [r["metrics"]["u"] for r in tr.rounds]
    assert len(set(us)) == len(us) > 4


def test_equinox_module_in_and_out(client2, digits):
    model = EqxMLP(jax.random.PRNGKey(0))
    ds = _ds(digits, 800)
    with ddl.Trainer(eqx_loss, model, optax.adam(1e-2), batch_size=32,
                     client=client2) as tr:
        tr.fit(ds, epochs=3, verbose=False)
        out = tr.params
        acc = tr.evaluate(ds, eqx_accuracy)["accuracy"]
    assert type(out) is EqxMLP and out.activation is jax.nn.relu
    assert acc > 0.85


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(64, 32, rngs=rngs)
        self.l2 = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))


def test_flax_nnx_through_split(client2, digits):
    graphdef, params, rest = nnx.split(NNXMLP(nnx.Rngs(0)), nnx.Param, ...)

    def loss(params, batch):
        logits = nnx.merge(graphdef, params, rest)(batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    def accuracy(params, batch):
        logits = nnx.merge(graphdef, params, rest)(batch["x"])
        return {"accuracy": (logits.argmax(-1) == batch["y"]).mean()}

    ds = _ds(digits, 800)
    with ddl.Trainer(loss, params, optax.adam(1e-2), batch_size=32, client=client2) as tr:
        tr.fit(ds, epochs=3, verbose=False)
        assert type(tr.params) is type(params)
        assert tr.evaluate(ds, accuracy)["accuracy"] > 0.85


def _counts(dask_worker, run):
    rep = dask_worker.plugins[replica_name(run)]
    return step_counts(rep.state.opt_state)


def test_a_resynced_worker_counts_global_steps(client2, digits):
    opt = optax.adam(optax.linear_schedule(1e-2, 0.0, 1000))
    with dask.config.set({"daskdl.testing.send-nan": {1: [1]}}):
        with ddl.Trainer(mse, {"w": np.zeros((64, 1), np.float32)}, opt,
                         policy=ddl.BSP(every=2), batch_size=16, client=client2) as tr:
            x, _ = digits
            ds = ddl.Dataset.from_arrays(x=x[:400], y=x[:400, :1], chunk_size=100)
            tr.fit(ds, epochs=1, verbose=False)
            assert tr.rejected_rounds  # rank 1 was re-synced after clock 1
            counts = tr.client.run(_counts, run=tr.run)
            assert tr.steps == tr.steps_per_epoch(ds) > 0
    assert all(c == [tr.steps, tr.steps] for c in counts.values()), counts


def _devices(dask_worker):
    return len(jax.local_devices())


def test_two_devices_in_one_worker_equal_one_device(digits):
    """Replicated and sharded (FSDP-style) params on a 2-device worker train as one
    device does (each cluster with its own copy of the data)."""
    from distributed import Client, LocalCluster

    from daskdl.workerenv import cluster_config

    variables = bn_variables()

    # SGD: the first Dense's bias has a zero gradient (BatchNorm follows), which Adam
    # would blow up from rounding noise into full steps that differ between layouts
    def train(client, **kw):
        with ddl.Trainer(bn_loss, variables["params"], optax.sgd(0.1),
                         state=variables["batch_stats"], policy=ddl.BSP(every=2),
                         batch_size=16, client=client, seed=2, **kw) as tr:
            tr.fit(_ds(digits, 400), epochs=1, verbose=False)
            return jax.tree_util.tree_leaves((tr.params, tr.state))

    results = {}
    for devices in (1, 2):
        with cluster_config():
            cluster = LocalCluster(
                n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0",
                env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"})
        with cluster, Client(cluster, set_as_default=False) as client:
            assert list(client.run(_devices).values()) == [devices]
            results[devices] = train(client)
            if devices == 2:
                results["sharded"] = train(client, shard_params=True)
    for got in (results[2], results["sharded"]):
        for a, b in zip(got, results[1]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


@pytest.mark.skipif(not _has_gpu(), reason="no GPU here: run benchmarks/gpu_check.py on a "
                    "machine with GPUs (jax[cuda])")
def test_gpu_check_script():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    out = subprocess.run([sys.executable, str(script), "--small"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "gpu check: OK" in out.stdout


def test_a_joining_worker_counts_global_steps(digits):
    """A worker that joins mid-training takes its optimizer step count from the
    global number of steps, so a schedule does not start again on it."""
    from distributed import Client, LocalCluster

    from daskdl.workerenv import cluster_config

    with cluster_config():
        cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                               dashboard_address=":0")
    with cluster_config(), cluster, Client(cluster, set_as_default=False) as client:
        seen: list = []

        def scale_up(r):
            seen.append(r)
            if len(seen) == 4:
                cluster.scale(2)
            if len(seen) == 8:  # a new process takes longer to start than this model
                client.wait_for_workers(2, timeout=60)

        opt = optax.adam(optax.linear_schedule(1e-2, 0.0, 1000))
        with ddl.Trainer(mse, {"w": np.zeros((64, 1), np.float32)}, opt,
                         policy=ddl.BSP(every=2), batch_size=16, client=client) as tr:
            x, _ = digits
            ds = ddl.Dataset.from_arrays(x=x[:800], y=x[:800, :1], chunk_size=100)
            tr.fit(ds, epochs=4, verbose=False, callbacks=[scale_up])
            assert tr.info()["generation"] >= 1 and len({r["worker"] for r in seen}) == 2
            counts = client.run(_counts, run=tr.run)
    assert len(counts) == 2 and tr.steps > 0
    assert all(c == [tr.steps, tr.steps] for c in counts.values()), (counts, tr.steps)


def test_checkpoint_and_resume_include_the_state(client2, digits, tmp_path):
    """Two epochs in one go == one epoch, then a new trainer resuming for the second:
    parameters and BatchNorm statistics bit for bit."""
    variables = bn_variables()
    ds = _ds(digits, 800)

    def trainer(ckpt=None):
        return ddl.Trainer(bn_loss, variables["params"], optax.adam(1e-2),
                           state=variables["batch_stats"], policy=ddl.BSP(every=2),
                           batch_size=16, client=client2, seed=2, checkpoint=ckpt)

    with trainer() as tr:
        tr.fit(ds, epochs=2, verbose=False)
        reference = jax.tree_util.tree_leaves((tr.params, tr.state))
    ckpt = str(tmp_path / "ck")
    with trainer(ckpt) as tr:
        tr.fit(ds, epochs=1, verbose=False)
    with trainer(ckpt) as tr:
        tr.fit(ds, epochs=2, verbose=False, resume=True)
        resumed = jax.tree_util.tree_leaves((tr.params, tr.state))
    assert len(reference) == len(resumed)
    for a, b in zip(reference, resumed):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
