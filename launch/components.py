"""torchx components for cctl-rec: train, datagen and bench (thin wrappers over ``dist.ddp``) and
experiment (one process that runs an experiment's trainings one after another).

Each function's docstring is its ``torchx run ... --help``. Examples (from the repository root,
with the virtualenv's ``bin`` on PATH, since torchx starts ``torchrun``)::

    # 2 CPU ranks on this machine (gloo)
    torchx run -s local_cwd launch/components.py:train --j 1x2 --config configs/cctl_small.yaml \\
        --run_dir runs/small -- selector.mode=paper
    # 8 GPUs on one host (nccl) in the Dockerfile's image
    torchx run -s local_docker launch/components.py:train --j 1x8 --gpu 8 --image cctl-rec:0.1.0
    # kubernetes (volcano), 2 nodes x 8 GPUs: the image as built (--workspace "": no local docker
    # needed), data and run dir on the PersistentVolumeClaim `cctl` mounted at /mnt/cctl
    torchx run --workspace "" -s kubernetes -cfg queue=default,namespace=recsys launch/components.py:datagen \\
        --preset small --out /mnt/cctl/data/small --j 1x1 --image ghcr.io/ORG/cctl-rec:0.1.0 \\
        --mounts type=volume,src=cctl,dst=/mnt/cctl
    torchx run --workspace "" -s kubernetes -cfg queue=default,namespace=recsys launch/components.py:train \\
        --j 2x8 --gpu 8 --image ghcr.io/ORG/cctl-rec:0.1.0 --mounts type=volume,src=cctl,dst=/mnt/cctl \\
        --data /mnt/cctl/data/small --run_dir /mnt/cctl/runs/cctl-2x8 --max_restarts 3 -- run.checkpoint_every=1000
    # slurm: jobs run in the current directory with the active virtualenv (no container, no
    # mounts), so submit from a checkout on the shared filesystem and keep data and run dir there
    torchx run -s slurm -cfg partition=gpu,time=720 launch/components.py:train --j 2x8 --h gpu.xlarge \\
        --data /shared/cctl/data/small --run_dir /shared/cctl/runs/cctl-2x8
    # a killed rank: torchrun restarts all ranks (at most 3 times), they resume from the newest checkpoint
    torchx run -s local_cwd launch/components.py:train --j 1x2 --max_restarts 3 --config configs/cctl_small.yaml \\
        --run_dir runs/small -- run.checkpoint_every=500
    # a benchmark, its JSON into --out
    torchx run -s local_cwd launch/components.py:bench --what datagen --out bench-datagen.json -- --preset tiny
    # an experiment (models x seeds; its runs with ranks > 1 start their own torchrun)
    torchx run -s local_cwd launch/components.py:experiment --config configs/experiments/amazon.yaml \\
        --out runs/exp-amazon

Resources (every component): ``--h NAME`` takes cpu, gpu and memory from a torchx named resource
(``gpu.small`` .. ``gpu.xlarge``, ``cpu.small`` .. ``cpu.xlarge``, ``aws_p4d.24xlarge`` and the other
``aws_*`` instance types, or one registered under the ``torchx.named_resources`` entry point); it
excludes ``--cpu/--gpu/--memMB``. Without it, ``--gpu N`` asks for the host share of torchx's
generic ``gpu.*`` resources, 8 CPUs and 32 GiB per GPU, unless ``--cpu`` / ``--memMB`` say
otherwise. On kubernetes torchx requests 0.1 CPU and 1 GiB less than the limit (node reserve).

``--mounts`` takes torchx's mount strings, comma-joined: ``type=volume,src=PVC,dst=/mnt/x`` (a
kubernetes PersistentVolumeClaim), ``type=bind,src=/host/path,dst=/mnt/x[,readonly]`` (a host path),
``type=device,src=/dev/X``. With mounts, a component refuses an output path (run dir, --out) that is
local and not on a writable mount: it would vanish with the container. slurm has no mounts (its
jobs see the shared filesystem); local_cwd ignores them.

``--env K=V,K2=V2`` reaches every rank (kubernetes: the pod's env; slurm: ``srun --export=ALL,...``).
"""


import os
from typing import Dict, List, Optional, Union

import torchx.specs as specs
from torchx.components import dist
from torchx.components.dist import parse_nnodes

IMAGE = "cctl-rec:0.1.0"
"""The image built from the repository's Dockerfile (ignored by the local_cwd and slurm schedulers)."""

GPU_CPU = 8
"""CPUs asked per GPU without --h or --cpu: torchx's generic gpu.small .. gpu.xlarge ratio."""
GPU_MEM_MB = 32 * 1024
"""Memory (MB) asked per GPU without --h or --memMB: the same ratio."""

Mount = Union[specs.BindMount, specs.VolumeMount, specs.DeviceMount]


def _resource(j: str, gpu: int, cpu: int, memMB: int, h: Optional[str], cpu_default: int,
              mem_default: int) -> specs.Resource:
    """The replica's resource: the named one, or cpu/memory that follow the GPUs, or the CPU defaults."""
    nproc = parse_nnodes(j)[2]
    if h:
        if cpu or gpu or memMB:
            raise ValueError(f"--h {h} sets cpu, gpu and memory; give either --h or --cpu/--gpu/--memMB, "
                             f"got --cpu {cpu} --gpu {gpu} --memMB {memMB}")
        try:
            res = specs.named_resources[h]
        except KeyError as e:  # torchx's message names the closest match
            raise ValueError(f"unknown named resource --h {h!r}: {e.args[0]}") from None
    else:
        if min(gpu, cpu, memMB) < 0:
            raise ValueError(f"--cpu, --gpu and --memMB must be >= 0, got {cpu}, {gpu}, {memMB}")
        if gpu:
            res = specs.Resource(cpu=cpu or GPU_CPU * gpu, gpu=gpu, memMB=memMB or GPU_MEM_MB * gpu)
        else:
            res = specs.Resource(cpu=cpu or cpu_default, gpu=0, memMB=memMB or mem_default)
    if res.gpu and nproc > res.gpu:
        raise ValueError(f"--j {j} starts {nproc} ranks per node but a node has {res.gpu} GPU(s) "
                         f"({'--h ' + h if h else '--gpu'}); one rank per GPU: --j NNODESx{res.gpu}")
    return res


def _mounts(mounts: Optional[List[str]]) -> List[Mount]:
    """torchx's mount strings, parsed; a malformed one is a ValueError naming the format."""
    if not mounts:
        return []
    try:
        return specs.parse_mounts(mounts)
    except (KeyError, ValueError) as e:
        msg = e.args[0] if e.args else e
        raise ValueError(f"bad --mounts {','.join(mounts)!r} ({msg}); expected "
                         "type=volume,src=PVC,dst=/mnt/x or type=bind,src=/host,dst=/mnt/x[,readonly]") from None


def _on_mount(what: str, path: str, mounts: List[Mount]) -> None:
    """With mounts, a local output path must lie on a writable one (else it dies with the container)."""
    if not mounts or "://" in path:
        return
    norm = os.path.normpath(path)
    for m in mounts:
        if isinstance(m, specs.DeviceMount):
            continue
        dst = os.path.normpath(m.dst_path)
        if norm == dst or norm.startswith(dst.rstrip("/") + "/"):
            if m.read_only:
                raise ValueError(f"{what} {path} is on the read-only mount {m.dst_path}; drop readonly or "
                                 "write elsewhere")
            return
    dsts = ", ".join(m.dst_path for m in mounts if not isinstance(m, specs.DeviceMount)) or "none"
    raise ValueError(f"{what} {path} is not on a mount (mounted: {dsts}); in a container it is lost when the "
                     f"job ends: put it under a mount's dst, e.g. {dsts.split(', ')[0]}/...")


def _finish(app: specs.AppDef, res: specs.Resource, mounts: List[Mount]) -> specs.AppDef:
    role = app.roles[0]
    role.resource = res  # the named resource as registered (capabilities such as the instance type)
    role.mounts = mounts
    return app


def train(*overrides: str, config: str = "configs/cctl_small.yaml", data: str = "", features: str = "",
          run_dir: str = "runs/cctl", j: str = "1x2", gpu: int = 0, h: Optional[str] = None, cpu: int = 0,
          memMB: int = 0, image: str = IMAGE, mounts: Optional[List[str]] = None, max_restarts: int = 0,
          max_retries: int = 0, rdzv_port: int = 29500, env: Optional[Dict[str, str]] = None) -> specs.AppDef:
    """Trains CCTL with torchrun: one rank per GPU, or per CPU slot when gpu=0 (gloo).

    With ``--max_restarts N`` torchrun stops all workers when one fails and starts them again (on
    every scheduler, local_cwd included); each resumes from the run directory's newest complete
    checkpoint, so set ``run.checkpoint_every``. In a container put ``--run_dir`` on a mount (or a
    URL): it holds the checkpoints and metrics.json.

    Args:
        overrides: config overrides such as selector.alpha=0.5 scn.sync_every=1000
        config: YAML file under configs/
        data: dataset root (overrides data.path in the config); with features, the raw logs' directory
        features: feature config YAML: train on the raw Parquet logs under data, mapped once by rank 0
            into run_dir/prepared/ (docs/features.md); needs a run_dir every rank sees
        run_dir: where config, sharding plan, TensorBoard events, checkpoints and metrics.json go
        j: {nnodes}x{nproc_per_node}, e.g. 1x2 or 2x8; with GPUs at most one rank per GPU
        gpu: GPUs per node (0: CPU ranks with gloo); cpu and memMB follow (8 CPUs, 32 GiB per GPU)
        h: torchx named resource per node (gpu.xlarge, aws_p4d.24xlarge, ...) instead of cpu/gpu/memMB
        cpu: CPUs per node (0: 8 per GPU, or one per CPU rank and at least 2)
        memMB: memory per node in MB (0: 32 GiB per GPU, or 4 GiB per CPU rank and at least 8 GiB)
        image: container image, or the local directory holding the code
        mounts: torchx mounts, e.g. type=volume,src=PVC,dst=/mnt/cctl (kubernetes) or type=bind,src=/host,dst=/mnt/cctl
        max_restarts: torchrun restarts of all workers after one fails (torchrun --max-restarts)
        max_retries: scheduler retries of the whole job (kubernetes, slurm, ...); local schedulers ignore it
        rdzv_port: c10d rendezvous port on the first node
        env: extra environment variables for every rank, K=V,K2=V2
    """
    nproc = parse_nnodes(j)[2]
    res = _resource(j, gpu, cpu, memMB, h, cpu_default=max(2, nproc), mem_default=4096 * max(2, nproc))
    mnts = _mounts(mounts)
    _on_mount("--run_dir", run_dir, mnts)
    if features and not data:
        raise ValueError(f"--features {features} needs --data, the directory of the raw logs it maps")
    args = ["train", "--config", config, "--run-dir", run_dir] + (["--data", data] if data else [])
    args += (["--features", features] if features else []) + list(overrides)
    env = dict(env or {})
    if max_restarts < 0:
        raise ValueError(f"--max_restarts must be >= 0, got {max_restarts}")
    if max_restarts:
        # torch shares the rendezvous TCPStore with the workers and keeps it across restarts, so the
        # restarted ranks read the previous attempt's gloo/nccl addresses (pytorch/pytorch#135712);
        # unshared, rank 0 hosts a fresh store on every attempt.
        env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    app = dist.ddp(*args, m="cctl_rec.cli", j=j, gpu=res.gpu, cpu=res.cpu, memMB=res.memMB, image=image,
                   name="cctl-train", max_retries=max_retries, rdzv_port=rdzv_port, env=env)
    if max_restarts:  # dist.ddp has no torchrun --max-restarts (its max_retries is the scheduler's)
        role = app.roles[0]
        if not role.args[-1].startswith("torchrun "):
            raise RuntimeError(f"unexpected dist.ddp command {role.args[-1][:80]!r}; torchx changed its layout")
        role.args[-1] = f"torchrun --max-restarts {max_restarts} " + role.args[-1][len("torchrun "):]
    return _finish(app, res, mnts)


def datagen(preset: str = "small", out: str = "data/small", seed: int = 0, scale: float = 1.0,
            j: str = "1x2", workers: int = 1, h: Optional[str] = None, cpu: int = 0, memMB: int = 0,
            image: str = IMAGE, mounts: Optional[List[str]] = None, rdzv_port: int = 29501,
            env: Optional[Dict[str, str]] = None) -> specs.AppDef:
    """Generates a synthetic two-domain dataset; shards are spread over the replicas (RANK i of
    WORLD_SIZE n writes shards i, i+n, ...); rank 0 writes the manifest once all shards exist.

    Args:
        preset: tiny, small or meituan
        out: output directory or URI (in a container: on a mount)
        seed: random seed (same seed, same bytes, whatever the replica count)
        scale: multiplies the preset's sample counts
        j: {nnodes}x{nproc_per_node}
        workers: worker processes per replica
        h: torchx named resource per node (cpu.xlarge, ...) instead of cpu/memMB
        cpu: CPUs per node (0: 2)
        memMB: memory per node in MB (0: 4 GiB)
        image: container image, or the local directory holding the code
        mounts: torchx mounts, e.g. type=volume,src=PVC,dst=/mnt/cctl
        rdzv_port: c10d rendezvous port
        env: extra environment variables, K=V,K2=V2
    """
    res = _resource(j, 0, cpu, memMB, h, cpu_default=2, mem_default=4096)
    mnts = _mounts(mounts)
    _on_mount("--out", out, mnts)
    args = ["datagen", "--preset", preset, "--out", out, "--seed", str(seed), "--scale", str(scale),
            "--workers", str(workers)]
    app = dist.ddp(*args, m="cctl_rec.cli", j=j, gpu=res.gpu, cpu=res.cpu, memMB=res.memMB, image=image,
                   name="cctl-datagen", rdzv_port=rdzv_port, env=dict(env or {}))
    return _finish(app, res, mnts)


def bench(*extra: str, what: str, out: str = "", j: str = "1x1", gpu: int = 0, h: Optional[str] = None,
          cpu: int = 0, memMB: int = 0, image: str = IMAGE, mounts: Optional[List[str]] = None,
          rdzv_port: int = 29502, env: Optional[Dict[str, str]] = None) -> specs.AppDef:
    """Runs ``cctl-rec bench WHAT --out OUT [extra]`` under torchrun; the measurements go to OUT as JSON.

    WHAT is passed through as given: datagen today; train, sync, reward, data, kernels, scaling and
    stress as the bench command gains them (``cctl-rec bench --help`` lists those installed).

    Args:
        extra: further arguments of the benchmark, e.g. --preset tiny --rows 200000
        what: the benchmark (datagen, train, sync, reward, data, kernels, scaling, stress)
        out: JSON file for the results (default bench-WHAT.json in the working directory; in a container: on a mount)
        j: {nnodes}x{nproc_per_node}; 1x1 unless the benchmark measures several ranks
        gpu: GPUs per node (0: CPU ranks with gloo); cpu and memMB follow (8 CPUs, 32 GiB per GPU)
        h: torchx named resource per node (gpu.small, aws_p4d.24xlarge, ...) instead of cpu/gpu/memMB
        cpu: CPUs per node (0: 8 per GPU, else 2)
        memMB: memory per node in MB (0: 32 GiB per GPU, else 8 GiB)
        image: container image, or the local directory holding the code
        mounts: torchx mounts, e.g. type=volume,src=PVC,dst=/mnt/cctl
        rdzv_port: c10d rendezvous port on the first node
        env: extra environment variables, K=V,K2=V2
    """
    if not what or what.startswith("-") or any(c.isspace() for c in what):
        raise ValueError(f"bench: --what must name a benchmark such as datagen, got {what!r}")
    res = _resource(j, gpu, cpu, memMB, h, cpu_default=2, mem_default=8192)
    mnts = _mounts(mounts)
    out = out or f"bench-{what}.json"
    _on_mount("--out", out, mnts)
    args = ["bench", what, "--out", out, *extra]
    app = dist.ddp(*args, m="cctl_rec.cli", j=j, gpu=res.gpu, cpu=res.cpu, memMB=res.memMB, image=image,
                   name=f"cctl-bench-{what}", rdzv_port=rdzv_port, env=dict(env or {}))
    return _finish(app, res, mnts)


def experiment(config: str, out: str, seeds: str = "", only: str = "", gpu: int = 0, h: Optional[str] = None,
               cpu: int = 0, memMB: int = 0, image: str = IMAGE, mounts: Optional[List[str]] = None,
               env: Optional[Dict[str, str]] = None) -> specs.AppDef:
    """Runs ``cctl-rec experiment``: every model x seed of ``config`` one after another, then
    ``OUT/results.json`` and ``OUT/report.md``; rerunning skips the finished runs.

    One plain process, not under torchrun: the experiment starts each training itself (under its
    own torchrun when the spec's ``ranks`` > 1), which must not inherit an outer rendezvous.

    Args:
        config: experiment YAML, e.g. configs/experiments/amazon.yaml
        out: output directory (runs/, results.json, report.md, plots; in a container: on a mount)
        seeds: comma-separated seeds replacing the spec's, e.g. 0,1
        only: comma-separated model names to run
        gpu: GPUs for the process (its trainings' ranks); cpu and memMB follow (8 CPUs, 32 GiB per GPU)
        h: torchx named resource (gpu.large, cpu.xlarge, ...) instead of cpu/gpu/memMB
        cpu: CPUs for the process (0: 8 per GPU, else 2)
        memMB: memory in MB (0: 32 GiB per GPU, else 16 GiB)
        image: container image, or the local directory holding the code
        mounts: torchx mounts, e.g. type=volume,src=PVC,dst=/mnt/cctl
        env: extra environment variables, K=V,K2=V2
    """
    res = _resource("1x1", gpu, cpu, memMB, h, cpu_default=2, mem_default=16384)
    mnts = _mounts(mounts)
    _on_mount("--out", out, mnts)
    args = ["-m", "cctl_rec.cli", "experiment", "--config", config, "--out", out]
    args += (["--seeds", seeds] if seeds else []) + (["--only", only] if only else [])
    role = specs.Role(name="experiment", image=image, entrypoint="python", args=args, resource=res,
                      env=dict(env or {}), mounts=mnts)
    return specs.AppDef(name="cctl-experiment", roles=[role])
