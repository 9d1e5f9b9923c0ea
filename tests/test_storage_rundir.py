"""Run directories and checkpoints on a URL (issue #18), against moto's S3 server on loopback (the
``s3`` fixture of tests/test_storage.py): a checkpoint counts only once its trainer.json (written
last) is there; a run on ``s3://`` resumes, prunes, keeps its best and TensorBoard events, and
ends equal to the local run; evaluate and export read it."""

import json
import os

import pytest

from cctl_rec.cli import main
from tests.test_storage import s3  # noqa: F401  (the fixture)

boto3 = pytest.importorskip("boto3")

BASE = ["data.batch_size=128", "model.tower=[32,16]", "model.san_hidden=[16]", "run.log_every=4",
        "scn.sync_every=6", "selector.update_every=4", "run.max_eval_rows=512", "selector.mode=bernoulli",
        "selector.ema_baseline=0.5", "scn.reward_source=heldout_batch", "run.checkpoint_every=3",
        "run.keep_best=true", "run.eval_every=4"]


def _keys(prefix):
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket="cctl", Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _get(key):
    return boto3.client("s3").get_object(Bucket="cctl", Key=key)["Body"].read()


def _put(key, body):
    boto3.client("s3").put_object(Bucket="cctl", Key=key, Body=body)


def _steps(prefix):
    """The step directories under ``prefix``checkpoints/, complete or not."""
    return sorted({k[len(prefix):].split("/")[1] for k in _keys(prefix + "checkpoints/")})


def _m(m):
    return {k: m[k] for k in ("target_test", "target_valid", "selector", "reward_mean", "steps", "syncs",
                              "selector_updates")}


def test_only_checkpoints_with_their_marker_count(s3):
    """list_checkpoints on a bucket: a step prefix counts once trainer.json is in it (DCP's files
    alone, a killed write, do not); nested trainer.json files (presync/) are not markers."""
    from cctl_rec.storage import check_location
    from cctl_rec.train.checkpoint import list_checkpoints

    check_location("s3://cctl/lc/run", "--run-dir", True)
    for key in ("step-00000003/.metadata", "step-00000003/__0_0.distcp", "step-00000003/trainer.json",
                "step-00000007/.metadata", "step-00000007/__0_0.distcp",       # killed before its marker
                "step-00000010/presync/trainer.json", "step-0000001/trainer.json", "notes/trainer.json"):
        _put("lc/run/checkpoints/" + key, b"{}")
    assert list_checkpoints("s3://cctl/lc/run") == [(3, "s3://cctl/lc/run/checkpoints/step-00000003")]
    assert list_checkpoints("s3://cctl/lc/none") == []


@pytest.mark.parametrize("argv, msg", [
    (["train", "--run-dir", "s3://nope/run"], "--run-dir s3://nope/run: bucket 'nope' does not exist"),
    (["evaluate", "--run-dir", "s3://cctl/absent", "--data", "d"], "--run-dir s3://cctl/absent does not exist"),
    (["export", "--run-dir", "s3://cctl/absent", "--out", "m"], "s3://cctl/absent has no config.yaml"),
])
def test_bad_remote_run_dirs_are_one_line_exit_2(s3, tmp_path, capsys, monkeypatch, argv, msg):
    monkeypatch.chdir(tmp_path)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err
    assert os.listdir(tmp_path) == [] and _keys("absent") == [] and _keys("run") == []


@pytest.mark.slow  # three short training runs (in process) and two evaluations
def test_run_dir_on_s3_resumes_to_the_local_run(s3, tiny_data, tmp_path, capsys):
    """A 1-rank run into s3://cctl/run stopped after step 5 (its final checkpoint carries presync/)
    and rerun to 14 steps resumes from step-5 on the bucket and ends exactly where the local
    uninterrupted run ends; a killed write (a step prefix without trainer.json) is skipped and
    removed; the newest 2 checkpoints are kept; config, plan, metrics, TensorBoard events and the
    best checkpoint are on the bucket; evaluate and export read them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def train(run_dir, steps):
        return main(["train", "--data", tiny_data, "--run-dir", run_dir, *BASE, f"run.steps={steps}"])

    assert train(str(tmp_path / "full"), 14) == 0
    assert train("s3://cctl/run", 5) == 0                        # "killed" after step 5
    assert [k for k in _keys("run/checkpoints/step-00000005/") if k.endswith(("trainer.json", ".metadata"))] == [
        "run/checkpoints/step-00000005/.metadata", "run/checkpoints/step-00000005/presync/.metadata",
        "run/checkpoints/step-00000005/trainer.json"]
    cut = json.loads(_get("run/metrics.json"))
    # TensorBoard events were staged locally and uploaded: the logged rows are on the bucket
    tb = tmp_path / "tb"
    tb.mkdir()
    for key in _keys("run/tb/"):
        (tb / key.rsplit("/", 1)[1]).write_bytes(_get(key))
    acc = EventAccumulator(str(tb))
    acc.Reload()
    events = acc.Scalars("train/loss_mixed")
    assert [e.step for e in events] == [r["step"] for r in cut["history"]] == [4, 5]
    assert [e.value for e in events] == pytest.approx([r["loss_mixed"] for r in cut["history"]], rel=1e-6)
    _put("run/checkpoints/step-00000007/__0_0.distcp", b"partial")   # a write killed before its marker
    _put("run/checkpoints/step-00000007/.metadata", b"partial")
    assert train("s3://cctl/run", 14) == 0
    m = json.loads(_get("run/metrics.json"))
    local = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert m["resumed_from_step"] == 5
    assert _m(m) == _m(local)                                         # bitwise: every float equal
    assert _steps("run/") == sorted(os.listdir(tmp_path / "full" / "checkpoints")) == ["step-00000012",
                                                                                        "step-00000014"]
    for name in ("config.yaml", "plan.json"):  # (plan.txt holds the planner's own timings)
        assert _get(f"run/{name}") == (tmp_path / "full" / name).read_bytes(), name
    assert _get("run/plan.txt").splitlines()[0] == (tmp_path / "full" / "plan.txt").read_bytes().splitlines()[0]
    best = json.loads(_get("run/best/best.json"))
    assert best["step"] == m["best_checkpoint"]["step"] and "run/best/.metadata" in _keys("run/best/")
    # evaluate and export read the run directory from the bucket
    capsys.readouterr()
    for run_dir in ("s3://cctl/run", str(tmp_path / "full")):
        assert main(["evaluate", "--run-dir", run_dir, "--data", tiny_data]) == 0
    scores = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()[-2:]]
    assert [{k: v for k, v in s.items() if k != "run_dir"} for s in scores][0] == \
        {k: v for k, v in scores[1].items() if k != "run_dir"}
    import torch

    for which in ("latest", "best"):
        assert main(["export", "--run-dir", "s3://cctl/run", "--out", str(tmp_path / f"s3-{which}"),
                     "--checkpoint", which]) == 0
    assert main(["export", "--run-dir", str(tmp_path / "full"), "--out", str(tmp_path / "local-latest")]) == 0
    got, want = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("s3-latest", "local-latest"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((tmp_path / "s3-best" / "serving.json").read_text())["step"] == best["step"]


@pytest.mark.slow  # a short training run on the bucket (in process)
@pytest.mark.parametrize("error, rc", [(OSError("We encountered an internal error. Please try again."), 1),
                                       (PermissionError("Access Denied"), 2)], ids=["store-failed", "refused"])
def test_a_checkpoint_the_store_fails_is_one_line_and_leaves_nothing(s3, tiny_data, capsys, monkeypatch, error, rc):
    """The bucket fails (s3fs: an OSError without errno) or refuses (PermissionError) the checkpoint's
    marker: one line naming the store's message and the checkpoint, exit 1 for a failing store (EIO)
    and 2 for a refusal (EACCES, the user's to fix); the step's objects are removed."""
    from cctl_rec import storage

    write = storage.write_object

    def failing(url, data):
        if url.endswith("/trainer.json"):
            raise error
        write(url, data)

    monkeypatch.setattr(storage, "write_object", failing)
    capsys.readouterr()
    got = main(["train", "--data", tiny_data, "--run-dir", "s3://cctl/fail", *BASE, "run.steps=3"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln.lower()]   # (the log lines too)
    assert got == rc and len(err) == 1 and err[0].startswith("cctl-rec train: error: "), err
    assert f"{error} while writing checkpoint s3://cctl/fail/checkpoints/step-00000003; it was not written, the " \
           "previous checkpoints are intact" in err[0], err
    assert "[Errno" not in err[0] and err[0].count("step-00000003") == 1, err  # no errno prefix, the path once
    assert _keys("fail/checkpoints/") == []
