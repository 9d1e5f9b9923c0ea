"""Training through `torchx run -s local_cwd` on 4 gloo ranks: one host with 4 processes (1x4) and
two "hosts" of 2 on this machine (2x2, c10d rendezvous on loopback)."""

import json

import pytest

from tests.test_launch import _torchx

pytestmark = pytest.mark.dist  # 4 torchrun workers


@pytest.mark.parametrize("j,port", [("1x4", 29621), ("2x2", 29622)])
def test_train_through_torchx_on_four_ranks(tmp_path, tiny_data, j, port):
    m = _torchx(tmp_path, tiny_data, j, port)
    assert m["world_size"] == 4 and m["steps"] == 12 and m["selector_updates"] == 3
    assert 0 < m["target_test"]["auc"] < 1
    plan = json.loads((tmp_path / f"run{j}" / "plan.json").read_text())
    assert plan["mixed_tgt"] == plan["pure_tgt"]  # one plan for both: the sync is shard-local
    ranks = {r for module in plan.values() for t in module.values() for r in t["ranks"]}
    assert ranks == {0, 1, 2, 3}, f"the 4-rank plan leaves ranks idle: {ranks}"
