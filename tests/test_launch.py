"""torchx components: they validate, and train really runs through `torchx run -s local_cwd`."""

import json
import os
import subprocess
import sys

import pytest
from torchx.components.component_test_base import ComponentTestCase

from launch import components

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ComponentsTest(ComponentTestCase):
    def test_train_validates(self) -> None:
        self.validate(components, "train")

    def test_datagen_validates(self) -> None:
        self.validate(components, "datagen")

    def test_bench_validates(self) -> None:
        self.validate(components, "bench")

    def test_experiment_validates(self) -> None:
        self.validate(components, "experiment")

    def test_experiment_appdef_is_one_plain_process(self) -> None:
        role = components.experiment(config="configs/experiments/amazon.yaml", out="runs/e", seeds="0,1").roles[0]
        assert role.entrypoint == "python" and role.num_replicas == 1
        assert role.args == ["-m", "cctl_rec.cli", "experiment", "--config", "configs/experiments/amazon.yaml",
                             "--out", "runs/e", "--seeds", "0,1"]

    def test_bench_appdef_passes_what_and_extra_through(self) -> None:
        app = components.bench("--preset", "tiny", "--rows", "1000", what="kernels", out="runs/k.json", j="1x2")
        role = app.roles[0]
        assert role.num_replicas == 1 and role.resource.gpu == 0
        assert role.args[-1].endswith("-m cctl_rec.cli bench kernels --out runs/k.json --preset tiny --rows 1000")
        assert "--nproc_per_node 2" in role.args[-1]
        assert components.bench(what="stress").roles[0].args[-1].endswith("bench stress --out bench-stress.json")
        with pytest.raises(ValueError, match="--what must name a benchmark"):
            components.bench(what="--rows")

    def test_train_max_restarts_reach_torchrun(self) -> None:
        role = components.train(j="2x1", max_restarts=2, env={"A": "1"}).roles[0]
        assert role.args[-1].startswith("torchrun --max-restarts 2 --rdzv_backend c10d ")
        assert role.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1" and role.env["A"] == "1"
        role = components.train(max_retries=3).roles[0]  # the scheduler's retries; torchrun's default 0
        assert role.max_retries == 3 and "--max-restarts" not in role.args[-1]
        assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in role.env

    def test_train_appdef(self) -> None:
        app = components.train("selector.alpha=0.5", config="configs/cctl_tiny.yaml", data="data/tiny",
                               run_dir="runs/x", j="2x4", gpu=4)
        role = app.roles[0]
        assert role.num_replicas == 2 and role.resource.gpu == 4
        args = " ".join(role.args)
        assert "cctl_rec.cli train --config configs/cctl_tiny.yaml --run-dir runs/x --data data/tiny" in args
        assert args.endswith("selector.alpha=0.5")


@pytest.mark.slow  # torchx in a subprocess
def test_bench_dryrun_through_the_torchx_cli():
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    r = subprocess.run(["torchx", "run", "--dryrun", "-s", "local_cwd", "launch/components.py:bench", "--what",
                        "datagen", "--out", "b.json", "--", "--preset", "tiny", "--rows", "1000"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    flat = " ".join((r.stdout + r.stderr).replace("'", " ").replace('"', " ").split())  # pprint splits strings
    assert "-m cctl_rec.cli bench datagen --out b.json --preset tiny --rows 1000" in flat, flat[-3000:]


def _torchx(tmp_path, tiny_data, j, port):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    run_dir = tmp_path / f"run{j}"
    cmd = ["torchx", "run", "-s", "local_cwd", "launch/components.py:train", "--j", j, "--config",
           "configs/cctl_tiny.yaml", "--data", tiny_data, "--run_dir", str(run_dir), "--rdzv_port", str(port),
           "--", "data.batch_size=64", "run.steps=12", "model.tower=[16,8]", "scn.sync_every=5",
           "selector.update_every=4", "run.max_eval_rows=512"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("j,port", [("1x2", 29611), ("2x1", 29612)])
def test_train_through_torchx_on_two_ranks(tmp_path, tiny_data, j, port):
    m = _torchx(tmp_path, tiny_data, j, port)
    assert m["world_size"] == 2 and m["steps"] == 12 and m["selector_updates"] == 3


@pytest.mark.slow
def test_experiment_through_torchx(tmp_path, tiny_data):
    spec = tmp_path / "exp.yaml"
    spec.write_text(f"""name: tx
seeds: [0]
datasets:
  tiny: {{path: {tiny_data}}}
overrides: [data.batch_size=64, run.steps=6, "model.tower=[16,8]", run.max_eval_rows=512]
models:
  - {{name: DNN, config: configs/cctl_tiny.yaml, overrides: [model.name=dnn]}}
""")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    out = tmp_path / "out"
    r = subprocess.run(["torchx", "run", "-s", "local_cwd", "launch/components.py:experiment", "--config", str(spec),
                        "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert [x["status"] for x in res["runs"]] == ["ok"]
    assert (out / "report.md").read_text().startswith("# Experiment `tx`")
