"""`python -m weights_conversion {sam,yolo,blo-sam-lora} ...`: dispatch to the converters."""

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {
        "sam": "official segment-anything .pth -> amsam_jax SAM directory",
        "yolo": "Ultralytics YOLOv8 .pt -> ONNX detector for box prompts",
        "blo-sam-lora": "BLO-SAM decoder LoRA .pth <-> run checkpoint (import/export)",
    }
    if not argv or argv[0] not in commands:
        print("usage: python -m weights_conversion {sam,yolo,blo-sam-lora} ... (--help for each)")
        for name, text in commands.items():
            print(f"  {name:12s} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "sam":
        from weights_conversion.convert_sam import main as command
    elif argv[0] == "blo-sam-lora":
        from weights_conversion.blo_sam_lora import main as command
    else:
        from weights_conversion.convert_yolo import main as command
    return command(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
