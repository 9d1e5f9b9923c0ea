"""The training log's rank average: p_clean / p_harmful are means over every rank's rows, so a rank
whose batch had no harmful row does not pull p_harmful towards 0 (8-rank paper-mode runs logged
p_harmful 31/32 of the 1-rank value before)."""

import torch

import cctl_rec.train.runlog as runlog
from cctl_rec.train.runlog import RunLog
from cctl_rec.train.trainer import LOG_KEYS, STAT_KEYS


def _stats(p_mean, p_clean, p_harm, n_clean, n_harm):
    base = {"loss_mixed": 1.0, "loss_pure": 0.5, "loss_tgt": 0.4, "loss_src": 0.6, "loss_ren": 0.0, "reward": 0.1,
            "cos_id": 0.0, "cos_seq": 0.0, "p_mean": p_mean, "p_clean": p_clean, "p_harmful": p_harm,
            "n_clean": n_clean, "n_harmful": n_harm}
    return [base[k] for k in STAT_KEYS]


def test_p_clean_and_p_harmful_average_over_rows_not_ranks(monkeypatch):
    other = torch.tensor([_stats(0.8, 0.8, 0.0, 4, 0)], dtype=torch.float64)   # the second rank: no harmful row

    def two_rank_mean(ts):  # what the all-reduce mean over 2 ranks does to this rank's tensor
        for t in ts:
            o = other.clone()
            for m, n in runlog._WEIGHTED:
                o[:, m] *= o[:, n]
            t.add_(o).div_(2)

    monkeypatch.setattr(runlog, "allreduce_mean_", two_rank_mean)
    log = RunLog(meta={}, start=0)
    log.add(_stats(0.5, 0.6, 0.4, 1, 3))
    row = log.close_window(1, {})
    # p_harmful: only this rank's 3 rows, 0.4 (the ranks' mean would say 0.2);
    # p_clean: (0.6 * 1 + 0.8 * 4) / 5 = 0.76; p_mean and the losses: plain mean of the ranks
    assert abs(row["p_harmful"] - 0.4) < 1e-12 and abs(row["p_clean"] - 0.76) < 1e-12
    assert abs(row["p_mean"] - 0.65) < 1e-12 and abs(row["loss_mixed"] - 1.0) < 1e-12
    assert set(row) == {"step", *LOG_KEYS}


def test_one_rank_log_is_the_steps_means():
    log = RunLog(meta={}, start=0)
    log.add(_stats(0.5, 0.625, 0.375, 3, 5))
    log.add(_stats(0.5, 0.0, 0.25, 0, 8))
    row = log.close_window(2, {})
    assert row["p_clean"] == (0.625 + 0.0) / 2 and row["p_harmful"] == (0.375 + 0.25) / 2


def test_a_target_only_step_logs_zero_rows_of_each_kind():
    from types import SimpleNamespace

    from cctl_rec.train.trainer import local_stats

    z = torch.tensor(0.5)
    losses = SimpleNamespace(mixed=z, pure=z, tgt=z, src=z, ren=z, cos_id=0.0, cos_seq=0.0)
    stats = dict(zip(STAT_KEYS, local_stats(losses, 0.0, None, None)))   # the DNN: no selector, no source rows
    assert stats["p_clean"] == stats["p_harmful"] == stats["n_clean"] == stats["n_harmful"] == 0.0
    h = torch.tensor([True, False, False])
    stats = dict(zip(STAT_KEYS, local_stats(losses, 0.0, torch.tensor([0.2, 0.5, 0.8]), h)))
    assert (stats["n_clean"], stats["n_harmful"]) == (2.0, 1.0) and abs(stats["p_clean"] - 0.65) < 1e-6


def test_a_resumed_run_reopens_the_log_window_its_checkpoint_cut():
    """A checkpoint at step 2 of a 3-step log window keeps the window's 2 steps (trainer.json's
    log_window); resuming at that step reopens it, so the log row of step 3 is the one an
    uninterrupted run writes. Resumed at another step (another world size: the step is rescaled)
    the cut window is not this run's and is dropped; the history and reward sum carry over."""
    steps = [_stats(0.5, 0.6, 0.4, 1, 3), _stats(0.3, 0.2, 0.1, 2, 2), _stats(0.9, 0.7, 0.5, 4, 4)]
    whole = RunLog(meta={}, start=0)
    whole.add(steps[0])
    first = whole.close_window(1, {})
    for s in steps[1:]:
        whole.add(s)
    want = whole.close_window(3, {})
    cut = RunLog(meta={}, start=0)
    cut.add(steps[0])
    cut.close_window(1, {})
    cut.add(steps[1])
    meta = {**cut.meta(), "step": 2}                         # trainer.json of the checkpoint at step 2
    resumed = RunLog(meta, start=2)
    resumed.add(steps[2])
    assert resumed.close_window(3, {}) == want
    assert resumed.history == [first, want] and resumed.reward_sum == whole.reward_sum
    elsewhere = RunLog(meta, start=1)                        # e.g. 2 ranks' step 2 resumed on 4 ranks
    elsewhere.add(steps[2])
    row = elsewhere.close_window(3, {})
    assert row["p_mean"] == 0.9 and elsewhere.history == [first, row]
    assert elsewhere.reward_sum == whole.reward_sum
