"""Writes docs/reliability.md from the JSON that ``tests/reliability_plugin.py`` records.

Usage (what ``make reliability`` runs)::

    CCTL_RELIABILITY_OUT=runs/reliability.json python -m pytest -m reliability
    python scripts/reliability_report.py runs/reliability.json docs/reliability.md

Every case of issues #8 and #20 is listed, in their order; each row is one test (its expectation,
node id and outcome). A case without a test says so, and a marked case outside the list gets a row too.
The command exits 1 if a listed case has no passing test or any marked test failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

# The issues' cases, in their order: category -> cases (the marker's two arguments); issue #20's
# (bad input, round 2) are marked "(#20)".
CASES: dict[str, list[str]] = {
    "data": [
        "missing file or directory", "empty file", "truncated or corrupt Parquet", "missing column",
        "unknown extra column", "wrong dtype", "null ids", "negative ids", "ids >= table size",
        "labels outside {0, 1}", "NaN/inf dense values", "sequences longer than the configured maximum",
        "a source file given as target", "shards whose schemas differ", "a manifest checksum mismatch",
        "a shard that is a special file (#20)", "a manifest of the wrong shape (#20)",
        "a split with one label class (#20)", "a datagen scale that leaves a split empty (#20)",
        "hostile manifests, property-based (#20)",
    ],
    "config": [
        "unknown key", "wrong type", "out-of-range values", "row_wise sharding on CPU",
        "a world size the data cannot be split over", "tables too large for the plan",
        "an alias bomb in a string field (#20)", "values that failed mid-run (#20)",
        "a config file that is not a small YAML text file (#20)", "hostile configs, property-based (#20)",
    ],
    "artifacts": [
        "a checkpoint from a different model or config", "an export directory with missing files",
        "predict on data with the wrong schema", "a rerun with another seed or dataset (#20)",
        "a second writer on one run directory (#20)",
        "a tampered metrics.json, trainer.json or serving.json (#20)",
    ],
    "fault": [
        "a rank killed mid-step", "a kill during a checkpoint write", "a kill during datagen",
        "a full disk simulated", "a read-only or failing disk (#20)",
    ],
    "security": [
        "YAML through safe_load", "no unpickling of user files",
        "paths from configs cannot escape the run directory", "no shell=True with user strings",
    ],
}

# Marker cases that tests name in their own words (prefixes), counted under the case.
ALIASES: dict[tuple[str, str], tuple[str, ...]] = {
    ("fault", "a rank killed mid-step"): ("kill -9 of rank",),   # tests/test_fault.py
}

TITLES = {"data": "Data", "config": "Config", "artifacts": "Artifacts", "fault": "Faults", "security": "Security"}

DECISIONS = """\
## Decisions

- **Exit codes.** A user mistake prints one line, `cctl-rec COMMAND: error: ...`, on stderr and
  exits 2. A full, read-only or failing disk (ENOSPC, EDQUOT, EROFS, EIO, EFBIG) prints one line
  too and exits 1: the input was fine, the machine was not. The disk error is looked for behind
  whatever wrapped it (torch turns a real ENOSPC into `RuntimeError: ... unexpected pos`, and DCP's
  gather of the ranks' errors drops the OSError, so a failed checkpoint write asks the disk:
  `statvfs`). The line drops C++ backtraces and is cut at 1000 characters. `-v` adds the
  traceback to the log.
- **A run directory is one run.** The checkpoint fingerprint covers the config (model, selector,
  SCN, REN, optimizer, data layout, schema), `run.seed` and the dataset (the sha256 of its
  manifest); a rerun whose fingerprint differs from the directory's newest checkpoint is refused
  (exit 2, the directory untouched), resuming or not. Rank 0 holds `fcntl.flock` on `RUN/.lock`
  for the run: a second writer is refused at once, naming the holder's pid; the kernel releases
  the lock however the holder ends. Temp names carry the pid (checkpoints: rank 0's).
- **Bounded input.** Every file the tool reads is `stat`ed first: a device, FIFO or socket (a
  symlink to `/dev/zero`) is refused unread, and nothing is read past its size (a manifest entry
  without `bytes` included). Config files: at most 1 MiB, UTF-8, and the loaded document (with
  each override) at most 10,000 values / 100,000 characters with YAML aliases counted at every use
  (an alias bomb costs no more than the bound), nested at most 64 deep. JSON files
  (`manifest.json`, `metrics.json`, `serving.json`, a checkpoint's `trainer.json`) are bounded,
  UTF-8, at most 64 deep and validated with pydantic: the error names the file and the key path.
  Values quoted in an error are cut (bounded `repr`).
- **Values checked before anything runs.** Ranges a run would otherwise hit later are config
  checks: `run.threads` in [0, 4096], `run.max_eval_rows` >= 0, `run.seed` in [0, 2^62), any
  integer 64-bit, `data.src_ratio` 0 or at least one source row per step, `model.embedding_dim` a
  multiple of 4 (fbgemm's TBE), widths <= 65536, `data.max_seq_len` <= 4096; RANK / WORLD_SIZE
  with 0 <= RANK < WORLD_SIZE.
- **Ids against the table they are looked up in.** A manifest (or serving.json) in which a
  feature's cardinality differs from the rows of the table it is looked up in (`seq` and
  `item_id`, or a feature mapped to another feature's table) is refused; ids are range-checked
  against the table's rows.
- **Undefined metrics are null.** A split with one label class reports `auc: null` with a
  warning naming the split, never 0.0 (without rows, `logloss` is null too); `eval` shows `n/a`.
- **No partial output.** `cctl-rec train` checks everything it can before it writes anything
  (config; dataset: manifest checksums, columns and types, the same schema across a split's
  shards, ids / nulls / labels from the Parquet footer statistics, rows for the world size;
  sharding type and sparse optimizer against the device; the fingerprint of the checkpoint it
  would resume from). A user mistake found later (the planner cannot place the tables, a corrupt
  row group) removes the run directory if this command created it and it holds no checkpoint yet.
  Checkpoints, exports, predictions, shards and manifests are written under a temp name and
  renamed when complete; a failed checkpoint or export removes its temp directory.
- **Unknown extra column: warn.** Extra columns are ignored with a warning naming them (converted
  data may carry raw fields along); a missing or mistyped column fails. The shards of one split
  must agree exactly, extra columns included (their rows are concatenated into one batch).
- **Ids >= table size: fail.** Ids are mapped into `[0, cardinality)` where the data is written
  (datagen, converters), so training, `predict` and the exported model see the same ids; hashing
  at read time would train on ids that serving never sees. There is no hashing switch.
- **Sequences longer than `data.max_seq_len`:** truncated to their newest items by default;
  `data.long_seq=fail` refuses them, and `cctl-rec train` then scans the
  sequence lengths before it starts.
- **Manifest checksums:** `data.verify=sha256` (default) hashes every shard against the manifest
  before training (each rank its share of the files); `size` compares sizes only (very large
  data); `none` skips.
- **NaN/inf:** the data has no dense features (every model input is an integer id), so a float
  column where an id or label belongs is refused by type; a NaN or infinite float in a config is
  refused by the loader.
- **Paths:** the run directory, `--out` and `--data` are the user's; nothing in a config names a
  file that is written, and every training write lands inside the run directory. A manifest's
  shard path must be relative and stay inside the dataset directory.
- **Pickles:** `model.pt` loads with `weights_only=True`; DCP's pickled checkpoint index
  (`.metadata`) is first unpickled with an allow-list of DCP's metadata classes (no
  byte-serialised entries, which DCP would `torch.load` without `weights_only`).
"""


def _cell(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def render(doc: dict[str, Any], json_path: str) -> tuple[str, list[str]]:
    """(markdown, problems): problems name listed cases without a passing test and failed tests."""
    by_case: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in doc["results"]:
        key = (r["category"], r["case"])
        for listed, prefixes in ALIASES.items():
            if r["category"] == listed[0] and r["case"].startswith(prefixes):
                key = listed
        by_case.setdefault(key, []).append(r)
    problems: list[str] = []
    cats = list(CASES) + sorted({c for c, _ in by_case} - set(CASES))
    n_cases = n_tests = 0
    counts: dict[str, int] = {}
    sections = []
    for cat in cats:
        listed = CASES.get(cat, [])
        extra = sorted({case for c, case in by_case if c == cat} - set(listed))
        lines = [f"## {TITLES.get(cat, cat.capitalize())}", "",
                 "| case | expected behaviour checked | test | outcome |", "|---|---|---|---|"]
        for case in listed + extra:
            rows = by_case.get((cat, case), [])
            n_cases += 1
            label = case + ("" if case in listed else " *(not in the issue's list)*")
            if not rows:
                lines.append(f"| {_cell(label)} | — | **no test** | — |")
                problems.append(f"{cat}: {case}: no test")
                continue
            prev = None
            if not any(r["outcome"] == "passed" for r in rows):
                problems.append(f"{cat}: {case}: no passing test")
            for i, r in enumerate(rows):
                n_tests += 1
                counts[r["outcome"] or "not run"] = counts.get(r["outcome"] or "not run", 0) + 1
                out = r["outcome"] or "not run"
                if r["outcome"] == "failed":
                    problems.append(f"{cat}: {case}: {r['test']} failed")
                if r.get("detail") and r["outcome"] in ("skipped", "failed"):
                    out += f" ({r['detail']})"
                expect = r["expect"] if r["case"] == case else f"*{r['case']}*: {r['expect']}"
                if i and expect == prev:
                    expect = "(as above)"
                else:
                    prev = expect
                lines.append(f"| {_cell(label) if i == 0 else ''} | {_cell(expect)} | `{_cell(r['test'])}` "
                             f"| {_cell(out)} |")
        sections.append("\n".join(lines))
    fuzz = [(r["case"], int(m.group(1)), r["outcome"]) for r in doc["results"]
            for m in [re.search(r"hypothesis, (\d+) derandomized cases", r["expect"])] if m]
    fuzz_line = ("Property-based (hypothesis, `tests/test_fuzz.py`): " + "; ".join(
        f"{case.replace(', property-based (#20)', '')}: {n} generated cases, {out}" for case, n, out in fuzz) +
        f" ({sum(n for _, n, _ in fuzz)} cases in all; a passing test ran exactly that many).\n") if fuzz else ""
    v = doc.get("versions", {})
    vs = ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "torchrec", "fbgemm-gpu-cpu", "fbgemm-gpu",
                                             "pyarrow", "pytest") if k in v)
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    head = f"""# Reliability: bad input, faults, security

Generated by `make reliability` — do not edit by hand. It ran:

```bash
CCTL_RELIABILITY_OUT={json_path} {doc['command']}
python scripts/reliability_report.py {json_path} docs/reliability.md
```

on {doc['generated']} (commit {v.get('git', 'unknown')}; {vs}; {v.get('platform', '')}).
Every case of issues #8 and #20 is a test marked `@pytest.mark.reliability(category, case)`
(#20's say so in their case); each row below is one test and its outcome in that run.
{n_cases} cases, {n_tests} tests: {summary}.
{"All listed cases have a passing test." if not problems else "Open: " + "; ".join(problems) + "."}
{fuzz_line}
Each bad-input test drives `cctl-rec` (`cctl_rec.cli.main`) and asserts the exit code, that the
error is one line naming the bad value and what was expected, and that nothing was written (no
run directory, output file or export) or the previous state is byte-identical.
"""
    return head + "\n" + DECISIONS + "\n" + "\n\n".join(sections) + "\n", problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", help="the JSON written with CCTL_RELIABILITY_OUT")
    p.add_argument("out", nargs="?", default="docs/reliability.md")
    args = p.parse_args(argv)
    if not os.path.exists(args.json):
        print(f"reliability_report: {args.json} does not exist; run the marked tests with "
              f"CCTL_RELIABILITY_OUT={args.json} first (make reliability)", file=sys.stderr)
        return 2
    with open(args.json) as f:
        doc = json.load(f)
    text, problems = render(doc, args.json)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {len(doc['results'])} tests" + (f"; {len(problems)} open: " + "; ".join(problems)
                                                               if problems else "; every listed case passes"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
