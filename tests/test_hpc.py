"""daskdl on a real SLURM through dask-jobqueue (skipped where SLURM is not running)."""

import shutil
import subprocess
import time

import dask.config
import jax
import optax
import pytest

import daskdl as ddl
from daskdl import hpc

from .conftest import accuracy, init_mlp, loss_fn


def slurm_running() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mixed", "alloc"))


def test_jobqueue_kwargs():
    kw = hpc.jobqueue_kwargs(compile_cache="/shared/jax cache", job_script_prologue=["module load x"])
    lines = kw["job_script_prologue"]
    assert lines[0] == "module load x"
    assert "export MALLOC_TRIM_THRESHOLD_=268435456" in lines
    assert "export JAX_COMPILATION_CACHE_DIR='/shared/jax cache'" in lines
    assert "job_extra_directives" not in kw
    # daskdl.cluster-config, as the variables Dask reads when the worker starts
    assert "export DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL=500ms" in lines
    env = dict(line[len("export "):].split("=", 1)
               for line in lines if line.startswith("export DASK_"))
    assert dask.config.collect_env(env) == {
        "distributed": {"admin": {"tick": {"interval": "500ms"},
                                  "system_monitor": {"interval": "2s"}},
                        "worker": {"profile": {"interval": "100ms"}}}}
    assert hpc.jobqueue_kwargs(gpus=1)["job_extra_directives"] == ["--gres=gpu:1"]
    assert hpc.jobqueue_kwargs(gpus=2, scheduler="pbs")["job_extra_directives"] == ["-l ngpus=2"]
    with pytest.raises(ValueError, match="scheduler must be one of"):
        hpc.jobqueue_kwargs(gpus=1, scheduler="condor")


def test_job_script_carries_the_environment():
    dask_jobqueue = pytest.importorskip("dask_jobqueue")
    cluster = dask_jobqueue.SLURMCluster(cores=1, memory="2GB", processes=1,
                                         scheduler_options={"dashboard_address": ":0"},
                                         **hpc.jobqueue_kwargs(compile_cache="/tmp/jc"))
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "export MALLOC_MMAP_THRESHOLD_=33554432" in script
    assert "export JAX_COMPILATION_CACHE_DIR=/tmp/jc" in script
    assert "#SBATCH --mem=" in script


@pytest.mark.slurm
@pytest.mark.skipif(not slurm_running(), reason="SLURM is not running here (sinfo finds no "
                    "idle node); .ci/slurm-up.sh starts a one-node cluster")
def test_training_on_slurm_jobs(digits, tmp_path):
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    x, y = digits
    train, test = ddl.Dataset.from_arrays(x=x, y=y).split(0.8, seed=0)
    cluster = SLURMCluster(cores=1, memory="2GB", processes=1, walltime="00:20:00",
                           scheduler_options={"dashboard_address": ":0"},
                           log_directory=str(tmp_path),
                           **hpc.jobqueue_kwargs(compile_cache=str(tmp_path / "jax-cache")))
    try:
        with Client(cluster) as client:
            cluster.scale(jobs=2)
            client.wait_for_workers(2, timeout=180)
            jobs = client.run(hpc.in_job)
            assert len(jobs) == 2
            ids = {j["SLURM_JOB_ID"] for j in jobs.values()}
            assert None not in ids and len(ids) == 2  # each worker inside its own job
            cores = [tuple(j["affinity"]) for j in jobs.values()]
            assert all(len(c) == 1 for c in cores) and len(set(cores)) == 2  # own core each
            with ddl.Trainer(loss_fn, init_mlp(jax.random.PRNGKey(0)), optax.adam(3e-3),
                             policy=ddl.BSP(every=4), batch_size=32, client=client) as tr:
                tr.fit(train, epochs=15)
                acc = tr.evaluate(test, accuracy)["accuracy"]
            env = ddl.worker_environment(client)
            assert all(e["malloc_fixed"] is False and e["malloc_trim_threshold"] == "268435456"
                       for e in env.values())
    finally:
        cluster.close()
    assert acc >= 0.95
    for _ in range(30):
        queue = subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout
        if not queue.strip():
            break
        time.sleep(1)
    assert not queue.strip(), queue
