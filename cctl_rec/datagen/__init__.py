"""Schema-driven synthetic two-domain data for CCTL, with known harmful source samples.

Modules: :mod:`datagen.presets` (every knob, as data), :mod:`datagen.hashing` (counter-based
per-id randomness), :mod:`datagen.generator` (the generative model), :mod:`datagen.writer`
(shards, atomic + resumable), :mod:`datagen.pipeline` (workers, ranks, manifest),
:mod:`datagen.stats`, :mod:`datagen.check` (does clean source data help?),
:mod:`datagen.bench` (rows/s, peak RSS). The CLI is ``cctl-rec datagen``.

Nothing is imported here, so worker processes start light.
"""
