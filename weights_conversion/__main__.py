"""`python -m weights_conversion {sam,yolo,blo-sam-lora} ...`: dispatch to the converters."""

import sys

from weights_conversion import blo_sam_lora, convert_sam_cli, convert_yolo


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {
        "sam": "SAM / MobileSAM / LiteMedSAM .pth (or a name) -> amsam_jax SAM directory",
        "yolo": "Ultralytics YOLOv8 .pt -> ONNX detector for box prompts",
        "blo-sam-lora": "BLO-SAM decoder LoRA .pth <-> run checkpoint (import/export)",
    }
    if not argv or argv[0] not in commands:
        print("usage: python -m weights_conversion {sam,yolo,blo-sam-lora} ... (--help for each)")
        for name, text in commands.items():
            print(f"  {name:12s} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command = {"sam": convert_sam_cli, "blo-sam-lora": blo_sam_lora, "yolo": convert_yolo}[argv[0]]
    return command.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
