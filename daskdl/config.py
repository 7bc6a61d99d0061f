"""Defaults under the ``daskdl`` key of ``dask.config``.

Loaded with :func:`dask.config.update_defaults`, so ``dask.config.set``,
``DASK_DASKDL__...`` environment variables and YAML files in the usual
Dask config locations override them.  Keyword arguments left ``None`` fall
back to :func:`get`.
"""

from __future__ import annotations

import os

import dask.config
import yaml

_fn = os.path.join(os.path.dirname(__file__), "daskdl.yaml")
with open(_fn) as f:
    defaults = yaml.safe_load(f)

dask.config.update_defaults(defaults)


def get(key: str, value=None):
    """Return ``value`` if it is not ``None``, else ``dask.config.get("daskdl." + key)``."""
    if value is not None:
        return value
    return dask.config.get(f"daskdl.{key}")


def get_seconds(key: str, value=None) -> float:
    """Like :func:`get` for a duration such as ``"300s"`` or ``5``; returns seconds."""
    from dask.utils import parse_timedelta

    return float(parse_timedelta(get(key, value), default="s"))
