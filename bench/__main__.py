"""Dispatcher of `python -m bench <subcommand> [args]`.

Subcommand modules are imported only when chosen, so one benchmark's dependencies never load for
another.
"""

import importlib
import sys

# name -> (module with `main(argv)` or None when not written yet, one-line description)
SUBCOMMANDS = {
    "encoder": ("bench.encoder", "image-encoder forward: JAX vs official PyTorch"),
    "boxes": ("bench.boxes", "box-prompt detector"),
    "train": ("bench.train", "bi-level step per hypergradient mode, whole few-shot run"),
    "sum": ("bench.sum", "SUM interactive step; AMG vs official PyTorch AMG"),
    "amg": ("bench.amg", "automatic mask generator only: JAX vs official PyTorch"),
    "export": ("bench.export", "exported ONNX encoder and decoder on ONNX Runtime vs JAX"),
    "scale": ("bench.scale", "SUM step and encoder on 1, 2 and 4 simulated devices"),
}


def usage() -> str:
    lines = ["usage: python -m bench <subcommand> [args]", "", "subcommands:"]
    lines += [f"  {name:<10}{desc}" for name, (_, desc) in SUBCOMMANDS.items()]
    lines += ["", "`python -m bench <subcommand> --help` shows its options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, _ = SUBCOMMANDS[name]
    if module_name is None:
        print(f"not implemented yet: {name}")
        return 2
    return importlib.import_module(module_name).main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
