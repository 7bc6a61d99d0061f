"""daskdl on HPC clusters started with dask-jobqueue (SLURM, PBS, LSF, ...).

What JAX workers need from a job, and how :func:`jobqueue_kwargs` provides it:

* **one worker process per job, one thread per core it was given** — pass
  ``cores=n, processes=1`` to the cluster; daskdl's worker set-up pins a
  single-threaded worker only inside the CPU set the job already has, so it never
  fights SLURM's ``task/affinity`` or cgroups (a one-core job is left as SLURM
  pinned it);
* **no small ``MALLOC_TRIM_THRESHOLD_``** — the nanny would start the worker with
  Dask's 65536, which slows XLA; the job exports larger trim and mmap thresholds
  (the nanny keeps a value already in the environment), and daskdl's worker set-up
  also repairs it at run time;
* **quieter periodic work** — the job exports ``daskdl.cluster-config`` (Dask's
  event-loop tick, system monitor and profiler intervals) as ``DASK_...`` variables,
  as :func:`daskdl.workerenv.cluster_config` gives the clusters daskdl starts;
* **a JAX compilation cache on a shared path** — ``compile_cache="/shared/jax-cache"``
  lets hundreds of workers reuse one compilation instead of each paying it;
* **GPUs** — install ``jax[cuda12]`` in the workers' environment; ``gpus=n`` asks
  for n GPUs per job (``--gres=gpu:n`` on SLURM); the batch system sets
  ``CUDA_VISIBLE_DEVICES``.  A worker that sees several GPUs runs each round on a
  mesh of all of them (the batch split across them; params replicated, or sharded
  with ``Trainer(shard_params=True)``); one GPU per job gives one device per worker.
  ``benchmarks/gpu_check.py`` checks a GPU node.

Examples
--------
>>> from dask_jobqueue import SLURMCluster                      # doctest: +SKIP
>>> cluster = SLURMCluster(cores=8, memory="32GB", processes=1,
...                        **daskdl.hpc.jobqueue_kwargs(compile_cache="/scratch/jax"))
>>> cluster.scale(jobs=4)                                       # doctest: +SKIP
"""

from __future__ import annotations

import shlex

MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": str(256 * 2**20), "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20)}


def dask_env(settings: dict) -> dict:
    """Dask config ``{"distributed.admin.tick.interval": "500ms"}`` as the environment
    variables Dask reads at start-up (``DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL``)."""
    return {"DASK_" + key.replace(".", "__").replace("-", "_").upper():
            value if isinstance(value, str) else repr(value)
            for key, value in settings.items()}


def worker_env(compile_cache: str | None = None, gpus: int = 0) -> dict:
    """Environment variables a JAX worker's job should export."""
    from .workerenv import cluster_settings

    env = dict(MALLOC_ENV)
    env.update(dask_env(cluster_settings()))
    if compile_cache:
        env["JAX_COMPILATION_CACHE_DIR"] = compile_cache
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    if gpus:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # several processes may share a node
    else:
        env["JAX_PLATFORMS"] = "cpu"
    return env


def jobqueue_kwargs(compile_cache: str | None = None, gpus: int = 0,
                    scheduler: str = "slurm", job_script_prologue: list | None = None) -> dict:
    """Keyword arguments for a dask-jobqueue cluster running daskdl workers.

    Parameters
    ----------
    compile_cache : a directory every job can read and write (shared file system) for
        JAX's persistent compilation cache; ``None`` for none.
    gpus : GPUs per job (one worker per job sees them all; use one GPU per job for
        one device per worker).
    scheduler : ``"slurm"``, ``"pbs"`` or ``"lsf"``: how to ask for GPUs.
    job_script_prologue : lines of your own to run before the worker starts (e.g.
        ``["module load cuda", "source activate daskdl"]``); daskdl's exports follow.

    Returns
    -------
    dict with ``job_script_prologue`` and, for GPUs, ``job_extra_directives``; pass it
    on with ``SLURMCluster(cores=..., memory=..., processes=1, **kwargs)``.
    """
    lines = list(job_script_prologue or [])
    lines += [f"export {k}={shlex.quote(v)}" for k, v in worker_env(compile_cache, gpus).items()]
    if compile_cache:
        lines.append(f"mkdir -p {shlex.quote(compile_cache)}")
    out: dict = {"job_script_prologue": lines}
    if gpus:
        directive = {"slurm": f"--gres=gpu:{gpus}", "pbs": f"-l ngpus={gpus}",
                     "lsf": f'-gpu "num={gpus}"'}
        if scheduler not in directive:
            raise ValueError(f"scheduler must be one of {sorted(directive)}, got {scheduler!r}")
        out["job_extra_directives"] = [directive[scheduler]]
    return out


def in_job() -> dict:
    """What a worker knows about its batch job (run it with ``client.run(in_job)``)."""
    import os

    keys = ("SLURM_JOB_ID", "SLURM_CPUS_ON_NODE", "PBS_JOBID", "LSB_JOBID",
            "CUDA_VISIBLE_DEVICES", "MALLOC_TRIM_THRESHOLD_", "JAX_COMPILATION_CACHE_DIR")
    info = {k: os.environ.get(k) for k in keys}
    info["affinity"] = sorted(os.sched_getaffinity(0))
    return info
