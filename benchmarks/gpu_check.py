"""Check daskdl on a machine with GPUs: one worker runs its rounds on a mesh of all
its GPUs (batch split across them), replicated and with ``shard_params=True``.

    python benchmarks/gpu_check.py [--small]

Needs ``jax[cuda]``.  Trains the Flax CNN of ``examples/flax_cnn.py`` on digits
with one worker holding every GPU, twice (replicated, sharded), and checks that both
reach the same parameters (float tolerance) and a test accuracy of at least 0.9.
Prints ``gpu check: OK`` last.  ``tests/test_models.py::test_gpu_check_script``
runs it wherever a GPU is present and skips with its reason elsewhere.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def main(small: bool) -> None:
    import jax
    import numpy as np
    import optax
    from dask.distributed import Client, LocalCluster

    import daskdl as ddl
    from flax_cnn import accuracy, digits_split, init, loss_fn

    train, test = digits_split()
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True)
    with cluster, Client(cluster) as client:
        devices = client.run(lambda: [str(d) for d in jax.local_devices()])
        print("worker devices:", devices)
        out = {}
        for shard in (False, True):
            params, stats = init()
            with ddl.Trainer(loss_fn, params, optax.adam(3e-3), state=stats,
                             policy=ddl.BSP(every=4), batch_size=64, client=client,
                             shard_params=shard) as tr:
                tr.fit(train, epochs=2 if small else 10, verbose=False)
                out[shard] = (jax.tree_util.tree_leaves(tr.params),
                              tr.evaluate(test, accuracy)["accuracy"])
                print(f"shard_params={shard}: test accuracy {out[shard][1]:.3f}")
    for a, b in zip(out[False][0], out[True][0]):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    assert min(out[False][1], out[True][1]) >= (0.5 if small else 0.9)
    print("gpu check: OK")


if __name__ == "__main__":
    main("--small" in sys.argv)
