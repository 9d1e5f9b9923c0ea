"""torchx components for cctl-rec: train, datagen and bench (thin wrappers over ``dist.ddp``) and
experiment (one process that runs an experiment's trainings one after another).

Each function's docstring is its ``torchx run ... --help``. Examples (from the repository root,
with the virtualenv's ``bin`` on PATH, since torchx starts ``torchrun``)::

    # 2 CPU ranks on this machine (gloo)
    torchx run -s local_cwd launch/components.py:train --j 1x2 --config configs/cctl_small.yaml \\
        --run_dir runs/small -- selector.mode=paper
    # 8 GPUs on one host (nccl), or 2 nodes x 8 GPUs on kubernetes / slurm with the Dockerfile's image
    torchx run -s local_docker launch/components.py:train --j 1x8 --gpu 8 --image cctl-rec:0.1.0
    torchx run -s kubernetes -cfg queue=default,namespace=recsys launch/components.py:train \\
        --j 2x8 --gpu 8 --image ghcr.io/ORG/cctl-rec:0.1.0 --data s3://bucket/meituan
    # a killed rank: torchrun restarts all ranks (at most 3 times), they resume from the newest checkpoint
    torchx run -s local_cwd launch/components.py:train --j 1x2 --max_restarts 3 --config configs/cctl_small.yaml \\
        --run_dir runs/small -- run.checkpoint_every=500
    # a benchmark, its JSON into --out
    torchx run -s local_cwd launch/components.py:bench --what datagen --out bench-datagen.json -- --preset tiny
    # an experiment (models x seeds; its runs with ranks > 1 start their own torchrun)
    torchx run -s local_cwd launch/components.py:experiment --config configs/experiments/amazon.yaml \
        --out runs/exp-amazon
"""


from typing import Dict, Optional

import torchx.specs as specs
from torchx.components import dist

IMAGE = "cctl-rec:0.1.0"
"""The image built from the repository's Dockerfile (ignored by the local_cwd scheduler)."""


def train(*overrides: str, config: str = "configs/cctl_small.yaml", data: str = "",
          run_dir: str = "runs/cctl", j: str = "1x2", gpu: int = 0, cpu: int = 2, memMB: int = 8192,
          image: str = IMAGE, max_restarts: int = 0, max_retries: int = 0, rdzv_port: int = 29500,
          env: Optional[Dict[str, str]] = None) -> specs.AppDef:
    """Trains CCTL with torchrun: one rank per GPU, or per CPU slot when gpu=0 (gloo).

    With ``--max_restarts N`` torchrun stops all workers when one fails and starts them again (on
    every scheduler, local_cwd included); each resumes from the run directory's newest complete
    checkpoint, so set ``run.checkpoint_every``.

    Args:
        overrides: config overrides such as selector.alpha=0.5 scn.sync_every=1000
        config: YAML file under configs/
        data: dataset root (overrides data.path in the config)
        run_dir: where config, sharding plan, TensorBoard events and metrics.json go
        j: {nnodes}x{nproc_per_node}, e.g. 1x2 or 2x8
        gpu: GPUs per node (0: CPU ranks with gloo)
        cpu: CPUs per replica
        memMB: memory per replica (MB)
        image: container image, or the local directory holding the code
        max_restarts: torchrun restarts of all workers after one fails (torchrun --max-restarts)
        max_retries: scheduler retries of the whole job (kubernetes, slurm, ...); local schedulers ignore it
        rdzv_port: c10d rendezvous port on the first node
        env: extra environment variables
    """
    args = ["train", "--config", config, "--run-dir", run_dir] + (["--data", data] if data else []) + list(overrides)
    env = dict(env or {})
    if max_restarts:
        # torch shares the rendezvous TCPStore with the workers and keeps it across restarts, so the
        # restarted ranks read the previous attempt's gloo/nccl addresses (pytorch/pytorch#135712);
        # unshared, rank 0 hosts a fresh store on every attempt.
        env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    app = dist.ddp(*args, m="cctl_rec.cli", j=j, gpu=gpu, cpu=cpu, memMB=memMB, image=image, name="cctl-train",
                   max_retries=max_retries, rdzv_port=rdzv_port, env=env)
    if max_restarts:  # dist.ddp has no torchrun --max-restarts (its max_retries is the scheduler's)
        role = app.roles[0]
        if not role.args[-1].startswith("torchrun "):
            raise RuntimeError(f"unexpected dist.ddp command {role.args[-1][:80]!r}; torchx changed its layout")
        role.args[-1] = f"torchrun --max-restarts {max_restarts} " + role.args[-1][len("torchrun "):]
    return app


def datagen(preset: str = "small", out: str = "data/small", seed: int = 0, scale: float = 1.0,
            j: str = "1x2", workers: int = 1, cpu: int = 2, memMB: int = 4096, image: str = IMAGE,
            rdzv_port: int = 29501) -> specs.AppDef:
    """Generates a synthetic two-domain dataset; shards are spread over the replicas (RANK i of
    WORLD_SIZE n writes shards i, i+n, ...); rank 0 writes the manifest once all shards exist.

    Args:
        preset: tiny, small or meituan
        out: output directory or URI
        seed: random seed (same seed, same bytes, whatever the replica count)
        scale: multiplies the preset's sample counts
        j: {nnodes}x{nproc_per_node}
        workers: worker processes per replica
        cpu: CPUs per replica
        memMB: memory per replica (MB)
        image: container image, or the local directory holding the code
        rdzv_port: c10d rendezvous port
    """
    args = ["datagen", "--preset", preset, "--out", out, "--seed", str(seed), "--scale", str(scale),
            "--workers", str(workers)]
    return dist.ddp(*args, m="cctl_rec.cli", j=j, cpu=cpu, memMB=memMB, image=image, name="cctl-datagen",
                    rdzv_port=rdzv_port)


def bench(*extra: str, what: str, out: str = "", j: str = "1x1", gpu: int = 0, cpu: int = 2, memMB: int = 8192,
          image: str = IMAGE, rdzv_port: int = 29502, env: Optional[Dict[str, str]] = None) -> specs.AppDef:
    """Runs ``cctl-rec bench WHAT --out OUT [extra]`` under torchrun; the measurements go to OUT as JSON.

    WHAT is passed through as given: datagen today; train, sync, reward, data, kernels, scaling and
    stress as the bench command gains them (``cctl-rec bench --help`` lists those installed).

    Args:
        extra: further arguments of the benchmark, e.g. --preset tiny --rows 200000
        what: the benchmark (datagen, train, sync, reward, data, kernels, scaling, stress)
        out: JSON file for the results (default bench-WHAT.json in the working directory)
        j: {nnodes}x{nproc_per_node}; 1x1 unless the benchmark measures several ranks
        gpu: GPUs per node (0: CPU ranks with gloo)
        cpu: CPUs per replica
        memMB: memory per replica (MB)
        image: container image, or the local directory holding the code
        rdzv_port: c10d rendezvous port on the first node
        env: extra environment variables
    """
    if not what or what.startswith("-") or any(c.isspace() for c in what):
        raise ValueError(f"bench: --what must name a benchmark such as datagen, got {what!r}")
    args = ["bench", what, "--out", out or f"bench-{what}.json", *extra]
    return dist.ddp(*args, m="cctl_rec.cli", j=j, gpu=gpu, cpu=cpu, memMB=memMB, image=image, name=f"cctl-bench-{what}",
                    rdzv_port=rdzv_port, env=env)


def experiment(config: str, out: str, seeds: str = "", only: str = "", cpu: int = 2, memMB: int = 16384,
               image: str = IMAGE, env: Optional[Dict[str, str]] = None) -> specs.AppDef:
    """Runs ``cctl-rec experiment``: every model x seed of ``config`` one after another, then
    ``OUT/results.json`` and ``OUT/report.md``; rerunning skips the finished runs.

    One plain process, not under torchrun: the experiment starts each training itself (under its
    own torchrun when the spec's ``ranks`` > 1), which must not inherit an outer rendezvous.

    Args:
        config: experiment YAML, e.g. configs/experiments/amazon.yaml
        out: output directory (runs/, results.json, report.md, plots)
        seeds: comma-separated seeds replacing the spec's, e.g. 0,1
        only: comma-separated model names to run
        cpu: CPUs for the process
        memMB: memory (MB)
        image: container image, or the local directory holding the code
        env: extra environment variables
    """
    args = ["-m", "cctl_rec.cli", "experiment", "--config", config, "--out", out]
    args += (["--seeds", seeds] if seeds else []) + (["--only", only] if only else [])
    role = specs.Role(name="experiment", image=image, entrypoint="python", args=args,
                      resource=specs.Resource(cpu=cpu, gpu=0, memMB=memMB), env=dict(env or {}))
    return specs.AppDef(name="cctl-experiment", roles=[role])
