"""Packaged YAML configs: one per method plus the quick and full profiles."""
