"""Checks that tests/test_directions.py kills the sign mutations it was written for.

Each mutation is a one-line change of the equation code that passed the rest of the suite (issue
#17). The script unpacks the committed tree (``git archive HEAD``) into a scratch directory, applies
one mutation at a time there (never in the checkout), runs tests/test_directions.py against that
copy and reports which tests failed. Exit status 1 when a mutation survives or no longer applies
(the code it edits has moved: update the line here). docs/testing.md lists the outcome.

    .venv/bin/python tests/direction_mutants.py        # about 3 minutes on one core
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (file, the line as it is, the line mutated, what the mutation does)
MUTANTS = [
    ("cctl_rec/train/ifn.py", "s = F.logsigmoid(logits).sum()", "s = F.logsigmoid(-logits).sum()",
     "paper-mode REINFORCE differentiates log(1 - p) instead of log p"),
    ("cctl_rec/train/ifn.py", "r = ifn.shaper(rows.reward)", "r = -ifn.shaper(rows.reward)",
     "the reward negated inside IFN.step"),
    ("cctl_rec/train/ifn.py", "loss = -(z * p).mean()", "loss = +(z * p).mean()",
     "the influence objective's sign flipped"),
    ("cctl_rec/train/losses.py", "else tgt) + (ren_weight * ren_l if ren_weight else zero)",
     "else tgt) - (ren_weight * ren_l if ren_weight else zero)", "Loss_ren subtracted from Loss_mixed"),
    ("cctl_rec/train/sync.py", "    if dense_opt is not None:", "    if dense_opt is None:",
     "the sync skips the dense Adam moments"),
    ("cctl_rec/train/trainer.py", "ifn.step(step, sel.logits, r, sel.actions", "ifn.step(step, sel.logits, -r, sel.actions",
     "the trainer hands the IFN the negated reward"),
]


def _run_tests(tree: str) -> tuple[int, list[str]]:
    env = {**os.environ, "PYTHONPATH": tree}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_directions.py"],
                       cwd=tree, env=env, capture_output=True, text=True)
    failed = [ln.split(" ")[1] for ln in r.stdout.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
    return r.returncode, failed


def main() -> int:
    with tempfile.TemporaryDirectory() as tree:
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        where = subprocess.run([sys.executable, "-c", "import cctl_rec; print(cctl_rec.__file__)"], cwd=tree,
                               env={**os.environ, "PYTHONPATH": tree}, capture_output=True, text=True).stdout
        assert where.startswith(tree), f"the scratch copy is not the one imported: {where}"
        rc, failed = _run_tests(tree)
        print(f"unmutated: {'all pass' if rc == 0 else 'FAILS ' + ', '.join(failed)}")
        ok = rc == 0
        for path, old, new, what in MUTANTS:
            f = os.path.join(tree, path)
            with open(f) as fh:
                src = fh.read()
            if src.count(old) != 1:
                print(f"NOT APPLIED ({src.count(old)} matches of {old!r} in {path}): {what}")
                ok = False
                continue
            with open(f, "w") as fh:
                fh.write(src.replace(old, new))
            try:
                rc, failed = _run_tests(tree)
            finally:
                with open(f, "w") as fh:
                    fh.write(src)
            killed = rc != 0 and bool(failed)
            ok = ok and killed
            print(f"{'killed' if killed else 'SURVIVES'}: {what} ({path}: {new.strip()})")
            for t in failed:
                print(f"    fails {t}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
