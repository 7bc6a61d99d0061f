"""The cost of coordination: no bubble at epoch boundaries."""

import jax
import numpy as np
import optax

import daskdl as ddl

from .conftest import init_mlp, loss_fn


def test_no_bubble_at_epoch_boundaries(client2, digits):
    """The next epoch's rounds are queued before the current epoch ends: the gap
    between the last merge of an epoch and the first of the next stays below one
    round's time beyond a typical gap (from the plugin's timestamps)."""
    x, y = digits
    ds = ddl.Dataset.from_arrays(x=x[:1024], y=y[:1024], chunk_size=128)
    with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.sgd(0.05),
                     policy=ddl.BSP(every=2), batch_size=16, client=client2) as tr:
        tr.fit(ds, epochs=1, verbose=False)  # compiles
        tr.fit(ds, epochs=6, verbose=False)
        history = tr.info()["history"]
    R = 1024 // 2 // 16 // 2  # rounds per epoch
    merges = [h for h in history if h["kind"] == "merge"]
    assert [m["clock"] for m in merges] == list(range(R, 7 * R))
    t = {m["clock"]: m["time"] for m in merges}
    gaps = np.diff([t[c] for c in sorted(t)])
    typical = float(np.median(gaps))
    boundary = [t[c] - t[c - 1] for c in sorted(t) if c % R == 0 and c - 1 in t]
    assert len(boundary) == 5
    assert float(np.median(boundary)) < 2 * typical, (boundary, typical)
