"""``cctl-rec experiment --out s3://...`` (issue #18), against moto's S3 server on loopback (the ``s3``
fixture of tests/test_storage.py): every run's directory, train.log and the report on the bucket,
the same numbers as the same experiment on a local directory, a rerun that trains nothing,
``--report-only`` read back from the bucket; an unusable URL is one line, exit 2, nothing written."""

import json
import os

import pytest

from cctl_rec.cli import main
from tests.test_experiment import _spec
from tests.test_fault import SAME
from tests.test_storage import s3  # noqa: F401  (the fixture)

boto3 = pytest.importorskip("boto3")


def _objects(prefix):
    """key below ``prefix/`` (every key for "") -> (ETag, LastModified) of the objects in bucket cctl."""
    c = boto3.client("s3")
    head = prefix + "/" if prefix else ""
    return {o["Key"][len(head):]: (o["ETag"], o["LastModified"])
            for page in c.get_paginator("list_objects_v2").paginate(Bucket="cctl", Prefix=head)
            for o in page.get("Contents", [])}


def _get(key):
    return boto3.client("s3").get_object(Bucket="cctl", Key=key)["Body"].read()


def _numbers(results):
    """Per run: the metrics that do not depend on time (SAME of tests/test_fault.py, history
    without its examples-per-second); per model: the report's summary without its seconds."""
    runs = {(r["model"], r["seed"]): ({k: r["metrics"][k] for k in SAME}, r["status"]) for r in results["runs"]}
    summary = {ds: {m: {k: v for k, v in row.items() if not k.endswith("_seconds")}
                    for m, row in s["models"].items()} for ds, s in results["summary"].items()}
    return runs, summary


@pytest.mark.slow  # two experiments of two runs each, in spawned worker processes
def test_experiment_on_s3_equals_the_local_one_resumes_and_reports_from_the_bucket(s3, tmp_path, tiny_data,
                                                                                    capsys):
    from cctl_rec.experiment.report import p_histograms

    s3.setenv("CCTL_REC_CACHE", str(tmp_path / "cache"))  # this test's staged logs and download cache
    cfg = _spec(tmp_path, tiny_data, [("CCTL", [])])  # seeds 0 and 1, a selector: TensorBoard histograms
    local, url = tmp_path / "out", "s3://cctl/exp"
    assert main(["experiment", "--config", cfg, "--out", str(local), "--jobs", "2"]) == 0
    assert main(["experiment", "--config", cfg, "--out", url, "--jobs", "2"]) == 0
    assert not os.path.exists("s3:")  # nothing written to a local directory named after the URL
    want = json.loads((local / "results.json").read_text())
    got = json.loads(_get("exp/results.json"))
    assert got["command"] == f"cctl-rec experiment --config {cfg} --out {url} --jobs 2"
    assert [r["run_dir"] for r in got["runs"]] == [f"{url}/runs/tiny/cctl/seed0", f"{url}/runs/tiny/cctl/seed1"]
    assert _numbers(got) == _numbers(want)  # every test / valid metric, selector statistic and history row
    assert got["summary"]["tiny"]["models"]["CCTL"]["auc"][0] != got["summary"]["tiny"]["models"]["CCTL"]["auc"][1]
    objs = _objects("exp")
    pngs = {"tiny-learning-curves.png", "tiny-p-histogram.png"}
    assert {"results.json", "report.md"} | pngs <= set(objs)
    for seed in (0, 1):
        run = f"runs/tiny/cctl/seed{seed}"
        assert {f"{run}/{n}" for n in ("metrics.json", "config.yaml", "train.log", "wall_seconds.json",
                                       "logs/rank0.log")} <= set(objs)
        assert json.loads(_get(f"exp/{run}/metrics.json"))["target_test"] == \
            json.loads((local / run / "metrics.json").read_text())["target_test"]
        # the worker's stdout and stderr, uploaded from its staging file when the run ended
        log = _get(f"exp/{run}/train.log").decode()
        assert f"run directory {url}/{run}" in log and "done: 6 steps in" in log, log[-2000:]
        # the selector's p histograms read back from the bucket's event files: those of the local run
        hs = p_histograms(f"{url}/{run}")
        assert hs and hs == p_histograms(str(local / run))
    for png in pngs:  # drawn from the same numbers: the same image
        assert _get(f"exp/{png}") == (local / png).read_bytes(), png
    report = _get("exp/report.md").decode()
    table = [ln for ln in report.splitlines() if ln.startswith("| CCTL |")]
    assert len(table) == 1 and table[0].rsplit("|", 2)[0] == \
        [ln for ln in (local / "report.md").read_text().splitlines() if ln.startswith("| CCTL |")][0].rsplit("|", 2)[0]

    # a rerun finds every run finished on the bucket: nothing trained, no run object rewritten
    runs_before = {k: v for k, v in objs.items() if k.startswith("runs/")}
    assert main(["experiment", "--config", cfg, "--out", url, "--jobs", "2"]) == 0
    assert {k: v for k, v in _objects("exp").items() if k.startswith("runs/")} == runs_before
    rerun = json.loads(_get("exp/results.json"))
    assert _numbers(rerun) == _numbers(want)
    assert [r["wall_seconds"] for r in rerun["runs"]] == [r["wall_seconds"] for r in got["runs"]]  # recorded ones

    # --report-only rebuilds the report from the bucket alone
    c = boto3.client("s3")
    for name in ("results.json", "report.md", *pngs):
        c.delete_object(Bucket="cctl", Key=f"exp/{name}")
    capsys.readouterr()
    assert main(["experiment", "--config", cfg, "--out", url, "--report-only"]) == 0
    printed = capsys.readouterr().out
    again = json.loads(_get("exp/results.json"))
    assert _numbers(again) == _numbers(want) and all(r["status"] == "ok" for r in again["runs"])
    assert printed.strip() == _get("exp/report.md").decode().strip() and table[0] in printed
    assert set(_objects("exp")) == set(objs)  # the figures are back too; no temp object left behind
    assert {k: v for k, v in _objects("exp").items() if k.startswith("runs/")} == runs_before


@pytest.mark.parametrize("env, out, data, msg", [
    ({}, "s3://nope/exp", None, "--out s3://nope/exp: bucket 'nope' does not exist"),
    ({}, "foo://b/exp", None, "--out foo://b/exp: unknown URL scheme 'foo'"),
    ({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}, "s3://cctl/bad", None,
     "--out s3://cctl/bad: cannot reach s3://cctl (NoCredentialsError"),
    ({}, "s3://cctl/bad", "s3://nope/data", "dataset tiny: path s3://nope/data: bucket 'nope' does not exist"),
    ({}, "s3://cctl/bad", "s3://cctl/absent", "dataset tiny: s3://cctl/absent has no manifest.json and the "
                                              "experiment gives no prepare command for it"),
])
def test_unusable_experiment_urls_are_one_line_exit_2_and_nothing_written(s3, tmp_path, tiny_data, capsys,
                                                                           env, out, data, msg):
    cfg = _spec(tmp_path, data or tiny_data, [("CCTL", [])])
    before, objects = set(os.listdir(tmp_path)), _objects("")
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.delenv(k) if v is None else mp.setenv(k, v)
        rc = main(["experiment", "--config", cfg, "--out", out])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err
    assert set(os.listdir(tmp_path)) == before and not os.path.exists("s3:") and not os.path.exists("foo:")
    assert _objects("") == objects  # the bucket as it was
