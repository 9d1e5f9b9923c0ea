"""`cctl-rec bench`: every benchmark runs end to end on a micro dataset and writes well-formed JSON
and markdown; the harness steps exactly as `train()` does; the stress checks catch a broken sync.

No timing is asserted: speed targets are reported in docs/benchmarks/README.md, not tested.
"""

import json
import tempfile

import pytest

from cctl_rec.cli import main

TINY = ["data.batch_size=128", "model.tower=[32,16]", "model.san_hidden=[16]", "run.max_eval_rows=512"]
FAST = ["--steps", "2", "--warmup", "1", "--repeats", "1"]
ENVELOPE = {"benchmark", "command", "finished_at", "options", "machine", "versions", "load", "targets", "results"}


def _bench(tiny_data, tmp_path, what, *args):
    out = tmp_path / f"{what}.json"
    rc = main(["bench", what, "--data", tiny_data, "--out", str(out), *FAST, *args, *TINY])
    res = json.loads(out.read_text())
    md = (tmp_path / f"{what}.md").read_text()
    assert set(res) >= ENVELOPE and res["benchmark"] == what
    assert res["machine"]["vcpus"] >= 1 and res["versions"]["torch"] and res["load"]["load_1m_start"] >= 0
    assert md.startswith("# ") and "cctl-rec bench " + what in md and "| " in md
    for t in res["targets"]:
        assert {"name", "goal", "value", "met", "note", "required"} <= set(t)
    return rc, res


@pytest.mark.parametrize("extra", [["run.precision=fp32"], ["run.precision=bf16", "selector.mode=influence"]])
def test_harness_step_is_train_step(tiny_data, extra):
    """The benchmarks time what `train()` runs: same steps, same model, bitwise."""
    from cctl_rec.bench.harness import Harness, run_steps
    from cctl_rec.config import load_config
    from cctl_rec.train.loop import train

    cfg = load_config(None, [f"data.path={tiny_data}", *TINY, "scn.sync_every=4", "selector.update_every=3",
                             "run.steps=9", *extra])
    with tempfile.TemporaryDirectory() as d:
        m = train(cfg, d)
    h = Harness(cfg, hooks=True)
    run_steps(h, 9)
    assert h.needs_final_sync(9)
    h.sync()  # train() ends with a sync: the pure tower is what is served
    assert h.evaluate("tgt/test") == m["target_test"]
    assert h.syncs == m["syncs"] == 3  # k=4 over 9 steps, then the last sync
    assert (h.ifn.rl.updates if h.ifn.rl is not None else 0) == m["selector_updates"]
    parts = h.sections.medians()
    assert {"data", "forward", "embeddings", "towers", "san", "backward_opt", "towers_bwd", "ren"} <= set(parts)
    h.close()


@pytest.mark.slow  # the bench command: a timed run, and git for the envelope (a process)
def test_bench_train(tiny_data, tmp_path):
    rc, res = _bench(tiny_data, tmp_path, "train", "--parts", "throughput,breakdown,threads,auc", "--auc-steps", "3")
    r = res["results"]
    assert rc == 0
    assert set(r["throughput"]) == {"dnn/fp32", "cctl/fp32", "dnn/bf16", "cctl/bf16", "cctl-influence/fp32"}
    assert r["throughput"]["cctl/fp32"]["target_samples_per_s"]["median"] > 0
    assert r["ratios"]["influence_over_paper_step_time"] > 0
    b = r["breakdown"]["cctl/fp32"]
    assert {"data", "embeddings (fwd)", "towers (fwd)", "SAN (fwd)", "selector scoring", "REN loss (fwd)", "reward",
            "metrics", "sync (amortised)", "selector update (amortised)"} <= set(b["parts_ms"])
    assert b["scn_ms"] > 0 and b["sync_every"] == 100
    assert "overhead_over_scn_ablation" in b and b["overhead_over_scn_attributed"]["median"] > 0
    assert r["auc"]["fp32"]["steps"] == 3 and "auc_diff_bf16_minus_fp32" in r["auc"]
    assert {t["name"] for t in res["targets"]} >= {"CCTL over its SCN towers (fp32), attributed",
                                                   "CCTL over its SCN towers (fp32), ablation",
                                                   "bf16 speed-up (CCTL)", "bf16 target AUC"}


@pytest.mark.slow  # a spawned process per variant
def test_bench_train_rss_in_a_fresh_process(tiny_data):
    from cctl_rec.bench.common import BenchOptions
    from cctl_rec.bench.train import VARIANTS, measure_rss

    out = measure_rss(BenchOptions(data=tiny_data, config=None, overrides=tuple(TINY), steps=2, warmup=1),
                      {"dnn/fp32": VARIANTS["dnn/fp32"]})
    assert out["dnn/fp32"]["peak_rss_mib"] > 100 and out["dnn/fp32"]["steps"] == 3


@pytest.mark.slow  # the bench command: a timed run, and git for the envelope (a process)
def test_bench_sync(tiny_data, tmp_path):
    rc, res = _bench(tiny_data, tmp_path, "sync", "--table-rows", "1000,20000")
    s = res["results"]["sizes"]
    assert rc == 0 and set(s) == {"1000", "20000"}
    assert s["20000"]["pure_equals_mixed_after_sync"] and s["20000"]["sync_ms"]["median"] > 0
    assert s["20000"]["target_table_rows"] > s["1000"]["target_table_rows"] and 0 < s["20000"]["share_at_k1000"]


@pytest.mark.slow  # the bench command: a timed run, and git for the envelope (a process)
def test_bench_reward(tiny_data, tmp_path):
    rc, res = _bench(tiny_data, tmp_path, "reward", "selector.update_every=2")
    r = res["results"]
    assert rc == 0 and set(r) == {"paper", "bernoulli"}
    assert r["paper"]["update_ms"]["median"] > 0 and r["paper"]["bookkeeping_share"] > 0


@pytest.mark.slow  # the bench command: a timed run, and git for the envelope (a process)
def test_bench_data(tiny_data, tmp_path):
    rc, res = _bench(tiny_data, tmp_path, "data")
    r = res["results"]
    assert rc == 0 and set(r["readers"]) == {"tgt", "src", "cctl", "dnn"} and set(r["ratio"]) == {"cctl", "dnn"}
    assert r["readers"]["cctl"]["rows_per_item"] == 128 * 5 and r["ratio"]["cctl"] > 0


@pytest.mark.slow  # the bench command: a timed run, and git for the envelope (a process)
def test_bench_kernels(tiny_data, tmp_path):
    rc, res = _bench(tiny_data, tmp_path, "kernels", "--table-rows", "5000")
    r = res["results"]
    assert rc == 0 and set(r) == {"dataset_tables", "user_table_5000"}
    v = r["user_table_5000"]["variants"]
    assert len(v) == 4 and v["fused TBE rowwise Adagrad (product)"]["product_speedup"] == 1.0


@pytest.mark.dist
def test_bench_scaling_counts_collectives(tiny_data, tmp_path):
    rc, res = _bench(tiny_data, tmp_path, "scaling")
    r = res["results"]
    assert rc == 0 and set(r) == {"1", "2"}
    two = r["2"]["ranks"][0]["per_step"]
    assert any(k.startswith("forward/alltoall") for k in two)  # TorchRec's input / output dist
    assert any(k.startswith("backward_opt/allreduce") for k in two)  # DDP's gradient buckets
    assert r["2"]["rank0_sent_bytes_per_step"] > 0 and r["1"]["rank0_sent_bytes_per_step"] == 0
    assert all(t["met"] for t in res["targets"])  # the sync sends nothing


@pytest.mark.slow  # the bench command: a timed run, and git for the envelope (a process)
def test_bench_stress_checks_every_window(tiny_data, tmp_path):
    rc, res = _bench(tiny_data, tmp_path, "stress", "--stress-steps", "44", "--sync-every", "2",
                     "--update-every", "2", "--rss-every", "2")
    r = res["results"]
    assert rc == 0 and not r["failures"]
    assert r["syncs"] == 22 and r["selector_updates"] == 22
    assert r["checks"]["updates_checked"] == 22 and r["checks"]["syncs_checked"] == 22
    assert r["rss"]["growth"] is not None and len(r["rss_samples"]) == 23


@pytest.mark.slow  # the bench command: a timed run, and git for the envelope (a process)
def test_bench_stress_fails_on_a_broken_sync(tiny_data, tmp_path, monkeypatch, capsys):
    import cctl_rec.train.trainer as trainer  # the harness is a Trainer: its sync is the trainer's

    monkeypatch.setattr(trainer, "sync_mixed_to_pure", lambda *a, **k: None)
    rc, res = _bench(tiny_data, tmp_path, "stress", "--stress-steps", "4", "--sync-every", "2",
                     "--update-every", "2", "--rss-every", "1")
    assert rc == 1 and any("pure != mixed" in f for f in res["results"]["failures"])
    assert "failed" in capsys.readouterr().err


def test_bench_user_mistakes_are_one_line(tiny_data, tmp_path, capsys):
    assert main(["bench", "train", "--data", str(tmp_path / "none")]) == 2
    assert "no dataset at" in capsys.readouterr().err
    assert main(["bench", "train", "--data", tiny_data, "--parts", "speed"]) == 2
    assert "unknown part(s) ['speed']" in capsys.readouterr().err
    assert main(["bench", "all", "--data", tiny_data, "--out", str(tmp_path / "x.json")]) == 2
    assert "takes a directory" in capsys.readouterr().err


def test_precision_is_validated():
    from cctl_rec.config import RunConfig, load_config

    with pytest.raises(ValueError, match=r"run.precision must be one of \['fp32', 'bf16'\], got 'fp16'"):
        load_config(None, ["run.precision=fp16"])
    with pytest.raises(ValueError, match="run.precision must be fp32 or bf16, got 'half'"):
        RunConfig(precision="half")
