"""Reshard across world sizes: a checkpoint written by 4 gloo ranks resumes on 2, whose checkpoint
resumes on 4 again. At each resume the live state right after the load (tables, TBE and Adam
state, selector and its trace) equals the saved one exactly (DCP reshards it), and the run ends
at the step, and after the rows, of an uninterrupted 4-rank run.

The per-rank batch is the same throughout (it is part of the checkpoint's fingerprint), so 2 ranks
consume half the rows per step: step s of 4 ranks is step 2s of 2 ranks.
"""

import json
import shutil

import pytest
import torch

from tests.dist_harness import run_distributed
from tests.test_checkpoint import _train_saving_what_was_loaded, _unsharded

pytestmark = pytest.mark.dist

BATCH = 32
EXTRA = [f"data.batch_size={BATCH}", "dist.sharding=table_wise"]


def _stage(tmp_path, name, world, data, run, steps, saved_step):
    """Resumes ``run`` on ``world`` ranks to ``steps``; returns the ranks' metrics and checks the
    loaded state against the checkpoint ``saved_step`` it resumed from."""
    saved = tmp_path / f"saved-{name}"
    shutil.copytree(run / "checkpoints" / f"step-{saved_step:08d}", saved)
    loaded = tmp_path / f"loaded-{name}"
    res = run_distributed(_train_saving_what_was_loaded, world, data, str(run), steps, EXTRA, str(loaded))
    a, b = _unsharded(saved, tmp_path), _unsharded(loaded, tmp_path)
    if (saved / "presync").is_dir():  # a final checkpoint: the pure network as training left it
        a.update(_unsharded(saved / "presync", tmp_path))
    assert sorted(a) == sorted(b)
    assert any(k.startswith("model/") and "embedding_bags" in k for k in a)
    for k, v in a.items():
        assert torch.equal(v, b[k]), f"{name}: {k} loaded on {world} ranks differs from the saved one"
    return res


def test_four_to_two_to_four_ranks_resumes_the_saved_state_and_ends_where_an_uninterrupted_run_does(
        tiny_data, tmp_path):
    from tests.test_checkpoint import _dist_train

    run, data = tmp_path / "run", tiny_data
    cut = run_distributed(_dist_train, 4, data, str(run), 4, EXTRA)                 # 4 ranks, steps 1-4
    assert [c["steps"] for c in cut] == [4] * 4
    two = _stage(tmp_path, "4to2", 2, data, run, 12, 4)                                  # 2 ranks, steps 9-12
    assert [t["resumed_from_step"] for t in two] == [8, 8] and two[0]["steps"] == 12
    back = _stage(tmp_path, "2to4", 4, data, run, 12, 12)                                # 4 ranks, steps 7-12
    assert [b["resumed_from_step"] for b in back] == [6] * 4 and back[0]["steps"] == 12
    assert all(b == back[0] for b in back[1:]), "ranks disagree on the metrics"
    full = run_distributed(_dist_train, 4, data, str(tmp_path / "full"), 12, EXTRA)          # uninterrupted
    assert back[0]["steps"] == full[0]["steps"] == 12
    # the same end: step 12 of 4 ranks, 12 x 4 x BATCH target rows consumed, metrics defined
    m_full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    m_back = json.loads((run / "metrics.json").read_text())
    assert m_full["steps"] == m_back["steps"] == 12 and m_full["world_size"] == m_back["world_size"] == 4
    assert m_back["resumed_from_step"] == 6
    for m in (m_full, m_back):
        assert 0 < m["target_test"]["auc"] < 1 and m["target_test"]["logloss"] > 0
