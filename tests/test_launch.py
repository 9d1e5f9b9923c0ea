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

    def test_train_appdef(self) -> None:
        app = components.train("selector.alpha=0.5", config="configs/cctl_tiny.yaml", data="data/tiny",
                               run_dir="runs/x", j="2x4", gpu=4)
        role = app.roles[0]
        assert role.num_replicas == 2 and role.resource.gpu == 4
        args = " ".join(role.args)
        assert "cctl_rec.cli train --config configs/cctl_tiny.yaml --run-dir runs/x --data data/tiny" in args
        assert args.endswith("selector.alpha=0.5")


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
