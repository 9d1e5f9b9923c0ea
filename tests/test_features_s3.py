"""``cctl-rec train --features`` with the run directory on a URL (issue #19, docs/storage.md), against
moto's S3 server on loopback (the ``s3`` fixture of tests/test_storage.py)."""

import json

import pytest

from cctl_rec.cli import main
from cctl_rec.data.features import cache
from tests.test_features import TINY_FEATURES, _write, raw_tiny  # noqa: F401  (raw_tiny: the fixture)
from tests.test_features_train import ARGS, _files
from tests.test_storage import s3  # noqa: F401  (the fixture)


@pytest.mark.slow  # moto's S3 server, two prepares and two 4-step trainings
def test_a_run_directory_on_s3_maps_into_the_bucket_and_trains_the_same(s3, raw_tiny, tmp_path, monkeypatch):  # noqa: F811
    """On a URL the mapping is written below RUN/prepared/<key>/ (no rename on an object store),
    source.json last: the bucket holds prepare's files byte for byte, a second call and a waiting
    rank reuse it, and the run trains as on a local run directory."""
    import hashlib

    import boto3

    import cctl_rec.data.features.prepare as prep

    monkeypatch.setenv("CCTL_REC_CACHE", str(tmp_path / "cache"))
    feats = _write(tmp_path, TINY_FEATURES)
    assert main(["prepare", "--features", feats, "--data", raw_tiny, "--out", str(tmp_path / "prep")]) == 0
    path, made = cache.ensure_prepared(feats, raw_tiny, "s3://cctl/rawrun")
    assert made and path.startswith("s3://cctl/rawrun/prepared/")
    c = boto3.client("s3")
    prefix = path[len("s3://cctl/"):] + "/"
    objs = {o["Key"][len(prefix):]: hashlib.sha256(c.get_object(Bucket="cctl", Key=o["Key"])["Body"].read()).digest()
            for o in c.list_objects_v2(Bucket="cctl", Prefix=prefix)["Contents"]}
    assert objs.pop("source.json")
    assert objs == {k: hashlib.sha256(v).digest() for k, v in _files(tmp_path / "prep").items()}

    def no_prepare(*a, **k):
        raise AssertionError("mapped again")

    with monkeypatch.context() as m:
        m.setattr(prep, "prepare", no_prepare)
        assert cache.ensure_prepared(feats, raw_tiny, "s3://cctl/rawrun") == (path, False)
        assert cache.ensure_prepared(feats, raw_tiny, "s3://cctl/rawrun", rank=1, timeout=5) == (path, False)
    steps = [*ARGS, "run.steps=4"]
    assert main(["train", "--features", feats, "--data", raw_tiny, "--run-dir", "s3://cctl/rawrun", *steps]) == 0
    assert main(["train", "--features", feats, "--data", raw_tiny, "--run-dir", str(tmp_path / "local"), *steps]) == 0
    remote = json.loads(c.get_object(Bucket="cctl", Key="rawrun/metrics.json")["Body"].read())
    local = json.loads((tmp_path / "local" / "metrics.json").read_text())
    for key in ("target_test", "target_valid", "selector"):
        assert remote[key] == local[key], key
