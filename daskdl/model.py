"""Models as daskdl sees them: any pytree, sent to the workers as a picklable template.

A model's parameters (and its optional non-trainable state) travel as a flat list
of numpy arrays, the *leaves*, plus a :class:`Template` that rebuilds the pytree
from them.  The template is the pytree itself with every array replaced by a
:class:`Slot` (its shape and dtype): it pickles like the user's object (a dict, a
Flax ``FrozenDict`` or NNX ``State``, an Equinox module with its static fields),
carries no array bytes, and each process computes the ``PyTreeDef`` from it
locally.  A ``PyTreeDef`` itself is never pickled: Equinox's break when pickled
(``'_Missing' object is not subscriptable``).

What counts as trainable:

* in an **Equinox module** (anything whose tree holds an ``equinox.Module``), the
  floating-point arrays, as ``eqx.partition(model, eqx.is_inexact_array)``; every
  other leaf (integers, Python values, functions) is static and stays in the
  template.  The optimizer sees the trainable part with ``None`` in the static
  places (as ``eqx.filter(model, eqx.is_inexact_array)``), ``loss_fn`` the whole
  module.  Equinox is never imported (duck typing on the class's module).
* in **any other pytree** (dicts, lists, Flax linen variables, NNX ``State``),
  every leaf must be a floating-point array; an integer leaf (a step counter) is an
  error that says where it belongs (``state=``), since it cannot be differentiated.

**State** (``Trainer(state=...)``) is any pytree of numeric arrays; integer leaves
are allowed (they are never differentiated; a merge takes them from the lowest
rank).

Invariant: ``Template.of(tree)`` gives ``(template, leaves)`` with
``template.build(leaves)`` equal to ``tree`` (same type, same static values), in
the leaf order of ``jax.tree_util.tree_leaves``.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, Callable, Sequence

import jax
import numpy as np


class ModelError(TypeError):
    """A model, its state or the user's function does not fit what daskdl needs; the
    message names the leaf or value and the fix (raised on the client, before
    anything runs)."""


class Slot:
    """Stands for one array of a :class:`Template` (not a pytree node, so a leaf)."""

    __slots__ = ("shape", "dtype")

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)

    def __getstate__(self):
        return (self.shape, self.dtype.str)

    def __setstate__(self, s):
        self.shape, self.dtype = tuple(s[0]), np.dtype(s[1])

    def __repr__(self) -> str:
        return f"Slot({self.dtype.name}{list(self.shape)})"

    def spec(self) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(self.shape, self.dtype)


def _is_array(x) -> bool:
    return isinstance(x, (np.ndarray, np.generic, jax.Array))


def _dtype(x) -> np.dtype:
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def is_inexact_array(x) -> bool:
    """A floating-point (or complex) array: trainable (``eqx.is_inexact_array``)."""
    return _is_array(x) and np.issubdtype(_dtype(x), np.inexact)


def _is_equinox(x) -> bool:
    return any(c.__module__.split(".")[0] == "equinox" for c in type(type(x)).__mro__
               if c is not type) or any(
        c.__module__.split(".")[0] == "equinox" for c in type(x).__mro__[1:])


def is_equinox_model(tree) -> bool:
    """Whether ``tree`` is or holds an ``equinox.Module`` (checked without importing
    Equinox)."""
    found = []

    def leaf(x):
        if _is_equinox(x):
            found.append(x)
        return _is_equinox(x)

    jax.tree_util.tree_flatten(tree, is_leaf=leaf)
    return bool(found)


def _node_classes(tree) -> set:
    """Classes of the pytree nodes in ``tree`` (for error messages)."""
    out: set = set()

    def walk(td):
        data = td.node_data()
        if data is not None:
            out.add(data[0])
        for child in td.children():
            walk(child)

    walk(jax.tree_util.tree_structure(tree))
    return out


def main_classes(tree) -> list:
    """Classes of ``tree``'s nodes that pickle by value (defined in ``__main__`` or in a
    module registered with ``cloudpickle.register_pickle_by_value``)."""
    import cloudpickle

    by_value = getattr(cloudpickle.cloudpickle, "_is_registered_pickle_by_value",
                       lambda m: False)
    out = []
    for cls in _node_classes(tree):
        mod = sys.modules.get(getattr(cls, "__module__", ""), None)
        if cls.__module__ == "__main__" or (mod is not None and by_value(mod)):
            out.append(cls)
    return sorted(out, key=lambda c: c.__qualname__)


class Template:
    """The structure of a model (or its state) without its arrays; see the module
    docstring.

    Parameters
    ----------
    skeleton : the pytree with :class:`Slot` in place of every trainable array.
    static : whether non-trainable leaves are kept as static values (Equinox).
    """

    def __init__(self, skeleton, static: bool = False):
        self.skeleton = skeleton
        self.static = static
        self._defs = None  # computed in each process, never pickled

    def __getstate__(self):
        return {"skeleton": self.skeleton, "static": self.static}

    def __setstate__(self, d):
        self.skeleton, self.static, self._defs = d["skeleton"], d["static"], None

    def __repr__(self) -> str:
        return f"<daskdl Template of {type(self.skeleton).__name__}, {self.n} arrays>"

    # -- making one ---------------------------------------------------------------------
    @classmethod
    def of(cls, tree, what: str = "params", allow_int: bool = False, copy: bool = True):
        """``(template, leaves)`` of ``tree`` (leaves copied to numpy with ``copy``);
        ``TypeError`` naming the leaf when a leaf cannot be trained (``params``) or
        carried (``state``)."""
        static = is_equinox_model(tree)
        path_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        leaves = []
        for path, x in path_leaves:
            if static and not is_inexact_array(x):
                continue
            _check_leaf(what, jax.tree_util.keystr(path), x, allow_int)
            leaves.append(np.array(x, copy=True) if copy else x)
        if not leaves:
            raise ModelError(
                f"{what} must be a pytree of arrays with at least one leaf (a floating-point "
                f"array), got "
                f"{type(tree).__name__} with structure {jax.tree_util.tree_structure(tree)}. "
                "Pass e.g. {'w': jnp.zeros((784, 10)), 'b': jnp.zeros(10)}.")
        skeleton = jax.tree_util.tree_map(
            lambda x: Slot(np.shape(x), _dtype(x)) if (is_inexact_array(x) or not static)
            else x, tree)
        return cls(skeleton, static), leaves

    # -- using one ----------------------------------------------------------------------
    def _treedefs(self):
        if self._defs is None:
            flat, full = jax.tree_util.tree_flatten(self.skeleton)
            where = [i for i, x in enumerate(flat) if isinstance(x, Slot)]
            trainable = jax.tree_util.tree_structure(jax.tree_util.tree_map(
                lambda x: x if isinstance(x, Slot) else None, self.skeleton))
            self._defs = (flat, full, where, trainable)
        return self._defs

    @property
    def n(self) -> int:
        """Number of arrays."""
        return len(self._treedefs()[2])

    @property
    def slots(self) -> list:
        """The :class:`Slot` of every array, in leaf order."""
        flat, _, where, _ = self._treedefs()
        return [flat[i] for i in where]

    def build(self, leaves: Sequence) -> Any:
        """The model (the type given) from its arrays."""
        flat, full, where, _ = self._treedefs()
        if len(leaves) != len(where):
            raise ValueError(f"{len(leaves)} arrays for a model of {len(where)}")
        flat = list(flat)
        for i, x in zip(where, leaves):
            flat[i] = x
        return jax.tree_util.tree_unflatten(full, flat)

    def trainable(self, leaves: Sequence) -> Any:
        """What is differentiated and what the optimizer sees: the model with ``None``
        in place of static leaves (the model itself for plain pytrees)."""
        if not self.static:
            return self.build(leaves)
        return jax.tree_util.tree_unflatten(self._treedefs()[3], list(leaves))

    def combine(self, trainable) -> Any:
        """The whole model from :meth:`trainable`'s output (inside a trace too)."""
        if not self.static:
            return trainable
        return self.build(jax.tree_util.tree_leaves(trainable))

    def specs(self) -> Any:
        """:meth:`trainable` with ``jax.ShapeDtypeStruct`` leaves (for ``eval_shape``)."""
        return self.trainable([s.spec() for s in self.slots])

    def check_portable(self) -> None:
        """``TypeError`` when the model holds an Equinox class that pickles by value:
        Equinox modules rebuilt from a by-value class have no fields on the workers."""
        if not self.static:
            return
        bad = [c for c in main_classes(self.skeleton) if _is_equinox_class(c)]
        if bad:
            names = ", ".join(c.__qualname__ for c in bad)
            raise ModelError(
                f"the model class(es) {names} are defined in __main__ (a script or a "
                "notebook); Equinox classes defined there reach the workers without "
                "their fields.  Move them to a module file next to your script, e.g. "
                "model.py, and import them (from model import CNN): workers started "
                "from that directory import it; for others, client.upload_file('model.py'). "
                "Wrong: class CNN(eqx.Module) in the script you run; right: "
                "from model import CNN.")


def _is_equinox_class(cls) -> bool:
    return any(c.__module__.split(".")[0] == "equinox" for c in cls.__mro__[1:])


def _check_leaf(what: str, where: str, x, allow_int: bool) -> None:
    if not _is_array(x):
        raise ModelError(
            f"{what} leaf {where} is a {type(x).__name__}, not an array. {what} must be a "
            "pytree (dicts, lists, tuples, Flax variables, NNX State, Equinox modules) "
            "whose leaves are numpy or JAX arrays; wrap numbers with jnp.asarray(...).")
    dt = _dtype(x)
    if np.issubdtype(dt, np.inexact):
        return
    if np.issubdtype(dt, np.integer) or dt == np.bool_:
        if allow_int:
            return
        raise ModelError(
            f"{what} leaf {where} is an {dt} array: integers cannot be differentiated, "
            "so they cannot be trained.  Move it out of the parameters into the model "
            f"state: Trainer(loss_fn, params, opt, state={{'step': ...}}) with "
            "loss_fn(params, state, batch) -> (loss, new_state); or make it a float.")
    raise ModelError(f"{what} leaf {where} has dtype {dt}; only numeric arrays can be "
                    "trained and averaged.")


# -- the user's functions --------------------------------------------------------------
def takes_key(fn: Callable) -> bool:
    """Whether ``fn`` has a parameter named ``key`` (it then gets a random key)."""
    try:
        return "key" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def key_required(fn: Callable) -> bool:
    """Whether ``fn`` has a ``key`` parameter without a default."""
    try:
        p = inspect.signature(fn).parameters.get("key")
    except (TypeError, ValueError):
        return False
    return p is not None and p.default is inspect.Parameter.empty


class Bound:
    """``fn`` called with the model (and state) rebuilt from flat leaves:
    ``Bound(fn, template, state_template)((leaves, state_leaves), *args)`` calls
    ``fn(model, state, *args)`` (``fn(model, *args)`` without state).  Picklable:
    how ``evaluate`` and ``predict`` send the user's function with the model's
    structure to the workers."""

    def __init__(self, fn: Callable, template: Template, state: Template | None = None):
        self.fn, self.template, self.state = fn, template, state

    def __call__(self, packed, *args):
        leaves, state_leaves = packed
        model = self.template.build(leaves)
        if self.state is None:
            return self.fn(model, *args)
        return self.fn(model, self.state.build(state_leaves), *args)


__all__ = ["Bound", "ModelError", "Slot", "Template", "is_equinox_model", "is_inexact_array",
           "key_required", "main_classes", "takes_key"]
