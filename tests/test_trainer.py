"""The run ends with its last sync before its last checkpoint: the checkpoint holds the served pure
network, and what the sync overwrote is kept so a longer rerun continues the same run
(tests/test_checkpoint.py pins that bitwise)."""

import json
import time

import pytest
import torch

from cctl_rec.cli import main
from cctl_rec.config import load_config
from cctl_rec.data.loader import Dataset
from cctl_rec.export import load_network_from_checkpoint
from cctl_rec.train.checkpoint import PRESYNC

BASE = ["data.batch_size=128", "model.tower=[32,16]", "model.san_hidden=[16]", "run.max_eval_rows=512",
        "selector.mode=paper", "selector.update_every=2", "scn.sync_every=3", "run.log_every=2"]


def _network(ckpt, data, name):
    dim = load_config(None, BASE).model.embedding_dim
    net = load_network_from_checkpoint(str(ckpt), Dataset(data).schemas["tgt"], dim, (32, 16), name)
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("steps,syncs,presync", [(5, 2, True), (6, 2, False)], ids=["sync-at-the-end", "synced-at-k"])
def test_last_checkpoint_holds_the_synced_pure_network(tiny_data, tmp_path, steps, syncs, presync):
    """5 steps, k=3: the sync at step 3, then the last sync; 6 steps: step 6 synced already, no
    sync is added (and none counted)."""
    run = tmp_path / "run"
    t0 = time.perf_counter()
    assert main(["train", "--data", tiny_data, "--run-dir", str(run), *BASE, f"run.steps={steps}"]) == 0
    wall = time.perf_counter() - t0
    m = json.loads((run / "metrics.json").read_text())
    assert m["syncs"] == syncs
    # the timings metrics.json reports: the training loop's seconds (within the call), its rows per second
    assert 0 < m["train_seconds"] < wall
    assert m["train_samples_per_s"] == pytest.approx(steps * 128 / m["train_seconds"], rel=1e-9)
    assert all(row["ex_per_s"] > 0 for row in m["history"])
    ckpt = run / "checkpoints" / f"step-{steps:08d}"
    meta = json.loads((ckpt / "trainer.json").read_text())
    assert meta["final"] is True and meta["syncs"] == syncs
    assert (meta.get("presync") == PRESYNC) is presync and (ckpt / PRESYNC).is_dir() is presync
    pure, mixed = _network(ckpt, tiny_data, "pure"), _network(ckpt, tiny_data, "mixed")
    assert pure.keys() == mixed.keys()
    for k in pure:
        assert torch.equal(pure[k], mixed[k]), k
    # export serves that pure network
    assert main(["export", "--run-dir", str(run), "--out", str(tmp_path / "model")]) == 0
    served = torch.load(tmp_path / "model" / "model.pt", weights_only=True)
    for k, v in pure.items():
        assert torch.equal(served[k], v), k


def test_presync_keeps_the_pure_network_training_left(tiny_data, tmp_path):
    """After 5 steps with k=3 the pure network trained 2 steps on its own since the sync at step 3:
    PRESYNC/ holds that network, different from the mixed one the last sync copied."""
    import torch.distributed.checkpoint as dcp

    run = tmp_path / "run"
    assert main(["train", "--data", tiny_data, "--run-dir", str(run), *BASE, "run.steps=5"]) == 0
    ckpt = run / "checkpoints" / "step-00000005"
    mixed = _network(ckpt, tiny_data, "mixed")
    before = {f"model/pure_tower.{k[len('tower.'):]}": torch.zeros_like(v) for k, v in mixed.items()
              if k.startswith("tower.")}
    dcp.load(before, checkpoint_id=str(ckpt / PRESYNC), no_dist=True)
    assert any(not torch.equal(v, mixed["tower." + k[len("model/pure_tower."):]]) for k, v in before.items())
    # and the pure tower's Adam moments, one entry per tower parameter (not the mixed tower's or SAN's)
    saved = dcp.FileSystemReader(str(ckpt / PRESYNC)).read_metadata().state_dict_metadata
    dense = {k.split("/")[1] for k in saved if k.startswith("dense/")}
    assert len(dense) == len(before) and all(f"dense/{i}/exp_avg" in saved for i in dense)


def test_selector_statistics_score_the_first_rows_asked(tiny_data):
    """metrics.json's selector statistics score the first ``rows`` source train rows: batches are
    read until that many are seen, not one batch past them."""
    from cctl_rec.train.loop import score_source
    from cctl_rec.train.trainer import Trainer

    cfg = load_config(None, [f"data.path={tiny_data}", *BASE, "data.eval_batch_size=512"])
    t = Trainer(cfg)
    for rows in (512, 1536):
        assert score_source(t.module, t.ifn, t.data, cfg, t.rank, t.world, rows=rows)["rows"] == rows


def test_finetune_source_steps_are_the_fraction_of_the_run():
    """The Finetune baseline's source-only steps: model.finetune_frac of the run's steps, rounded;
    model.finetune_steps, when set, wins; neither: none."""
    from cctl_rec.train.trainer import finetune_steps

    assert finetune_steps(load_config(None, ["model.finetune_frac=0.25"]), 40) == 10
    assert finetune_steps(load_config(None, ["model.finetune_frac=0.3"]), 7) == 2       # round(2.1)
    assert finetune_steps(load_config(None, ["model.finetune_frac=0.25", "model.finetune_steps=3"]), 40) == 3
    assert finetune_steps(load_config(None, []), 40) == 0


def _rewards_reinforce_learns_from(rank, world, data):
    """Three paper-mode steps on this rank: the reward each step hands the IFN, and the rank's own."""
    from cctl_rec.train.trainer import STAT_KEYS, Trainer

    t = Trainer(load_config(None, [f"data.path={data}", *BASE, "dist.sharding=table_wise", "run.steps=3"]))
    handed, own, step_fn = [], [], t.ifn.step

    def spy(step, logits, reward, *args, **kwargs):
        handed.append(reward)
        return step_fn(step, logits, reward, *args, **kwargs)

    t.ifn.step = spy
    for step, batch in t.batches(0):
        own.append(dict(zip(STAT_KEYS, t.step(batch, step).stats))["reward"])
    return handed, own


@pytest.mark.dist
def test_reinforce_learns_from_the_mean_reward_of_the_ranks(tiny_data):
    """2 ranks, paper mode: each step the IFN gets one reward on every rank, the mean of the ranks'
    own rewards (which differ: each rank has its rows), as Eq. 9 on the global batch needs."""
    from tests.dist_harness import run_distributed

    (handed0, own0), (handed1, own1) = run_distributed(_rewards_reinforce_learns_from, 2, tiny_data)
    assert len(handed0) == 3 and handed0 == handed1
    assert handed0 == pytest.approx([(a + b) / 2 for a, b in zip(own0, own1)], rel=1e-6)
    assert own0 != own1


def test_every_selector_mode_is_one_row_of_the_table():
    """selector.mode's accepted values and the IFN's table of modes are the same set: a mode added
    to one and not the other fails here."""
    from typing import get_args

    from cctl_rec.config import SelectorMode
    from cctl_rec.train.ifn import MODES

    assert set(MODES) == set(get_args(SelectorMode))
    assert {m.learner for m in MODES.values()} <= {None, "reinforce", "adam"}
