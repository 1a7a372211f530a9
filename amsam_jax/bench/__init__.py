"""Benchmarks: `python -m amsam_jax.bench <subcommand> --help`."""
