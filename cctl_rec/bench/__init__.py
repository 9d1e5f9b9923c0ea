"""Benchmarks of cctl-rec's real code paths (``cctl-rec bench WHAT``): one module per benchmark,
each with ``run(opts) -> (JSON envelope, markdown)``; :mod:`cctl_rec.bench.common` holds timing,
memory, machine facts and the writer, :mod:`cctl_rec.bench.harness` the training step with
timers. Results for the development machine: docs/benchmarks/."""
