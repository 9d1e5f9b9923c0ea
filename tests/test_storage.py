"""Remote URLs through one I/O layer (iopath -> fsspec), against a real S3-compatible server on
loopback (moto's server, in a thread of the test process): what cannot work is one line, exit 2,
before anything is written; datagen -> train -> evaluate with s3:// data equals the local run."""

import json
import os

import pytest

from cctl_rec.cli import main

moto_server = pytest.importorskip("moto.server", reason="moto[server] is in requirements/cpu.txt")
pytest.importorskip("s3fs")

SMALL = ["data.batch_size=128", "model.tower=[32,16]", "model.san_hidden=[16]", "run.steps=6",
         "run.max_eval_rows=0"]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with bucket ``cctl``; the S3 environment pointed at it."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's request lines are not ours
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}",
                     "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent",
                     "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}.items():
            mp.setenv(k, v)
        import boto3

        boto3.client("s3").create_bucket(Bucket="cctl")
        yield mp
    srv.stop()


def _run(capsys, *argv):
    rc = main(list(argv))
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("env, argv, msg", [
    ({}, ["datagen", "--preset", "tiny", "--out", "s3://nope/x"], "--out s3://nope/x: bucket 'nope' does not exist"),
    ({}, ["datagen", "--preset", "tiny", "--out", "foo://b/x"], "unknown URL scheme 'foo'"),
    ({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}, ["datagen", "--preset", "tiny", "--out", "s3://cctl/x"],
     "cannot reach s3://cctl (NoCredentialsError"),
    ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, ["datagen", "--preset", "tiny", "--out", "s3://cctl/x"],
     "cannot reach s3://cctl (EndpointConnectionError"),
    ({}, ["train", "--config", "s3://cctl/c.yaml", "--run-dir", "s3://cctl/run"],
     "--config s3://cctl/c.yaml: this option takes a local path"),
    ({}, ["experiment", "--config", "c.yaml", "--out", "s3://nope/exp"], "--out s3://nope/exp: bucket 'nope' does not"),
    ({}, ["export", "--run-dir", "s3://nope/run", "--out", "m"], "--run-dir s3://nope/run: bucket 'nope' does not"),
])
def test_unusable_urls_are_one_line_exit_2_and_nothing_is_written(s3, tmp_path, capsys, env, argv, msg):
    s3.chdir(tmp_path)  # the old bug wrote a local directory s3:/bucket/x here
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.delenv(k) if v is None else mp.setenv(k, v)
        rc, err = _run(capsys, *argv)
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err
    assert os.listdir(tmp_path) == []
    import boto3

    assert [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="cctl").get("Contents", [])
            if o["Key"].startswith(("x/", "run/", "model/"))] == []


@pytest.mark.slow  # datagen's writer pool and two training runs
def test_datagen_train_evaluate_on_s3_equal_the_local_run(s3, tmp_path, capsys):
    gen = ["datagen", "--preset", "tiny", "--scale", "0.05", "--workers", "1", "--seed", "3"]
    assert main([*gen, "--out", "s3://cctl/data"]) == 0
    assert main([*gen, "--out", str(tmp_path / "data")]) == 0
    import boto3

    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="cctl")["Contents"]}
    assert "data/manifest.json" in keys and not os.path.exists("s3:")
    local = json.loads((tmp_path / "data" / "manifest.json").read_text())
    remote = json.loads(boto3.client("s3").get_object(Bucket="cctl", Key="data/manifest.json")["Body"].read())
    assert remote["splits"] == local["splits"]  # same shards, rows and sha256
    for name, data in (("s3", "s3://cctl/data"), ("local", str(tmp_path / "data"))):
        assert main(["train", "--data", data, "--run-dir", str(tmp_path / name), *SMALL]) == 0
    m = {n: json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("s3", "local")}
    assert m["s3"]["target_test"] == m["local"]["target_test"] and m["s3"]["selector"] == m["local"]["selector"]
    capsys.readouterr()
    assert main(["evaluate", "--run-dir", str(tmp_path / "s3"), "--data", "s3://cctl/data"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["rows"] == sum(e["rows"] for e in local["splits"]["tgt/test"])
    # export to the bucket -> predict with s3:// model, input and output == local export and predict
    assert main(["export", "--run-dir", str(tmp_path / "s3"), "--out", "s3://cctl/model"]) == 0
    assert main(["export", "--run-dir", str(tmp_path / "s3"), "--out", str(tmp_path / "model")]) == 0
    assert main(["predict", "--model", "s3://cctl/model", "--data", "s3://cctl/data",
                 "--out", "s3://cctl/pred/test.parquet"]) == 0
    assert main(["predict", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data" / "tgt" / "test"),
                 "--out", str(tmp_path / "pred.parquet"), "--reserved-columns", "user_id"]) == 0
    import io

    import pyarrow.parquet as pq

    remote_pred = pq.read_table(io.BytesIO(boto3.client("s3").get_object(
        Bucket="cctl", Key="pred/test.parquet")["Body"].read()))
    local_pred = pq.read_table(tmp_path / "pred.parquet")
    assert remote_pred.column("logit").to_pylist() == local_pred.column("logit").to_pylist()


def test_dcp_writer_and_reader_keep_the_endpoint_when_dcp_resets_them(monkeypatch):
    """DCP resets its storage writer / reader to the checkpoint_id it is given; the base classes then
    looked the filesystem up without options, i.e. fsspec's cached instance made under an earlier
    environment (the fresh-clone suite: a checkpoint went to a moto server stopped one module before)."""
    from cctl_rec import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    for make in (storage.dcp_writer, storage.dcp_reader):
        io = make("s3://b/run/checkpoints/step-1")
        io.reset("s3://b/run/checkpoints/step-2")
        assert io.path == "s3://b/run/checkpoints/step-2"
        assert io.fs.fs.endpoint_url == "http://127.0.0.1:9"
        assert io.fs.fs is storage.filesystem("s3")
    assert storage.dcp_writer("/local/dir") is None and storage.dcp_reader("/local/dir") is None
