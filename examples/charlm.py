"""A character-level GPT (nanoGPT-style, Flax linen) with dropout, trained on the
Python standard library's own source, 2 workers.

    python examples/charlm.py            # ~0.4 M parameters, 3 epochs
    python examples/charlm.py --small    # a tiny model and corpus (CI)

The text is cut into windows of ``block + 1`` byte tokens, shared once to a Zarr
store with ``Dataset.share`` (the workers read their chunks from it), and a tenth is
kept apart for validation.  Dropout takes its randomness from ``key``, which daskdl
derives for every step from (seed, rank, round, step).  Prints the validation loss per
epoch and, last, tokens/s of daskdl against a plain single-process loop of the same
model, measured in this invocation.

The model lives in a module the workers can import: run as a script, this file
imports itself as ``charlm``.
"""

import os
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

SIZES = {"small": dict(block=32, embd=32, layers=1, heads=2, chars=200_000, epochs=2),
         "full": dict(block=64, embd=128, layers=2, heads=4, chars=2_000_000, epochs=3)}
# the size travels to the workers (which import this module) in the environment
os.environ.setdefault("CHARLM_SIZE", "small" if "--small" in sys.argv else "full")
CONF = dict(SIZES[os.environ["CHARLM_SIZE"]])
BATCH = 32


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and an MLP, with dropout."""

    embd: int
    heads: int
    rate: float = 0.1

    @nn.compact
    def __call__(self, x, train: bool):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
        h = nn.MultiHeadDotProductAttention(self.heads, dropout_rate=self.rate,
                                            deterministic=not train)(
            nn.LayerNorm()(x), mask=mask)
        x = x + nn.Dropout(self.rate, deterministic=not train)(h)
        h = nn.Dense(self.embd)(nn.gelu(nn.Dense(4 * self.embd)(nn.LayerNorm()(x))))
        return x + nn.Dropout(self.rate, deterministic=not train)(h)


class GPT(nn.Module):
    """Byte-level GPT: token and position embeddings, ``layers`` blocks, a head."""

    block: int
    embd: int
    layers: int
    heads: int

    @nn.compact
    def __call__(self, tokens, train: bool):
        x = nn.Embed(256, self.embd)(tokens) + nn.Embed(self.block, self.embd)(
            jnp.arange(tokens.shape[1]))
        x = nn.Dropout(0.1, deterministic=not train)(x)
        for _ in range(self.layers):
            x = Block(self.embd, self.heads)(x, train)
        return nn.Dense(256)(nn.LayerNorm()(x))


MODEL = GPT(CONF["block"], CONF["embd"], CONF["layers"], CONF["heads"])


def init(seed: int = 0):
    return MODEL.init(jax.random.PRNGKey(seed), jnp.zeros((1, CONF["block"]), jnp.int32),
                      train=False)["params"]


def _xent(params, tokens, train, key=None):
    tokens = tokens.astype(jnp.int32)
    rngs = {"dropout": key} if train else {}
    logits = MODEL.apply({"params": params}, tokens[:, :-1], train=train, rngs=rngs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def loss_fn(params, batch, key):
    return _xent(params, batch["tokens"], True, key)


def val_loss(params, batch):
    return {"loss": _xent(params, batch["tokens"], False)}


def corpus(chars: int) -> np.ndarray:
    """The first ``chars`` bytes of the standard library's ``.py`` files, sorted by path."""
    root = os.path.dirname(os.__file__)
    out, size = [], 0
    for path in sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                       if f.endswith(".py") and "site-packages" not in d):
        with open(path, "rb") as f:
            out.append(f.read())
        size += len(out[-1])
        if size >= chars:
            break
    return np.frombuffer(b"".join(out)[:chars], np.uint8)


def windows(text: np.ndarray) -> np.ndarray:
    """Non-overlapping windows of ``block + 1`` tokens (input and next-token target)."""
    w = CONF["block"] + 1
    n = len(text) // w
    return text[:n * w].reshape(n, w)


def plain_tokens_per_s(data: np.ndarray, steps: int) -> float:
    """The same model and optimizer in this process, one compiled step at a time."""
    opt = optax.adamw(1e-3)
    params = init()
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, tokens, key):
        loss, g = jax.value_and_grad(lambda p: _xent(p, tokens, True, key))(params)
        upd, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, loss

    key = jax.random.key(0)
    params, opt_state, loss = step(params, opt_state, data[:BATCH], key)  # compile
    loss.block_until_ready()
    t = time.perf_counter()
    for i in range(steps):
        j = (i * BATCH) % (len(data) - BATCH)
        params, opt_state, loss = step(params, opt_state, data[j:j + BATCH],
                                       jax.random.fold_in(key, i))
    loss.block_until_ready()
    return steps * BATCH * CONF["block"] / (time.perf_counter() - t)


def main() -> None:
    from dask.distributed import Client, LocalCluster

    import daskdl as ddl
    from daskdl.workerenv import cluster_config

    data = windows(corpus(CONF["chars"]))
    rng = np.random.default_rng(0)
    data = data[rng.permutation(len(data))]
    n_val = len(data) // 10
    val, train_np = data[:n_val], data[n_val:]
    epochs = CONF["epochs"]
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(init()))
    print(f"{len(train_np)} training windows of {CONF['block']} tokens, {n_params} parameters")
    with cluster_config():
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True)
    with cluster, Client(cluster) as client, tempfile.TemporaryDirectory() as tmp:
        train = ddl.Dataset.from_arrays(tokens=train_np).share(os.path.join(tmp, "t.zarr"))
        val_ds = ddl.Dataset.from_arrays(tokens=val)
        total = epochs * ddl.steps_per_epoch(train, n_workers=2, batch_size=BATCH)
        opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, total // 10, total))
        rates = []
        with ddl.Trainer(loss_fn, init(), opt, policy=ddl.BSP(every=8), batch_size=BATCH,
                         client=client, seed=0) as trainer:
            for _ in range(epochs):
                rec = trainer.fit(train, epochs=1, verbose=False)[0]
                rates.append(rec["samples"] * CONF["block"] / rec["seconds"])
                v = trainer.evaluate(val_ds, val_loss)["loss"]
                print(f"epoch {rec['epoch']}  train loss {rec['loss']:.3f}  "
                      f"validation loss {v:.3f}  {rates[-1]:8.0f} tokens/s")
    steady = float(np.median(rates[1:] if len(rates) > 1 else rates))
    plain = plain_tokens_per_s(train_np, steps=min(200, len(train_np) // BATCH))
    print(f"tokens/s: daskdl 2 workers {steady:.0f}, plain loop {plain:.0f}, "
          f"ratio {steady / plain:.2f}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import charlm  # this file as an importable module (see the docstring)

    charlm.main()
