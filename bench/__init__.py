"""Benchmarks: `python -m bench <subcommand> --help`."""
