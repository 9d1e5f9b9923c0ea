"""Mutation testing of cctl_rec/train and cctl_rec/modules: does a test fail when the code changes?

For each target file the script generates one-change mutants from the syntax tree (``ast``):
arithmetic swaps (+ -, * /, // /, ** *, and the augmented forms), a unary minus removed or added
(around an arithmetic result), comparison swaps (< <=, > >=, == !=, is / is not, in / not in),
and / or, numeric constants (0 <-> 1, x -> -x), ``.sum()`` <-> ``.mean()`` and
``reduction="sum"`` <-> ``"mean"``, True <-> False in keyword arguments and defaults, ``min`` <->
``max``, ``.detach()`` / ``.clone()`` removed, and a call statement (``p.add_(...)``,
``opt.step()``) replaced by ``pass``. Each mutant is applied in a scratch copy of the
committed tree (``git archive HEAD``; never the checkout) and the tests that execute the mutated
line are run there:

- a coverage pass first runs every candidate test once (``-m "not slow"`` of the test files below)
  and records which lines of the target files each test executes, and how long it takes;
- a mutant on a line executed by some tests runs those tests (fastest first, ``-x``); a mutant on
  a line only executed at import (a default, a module constant) runs every test touching the file;
  a line inside a function that no test executes is ``uncovered`` (a survivor: no test can see it),
  unless :data:`DIST_TESTS` names the multi-process tests for that function (the branches only
  taken under torch.distributed with more than one rank).

Each mutant runs in a child forked from a parent that has imported torch, torchrec, cctl_rec and the
tests (no interpreter start-up per mutant): the child swaps the mutated function's code in place
(every reference to it runs the mutant); a mutant at module level (a constant, a class attribute)
is written into the child's tree and the package imported anew. One torch thread per child. Outcomes: killed
(a test failed), timeout (killed too: the mutant hangs or crawls), survived, uncovered, equivalent
(survived, and :data:`EQUIVALENT` says why no input can tell it from the original), invalid (the
mutant does not compile). Writes a JSON of every mutant and prints a summary.

    nice -n 10 .venv/bin/python scripts/mutate.py                 # the critical files
    nice -n 10 .venv/bin/python scripts/mutate.py --light         # the rest of train/ and modules/, operator swaps
    nice -n 10 .venv/bin/python scripts/mutate.py --files cctl_rec/train/reward.py --list   # the mutants only

docs/testing.md lists the last results. Exit status 1 when a mutant survives in a critical file.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tokenize
from dataclasses import asdict, dataclass, field
from typing import Optional

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

IFN_CRITICAL = {
    # the influence mode and REINFORCE (paper, bernoulli) parts of ifn.py, and what both go through
    "update_every_for", "_centre_per_label", "_world", "pairwise_loss", "per_sample_influence", "_mlp_sequence",
    "_mlp_influence", "_influence_double_backward", "_last_bias", "IFN.__init__", "IFN.keep_rate", "IFN.select",
    "IFN.step", "IFN._normalise", "IFN._apply", "_soft", "_ones", "_paper_weights", "_bernoulli_weights",
    "_reinforce", "_learn_paper", "_learn_bernoulli", "_learn_influence",
}
CRITICAL: dict[str, Optional[set[str]]] = {
    # file -> the functions (qualified names) that must let no mutant survive; None: the whole file
    "cctl_rec/train/losses.py": None,
    "cctl_rec/train/reward.py": None,
    "cctl_rec/train/reinforce.py": None,
    "cctl_rec/train/sync.py": None,
    "cctl_rec/modules/ren.py": None,
    "cctl_rec/modules/selector.py": None,
    "cctl_rec/train/ifn.py": IFN_CRITICAL,
}
LIGHT = [
    "cctl_rec/train/best.py", "cctl_rec/train/checkpoint.py", "cctl_rec/train/evaluation.py",
    "cctl_rec/train/evidence.py", "cctl_rec/train/influence_groups.py", "cctl_rec/train/loop.py",
    "cctl_rec/train/rundir.py", "cctl_rec/train/runlog.py", "cctl_rec/train/trainer.py",
    "cctl_rec/modules/attention.py", "cctl_rec/modules/conet.py", "cctl_rec/modules/embedding.py",
    "cctl_rec/modules/heads.py", "cctl_rec/modules/interest.py", "cctl_rec/modules/san.py",
    "cctl_rec/modules/tower.py",
]
TEST_FILES = [  # the equation tests: each mutant of a critical file must be caught here
    "tests/test_equations.py", "tests/test_directions.py", "tests/test_evidence.py", "tests/test_heads.py",
]
LIGHT_TEST_FILES = TEST_FILES + [
    "tests/test_trainer.py", "tests/test_train.py", "tests/test_checkpoint.py", "tests/test_evaluate.py",
    "tests/test_keep_best.py", "tests/test_attention_heads.py", "tests/test_runlog.py",
    "tests/test_storage_rundir.py",   # checkpoints on a bucket (moto's S3 server on loopback)
]

DIST_TESTS: dict[tuple[str, str], list[str]] = {
    # (file, function) -> multi-process tests for the lines only run with more than one rank
    ("cctl_rec/train/reinforce.py", "Reinforce.update"): ["tests/test_equations.py::test_equations_on_two_ranks"],
    ("cctl_rec/modules/ren.py", "global_counts"): ["tests/test_equations.py::test_equations_on_two_ranks"],
    ("cctl_rec/modules/ren.py", "ren_loss"): ["tests/test_equations.py::test_equations_on_two_ranks"],
    ("cctl_rec/train/sync.py", "sync_mixed_to_pure"):   # the fused (TBE) optimizer state of sharded tables
        ["tests/test_sharding.py::test_cctl_sharded_forward_equals_unsharded_and_sync_equalises[table_wise]",
         "tests/test_sharding.py::test_sync_copies_the_data_parallel_tables_optimizer_state"],
    ("cctl_rec/train/ifn.py", "IFN._normalise"): ["tests/test_equations.py::test_equations_on_two_ranks"],
    ("cctl_rec/train/ifn.py", "IFN._apply"): ["tests/test_equations.py::test_equations_on_two_ranks"],
    ("cctl_rec/train/reward.py", "rank_mean"): ["tests/test_equations.py::test_equations_on_two_ranks"],
    ("cctl_rec/train/ifn.py", "_world"): ["tests/test_equations.py::test_equations_on_two_ranks"],
    ("cctl_rec/train/ifn.py", "IFN.__init__"): ["tests/test_equations.py::test_equations_on_two_ranks"],
    ("cctl_rec/train/trainer.py", "Trainer.step"):   # the reward REINFORCE gets: the ranks' mean
        ["tests/test_trainer.py::test_reinforce_learns_from_the_mean_reward_of_the_ranks"],
}

DIST_SET = {t for ts in DIST_TESTS.values() for t in ts}

SLOW_TESTS: dict[tuple[str, str], list[str]] = {
    # (file, function) -> slow in-process tests (left out of the coverage pass) for what only they run:
    # a run killed and resumed, a run directory on a bucket, a store that fails a write
    ("cctl_rec/train/loop.py", "train"):
        ["tests/test_checkpoint.py::test_a_run_killed_inside_a_log_window_logs_what_an_uninterrupted_run_logs"],
    ("cctl_rec/train/checkpoint.py", "save_checkpoint"):
        ["tests/test_storage_rundir.py::test_a_checkpoint_the_store_fails_is_one_line_and_leaves_nothing",
         "tests/test_storage_rundir.py::test_run_dir_on_s3_resumes_to_the_local_run"],
    ("cctl_rec/train/checkpoint.py", "load_checkpoint"):
        ["tests/test_checkpoint.py::test_resume_after_interruption_is_bitwise_the_same_run[bernoulli]"],
    ("cctl_rec/train/checkpoint.py", "TrainState.pure_keys"):   # PRESYNC/: what a resume from a final checkpoint loads
        ["tests/test_checkpoint.py::test_resume_after_interruption_is_bitwise_the_same_run[bernoulli]"],
    ("cctl_rec/train/checkpoint.py", "TrainState.restore"):
        ["tests/test_checkpoint.py::test_resume_after_interruption_is_bitwise_the_same_run"],
    ("cctl_rec/train/ifn.py", "IFN.load_meta"):
        ["tests/test_checkpoint.py::test_resume_after_interruption_is_bitwise_the_same_run[bernoulli]"],
}

_ONE_RANK = "with one initialised rank the all-reduce is the identity: the same numbers either way"
_DETACHED = ("autograd.grad is taken w.r.t. the tower's parameters (or layer outputs) only and the "
             "result carries no graph: the values and every .grad are the same")
EQUIVALENT: dict[tuple[str, str], str] = {
    # (file, the mutated line, whitespace collapsed) -> why no input tells it from the original
    ("cctl_rec/train/sync.py", 'if hasattr(t, "metadata") or hasattr(t, "local_shards"):'):
        "a ShardedTensor has both attributes, a plain tensor neither",
    ("cctl_rec/train/sync.py", "return [((1,) * t.dim(), tuple(t.shape), None)]"):
        "both table sets' plain tensors get the same offsets: the comparison's verdict is unchanged",
    ("cctl_rec/train/sync.py", "_LAYOUT_CHECKED[module.pure_tgt] = False"):
        "only membership of _LAYOUT_CHECKED is read, never the value",
    ("cctl_rec/train/reinforce.py",
     "if dist.is_available() and dist.is_initialized() and dist.get_world_size() >= 1:"): _ONE_RANK,
    ("cctl_rec/train/reinforce.py",
     "if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 0:"): _ONE_RANK,
    ("cctl_rec/train/reinforce.py", "out = out / (math.sqrt(self.sq) + 1e-12) if self.sq >= 0 else 0.0"):
        "sq == 0 only when every shaped reward squared to 0.0 (|r| < 1.5e-154): 0 vs r / 1e-12 < 1.5e-142",
    ("cctl_rec/modules/ren.py",
     "if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() >= 1):"):
        _ONE_RANK + " (the counts clamped at 1, as masked_mean's own)",
    ("cctl_rec/modules/ren.py",
     "if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 0):"):
        _ONE_RANK + " (the counts clamped at 1, as masked_mean's own)",
    ("cctl_rec/modules/ren.py", "cos_id = masked_mean(F.cosine_similarity(id_s, id_t, dim=1, eps=1e-8), id_mask,"):
        "the inputs are N X D (2-D): dim 1 is dim -1",
    ("cctl_rec/modules/ren.py",
     "cos_seq = masked_mean(F.cosine_similarity(seq_s, seq_t, dim=1, eps=1e-8), seq_mask,"):
        "the inputs are B X D (2-D): dim 1 is dim -1",
    ("cctl_rec/modules/selector.py",
     "return self.net(x).squeeze(1).clamp(-self.logit_clamp, self.logit_clamp)"):
        "the MLP's output is B X 1: squeeze(1) is squeeze(-1)",
    ("cctl_rec/train/ifn.py",
     "return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 0"):
        "the only caller tests _world() > 1: false for 0 and 1",
    ("cctl_rec/train/ifn.py", "pos, neg = logits[y >= 0.5], logits[y <= 0.5]"):
        "labels are 0/1 clicks: no label equals 0.5",
    ("cctl_rec/train/ifn.py", "pos, neg = logits[y > 0.5], logits[y < 0.5]"):
        "labels are 0/1 clicks: no label equals 0.5",
    ("cctl_rec/train/ifn.py", "return -(logits.sum() * 0.0)"): "-0.0 == 0.0, and its gradient is 0 either way",
    ("cctl_rec/train/ifn.py", "return logits.mean() * 0.0"): "0 either way (finite logits), with a graph",
    ("cctl_rec/train/ifn.py", "f_eval = tower(x_eval)"): _DETACHED,
    ("cctl_rec/train/ifn.py", "return _mlp_influence(seq, x_src, y_src, dict(zip(params, g_eval)))"): _DETACHED,
    ("cctl_rec/train/ifn.py",
     "return _influence_double_backward(tower, params, list(g_eval), x_src, y_src)"): _DETACHED,
    ("cctl_rec/train/ifn.py", "infl += ((d @ g_eval[m.weight]) * a_in).sum(1)"):
        "the sum is returned .detach()ed: the same values",
    ("cctl_rec/train/ifn.py", "return infl"):
        "infl is built from autograd.grad results (no create_graph) and detached inputs: no graph to drop",
    ("cctl_rec/train/ifn.py", "self.opt.zero_grad(set_to_none=True)"):
        "every parameter's .grad is replaced by a fresh tensor on the next line, whatever zero_grad left",
    ("cctl_rec/train/ifn.py", "p.grad = g"): "g is a fresh tensor from autograd.grad that nothing else holds",
    ("cctl_rec/train/ifn.py", "m = labels != y"):
        "with 0/1 labels the loop over y = 0, 1 centres the same two classes, each once, in the other order",
    ("cctl_rec/train/ifn.py",
     'loss = F.binary_cross_entropy_with_logits(a.squeeze(1), y, reduction="sum") # sum: delta_i per row'):
        "the MLP's output is B X 1: squeeze(1) is squeeze(-1)",
    ("cctl_rec/train/ifn.py", "if float(c_src.mean()) == 0:"):
        "the label counts are >= 0: their mean is 0 exactly when their sum is",
    ("cctl_rec/train/ifn.py",
     "g_src = torch.autograd.grad((eps * l_src).sum(), params, create_graph=True, allow_unused=False)"):
        "g_eval, taken through the same tower forward without allow_unused, already fails on a parameter "
        "outside the graph: every parameter here is in it",
    ("cctl_rec/train/reinforce.py",
     "flat = torch.cat([a.flatten() for a in self.acc] + [torch.tensor([self.n], dtype=self.acc[1].dtype)])"):
        "the selector's parameters (weight and bias of each layer: always >= 2) share one dtype",
    ("cctl_rec/train/sync.py", "if fm is not None or fp is not None:"):
        "mixed_tgt and pure_tgt get their optimizer and their sharding from one code path (apply_sparse_optimizer, "
        "one mirrored plan): both have a fused optimizer or neither",
}
_B_X_1 = "the output is B X 1 (2-D): squeeze(1) is squeeze(-1)"
_TWO_D = "the tensor is 2-D (B X L scores, B X K weights): dim 1 is dim -1"
_ONE_RANK_COLLECTIVE = ("with one rank the barrier returns at once and the broadcast / all-gather gives this "
                        "rank's own value: the same either way (a run always has a process group, of 1 rank here)")
EQUIVALENT.update({
    # the light pass (the rest of train/ and modules/)
    ("cctl_rec/modules/tower.py", "return self.net(x).squeeze(1)"): _B_X_1,
    ("cctl_rec/modules/conet.py", 'return self.out[domain](a_t if domain == "tgt" else a_s).squeeze(1)'): _B_X_1,
    ("cctl_rec/modules/heads.py", "return self.linear(x).squeeze(1)"): _B_X_1,
    ("cctl_rec/modules/heads.py", "return (self.linear(x) + self.deep(x)).squeeze(1) + fm"): _B_X_1,
    ("cctl_rec/modules/heads.py", "return self.linear(x).squeeze(1) + self.p((a * pairs).sum(1)).squeeze(-1)"):
        _B_X_1,
    ("cctl_rec/modules/heads.py", "return self.linear(x).squeeze(-1) + self.p((a * pairs).sum(1)).squeeze(1)"):
        _B_X_1,
    ("cctl_rec/modules/heads.py", "return h.squeeze(1)"): _B_X_1 + " (StarTower's last layer has width 1)",
    ("cctl_rec/modules/heads.py", "return self.net(GradReverse.apply(x, 1.0)).squeeze(1)"): _B_X_1,
    ("cctl_rec/modules/attention.py", "return torch.softmax(filled, dim=1) * mask.to(scores.dtype)"):
        _TWO_D + " (its one caller passes ItemAttention's B X L scores)",
    ("cctl_rec/modules/attention.py", "dim=1)"): _TWO_D + " (InterestAttention: K scores of B X 1 concatenated)",
    ("cctl_rec/train/evidence.py",
     "if dist.is_available() and dist.is_initialized() and dist.get_world_size() >= 1:"): _ONE_RANK,
    ("cctl_rec/train/best.py", "if dist.is_initialized() and dist.get_world_size() >= 1:"): _ONE_RANK_COLLECTIVE,
    ("cctl_rec/train/loop.py", "if world >= 1: # rank 0 made the run directory; then every rank logs into it"):
        _ONE_RANK_COLLECTIVE,
    ("cctl_rec/train/loop.py", "if world >= 1:"): _ONE_RANK_COLLECTIVE,
    ("cctl_rec/train/checkpoint.py", "if world >= 1: # every rank writes into rank 0's temp directory"):
        _ONE_RANK_COLLECTIVE,
    # ifn.py outside the critical functions (evidence, oracle, supervised)
    ("cctl_rec/train/ifn.py", "z_t = (infl_t / (ifn.infl_scale or 0.0)).clamp(-5, 5)"):
        "_normalise set infl_scale (>= 1e-12) on the line before: the `or` never reaches its fallback",
    ("cctl_rec/train/ifn.py", "@dataclass(frozen=False)"):
        "nothing assigns to a Mode's fields (MODES is built once, read only): frozen or not, the same table",
    ("cctl_rec/train/ifn.py", "reward: float = 1.0"):
        "SourceRows' default reward is never read: IFN.step, the one caller whose learners read it (_reinforce), "
        "passes the step's reward; select's rows reach the weight functions only, which do not read it",
    ("cctl_rec/train/ifn.py", "return (2.0 * labels.float() - 1.0) * logits.float()"):
        "every reader of the margins detaches them again (bucketize, histc, a comparison): the same values, no graph",
})
_LABEL_HALF = "labels are 0/1 clicks: no label equals 0.5"
_STRICTNESS = {"> -> >=", ">= -> >", "< -> <=", "<= -> <"}

_NO_RL = ("the REINFORCE counters trainer.json gets from a mode without REINFORCE (rl is None): load_meta reads "
          "them only when there is one, so the run resumes the same")
HARMLESS: dict[tuple[str, str], str] = {
    # (file, the mutated line) -> why a surviving mutant that some input does tell apart changes no result
    ("cctl_rec/train/loop.py", "exs = (step + step_last) * cfg.data.batch_size * world / (now - t_last)"):
        "the log's examples per second of each window after the first (the first has step_last = 0): a timing "
        "for people reading the log, no result reads it; tests check it is > 0 (speed itself is cctl-rec bench's)",
    ("cctl_rec/train/ifn.py",
     'return {"n": self.rl.n if self.rl else 1.0, "updates": self.rl.updates if self.rl else 0,'):
        _NO_RL,
    ("cctl_rec/train/ifn.py",
     'return {"n": self.rl.n if self.rl else 0.0, "updates": self.rl.updates if self.rl else 1,'):
        _NO_RL,
    ("cctl_rec/train/trainer.py",
     "torch.manual_seed(cfg.run.seed - 1000 + self.rank) # per-rank randomness (Bernoulli actions)"):
        "another fixed seed for the per-rank draws, still one per rank and apart from the model's: runs stay "
        "deterministic, with other draws; no test can prefer one seed to another",
    ("cctl_rec/train/trainer.py",
     "torch.manual_seed(cfg.run.seed + 1000 - self.rank) # per-rank randomness (Bernoulli actions)"):
        "another fixed seed for the per-rank draws, still one per rank and apart from the model's: runs stay "
        "deterministic, with other draws; no test can prefer one seed to another",
}

_REMOVED_ZERO_GRAD = ("cctl_rec/train/ifn.py", "self.opt.zero_grad(set_to_none=False)")


_WEAKER_ASSERT = ("an internal invariant's assert made weaker (and -> or): every call the code makes passes "
                  "both; a broken caller still fails, on the next line that reads the None")


def _equivalent(m: "Mutant") -> str:
    if m.old.startswith("assert ") and m.what == "and -> or":
        return _WEAKER_ASSERT
    if m.new == "pass":
        return EQUIVALENT[("cctl_rec/train/ifn.py", "self.opt.zero_grad(set_to_none=True)")] \
            if (m.file, m.old) == _REMOVED_ZERO_GRAD else ""
    if m.what in _STRICTNESS and re.search(r"labels?\b\S*\s*" + re.escape(m.text) + r"\s*0\.5\b", m.new):
        return _LABEL_HALF
    return EQUIVALENT.get((m.file, m.new), "")


def _verdict(m: "Mutant") -> tuple[str, str]:
    """("equivalent" or "harmless", the reason) for a mutant that may survive; ("", "") otherwise.
    No mutant of a critical function is ever harmless."""
    eq = _equivalent(m)
    if eq:
        return "equivalent", eq
    why = HARMLESS.get((m.file, m.new), "")
    return ("harmless", why) if why and not is_critical(m) else ("", "")


@dataclass
class Mutant:
    file: str
    line: int
    func: str
    what: str          # e.g. "+ -> -"
    old: str           # the original line, stripped
    new: str           # the mutated line(s), stripped
    start: int         # character offsets of the edit in the file
    end: int
    text: str
    kind: str          # operator family, for --light
    at_import: bool = False   # a class attribute or a module constant: read when imported
    body: tuple = ()          # a default's function body (first, last line): the tests running it
    status: str = ""
    tests: list[str] = field(default_factory=list)
    failed: str = ""
    seconds: float = 0.0
    reason: str = ""
    verdict: str = ""         # "equivalent" or "harmless" when it survives (with its reason)


# ----------------------------------------------------------------------------- generating mutants

BINOPS = {ast.Add: ("+", "-"), ast.Sub: ("-", "+"), ast.Mult: ("*", "/"), ast.Div: ("/", "*"),
          ast.FloorDiv: ("//", "/"), ast.Pow: ("**", "*")}
CMPOPS = {ast.Lt: ("<", "<="), ast.LtE: ("<=", "<"), ast.Gt: (">", ">="), ast.GtE: (">=", ">"),
          ast.Eq: ("==", "!="), ast.NotEq: ("!=", "=="), ast.Is: ("is", "is not"), ast.IsNot: ("is not", "is"),
          ast.In: ("in", "not in"), ast.NotIn: ("not in", "in")}
MATH_CALLS = {"sum", "mean", "sigmoid", "logsigmoid", "log", "exp", "cosine_similarity", "softplus",
              "binary_cross_entropy_with_logits", "sqrt", "eq5", "masked_mean", "abs", "clamp", "float",
              "_reduce", "heldout_reward"}


class _Gen(ast.NodeVisitor):
    def __init__(self, path: str, src: str) -> None:
        self.path, self.src = path, src
        self.lines = src.splitlines(keepends=True)
        self.line_start = [0]
        for ln in self.lines:
            self.line_start.append(self.line_start[-1] + len(ln))
        self.tokens = [t for t in tokenize.generate_tokens(io.StringIO(src).readline)
                       if t.type in (tokenize.OP, tokenize.NAME)]
        self.stack: list[str] = []
        self.out: list[Mutant] = []
        self.docstrings: set[int] = set()
        self.body_depth = 0   # > 0 inside a function body
        self.default_of: tuple = ()   # (first, last) body line of the function whose default is visited

    # positions ---------------------------------------------------------------------------------
    def off(self, line: int, col_bytes: int) -> int:
        """Character offset in the file of an ast (line, utf-8 byte column)."""
        text = self.lines[line - 1]
        return self.line_start[line - 1] + len(text.encode()[:col_bytes].decode(errors="ignore"))

    def tok_off(self, t: tokenize.TokenInfo) -> tuple[int, int]:
        (l0, c0), (l1, c1) = t.start, t.end
        return self.line_start[l0 - 1] + c0, self.line_start[l1 - 1] + c1

    def first_token(self, after: int, strings: tuple[str, ...], before: Optional[int] = None):
        for t in self.tokens:
            s, e = self.tok_off(t)
            if s < after or (before is not None and s >= before):
                continue
            if t.string in strings:
                return t
            if t.string not in (")", "]", "(", "not", "is", "in"):  # only brackets may come first
                return None
        return None

    def node_span(self, n: ast.AST) -> tuple[int, int]:
        return self.off(n.lineno, n.col_offset), self.off(n.end_lineno, n.end_col_offset)

    # recording ---------------------------------------------------------------------------------
    def add(self, start: int, end: int, text: str, what: str, kind: str) -> None:
        line = self.src.count("\n", 0, start) + 1
        new_src = self.src[:start] + text + self.src[end:]
        l0 = self.line_start[line - 1]
        last = self.src.count("\n", 0, end) + 1
        old = "".join(self.lines[line - 1:last]).strip()
        new_end = self.line_start[last] + len(text) - (end - start) if last < len(self.line_start) else len(new_src)
        new = new_src[l0:new_end].strip()
        self.out.append(Mutant(self.path, line, ".".join(self.stack) or "<module>", what,
                               " ".join(old.split()), " ".join(new.split()), start, end, text, kind,
                               at_import=self.body_depth == 0 and not self.default_of, body=self.default_of))

    # visitors ----------------------------------------------------------------------------------
    def _scoped(self, node, name):
        self.stack.append(name)
        body = getattr(node, "body", [])
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            self.docstrings.add(id(body[0].value))
        self.generic_visit(node)
        self.stack.pop()

    def visit_FunctionDef(self, node):
        for d in node.args.defaults + node.args.kw_defaults:   # defaults belong to the def's scope
            if d is not None:
                self.stack.append(node.name)
                self.default_of = (node.body[0].lineno, node.end_lineno)
                self.visit(d)
                self.default_of = ()
                self.stack.pop()
        self.stack.append(node.name)
        self.body_depth += 1
        for st in node.body:
            self.visit(st)
        self.body_depth -= 1
        self.stack.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        self._scoped(node, node.name)

    def visit_Module(self, node):
        self.generic_visit(node)

    def visit_AnnAssign(self, node):  # annotations are not behaviour
        if node.value is not None:
            self.visit(node.value)
            self._negate(node.value)

    def visit_arguments(self, node):
        pass

    def visit_JoinedStr(self, node):  # f-strings: messages, and 3.11's positions inside them are unreliable
        pass

    def visit_BinOp(self, node):
        ops = BINOPS.get(type(node.op))
        if ops:
            t = self.first_token(self.node_span(node.left)[1], (ops[0],))
            if t is not None:
                s, e = self.tok_off(t)
                self.add(s, e, ops[1], f"{ops[0]} -> {ops[1]}", "arith")
        self.generic_visit(node)

    def visit_AugAssign(self, node):
        ops = BINOPS.get(type(node.op))
        if ops and ops[0] in ("+", "-", "*", "/"):
            t = self.first_token(self.node_span(node.target)[1], (ops[0] + "=",))
            if t is not None:
                s, e = self.tok_off(t)
                self.add(s, e, ops[1] + "=", f"{ops[0]}= -> {ops[1]}=", "arith")
        self._negate(node.value)
        self.generic_visit(node)

    def visit_UnaryOp(self, node):
        if isinstance(node.op, (ast.USub, ast.Not)):
            s, _ = self.node_span(node)
            o = s + (1 if isinstance(node.op, ast.USub) else 3)
            while self.src[o] == " ":
                o += 1
            self.add(s, o, "", "unary - removed" if isinstance(node.op, ast.USub) else "not removed",
                     "unary" if isinstance(node.op, ast.USub) else "logic")
        if isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            return  # -c: the constant's own mutants would duplicate "unary - removed"
        self.generic_visit(node)

    def visit_Compare(self, node):
        prev = node.left
        for op, right in zip(node.ops, node.comparators):
            old, new = CMPOPS[type(op)]
            s0 = self.node_span(prev)[1]
            s1 = self.node_span(right)[0]
            s = s0 + (len(self.src[s0:s1]) - len(self.src[s0:s1].lstrip(" ()")))
            seg = self.src[s:s1]
            core = seg.rstrip(" (")
            if " ".join(core.split()) == old:
                self.add(s, s + len(core), new, f"{old} -> {new}", "compare")
            prev = right
        self.generic_visit(node)

    def visit_BoolOp(self, node):
        old = "and" if isinstance(node.op, ast.And) else "or"
        new = "or" if old == "and" else "and"
        for a in node.values[:-1]:
            t = self.first_token(self.node_span(a)[1], (old,))
            if t is not None:
                s, e = self.tok_off(t)
                self.add(s, e, new, f"{old} -> {new}", "logic")
        self.generic_visit(node)

    def visit_Constant(self, node):
        if id(node) in self.docstrings:
            return
        v = node.value
        s, e = self.node_span(node)
        if isinstance(v, bool):
            self.add(s, e, str(not v), f"{v} -> {not v}", "const")
        elif isinstance(v, (int, float)):
            if v == 0:
                self.add(s, e, "1" if isinstance(v, int) else "1.0", f"{v!r} -> 1", "const")
            elif v == 1:
                self.add(s, e, "0" if isinstance(v, int) else "0.0", f"{v!r} -> 0", "const")
            else:
                self.add(s, e, f"(-{self.src[s:e]})", f"{self.src[s:e]} -> -{self.src[s:e]}", "const")
        elif isinstance(v, str) and v in ("sum", "mean"):
            self.add(s, e, repr("mean" if v == "sum" else "sum").replace("'", '"'), f'"{v}" -> other', "reduce")

    def visit_Expr(self, node):
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return  # a docstring or a bare string
        if isinstance(node.value, ast.Call) and not (isinstance(node.value.func, ast.Attribute) and
                                                     node.value.func.value.__class__ is ast.Name and
                                                     node.value.func.value.id == "logger"):
            s, e = self.node_span(node)
            self.add(s, e, "pass", "call statement removed", "stmt")
        self.generic_visit(node)

    def visit_Call(self, node):
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in ("sum", "mean") and not node.args and not node.keywords:
            t = self.first_token(self.node_span(f.value)[1], (".",))
            if t is not None:
                s, _ = self.tok_off(t)
                self.add(s + 1, s + 1 + len(f.attr), "mean" if f.attr == "sum" else "sum",
                         f".{f.attr}() -> .{'mean' if f.attr == 'sum' else 'sum'}()", "reduce")
        if isinstance(f, ast.Attribute) and f.attr in ("detach", "clone") and not node.args:
            t = self.first_token(self.node_span(f.value)[1], (".",))
            if t is not None:
                _, ce = self.node_span(node)
                self.add(self.tok_off(t)[0], ce, "", f".{f.attr}() removed", "detach")
        if isinstance(f, ast.Name) and f.id in ("min", "max"):
            s, e = self.node_span(f)
            self.add(s, e, "max" if f.id == "min" else "min", f"{f.id} -> {'max' if f.id == 'min' else 'min'}",
                     "const")
        self.generic_visit(node)

    def _negate(self, value):
        if isinstance(value, ast.BinOp) or (isinstance(value, ast.Call) and (
                (isinstance(value.func, ast.Attribute) and value.func.attr in MATH_CALLS)
                or (isinstance(value.func, ast.Name) and value.func.id in MATH_CALLS))):
            s, e = self.node_span(value)
            self.add(s, e, f"-({self.src[s:e]})", "unary - added", "unary")

    def visit_Assign(self, node):
        self._negate(node.value)
        self.generic_visit(node)

    def visit_Return(self, node):
        if node.value is not None:
            self._negate(node.value)
        self.generic_visit(node)


def mutants_of(path: str, src: str) -> list[Mutant]:
    tree = ast.parse(src)
    g = _Gen(path, src)
    for node in ast.walk(tree):  # every docstring, so its string is not mutated
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            b = node.body[0]
            if isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str):
                g.docstrings.add(id(b.value))
    g.visit(tree)
    out, seen = [], set()
    for m in g.out:
        key = (m.start, m.end, m.text)
        if key in seen:
            continue
        seen.add(key)
        mutated = src[:m.start] + m.text + src[m.end:]
        try:
            compile(mutated, path, "exec")
        except SyntaxError:
            m.status = "invalid"
        out.append(m)
    return out


def is_critical(m: Mutant) -> bool:
    if m.file not in CRITICAL:
        return False
    funcs = CRITICAL[m.file]
    return funcs is None or m.func in funcs or any(m.func.startswith(f + ".") for f in funcs)


# ----------------------------------------------------------------------------- running tests


class _Recorder:
    """A pytest plugin: the lines of the target files each test executes, and its duration."""

    def __init__(self, targets: set[str]) -> None:
        self.targets = targets
        self.current = "<import>"
        self.lines: dict[str, set[tuple[str, int]]] = {"<import>": set()}
        self.seconds: dict[str, float] = {}
        self.failed: list[str] = []
        self.uses: dict[str, list[str]] = {}   # test -> the keys of the wider-scoped fixtures it uses

    def tracer(self, frame, event, arg):
        if frame.f_code.co_filename not in self.targets:
            return None
        cur = self.lines.setdefault(self.current, set())
        cur.add((frame.f_code.co_filename, frame.f_lineno))

        def local(frame, event, arg):
            cur.add((frame.f_code.co_filename, frame.f_lineno))
            return local
        return local

    def pytest_runtest_logstart(self, nodeid, location):
        self.current = nodeid

    @staticmethod
    def _fixture_key(scope: str, name: str, scope_id: str) -> str:
        return f"<fixture {scope_id if scope in ('module', 'class') else scope}::{name}>"

    @pytest.hookimpl(hookwrapper=True)
    def pytest_fixture_setup(self, fixturedef, request):
        """A module- (or class-, session-) scoped fixture runs once, inside the first test that
        uses it: its lines go under the fixture (see ``uses``), so every test using it counts
        (a mutant of a line only the fixture runs is tested by all of them, not by the first alone)."""
        prev = self.current
        if fixturedef.scope != "function":
            self.current = self._fixture_key(fixturedef.scope, fixturedef.argname, request.node.nodeid)
        yield
        self.current = prev

    def pytest_runtest_setup(self, item):
        self.current = item.nodeid
        keys = []
        for name, defs in getattr(item, "_fixtureinfo").name2fixturedefs.items():
            d = defs[-1]
            if d.scope != "function":
                parts = item.nodeid.split("::")
                scope_id = parts[0] if d.scope == "module" else "::".join(parts[:2])
                keys.append(self._fixture_key(d.scope, name, scope_id))
        self.uses[item.nodeid] = keys

    def pytest_runtest_logreport(self, report):
        self.seconds[report.nodeid] = self.seconds.get(report.nodeid, 0.0) + report.duration
        if report.failed:
            self.failed.append(report.nodeid)

    def pytest_runtest_logfinish(self, nodeid, location):
        self.current = "<between>"


COVERAGE_FORMAT = 2
"""Bumped when the coverage pass records differently (2: the lines of a wider-scoped fixture count for every
test using it)."""

TINY: Optional[str] = None


def _child_setup(tree: str, log: str) -> None:
    os.setpgrp()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.chdir(tree)
    sys.path.insert(0, tree)
    import torch

    torch.set_num_threads(1)
    if TINY is not None:  # the session fixture tiny_data: the dataset written once (read only by the tests)
        import tests.tinydata

        # only the fixture's call (no arguments but the directory): a test writing a dataset of its own
        # (another seed, size or schema) gets it written (until 2026-12-03 it got the shared one, and a
        # mutant written into its tree, whose tests import write_tiny anew, "failed" test_evaluate's
        # other-schema test)
        write = tests.tinydata.write_tiny
        tests.tinydata.write_tiny = lambda root, *a, **k: write(root, *a, **k) if a or k else TINY


def _wait(pid: int, timeout: float) -> tuple[Optional[int], float]:
    t0 = time.monotonic()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return None, time.monotonic() - t0
        time.sleep(0.05)


def warm_imports(tree: str, test_files: list[str], tiny: Optional[str]) -> None:
    """Imports the package and the tests (from ``tree``): each forked child starts warm and
    patches the mutated function in memory (:func:`_patch`).
    Writes the tests' tiny dataset (``tests/tinydata.py``) into ``tiny`` once, for every child."""
    import importlib
    import pkgutil

    import numpy  # noqa: F401
    import pytest  # noqa: F401
    import torch  # noqa: F401
    import torchrec  # noqa: F401

    sys.path.insert(0, tree)
    cwd = os.getcwd()
    os.chdir(tree)
    try:
        import cctl_rec

        assert cctl_rec.__file__.startswith(tree), f"the scratch copy is not the one imported: {cctl_rec.__file__}"
        for info in pkgutil.walk_packages(cctl_rec.__path__, "cctl_rec."):
            try:
                importlib.import_module(info.name)
            except Exception:  # noqa: BLE001  (an optional dependency: the child will say)
                pass
        for t in test_files:
            try:
                importlib.import_module(t[:-3].replace("/", "."))
            except Exception:  # noqa: BLE001
                pass
        if tiny is not None and not os.path.exists(os.path.join(tiny, "done")):
            from tests.tinydata import write_tiny

            write_tiny(tiny)
            open(os.path.join(tiny, "done"), "w").close()
    finally:
        os.chdir(cwd)


def _forget(*packages: str) -> None:
    for name in [n for n in sys.modules if n.split(".")[0] in packages]:
        del sys.modules[name]


def fingerprint(tree: str, test_files: list[str]) -> tuple[str, str]:
    """(code, tests): sha256 of every ``cctl_rec`` source in ``tree``, and of every file under
    ``tests/`` with the candidate test list: what a coverage pass and a mutant's outcome depend on."""
    import hashlib

    out = []
    for top in ("cctl_rec", "tests"):
        h = hashlib.sha256("\n".join(test_files).encode() if top == "tests" else b"")
        for root, dirs, names in sorted(os.walk(os.path.join(tree, top))):
            dirs.sort()
            for n in sorted(names):
                if n.endswith(".py"):
                    path = os.path.join(root, n)
                    h.update(os.path.relpath(path, tree).encode())
                    with open(path, "rb") as fh:
                        h.update(fh.read())
        out.append(h.hexdigest()[:16])
    return out[0], out[1]


def coverage_pass(tree: str, test_files: list[str], targets: list[str], work: str, reuse: bool,
                  fp: str = "") -> dict:
    """Runs the candidate tests once in a forked child with a line tracer; returns
    {"lines": {test: [[file, line], ...]}, "seconds": {test: s}, "failed": [...]} (``reuse``: the
    last pass's whatever changed; ``fp``: the last pass's when it was made of the same code and tests)."""
    out = os.path.join(work, "coverage.json")
    if os.path.exists(out):
        with open(out) as fh:
            data = json.load(fh)
        if reuse or (fp and data.get("fingerprint") == fp and set(targets) <= set(data.get("targets", ()))):
            print(f"coverage pass: reused {out} ({len(data['seconds'])} tests)", flush=True)
            return data
    if os.path.exists(out):
        os.remove(out)
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            _child_setup(tree, os.path.join(work, "coverage.log"))
            import pytest

            rec = _Recorder({os.path.join(tree, t) for t in targets})
            sys.settrace(rec.tracer)
            import threading

            threading.settrace(rec.tracer)
            code = pytest.main(["-q", "-p", "no:cacheprovider", "-m", "not slow", *test_files], plugins=[rec])
            sys.settrace(None)
            import cctl_rec

            assert cctl_rec.__file__.startswith(tree), f"the scratch copy is not the one imported: {cctl_rec.__file__}"
            with open(out, "w") as fh:
                json.dump({"lines": {k: sorted((os.path.relpath(f, tree), ln) for f, ln in v)
                                     for k, v in rec.lines.items()}, "seconds": rec.seconds, "uses": rec.uses,
                           "failed": rec.failed, "code": int(code), "fingerprint": fp,
                           "targets": sorted(targets)}, fh)
        except BaseException as e:  # noqa: BLE001  (report it; the parent reads the log)
            print(f"coverage pass failed: {e!r}", file=sys.stderr)
        finally:
            os._exit(int(code) if isinstance(code, int) else 3)
    code, secs = _wait(pid, 3600)
    if not os.path.exists(out):
        sys.exit(f"the coverage pass failed (exit {code}); see {os.path.join(work, 'coverage.log')}")
    with open(out) as fh:
        data = json.load(fh)
    print(f"coverage pass: {len(data['seconds'])} tests in {secs:.0f} s, pytest exit {data['code']}", flush=True)
    return data


def start_mutant(tree: str, home: str, m: Mutant, src: str, log: str) -> int:
    """Forks a child that writes the mutant into ``tree`` and runs its tests there; returns its pid."""
    path = os.path.join(tree, m.file)
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            mutated = src[:m.start] + m.text + src[m.end:]
            spawns = any(t in DIST_SET for t in m.tests)   # spawned ranks import the package from the tree
            if m.at_import or spawns or not _patch(m, mutated):
                with open(path, "w") as fh:
                    fh.write(mutated)
                _forget("cctl_rec", "tests")      # import the package and the tests anew, from this tree
            else:
                tree = home                       # where the parent imported both from
            _child_setup(tree, log)
            import pytest

            code = pytest.main(["-x", "-q", "-p", "no:cacheprovider", *m.tests])
        finally:
            os._exit(int(code) if isinstance(code, int) else 3)
    return pid


def _resolve(ns: dict, parts: list[str]):
    """The plain function at ``parts`` (a qualified name) of a module namespace, or None."""
    import inspect

    obj = ns.get(parts[0])
    for name in parts[1:]:
        if not inspect.isclass(obj):
            return None
        obj = obj.__dict__.get(name)
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if isinstance(obj, property):
        obj = obj.fget
    obj = inspect.unwrap(obj) if callable(obj) else obj
    return obj if inspect.isfunction(obj) else None


def _patch(m: Mutant, mutated: str) -> bool:
    """Swaps the code (and defaults) of the mutated function, in place, for the mutant's: every
    reference to it (``from x import f`` included) runs the mutant. False when the mutant is not
    inside a module-level function or method (the caller then imports the mutated file anew)."""
    mod = sys.modules.get(m.file[:-3].replace("/", "."))
    if mod is None or m.func == "<module>":
        return False
    ns = {"__name__": mod.__name__, "__file__": mod.__file__, "__package__": mod.__package__}
    exec(compile(mutated, mod.__file__, "exec"), ns)
    parts = m.func.split(".")
    for k in range(len(parts), 0, -1):      # a nested function: patch the function holding it
        old, new = _resolve(vars(mod), parts[:k]), _resolve(ns, parts[:k])
        if old is not None and new is not None and old.__code__.co_freevars == new.__code__.co_freevars:
            old.__code__, old.__defaults__, old.__kwdefaults__ = new.__code__, new.__defaults__, new.__kwdefaults__
            return True
    return False


def journal_key(m: "Mutant", sources: dict[str, str]) -> str:
    """A mutant's identity in the journal: its file, the file's content hash and the edit."""
    import hashlib

    src = hashlib.sha256(sources[m.file].encode()).hexdigest()[:16]
    return json.dumps([m.file, src, m.start, m.end, m.text])


def read_journal(path: str) -> dict[str, dict]:
    """The last record of each mutant in the journal (one JSON object a line; a torn last line skipped)."""
    done: dict[str, dict] = {}
    if os.path.exists(path):
        with open(path) as fh:
            for ln in fh:
                try:
                    rec = json.loads(ln)
                except ValueError:
                    continue
                done[rec["key"]] = rec
    return done


def run_all(trees: list[str], todo: list, sources: dict[str, str], work: str, total: int,
            journal: Optional[str] = None, tests_fp: str = "") -> None:
    """Runs the mutants, one per scratch tree at a time; restores each tree's file after its child.
    Appends each outcome to ``journal`` as it comes (a stopped pass resumes from there)."""
    running: dict[int, tuple] = {}     # pid -> (tree, index, mutant, budget, t0, log)
    queue = list(todo)
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    try:
        _run_queue(trees, queue, running, sources, work, total, journal, tests_fp)
    except BaseException:   # stopped: end the children still running (each leads its own group)
        for pid in running:
            try:
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        raise


def _run_queue(trees: list[str], queue: list, running: dict, sources: dict[str, str], work: str, total: int,
               journal: Optional[str], tests_fp: str) -> None:
    free = list(trees)
    while queue or running:
        while queue and free:
            i, m, budget = queue.pop(0)
            tree = free.pop()
            log = os.path.join(work, "logs", f"{i:04d}.log")
            running[start_mutant(tree, trees[0], m, sources[m.file], log)] = (tree, i, m, budget, time.monotonic(), log)
        time.sleep(0.05)
        for pid in list(running):
            tree, i, m, budget, t0, log = running[pid]
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done and time.monotonic() - t0 <= budget:
                continue
            if not done:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                os.waitpid(pid, 0)
                outcome = "timeout"
            else:
                outcome = "killed" if os.waitstatus_to_exitcode(status) != 0 else "survived"
            del running[pid]
            with open(os.path.join(tree, m.file), "w") as fh:
                fh.write(sources[m.file])
            free.append(tree)
            m.seconds = time.monotonic() - t0
            m.failed = first_failure(log) if outcome == "killed" else ""
            m.status = m.verdict if outcome == "survived" and m.verdict else outcome
            if outcome == "killed":
                os.remove(log)
            if journal:
                with open(journal, "a") as fh:
                    fh.write(json.dumps({"key": journal_key(m, sources), "tests_fp": tests_fp,
                                         "status": m.status, "failed": m.failed, "seconds": round(m.seconds, 1),
                                         "line": m.line, "new": m.new, "tests": m.tests,
                                         "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
            print(f"[{i + 1}/{total}] {m.status:10s} {m.file}:{m.line} {m.what}: {m.new[:100]}"
                  f"  ({m.seconds:.1f} s, {len(m.tests)} tests{'; ' + m.failed if m.failed else ''})", flush=True)


def first_failure(log: str) -> str:
    try:
        with open(log) as fh:
            for ln in fh:
                if ln.startswith(("FAILED ", "ERROR ")):
                    return ln.split(" ")[1].strip()
    except OSError:
        pass
    return ""


# ----------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", nargs="*", help="target files (default: the critical files; with --light the rest)")
    ap.add_argument("--light", action="store_true", help="the rest of train/ and modules/, operator swaps only")
    ap.add_argument("--kinds", default="", help="comma list of mutant kinds to keep "
                    "(arith, unary, compare, logic, const, reduce, detach, stmt); default: all, --light: arith,compare,unary")
    ap.add_argument("--overlay", nargs="*", default=[], help="files copied from the checkout over the committed "
                    "tree (your uncommitted tests)")
    ap.add_argument("--out", default="/tmp/mutants/results.json")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="mutants run at once (one scratch tree each)")
    ap.add_argument("--reuse-coverage", action="store_true", help="the last coverage pass's tests per line "
                    "(same --out folder; only when neither the tests nor the code changed since)")
    ap.add_argument("--fresh", action="store_true", help="ignore the journal (journal.jsonl beside --out): run "
                    "every mutant again. Without it a mutant the journal holds for the same file content is not "
                    "run again when it was killed or timed out, nor when it survived against the same tests")
    ap.add_argument("--retry-timeouts", action="store_true", help="run the journal's timed-out mutants again")
    ap.add_argument("--retry-survivors", action="store_true", help="run the journal's survivors again (after a "
                    "change of DIST_TESTS or of the script; a change of the tests does it by itself)")
    ap.add_argument("--critical-only", action="store_true", help="only the mutants inside the critical functions "
                    "(CRITICAL; ifn.py's other modes left out)")
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--sample", type=int, default=1, help="keep every n-th mutant of each file (a lighter pass)")
    ap.add_argument("--only", default="", help="run only mutants whose 'file:line' contains this")
    args = ap.parse_args(argv)
    files = args.files or (LIGHT if args.light else list(CRITICAL))
    kinds = set(filter(None, args.kinds.split(","))) or ({"arith", "compare", "unary"} if args.light else set())
    test_files = LIGHT_TEST_FILES if args.light else TEST_FILES

    sources = {}
    for f in files:
        sources[f] = subprocess.run(["git", "show", f"HEAD:{f}"], cwd=REPO, capture_output=True, text=True,
                                    check=True).stdout
    for f in args.overlay:
        if f in sources:
            with open(os.path.join(REPO, f)) as fh:
                sources[f] = fh.read()
    files = sorted(files, key=lambda f: len(sources[f]))   # small files first
    mutants = [m for f in files for m in mutants_of(f, sources[f]) if not kinds or m.kind in kinds]
    if args.only:
        mutants = [m for m in mutants if args.only in f"{m.file}:{m.line}"]
    if args.critical_only:
        mutants = [m for m in mutants if is_critical(m)]
    if args.sample > 1:  # every n-th mutant of each file (deterministic)
        mutants = [m for f in files for m in [x for x in mutants if x.file == f][::args.sample]]
    if args.list:
        for m in mutants:
            print(f"{m.file}:{m.line} [{m.func}] {m.what}: {m.new}{'  (invalid)' if m.status else ''}")
        print(f"{len(mutants)} mutants")
        return 0

    t_start = time.time()
    work = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(work, exist_ok=True)
    trees = [tempfile.mkdtemp(prefix=f"tree{j}-", dir=work) for j in range(args.jobs)]
    tree = trees[0]
    try:
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, capture_output=True, check=True).stdout
        for t in trees:
            subprocess.run(["tar", "-x", "-C", t], input=archive, check=True)
            for f in args.overlay:
                os.makedirs(os.path.dirname(os.path.join(t, f)), exist_ok=True)
                shutil.copy(os.path.join(REPO, f), os.path.join(t, f))
        test_files = [t for t in test_files if os.path.exists(os.path.join(tree, t))]
        os.environ["PYTHONPATH"] = tree + os.pathsep + os.environ.get("PYTHONPATH", "")
        os.environ["PYTHONDONTWRITEBYTECODE"] = "1"   # a same-size mutant must never reuse a stale .pyc
        sys.dont_write_bytecode = True
        global TINY
        TINY = os.path.join(work, "tiny")
        os.makedirs(TINY, exist_ok=True)
        warm_imports(tree, test_files, TINY)

        code_fp, tests_fp = fingerprint(tree, test_files)
        cov = coverage_pass(tree, test_files, files, work, args.reuse_coverage,
                            f"{code_fp}-{tests_fp}-{COVERAGE_FORMAT}")
        journal = os.path.join(work, "journal.jsonl")
        seen = {} if args.fresh else read_journal(journal)
        resumed = 0
        base_failed = set(cov["failed"])
        if base_failed:
            print(f"failing without a mutant (left out): {sorted(base_failed)}", flush=True)
        secs = {t: s for t, s in cov["seconds"].items() if t not in base_failed}
        by_line: dict[tuple[str, int], list[str]] = {}
        touching: dict[str, set[str]] = {}
        uses = cov.get("uses", {})
        for test in secs:   # a test's own lines and those of the wider-scoped fixtures it uses
            lines = [x for k in [test, *uses.get(test, ())] for x in cov["lines"].get(k, ())]
            for fpath, ln in lines:
                rel = fpath
                by_line.setdefault((rel, ln), []).append(test)
                touching.setdefault(rel, set()).add(test)
        import_lines = {(f, ln) for f, ln in cov["lines"].get("<import>", [])}

        todo = []
        for i, m in enumerate(mutants):
            if m.status == "invalid":
                continue
            rec = seen.get(journal_key(m, sources))
            verdict, why = _verdict(m)
            survived = rec is not None and rec["status"] in ("survived", "equivalent", "harmless")
            if rec is not None and (rec["status"] == "killed" or (rec["status"] == "timeout" and not args.retry_timeouts)
                                    or (not args.retry_survivors and survived and (
                                        verdict == "equivalent"     # no test can tell it apart: not run again
                                        or rec["tests_fp"] == tests_fp))):
                m.status, m.failed, m.seconds, m.tests = rec["status"], rec["failed"], rec["seconds"], rec["tests"]
                m.verdict, m.reason = verdict, why
                if survived:   # EQUIVALENT / HARMLESS may have gained (or lost) its line
                    m.status = verdict or "survived"
                resumed += 1
                continue
            m.verdict, m.reason = verdict, why
            lines = range(m.body[0], m.body[1] + 1) if m.body else [m.line]
            tests = sorted({t for ln in lines for t in by_line.get((m.file, ln), [])}, key=lambda t: secs[t])
            if m.at_import or (not tests and (m.file, m.line) in import_lines):
                tests = sorted(touching.get(m.file, ()), key=lambda t: secs[t])
            dist = []
            for (f, fn), ts in [*DIST_TESTS.items(), *SLOW_TESTS.items()]:
                if f == m.file and (m.func == fn or m.func.startswith(fn + ".")):
                    dist += [t for t in ts if os.path.exists(os.path.join(tree, t.split("::")[0]))]
            m.tests = tests + dist
            if not m.tests:
                m.status = "equivalent" if verdict == "equivalent" else "uncovered"
            else:
                todo.append((i, m, 60.0 + 10 * sum(secs.get(t, 0.0) for t in tests) + 300.0 * len(dist)))
        if resumed:
            print(f"from the journal {journal}: {resumed} mutants (not run again); {len(todo)} to run", flush=True)
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))   # interrupted: still write what ran
        try:
            run_all(trees, todo, sources, work, len(mutants), journal, tests_fp)
        except (KeyboardInterrupt, SystemExit):
            print("interrupted: the results below are partial", flush=True)
    finally:
        for t in trees:
            shutil.rmtree(t, ignore_errors=True)

    wall = time.time() - t_start
    with open(args.out, "w") as fh:
        json.dump({"wall_s": wall, "files": files, "mutants": [asdict(m) for m in mutants]}, fh, indent=1)
    print(f"\n{'file':40s} {'mutants':>7s} {'killed':>6s} {'timeout':>7s} {'survived':>8s} {'uncovered':>9s} "
          f"{'equiv.':>6s} {'harmless':>8s} {'invalid':>7s} {'not run':>7s}")
    for f in files:
        ms = [m for m in mutants if m.file == f]
        c = {s: sum(m.status == s for m in ms) for s in ("killed", "timeout", "survived", "uncovered", "equivalent",
                                                          "harmless", "invalid", "")}
        print(f"{f:40s} {len(ms):7d} {c['killed']:6d} {c['timeout']:7d} {c['survived']:8d} {c['uncovered']:9d} "
              f"{c['equivalent']:6d} {c['harmless']:8d} {c['invalid']:7d} {c['']:7d}")
    for m in mutants:
        if m.status == "harmless":
            print(f"harmless: {m.file}:{m.line} [{m.func}] {m.what}: {m.new}  ({m.reason})")
    bad = [m for m in mutants if m.status in ("survived", "uncovered")]
    for m in bad:
        print(f"{'CRITICAL ' if is_critical(m) else ''}{m.status}: {m.file}:{m.line} [{m.func}] {m.what}: {m.new}")
    print(f"wall {wall:.0f} s; results in {args.out}")
    return 1 if any(is_critical(m) for m in bad) else 0


if __name__ == "__main__":
    sys.exit(main())
