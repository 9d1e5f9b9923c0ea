"""Resume gives the same run; checkpoints refuse other models; export serves only the pure network."""

import json
import os
import shutil

import pyarrow.parquet as pq
import pytest
import torch

from cctl_rec.cli import main
from tests.dist_harness import run_distributed

BASE = ["data.batch_size=128", "model.tower=[32,16]", "model.san_hidden=[16]", "run.log_every=4",
        "scn.sync_every=6", "selector.update_every=4", "run.max_eval_rows=512", "selector.mode=bernoulli",
        "selector.ema_baseline=0.5", "scn.reward_source=heldout_batch"]


def _train(data, run_dir, steps, *extra):
    return main(["train", "--data", data, "--run-dir", str(run_dir), *BASE, f"run.steps={steps}", *extra])


def _m(run_dir):
    m = json.loads((run_dir / "metrics.json").read_text())
    return {k: m[k] for k in ("target_test", "target_valid", "selector", "reward_mean", "steps", "syncs")}


@pytest.mark.slow  # two training runs and a resume: 3-6 s on one core
@pytest.mark.parametrize("mode", [[], ["selector.mode=influence"], ["selector.mode=evidence", "selector.evidence_groups=true"]],
                         ids=["bernoulli", "influence", "evidence"])
def test_resume_after_interruption_is_bitwise_the_same_run(tiny_data, tmp_path, mode):
    """The influence mode's group table and Adam state, the evidence mode's tables, come back too."""
    assert _train(tiny_data, tmp_path / "full", 14, *mode) == 0
    assert _train(tiny_data, tmp_path / "cut", 5, "run.checkpoint_every=3", *mode) == 0   # "killed" after step 5
    assert _train(tiny_data, tmp_path / "cut", 14, *mode) == 0                             # resumes at 5
    cut = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert cut["resumed_from_step"] == 5
    assert _m(tmp_path / "full") == _m(tmp_path / "cut")
    assert sorted(os.listdir(tmp_path / "cut" / "checkpoints")) == ["step-00000005", "step-00000014"]


@pytest.mark.slow  # three training runs
def test_a_run_killed_inside_a_log_window_logs_what_an_uninterrupted_run_logs(tiny_data, tmp_path):
    """Killed after the checkpoint of step 3, inside the log window of steps 1-4: the resumed run
    reopens that window (the run log's sums and the CTR metrics' rows, from trainer.json), so its
    history is the uninterrupted run's, every float equal (but the timing, ex_per_s)."""
    assert _train(tiny_data, tmp_path / "full", 10) == 0
    assert _train(tiny_data, tmp_path / "cut", 5, "run.checkpoint_every=3") == 0
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-00000005")    # "killed" after step 3's checkpoint
    os.remove(tmp_path / "cut" / "metrics.json")
    assert _train(tiny_data, tmp_path / "cut", 10, "run.checkpoint_every=3") == 0

    def history(run):
        return [{k: v for k, v in row.items() if k != "ex_per_s"}
                for row in json.loads((run / "metrics.json").read_text())["history"]]

    full, cut = history(tmp_path / "full"), history(tmp_path / "cut")
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["resumed_from_step"] == 3
    assert [r["step"] for r in cut] == [4, 8, 10] and {"train_auc", "loss_mixed"} <= set(cut[0])
    assert cut == full


def test_interrupted_checkpoint_write_leaves_the_previous_one_used(tiny_data, tmp_path):
    assert _train(tiny_data, tmp_path / "r", 6) == 0
    half = tmp_path / "r" / "checkpoints" / ".step-00000009.tmp"
    half.mkdir()
    (half / "__0_0.distcp").write_bytes(b"partial")
    assert _train(tiny_data, tmp_path / "r", 10) == 0
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["resumed_from_step"] == 6


def test_a_failed_write_torch_does_not_name_is_named_from_the_disk(tmp_path, monkeypatch):
    """A checkpoint write torch reports only as 'unexpected pos' (its OSError lost inside DCP) is
    ENOSPC when the disk has less than 64 MiB left, EROFS on a read-only disk, else EIO; an error
    naming its cause keeps that cause; an error that is no write failure is not turned into one."""
    import errno

    from cctl_rec.train.checkpoint import _write_failure

    torch_says = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    real = os.statvfs(tmp_path)

    def disk(avail_blocks, flag=0):
        monkeypatch.setattr(os, "statvfs", lambda p: os.statvfs_result((
            4096, 4096, real.f_blocks, avail_blocks, avail_blocks, real.f_files, real.f_ffree, real.f_favail,
            flag, real.f_namemax)))

    disk((1 << 30) // 4096)                      # 1 GiB left
    assert _write_failure(torch_says, str(tmp_path)) == errno.EIO
    disk((64 << 20) // 4096)                     # exactly 64 MiB: still room for a checkpoint
    assert _write_failure(torch_says, str(tmp_path)) == errno.EIO
    disk((64 << 20) // 4096 - 1)                 # 4 KiB less
    assert _write_failure(torch_says, str(tmp_path)) == errno.ENOSPC
    disk((1 << 30) // 4096, os.ST_RDONLY)
    assert _write_failure(torch_says, str(tmp_path)) == errno.EROFS
    assert _write_failure(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), str(tmp_path)) == errno.EDQUOT
    assert _write_failure(RuntimeError("size mismatch for tower.0.weight"), str(tmp_path)) is None


def test_checkpoint_of_another_config_is_refused(tiny_data, tmp_path, capsys):
    assert _train(tiny_data, tmp_path / "r", 4) == 0
    rc = _train(tiny_data, tmp_path / "r", 8, "model.tower=[64,16]")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "was made by a different model or config: model is" in err


def _dist_train(rank, world, data, run_dir, steps, extra):
    from cctl_rec.config import load_config
    from cctl_rec.train.loop import train

    cfg = load_config(None, BASE + [f"data.path={data}", f"run.steps={steps}", *extra])
    m = train(cfg, run_dir)
    return {k: m[k] for k in ("target_test", "selector", "reward_mean", "steps", "resumed_from_step")}


@pytest.mark.dist
@pytest.mark.parametrize("mode", [[], ["selector.mode=influence"], ["selector.mode=evidence", "selector.evidence_groups=true"]],
                         ids=["bernoulli", "influence", "evidence"])
def test_two_rank_resume_and_reload_on_one_rank(tiny_data, tmp_path, mode):
    """Influence mode: the group table is pooled over ranks (identical on both) and comes back."""
    ex = ["dist.sharding=table_wise", *mode]
    full = run_distributed(_dist_train, 2, tiny_data, str(tmp_path / "full"), 10, ex)
    assert full[0]["selector"] == full[1]["selector"]
    run_distributed(_dist_train, 2, tiny_data, str(tmp_path / "cut"), 4, ex)
    cut = run_distributed(_dist_train, 2, tiny_data, str(tmp_path / "cut"), 10, ex)
    assert cut[0]["resumed_from_step"] == 4
    for k in ("target_test", "selector", "reward_mean"):
        assert cut[0][k] == full[0][k], k
    # the 2-rank checkpoint loads on 1 rank (resharded by DCP) and training goes on
    shutil.copytree(tmp_path / "full", tmp_path / "one")
    one = run_distributed(_dist_train, 1, tiny_data, str(tmp_path / "one"), 24, ex)
    assert one[0]["resumed_from_step"] == 20 and one[0]["steps"] == 24


def _train_saving_what_was_loaded(rank, world, data, run_dir, steps, extra, loaded_dir):
    """_dist_train, with the live state saved to ``loaded_dir`` right after the checkpoint load."""
    import torch.distributed.checkpoint as dcp

    from cctl_rec.train import loop

    load = loop.load_checkpoint

    def load_then_save(path, state, fingerprint):
        meta = load(path, state, fingerprint)
        dcp.save(state.tensors(), checkpoint_id=loaded_dir)
        return meta

    loop.load_checkpoint = load_then_save  # this spawned process ends with the run
    return _dist_train(rank, world, data, run_dir, steps, extra)


def _unsharded(dcp_dir, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / (os.path.basename(dcp_dir) + ".pt")
    dcp_to_torch_save(dcp_dir, out)
    return torch.load(out, weights_only=False)


@pytest.mark.dist
@pytest.mark.parametrize("sharding", ["table_wise", "column_wise", "data_parallel"])
def test_one_rank_checkpoint_loads_and_continues_on_two_ranks(tiny_data, tmp_path, sharding):
    run, extra = tmp_path / "run", [f"dist.sharding={sharding}"]
    run_distributed(_dist_train, 1, tiny_data, str(run), 8, extra)
    shutil.copytree(run / "checkpoints" / "step-00000008", tmp_path / "saved")
    two = run_distributed(_train_saving_what_was_loaded, 2, tiny_data, str(run), 10, extra, str(tmp_path / "loaded"))
    # 8 steps of 1 rank = 4 steps of 2 ranks (the same rows), then 6 more steps on 2 ranks
    assert [t["resumed_from_step"] for t in two] == [4, 4] and two[0]["steps"] == 10
    assert two[0]["target_test"] == two[1]["target_test"] and two[0]["target_test"]["auc"] > 0
    plan = json.loads((run / "plan.json").read_text())
    tables = [t for module in plan.values() for t in module.values()]
    assert {t["sharding_type"] for t in tables} == {sharding}
    assert set().union(*(t["ranks"] for t in tables)) == {0, 1}, "the 2-rank plan does not use both ranks"
    saved, loaded = _unsharded(tmp_path / "saved", tmp_path), _unsharded(tmp_path / "loaded", tmp_path)
    # the last checkpoint holds the served pure network (the run's last sync came first); a load restores
    # the pure network as training left it, which that sync overwrote: kept in presync/
    if (tmp_path / "saved" / "presync").is_dir():
        saved.update(_unsharded(tmp_path / "saved" / "presync", tmp_path))
    assert sorted(saved) == sorted(loaded)
    table_opt = "dp/" if sharding == "data_parallel" else "fused/"  # own Adagrad, or fused into the TBE
    for part in ("model/", table_opt, "dense/", "ifn/selector/", "ifn/trace/", "ifn/acc/"):
        assert any(k.startswith(part) for k in saved), part
    assert any(k.startswith("model/") and "tgt" in k and "embedding_bags" in k for k in saved)
    for k, v in saved.items():  # tables, TBE and Adam state, selector with its trace: exactly as saved
        assert torch.equal(v, loaded[k]), k


def test_export_serves_only_the_pure_network_and_predict_matches_training(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(tiny_data, run, 10, "run.save_predictions=true", "run.max_eval_rows=0") == 0
    assert main(["export", "--run-dir", str(run), "--out", str(tmp_path / "model")]) == 0
    state = torch.load(tmp_path / "model" / "model.pt", weights_only=True)
    assert set(state) == {f"tables.{t}" for t in ("user_id", "gender", "device", "item_id", "category", "brand",
                                                  "hour", "position")} | {k for k in state if k.startswith("tower.")}
    assert not [k for k in state if any(s in k for s in ("san", "selector", "src", "mixed", "ren"))]
    meta = json.loads((tmp_path / "model" / "serving.json").read_text())
    assert meta["bytes"]["model.pt"] > 0 and meta["program"] == "program.pt2"
    out = tmp_path / "pred.parquet"
    assert main(["predict", "--model", str(tmp_path / "model"), "--data", tiny_data, "--out", str(out)]) == 0
    got = torch.tensor(pq.read_table(out).column("logit").to_numpy())
    want = torch.tensor(pq.read_table(run / "predictions-tgt-test.parquet").column("logit").to_numpy())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    program = torch.export.load(str(tmp_path / "model" / "program.pt2"))
    from cctl_rec.export import load_artifact, padded_inputs
    model, meta = load_artifact(str(tmp_path / "model"))
    table = pq.read_table(os.path.join(tiny_data, "tgt/test/part-00000.parquet")).slice(0, 7)
    ids, seq, lens = padded_inputs(table, model.schema, model.single_features, meta["max_seq_len"], "t")
    assert not program.state_dict and not program.constants  # the weights are in model.pt only
    weights = tuple(state[k] for k in meta["weights"])
    torch.testing.assert_close(program.module()(weights, ids, seq, lens), model(ids, seq, lens))


@pytest.mark.parametrize("remove", ["model.pt", "serving.json"])
def test_export_dir_with_missing_files(tiny_data, tmp_path, capsys, remove):
    assert _train(tiny_data, tmp_path / "run", 4) == 0
    assert main(["export", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "m")]) == 0
    os.remove(tmp_path / "m" / remove)
    rc = main(["predict", "--model", str(tmp_path / "m"), "--data", tiny_data, "--out", str(tmp_path / "p.parquet")])
    assert rc == 2 and f"lacks ['{remove}']" in capsys.readouterr().err
    assert not (tmp_path / "p.parquet").exists()


def test_predict_on_source_schema_fails_cleanly(tiny_data, tmp_path, capsys):
    assert _train(tiny_data, tmp_path / "run", 4) == 0
    assert main(["export", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "m")]) == 0
    rc = main(["predict", "--model", str(tmp_path / "m"), "--data", tiny_data, "--split", "src/train",
               "--out", str(tmp_path / "p.parquet")])
    err = capsys.readouterr().err
    assert rc == 2 and "lacks column(s) ['position'] of the tgt schema" in err
