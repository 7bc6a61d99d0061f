"""An Equinox CNN with Dropout on scikit-learn's digits, 2 workers.

    python examples/equinox_cnn.py            # about 0.98 test accuracy
    python examples/equinox_cnn.py --small    # a few epochs (CI)

The module itself is the ``params``: its floating-point arrays are trained, every
other field (activation functions, sizes) is static, as ``eqx.partition(model,
eqx.is_inexact_array)``; ``trainer.params`` is a ``CNN`` again.  Dropout takes its
randomness from ``key`` (one per step, from seed, rank, round and step).

Equinox classes must be importable by the workers (not defined in ``__main__``):
run as a script, this file imports itself as ``equinox_cnn``.

Prints one line per epoch and, last, ``test accuracy: 0.9xx``.
"""

import sys

import equinox as eqx
import jax
import optax


class CNN(eqx.Module):
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    dense: eqx.nn.Linear
    out: eqx.nn.Linear
    dropout: eqx.nn.Dropout

    def __init__(self, key):
        k = jax.random.split(key, 4)
        self.conv1 = eqx.nn.Conv2d(1, 16, 3, padding=1, key=k[0])
        self.conv2 = eqx.nn.Conv2d(16, 32, 3, padding=1, key=k[1])
        self.dense = eqx.nn.Linear(32 * 4 * 4, 64, key=k[2])
        self.out = eqx.nn.Linear(64, 10, key=k[3])
        self.dropout = eqx.nn.Dropout(0.3)

    def __call__(self, x, key=None):
        x = jax.nn.relu(self.conv1(x.reshape(1, 8, 8)))
        x = jax.nn.relu(self.conv2(x))
        x = x.reshape(32, 4, 2, 4, 2).mean((2, 4)).reshape(-1)  # 2x2 average pooling
        x = jax.nn.relu(self.dense(x))
        x = self.dropout(x, key=key, inference=key is None)
        return self.out(x)


def loss_fn(model, batch, key):
    keys = jax.random.split(key, batch["x"].shape[0])
    logits = jax.vmap(model)(batch["x"], keys)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def accuracy(model, batch):
    logits = jax.vmap(model)(batch["x"])
    return {"accuracy": (logits.argmax(-1) == batch["y"]).mean()}


def main(small: bool = False):
    import daskdl as ddl
    from flax_cnn import run

    def make_trainer(client, total_steps):
        opt = optax.adam(optax.cosine_decay_schedule(3e-3, total_steps))
        return ddl.Trainer(loss_fn, CNN(jax.random.PRNGKey(0)), opt,
                           policy=ddl.BSP(every=4), batch_size=32, client=client, seed=0)

    run(make_trainer, accuracy, epochs=2 if small else 12)


if __name__ == "__main__":
    import equinox_cnn  # this file as an importable module (see the docstring)

    equinox_cnn.main(small="--small" in sys.argv)
