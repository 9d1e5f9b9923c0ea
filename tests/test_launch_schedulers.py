"""torchx components on kubernetes and slurm: the specs their dry runs produce (no cluster needed).

The fast tests call torchx's Python API (``Runner.dryrun``) and read the volcano Job (YAML) and the
sbatch script it would submit; the slow one runs the README's kubernetes and slurm lines through
the torchx CLI with ``--dryrun``, so they stay copy-paste correct.
"""

import os
import re
import shlex
import subprocess
import sys
import warnings
from unittest import mock

import pytest
import yaml
from torchx.runner import get_runner
from torchx.schedulers.slurm_scheduler import SlurmScheduler

from launch import components

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = "ghcr.io/org/cctl-rec:0.1.0"
PVC = ["type=volume", "src=cctl", "dst=/mnt/cctl"]


@pytest.fixture(scope="module")
def runner():
    r = get_runner()
    yield r
    r.close()


def k8s(runner, app) -> dict:
    """The volcano Job the kubernetes scheduler would create, as a dict."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # volcano's retry warning when max_retries > 0
        info = runner.dryrun(app, "kubernetes", cfg={"queue": "default", "namespace": "recsys"})
    return yaml.safe_load(str(info))


def slurm(runner, app):
    """The sbatch request (no ``sinfo`` call: no slurm here)."""
    with mock.patch.object(SlurmScheduler, "_partition_memmb", return_value=None):
        return runner.dryrun(app, "slurm", cfg={"partition": "gpu", "time": "720"})


def env_of(container: dict) -> dict:
    return {e["name"]: e["value"] for e in container["env"]}


def test_train_on_kubernetes_2x8_gpus_pvc_env_restarts(runner):
    app = components.train("run.checkpoint_every=1000", j="2x8", gpu=8, image=IMAGE, mounts=PVC,
                           data="/mnt/cctl/data/small", run_dir="/mnt/cctl/runs/x", max_restarts=3,
                           max_retries=2, env={"NCCL_DEBUG": "INFO"})
    job = k8s(runner, app)
    spec = job["spec"]
    assert job["kind"] == "Job" and spec["schedulerName"] == "volcano" and spec["queue"] == "default"
    assert job["metadata"]["name"].startswith("cctl-train-")
    assert spec["maxRetry"] == 2  # --max_retries: the scheduler's
    assert [t["replicas"] for t in spec["tasks"]] == [1, 1]  # 2 nodes, one pod each
    for i, task in enumerate(spec["tasks"]):
        pod = task["template"]["spec"]
        (c,) = pod["containers"]
        assert c["image"] == IMAGE
        # cpu and memory follow the GPUs (torchx's gpu.xlarge share), not 2 CPUs / 8 GiB
        assert c["resources"]["limits"] == {"cpu": "64000m", "memory": "262144M", "nvidia.com/gpu": "8"}
        assert c["resources"]["requests"]["nvidia.com/gpu"] == "8"
        cmd = c["command"][-1]
        assert cmd.startswith("torchrun --max-restarts 3 ")  # --max_restarts: torchrun's
        assert "--nnodes 2 --nproc_per_node 8" in cmd
        assert cmd.endswith("-m cctl_rec.cli train --config configs/cctl_small.yaml --run-dir /mnt/cctl/runs/x "
                            "--data /mnt/cctl/data/small run.checkpoint_every=1000")
        env = env_of(c)
        assert env["NCCL_DEBUG"] == "INFO" and env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
        assert {"mountPath": "/mnt/cctl", "name": "mount-0", "readOnly": False} in c["volumeMounts"]
        assert {"name": "mount-0", "persistentVolumeClaim": {"claimName": "cctl"}} in pod["volumes"]
        assert pod["restartPolicy"] == "Never"
        if i == 1:  # the second node finds the first through volcano's host variable
            assert "${VC_CLI_0_HOSTS:=localhost}:29500" in cmd


def test_train_on_kubernetes_named_resource_and_host_path(runner):
    app = components.train(j="2x8", h="aws_p4d.24xlarge", image=IMAGE, run_dir="/mnt/cctl/runs/x",
                           mounts=["type=bind", "src=/fsx", "dst=/mnt/cctl",
                                   "type=volume", "src=ro-data", "dst=/mnt/data", "readonly"])
    pod = k8s(runner, app)["spec"]["tasks"][0]["template"]["spec"]
    (c,) = pod["containers"]
    assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "p4d.24xlarge"}
    limits = c["resources"]["limits"]
    assert limits["cpu"] == "96000m" and limits["nvidia.com/gpu"] == "8" and limits["vpc.amazonaws.com/efa"] == "4"
    assert {"hostPath": {"path": "/fsx"}, "name": "mount-0"} in pod["volumes"]
    assert {"mountPath": "/mnt/data", "name": "mount-1", "readOnly": True} in c["volumeMounts"]
    env = env_of(c)
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in env  # no restarts, no workaround
    assert "--max-restarts" not in c["command"][-1]
    assert k8s(runner, app)["spec"]["maxRetry"] == 0


def test_train_on_slurm_2x8_named_resource_env_restarts(runner):
    app = components.train("a.b=1", j="2x8", h="gpu.xlarge", data="/shared/cctl/data",
                           run_dir="/shared/cctl/runs/x", max_restarts=3, max_retries=2, env={"NCCL_DEBUG": "INFO"})
    info = slurm(runner, app)
    req = info.request
    assert sorted(req.replicas) == ["cli-0", "cli-1"] and req.max_retries == 2
    script = str(info)
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH --job-name")]
    assert len(sbatch) == 2  # one heterogeneous group per node
    for line in sbatch:
        for opt in ("--partition=gpu", "--time=720", "--ntasks-per-node=1", "--cpus-per-task=64", "--mem=262144",
                    "--gpus-per-task=8"):
            assert opt in line.split(), (opt, line)
    assert "export TORCHX_MAX_RETRIES=2" in script
    srun = [line for line in script.splitlines() if "--export=ALL," in line]
    assert len(srun) == 2
    for line in srun:
        exported = line.split("--export=ALL,")[1].split()[0]
        assert "NCCL_DEBUG=INFO" in exported and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in exported
        assert "torchrun --max-restarts 3 " in line and "--nnodes 2 --nproc_per_node 8" in line
        assert "--run-dir /shared/cctl/runs/x --data /shared/cctl/data a.b=1" in line


def test_slurm_gpu_without_named_resource_follows_the_gpus(runner):
    script = str(slurm(runner, components.train(j="1x4", gpu=4, run_dir="/shared/r")))
    assert "--cpus-per-task=32 --mem=131072 --gpus-per-task=4" in script
    script = str(slurm(runner, components.train(j="1x4", gpu=4, cpu=12, memMB=65536, run_dir="/shared/r")))
    assert "--cpus-per-task=12 --mem=65536 --gpus-per-task=4" in script


@pytest.mark.parametrize("name", ["datagen", "bench", "experiment"])
def test_other_components_on_kubernetes_take_mounts_resource_env(runner, name):
    make = {"datagen": lambda **kw: components.datagen(out="/mnt/cctl/data/small", j="1x1", **kw),
            "bench": lambda **kw: components.bench(what="train", out="/mnt/cctl/bench.json", **kw),
            "experiment": lambda **kw: components.experiment(config="configs/experiments/amazon.yaml",
                                                             out="/mnt/cctl/exp", **kw)}[name]
    job = k8s(runner, make(h="cpu.xlarge", image=IMAGE, mounts=PVC, env={"K": "v"}))
    (task,) = job["spec"]["tasks"]
    pod = task["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == IMAGE and c["resources"]["limits"] == {"cpu": "8000m", "memory": "32768M"}
    assert env_of(c)["K"] == "v"
    assert {"name": "mount-0", "persistentVolumeClaim": {"claimName": "cctl"}} in pod["volumes"]
    assert "/mnt/cctl/" in " ".join(c["command"])


def test_resources_follow_gpus_cpu_defaults_unchanged():
    res = components.train().roles[0].resource
    assert (res.cpu, res.gpu, res.memMB) == (2, 0, 8192)
    res = components.train(j="1x8").roles[0].resource  # CPU ranks: one CPU and 4 GiB each
    assert (res.cpu, res.gpu, res.memMB) == (8, 0, 32768)
    res = components.train(j="1x8", gpu=8).roles[0].resource
    assert (res.cpu, res.gpu, res.memMB) == (64, 8, 8 * 32 * 1024)
    res = components.train(j="1x8", gpu=8, cpu=48, memMB=500_000).roles[0].resource
    assert (res.cpu, res.gpu, res.memMB) == (48, 8, 500_000)
    res = components.train(j="1x1", h="gpu.small").roles[0].resource
    assert (res.cpu, res.gpu, res.memMB) == (8, 1, 32 * 1024)
    res = components.experiment(config="c.yaml", out="o", gpu=2).roles[0].resource
    assert (res.cpu, res.gpu, res.memMB) == (16, 2, 64 * 1024)
    res = components.datagen().roles[0].resource
    assert (res.cpu, res.gpu, res.memMB) == (2, 0, 4096)


@pytest.mark.parametrize("kwargs,match", [
    (dict(h="gpu.small", cpu=4), "give either --h or --cpu/--gpu/--memMB"),
    (dict(h="gpu.xlarge", gpu=8), "give either --h or"),
    (dict(h="gpu.smal"), "unknown named resource --h 'gpu.smal'.*gpu.small"),
    (dict(h="gpu.small", j="1x2"), "starts 2 ranks per node but a node has 1 GPU"),
    (dict(gpu=2, j="1x4"), "one rank per GPU: --j NNODESx2"),
    (dict(gpu=-1), "must be >= 0"),
    (dict(max_restarts=-1), "--max_restarts must be >= 0"),
    (dict(mounts=PVC, run_dir="runs/x"), "--run_dir runs/x is not on a mount \\(mounted: /mnt/cctl\\)"),
    (dict(mounts=PVC, run_dir="/mnt/cctlx/r"), "not on a mount"),
    (dict(mounts=PVC + ["readonly"], run_dir="/mnt/cctl/r"), "read-only mount /mnt/cctl"),
    (dict(mounts=["type=volume", "dst=/mnt/x"], run_dir="/mnt/x/r"), "bad --mounts .*expected type=volume"),
    (dict(mounts=["src=a", "type=volume", "dst=/mnt/x"], run_dir="/mnt/x/r"), "bad --mounts"),
    (dict(mounts=["type=nfs", "src=a", "dst=/mnt/x"], run_dir="/mnt/x/r"), "bad --mounts"),
])
def test_train_refuses(kwargs, match):
    with pytest.raises(ValueError, match=match):
        components.train(**kwargs)


def test_outputs_on_mounts():
    assert components.train(mounts=PVC, run_dir="/mnt/cctl").roles[0].mounts[0].dst_path == "/mnt/cctl"
    assert components.train(mounts=PVC, run_dir="/mnt/cctl/runs/../runs/x").roles[0].mounts
    assert components.train(mounts=PVC, run_dir="s3://bucket/runs/x").roles[0].mounts  # a URL needs no mount
    assert components.train(run_dir="runs/x").roles[0].mounts == []  # no mounts: local_cwd, slurm
    with pytest.raises(ValueError, match="--out runs/e is not on a mount"):
        components.experiment(config="c.yaml", out="runs/e", mounts=PVC)
    with pytest.raises(ValueError, match="--out bench-train.json is not on a mount"):
        components.bench(what="train", mounts=PVC)
    with pytest.raises(ValueError, match="--out data/small is not on a mount"):
        components.datagen(mounts=PVC)


def _readme_line(scheduler: str) -> list:
    text = open(os.path.join(REPO, "README.md")).read()
    (line,) = [x for x in text.splitlines() if re.match(rf"torchx run .*-s {scheduler} ", x)]
    return shlex.split(line)


@pytest.mark.slow  # the torchx CLI in subprocesses
def test_readme_kubernetes_and_slurm_lines_dry_run():
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])

    def dryrun(argv):
        assert argv[:2] == ["torchx", "run"], argv
        r = subprocess.run(argv[:2] + ["--dryrun"] + argv[2:], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout.split("=== SCHEDULER REQUEST ===")[1]

    job = yaml.safe_load(dryrun(_readme_line("kubernetes")))
    assert [t["replicas"] for t in job["spec"]["tasks"]] == [1, 1]
    pod = job["spec"]["tasks"][0]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"].endswith("/cctl-rec:0.1.0") and c["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert int(c["resources"]["limits"]["cpu"].rstrip("m")) >= 8000 * 8
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v}
    mounted = {m["mountPath"]: claims[m["name"]] for m in c["volumeMounts"] if m["name"] in claims}
    run_dir = c["command"][-1].split("--run-dir ")[1].split()[0]
    assert any(run_dir.startswith(p + "/") for p in mounted), (run_dir, mounted)  # the run dir survives the pod
    assert env_of(c)["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1" and "--max-restarts" in c["command"][-1]

    script = dryrun(_readme_line("slurm"))
    assert script.count("#SBATCH --job-name") == 2 and script.count("--gpus-per-task=8") == 2
    assert "--run-dir /" in script  # an absolute path: the shared filesystem, not the job's cwd

    # the CLI's own parsing of --env and --mounts (comma-joined) into the spec
    out = dryrun(["torchx", "run", "--workspace", "", "-s", "kubernetes", "-cfg", "queue=default",
                  "launch/components.py:train", "--j", "1x1", "--h", "gpu.small", "--image", IMAGE,
                  "--mounts", "type=bind,src=/fsx,dst=/mnt/cctl", "--run_dir", "/mnt/cctl/r",
                  "--env", "NCCL_DEBUG=INFO,FOO=bar", "--max_restarts", "1"])
    (c,) = yaml.safe_load(out)["spec"]["tasks"][0]["template"]["spec"]["containers"]
    env = env_of(c)
    assert env["NCCL_DEBUG"] == "INFO" and env["FOO"] == "bar" and env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert c["resources"]["limits"] == {"cpu": "8000m", "memory": "32768M", "nvidia.com/gpu": "1"}
