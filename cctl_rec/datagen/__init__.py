"""Schema-driven synthetic two-domain data for CCTL, with known harmful source samples.

Modules: :mod:`cctl_rec.datagen.presets` (every knob, as data), :mod:`cctl_rec.datagen.hashing` (counter-based
per-id randomness), :mod:`cctl_rec.datagen.generator` (the generative model), :mod:`cctl_rec.datagen.writer`
(shards, atomic + resumable), :mod:`cctl_rec.datagen.pipeline` (workers, ranks, manifest),
:mod:`cctl_rec.datagen.stats`, :mod:`cctl_rec.datagen.check` (does clean source data help?),
:mod:`cctl_rec.datagen.bench` (rows/s, peak RSS). The CLI is ``cctl-rec datagen``.

Nothing is imported here, so worker processes start light.
"""
