"""``convert --out`` and ``prepare --out`` on a URL (issue #18), against moto's S3 server on loopback
(the ``s3`` fixture of tests/test_storage.py): the bucket holds the local conversion's files byte for
byte and nothing else, the loader reads and verifies it, the manifest is the completion marker (a
conversion that fails midway leaves none), and what cannot work is one line, exit 2, nothing written."""

import hashlib
import os

import pytest

from cctl_rec.cli import main
from tests.test_convert import implicit_dirs  # noqa: F401  (the fixture)
from tests.test_features import TINY_FEATURES, _write, raw_tiny  # noqa: F401  (raw_tiny: the fixture)
from tests.test_storage import s3  # noqa: F401  (the fixture)

boto3 = pytest.importorskip("boto3")

SPLITS = ["tgt/train", "tgt/valid", "tgt/test", "src/train"]


def _objects(prefix):
    """rel key -> sha256 of every object below ``prefix/`` in bucket cctl."""
    c = boto3.client("s3")
    keys = [o["Key"] for page in c.get_paginator("list_objects_v2").paginate(Bucket="cctl", Prefix=prefix + "/")
            for o in page.get("Contents", [])]
    return {k[len(prefix) + 1:]: hashlib.sha256(c.get_object(Bucket="cctl", Key=k)["Body"].read()).hexdigest()
            for k in keys}


def _files(root):
    """rel path -> sha256 of every file below the local directory ``root``."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root).replace(os.sep, "/")] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _loads_and_verifies(url):
    from cctl_rec.data.loader import Dataset

    ds = Dataset(url)
    ds.verify(SPLITS, "sha256")  # every shard read back from the bucket and checked against the manifest
    return ds


@pytest.mark.slow  # two conversions (~10 s on a busy core)
def test_convert_to_s3_is_the_local_conversion_byte_for_byte(s3, implicit_dirs, tmp_path, capsys):  # noqa: F811
    argv = ["convert", "implicit", "--src-dir", implicit_dirs[0], "--tgt-dir", implicit_dirs[1], "--neg-per-pos", "2",
            "--seed", "5", "--max-seq-len", "6", "--shard-rows", "300"]
    assert main([*argv, "--out", str(tmp_path / "data")]) == 0
    assert main([*argv, "--out", "s3://cctl/conv"]) == 0
    local = _files(tmp_path / "data")
    assert "manifest.json" in local and sum(k.startswith("tgt/train/part-") for k in local) > 1
    assert _objects("conv") == local  # same names, same bytes; no temp object left behind
    assert not os.path.exists("s3:")
    _loads_and_verifies("s3://cctl/conv")

    # a rerun that fails midway (the disk-full a shard upload can hit) leaves no manifest: not a dataset
    from cctl_rec.data.convert import common

    real, calls = common.atomic_write_bytes, []

    def fail_on_third(path, data):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(path, data)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "atomic_write_bytes", fail_on_third)
        assert main([*argv, "--out", "s3://cctl/conv"]) == 1  # a disk error: exit 1 (cli.main)
    assert len(calls) == 3 and "manifest.json" not in _objects("conv")
    with pytest.raises(FileNotFoundError, match="manifest"):
        _loads_and_verifies("s3://cctl/conv")
    assert main([*argv, "--out", "s3://cctl/conv"]) == 0  # and a rerun completes it, equal again
    assert _objects("conv") == local
    capsys.readouterr()


@pytest.mark.slow  # two prepares (~7 s on a busy core)
def test_prepare_to_s3_is_the_local_prepare_byte_for_byte(s3, raw_tiny, tmp_path, capsys):  # noqa: F811
    feats = _write(tmp_path, TINY_FEATURES)
    argv = ["prepare", "--features", feats, "--data", raw_tiny, "--shard-rows", "1500"]
    assert main([*argv, "--out", str(tmp_path / "data")]) == 0
    assert main([*argv, "--out", "s3://cctl/prep"]) == 0
    local = _files(tmp_path / "data")
    assert {"manifest.json", "features/features.json"} <= set(local)
    assert any(k.startswith("features/vocab/") for k in local)
    assert _objects("prep") == local
    _loads_and_verifies("s3://cctl/prep")
    capsys.readouterr()


@pytest.mark.parametrize("argv, msg", [
    (["prepare", "--features", "F", "--data", "D", "--out", "s3://nope/p"],
     "--out s3://nope/p: bucket 'nope' does not"),
    (["convert", "implicit", "--src-dir", "S", "--tgt-dir", "T", "--out", "foo://b/c"], "unknown URL scheme 'foo'"),
    (["convert", "implicit", "--src-dir", "S", "--tgt-dir", "T", "--out", "s3://cctl/bad"],
     "--src-dir S does not exist"),  # the input is checked (and refused) before anything is written
])
def test_unusable_remote_output_is_one_line_exit_2_and_nothing_written(s3, tmp_path, capsys, argv, msg):
    s3.chdir(tmp_path)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err
    assert os.listdir(tmp_path) == [] and _objects("bad") == {} and _objects("p") == {}


def test_remote_output_holding_another_dataset_is_refused(s3, raw_tiny, tmp_path, capsys):  # noqa: F811
    """A bucket prefix with a converted dataset is not overwritten by prepare (and its manifest stays)."""
    boto3.client("s3").put_object(Bucket="cctl", Key="other/manifest.json",
                                  Body=b'{"format": "cctl-rec/v1", "preset": "amazon-convert"}')
    feats = _write(tmp_path, TINY_FEATURES)
    capsys.readouterr()
    rc = main(["prepare", "--features", feats, "--data", raw_tiny, "--out", "s3://cctl/other"])
    err = capsys.readouterr().err
    assert rc == 2 and "--out s3://cctl/other holds another dataset" in err and len(err.strip().splitlines()) == 1, err
    assert list(_objects("other")) == ["manifest.json"]


def test_eval_reads_run_directories_on_s3_like_local_ones(s3, tmp_path, capsys):
    """``cctl-rec eval`` on run directories in the bucket prints what it prints for the same
    directories on disk (table, --json, --by-seed with the mean ± std over seeds by hand); a
    missing run or bucket is one line, exit 2."""
    import json

    from tests.test_cli import _metrics, _write_run

    c = boto3.client("s3")
    runs = {"dnn-s0": 0.80, "dnn-s1": 0.82, "cctl-s0": 0.70}
    local = [_write_run(tmp_path / "runs" / name, _metrics(auc)) for name, auc in runs.items()]
    for name, auc in runs.items():
        c.put_object(Bucket="cctl", Key=f"ev/runs/{name}/metrics.json", Body=json.dumps(_metrics(auc)).encode())
    remote = [f"s3://cctl/ev/runs/{name}" for name in runs]
    capsys.readouterr()
    for opts in ([], ["--json"], ["--by-seed"]):
        assert main(["eval", *opts, *local]) == 0
        want = capsys.readouterr().out
        assert main(["eval", *opts, *remote]) == 0
        assert capsys.readouterr().out == want
    assert main(["eval", "--by-seed", *remote]) == 0
    rows = {ln.split("|")[1].strip(): ln.split("|")[2:4] for ln in capsys.readouterr().out.splitlines()[2:]}
    assert {k: (int(v[0]), v[1].strip()) for k, v in rows.items()} == {"dnn": (2, "0.8100 ± 0.0141"),
                                                                      "cctl": (1, "0.7000 ± 0.0000")}
    for argv, msg in ((["s3://cctl/ev/runs/absent"], "s3://cctl/ev/runs/absent/metrics.json does not exist"),
                      (["s3://nope/r"], "run directory s3://nope/r: bucket 'nope' does not exist")):
        assert main(["eval", *argv]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
