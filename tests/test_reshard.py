"""Reshard across world sizes: a checkpoint written by 4 (or 8) gloo ranks resumes on 2, whose
checkpoint resumes on 4 (or 8) again. At each resume the live state right after the load (tables,
TBE and Adam state, selector and its trace) equals the saved one exactly (DCP reshards it), and the
run ends at the step, and after the rows, of an uninterrupted 4- (or 8-) rank run.

The per-rank batch is the same throughout (it is part of the checkpoint's fingerprint), so 2 ranks
consume half (a quarter) of the rows per step: step s of 4 ranks is step 2s of 2 ranks, step s of
8 ranks step 4s. Both cases consume as many target rows: 512 before the first reshard, 768 before
the second, 1,536 at the end.
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


@pytest.mark.parametrize("big", [4, 8])  # 8: oversubscribed processes, the slowest case of the file
def test_n_to_two_to_n_ranks_resumes_the_saved_state_and_ends_where_an_uninterrupted_run_does(
        tiny_data, tmp_path, big):
    from tests.test_checkpoint import _dist_train

    run, data = tmp_path / "run", tiny_data
    cut, end = 16 // big, 48 // big  # steps at `big` ranks: 512 rows, 1,536 rows
    res = run_distributed(_dist_train, big, data, str(run), cut, EXTRA)                  # big ranks, steps 1-cut
    assert [c["steps"] for c in res] == [cut] * big
    two = _stage(tmp_path, f"{big}to2", 2, data, run, 12, cut)                          # 2 ranks, steps 9-12
    assert [t["resumed_from_step"] for t in two] == [8, 8] and two[0]["steps"] == 12
    back = _stage(tmp_path, f"2to{big}", big, data, run, end, 12)                       # big ranks, 24/big+1 .. end
    assert [b["resumed_from_step"] for b in back] == [24 // big] * big and back[0]["steps"] == end
    assert all(b == back[0] for b in back[1:]), "ranks disagree on the metrics"
    full = run_distributed(_dist_train, big, data, str(tmp_path / "full"), end, EXTRA)      # uninterrupted
    assert back[0]["steps"] == full[0]["steps"] == end
    # the same end: step `end` of `big` ranks, end x big x BATCH target rows consumed, metrics defined
    m_full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    m_back = json.loads((run / "metrics.json").read_text())
    assert m_full["steps"] == m_back["steps"] == end and m_full["world_size"] == m_back["world_size"] == big
    assert m_back["resumed_from_step"] == 24 // big
    for m in (m_full, m_back):
        assert 0 < m["target_test"]["auc"] < 1 and m["target_test"]["logloss"] > 0
