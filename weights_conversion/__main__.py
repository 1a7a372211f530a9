"""`python -m weights_conversion {sam,yolo,blo-sam-lora,export-sam,export-onnx} ...`: dispatch to
the converters and exporters."""

import sys

from weights_conversion import blo_sam_lora, convert_sam_cli, convert_yolo, export_onnx, export_sam

COMMANDS = {
    "sam": "SAM / MobileSAM / LiteMedSAM .pth (or a name) -> amsam_jax SAM directory",
    "yolo": "Ultralytics YOLOv8 .pt -> ONNX detector for box prompts",
    "blo-sam-lora": "BLO-SAM decoder LoRA .pth <-> run checkpoint (import/export)",
    "export-sam": "run or SAM directory -> official segment-anything .pth (no torch needed)",
    "export-onnx": "run or SAM directory -> ONNX encoder, decoder (needs the export extra)",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        asked = bool(argv) and argv[0] in ("-h", "--help")
        out = sys.stdout if asked else sys.stderr  # usage is output only when asked for
        print(
            f"usage: python -m weights_conversion {{{','.join(COMMANDS)}}} ... (--help for each)",
            file=out,
        )
        for name, text in COMMANDS.items():
            print(f"  {name:12s} {text}", file=out)
        if asked:
            return 0
        problem = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"error: {problem} (one of {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    command = {
        "sam": convert_sam_cli,
        "blo-sam-lora": blo_sam_lora,
        "yolo": convert_yolo,
        "export-sam": export_sam,
        "export-onnx": export_onnx,
    }[argv[0]]
    return command.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
