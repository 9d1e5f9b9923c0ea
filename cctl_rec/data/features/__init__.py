"""Bring your own logs: the feature config, id mapping and `cctl-rec prepare` (docs/features.md)."""
