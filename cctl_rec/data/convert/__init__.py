"""Converters from public interaction files into the cctl-rec Parquet dataset format.

- :mod:`cctl_rec.data.convert.amazon`: the paper's Amazon setting (Books -> Movies&TV), explicit
  ratings, ``rating >= 4`` positive.
- :mod:`cctl_rec.data.convert.implicit`: ``user item value`` files with their own train/test
  split (e.g. DisenCDR's Amazon pairs); negatives sampled.
- :mod:`cctl_rec.data.convert.common`: reading, dense ids, the per-user split, behaviour
  sequences without leakage, and the atomic write (manifest last).

The rules are documented in ``docs/data.md`` and recorded in each dataset's ``manifest.json``.
"""
