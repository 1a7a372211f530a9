"""ONNX models of a fine-tuned SAM through segment-anything's own exporter route (needs torch).

    python -m weights_conversion export-onnx runs/am_sam onnx/am_sam [--checkpoint best]
    python -m weights_conversion export-onnx checkpoints/sam_vit_b onnx/sam_vit_b [--opset 17]

The model is first written as an official state dict (`export_sam`), loaded into the official
segment_anything modules with strict loading, and traced by `torch.onnx.export` (the TorchScript
exporter, `dynamo=False`, as segment-anything's `scripts/export_onnx_model.py` runs it). OUT_DIR:

    sam.pth [sam.pth.extra.npz]   the official state dict (and side file) the models come from
    image_encoder.onnx            image (1, 3, S, S), preprocessed -> image_embeddings (1, C, G, G)
                                  (ViT encoders: the official code has no TinyViT)
    decoder.onnx                  `SamOnnxModel`: image_embeddings, point_coords, point_labels,
                                  mask_input, has_mask_input, orig_im_size -> masks,
                                  iou_predictions, low_res_masks (SAM's ONNX decoder interface)
    no_prompt.onnx                few-shot runs: image_embeddings [, box (1, 4)] -> masks
                                  (1, n, 4G, 4G), the run's calibrated logits (LoRA merged, learned
                                  prompt and box residual baked in; `fewshot.blo.forward`)
    export.json                   what each file takes and gives, the preprocessing, the source

The folder is written to a temporary sibling and renamed into place: all files or none.
"""

import argparse
import dataclasses
import json
import os
import types
import warnings
from pathlib import Path

import numpy as np

from amsam_jax.build_sam import SamConfig
from amsam_jax.fewshot.trainer import CHECKPOINT_KINDS
from amsam_jax.utils.cli import guarded
from amsam_jax.utils.io import atomic_directory, check_output_folder, write_json
from weights_conversion.export_sam import EXTRA_SUFFIX, ExportError, export_sam, load_source
from weights_conversion.official_arch import prompt_side, vit_encoder

EXTRA = "export"  # the pyproject.toml extra with torch, segment-anything and onnx
STATE_DICT = "sam.pth"
ENCODER = "image_encoder.onnx"
DECODER = "decoder.onnx"
NO_PROMPT = "no_prompt.onnx"
MANIFEST = "export.json"
OPSET = 17  # scripts/export_onnx_model.py's default
DECODER_INPUTS = (
    "image_embeddings",
    "point_coords",
    "point_labels",
    "mask_input",
    "has_mask_input",
    "orig_im_size",
)
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")


def require_torch() -> types.SimpleNamespace:
    """torch and the official segment_anything modules, or a one-line error naming the extra.

    Raises:
        ExportError: torch or segment-anything is not installed.
    """
    try:
        import torch
        from segment_anything import modeling
        from segment_anything.utils.onnx import SamOnnxModel
    except ImportError as e:
        raise ExportError(
            f"export-onnx needs PyTorch and segment-anything ({e.name or e} is missing): "
            f"pip install 'amsam-jax[{EXTRA}]'"
        ) from None
    return types.SimpleNamespace(
        torch=torch, modeling=modeling, SamOnnxModel=_fixed_crop(torch, SamOnnxModel)
    )


def _fixed_crop(torch, sam_onnx_model: type) -> type:
    """segment-anything 1.0's `SamOnnxModel` with the crop of its main branch (docs/export.md §3).

    In the PyPI 1.0 release `mask_postprocessing` crops with `int(prepadded_size[i])`, which the
    tracer records as the constant of the dummy `orig_im_size`: the exported decoder then crops
    every image as one of the dummy's aspect ratio (segment-anything issue #56, fixed by PR #58
    after the release). The fix slices with the int64 tensors, so the crop follows the input.
    """

    class SamOnnxModel(sam_onnx_model):
        def mask_postprocessing(self, masks, orig_im_size):
            interpolate = torch.nn.functional.interpolate
            size = (self.img_size, self.img_size)
            masks = interpolate(masks, size=size, mode="bilinear", align_corners=False)
            prepadded = self.resize_longest_image_size(orig_im_size, self.img_size)
            prepadded = prepadded.to(torch.int64)
            masks = masks[..., : prepadded[0], : prepadded[1]]
            orig_im_size = orig_im_size.to(torch.int64)
            h, w = orig_im_size[0], orig_im_size[1]
            return interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)

    return SamOnnxModel


@dataclasses.dataclass(frozen=True)
class NoPromptSpec:
    """What a few-shot run's forward adds to the decoder (docs/fewshot.md §6; `fewshot.blo`).

    Attributes:
        prompt: the learned dense prompt (1, C).
        box_residual: the learned (2, C) offset on the box tokens, or None.
        boxes: the run was prompted with one box per image (else no sparse prompt).
        semantic_head: "tokens" (class k = mask token k) or "single_mask" ([0, token 0]).
        calibration: Eqs. 9-12 on (docs/fewshot.md §6.3).
        alpha: the calibration's mixing weight.
        average: "batch" or "sample" (equal at batch 1, the exported batch).
        channels: c, the upscaled channels of the decoder (C / 8).
    """

    prompt: np.ndarray
    box_residual: np.ndarray | None
    boxes: bool
    semantic_head: str
    calibration: bool
    alpha: float
    average: str
    channels: int

    @classmethod
    def from_side_arrays(cls, arrays: dict) -> "NoPromptSpec":
        """The spec written in a few-shot export's side file (`export_sam.side_arrays`)."""
        meta = json.loads(str(arrays["meta"]))
        cal = meta["calibration"]
        return cls(
            prompt=np.asarray(arrays["prompt"], np.float32),
            box_residual=arrays.get("box_residual"),
            boxes=meta["boxes"],
            semantic_head=meta["semantic_head"],
            calibration=cal["enabled"],
            alpha=cal["alpha"],
            average=cal["average"],
            channels=cal["channels"],
        )


def _stand_in_encoder(nn, img_size: int):
    """A parameter-free image encoder for a TinyViT SAM: the official Sam reads its `img_size`."""
    encoder = nn.Module()
    encoder.img_size = img_size
    return encoder


def official_sam(ns: types.SimpleNamespace, cfg: SamConfig, sd: dict):
    """segment_anything's `Sam` for `cfg` with the state dict `sd` loaded strictly.

    A ViT encoder is segment_anything's `ImageEncoderViT` (its build_sam.py arguments); a TinyViT
    one has no official code, so the model gets a parameter-free stand-in and the encoder keys are
    left out (the decoder side is still loaded strictly).

    Args:
        ns: `require_torch()`.
        cfg: the architecture.
        sd: official key -> torch tensor (`torch.load(..., weights_only=True)`).

    Returns:
        the model in eval mode.
    """
    torch, m = ns.torch, ns.modeling
    if cfg.encoder == "vit":
        encoder = vit_encoder(cfg, m.ImageEncoderViT, torch.nn.LayerNorm)
    else:
        encoder = _stand_in_encoder(torch.nn, cfg.image_size)
        sd = {k: v for k, v in sd.items() if not k.startswith("image_encoder.")}
    sam = m.Sam(
        image_encoder=encoder,
        **prompt_side(cfg, m.PromptEncoder, m.MaskDecoder, m.TwoWayTransformer),
        pixel_mean=list(cfg.pixel_mean),
        pixel_std=list(cfg.pixel_std),
    )
    sam.load_state_dict(sd, strict=True)
    return sam.eval()


def _export(ns, module, args: tuple, path: Path, inputs, outputs, opset: int, dynamic=None):
    """`torch.onnx.export` as scripts/export_onnx_model.py calls it (TorchScript exporter)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ns.torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # the legacy exporter
        with open(path, "wb") as f:
            ns.torch.onnx.export(
                module,
                args,
                f,
                export_params=True,
                verbose=False,
                opset_version=opset,
                do_constant_folding=True,
                input_names=list(inputs),
                output_names=list(outputs),
                dynamic_axes=dynamic,
                dynamo=False,
            )


def export_encoder(ns, sam, cfg: SamConfig, path: Path, opset: int = OPSET) -> None:
    """The image encoder: `image` (1, 3, S, S), preprocessed -> `image_embeddings` (1, C, G, G)."""
    dummy = ns.torch.randn(1, 3, cfg.image_size, cfg.image_size)
    with ns.torch.no_grad():
        _export(ns, sam.image_encoder, (dummy,), path, ["image"], ["image_embeddings"], opset)


def export_decoder(ns, sam, path: Path, opset: int = OPSET) -> None:
    """SAM's ONNX decoder, exactly scripts/export_onnx_model.py (`return_single_mask` off)."""
    torch = ns.torch
    model = ns.SamOnnxModel(model=sam, return_single_mask=False)
    embed_size = sam.prompt_encoder.image_embedding_size
    dummy = {
        "image_embeddings": torch.randn(1, sam.prompt_encoder.embed_dim, *embed_size),
        "point_coords": torch.randint(low=0, high=1024, size=(1, 5, 2), dtype=torch.float),
        "point_labels": torch.randint(low=0, high=4, size=(1, 5), dtype=torch.float),
        "mask_input": torch.randn(1, 1, *[4 * x for x in embed_size]),
        "has_mask_input": torch.tensor([1], dtype=torch.float),
        "orig_im_size": torch.tensor([1500, 2250], dtype=torch.float),
    }
    _ = model(**dummy)
    dynamic = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
    _export(ns, model, tuple(dummy.values()), path, DECODER_INPUTS, DECODER_OUTPUTS, opset, dynamic)


def no_prompt_module(ns, sam, spec: NoPromptSpec):
    """A torch module computing a few-shot run's forward on the official prompt encoder and
    decoder: `forward(image_embeddings (1, C, G, G)[, box (1, 4)]) -> (1, n, 4G, 4G)` logits.

    Mirrors `fewshot.blo.forward`: sparse = the box's two corner tokens (+ the residual) or none;
    dense = the learned prompt broadcast; masks of every token; the semantic head; calibration
    `alpha * M + (1 - alpha) / c * mean_batch(M)` (`fewshot.calibration.calibrate_masks`).
    """
    torch = ns.torch

    class NoPromptDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.prompt_encoder = sam.prompt_encoder
            self.mask_decoder = sam.mask_decoder
            c = spec.prompt.shape[-1]
            prompt = np.array(spec.prompt, np.float32).reshape(1, c, 1, 1)
            self.register_buffer("prompt", torch.from_numpy(prompt))
            residual = spec.box_residual if spec.box_residual is not None else np.zeros((2, c))
            self.register_buffer("box_residual", torch.from_numpy(residual.astype(np.float32)))

        def forward(self, image_embeddings, box=None):
            b, c, h, w = image_embeddings.shape
            if box is None:
                sparse = torch.zeros((b, 0, c), dtype=image_embeddings.dtype)
            else:
                sparse = self.prompt_encoder._embed_boxes(box) + self.box_residual  # (B, 2, C)
            dense = self.prompt.expand(b, c, h, w)
            masks, _ = self.mask_decoder.predict_masks(
                image_embeddings=image_embeddings,
                image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
            )
            if spec.semantic_head == "single_mask":
                foreground = masks[:, :1]
                masks = torch.cat([torch.zeros_like(foreground), foreground], dim=1)
            if spec.calibration:
                mean = masks.mean(dim=0, keepdim=True) if spec.average == "batch" else masks
                masks = spec.alpha * masks + ((1.0 - spec.alpha) / spec.channels) * mean
            return masks

    return NoPromptDecoder().eval()


def export_no_prompt(ns, sam, spec: NoPromptSpec, path: Path, opset: int = OPSET) -> list[str]:
    """Writes `no_prompt_module` as ONNX; returns its input names."""
    torch = ns.torch
    module = no_prompt_module(ns, sam, spec)
    grid = sam.prompt_encoder.image_embedding_size
    args = (torch.randn(1, sam.prompt_encoder.embed_dim, *grid),)
    if spec.boxes:
        size = float(sam.image_encoder.img_size)
        args += (torch.tensor([[0.1 * size, 0.2 * size, 0.7 * size, 0.9 * size]]),)
    inputs = ["image_embeddings", "box"][: len(args)]
    with torch.no_grad():
        _export(ns, module, args, path, inputs, ["masks"], opset)
    return inputs


def export_onnx(
    source_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    checkpoint: str = "best",
    opset: int = OPSET,
    overwrite: bool = False,
) -> dict:
    """Writes the ONNX models of a run or SAM directory into `out_dir` (see the module docstring).

    Returns:
        the manifest (also written as `export.json`).

    Raises:
        ExportError: torch missing (naming the extra), a bad source (`export_sam.load_source`),
            an existing `out_dir` without `overwrite`.
        WriteError: `out_dir` cannot be written (nothing is left then).
    """
    out_dir = check_output_folder(Path(out_dir).absolute())
    if out_dir.exists() and not overwrite:
        raise ExportError(out_dir, "already exists (pass --overwrite to replace it)")
    ns = require_torch()
    source = load_source(source_path, checkpoint)
    cfg = source.cfg
    files: dict[str, dict] = {}
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        exported = export_sam(source_path, tmp / STATE_DICT, source=source)
        sd = ns.torch.load(tmp / STATE_DICT, map_location="cpu", weights_only=True)
        sam = official_sam(ns, cfg, sd)
        files[STATE_DICT] = {"loads_into": exported["loader"]}
        if exported["side_file"]:
            files[STATE_DICT + EXTRA_SUFFIX] = {"arrays": exported["side_arrays"]}
        g, s = cfg.grid_size, cfg.image_size
        c = cfg.prompt_embed_dim
        if cfg.encoder == "vit":
            export_encoder(ns, sam, cfg, tmp / ENCODER, opset)
            files[ENCODER] = {
                "inputs": {"image": [1, 3, s, s]},
                "outputs": {"image_embeddings": [1, c, g, g]},
            }
        export_decoder(ns, sam, tmp / DECODER, opset)
        files[DECODER] = {
            "inputs": dict(zip(DECODER_INPUTS, [[1, c, g, g], [1, "num_points", 2],
                           [1, "num_points"], [1, 1, 4 * g, 4 * g], [1], [2]], strict=True)),
            "outputs": {"masks": [1, cfg.num_multimask_outputs + 1, "H", "W"],
                        "iou_predictions": [1, cfg.num_multimask_outputs + 1],
                        "low_res_masks": [1, cfg.num_multimask_outputs + 1, 4 * g, 4 * g]},
        }  # fmt: skip
        if source.kind == "fewshot":
            extra = np.load(tmp / (STATE_DICT + EXTRA_SUFFIX))
            spec = NoPromptSpec.from_side_arrays(dict(extra))
            inputs = export_no_prompt(ns, sam, spec, tmp / NO_PROMPT, opset)
            shapes = {"image_embeddings": [1, c, g, g], "box": [1, 4]}
            classes = 2 if spec.semantic_head == "single_mask" else cfg.num_multimask_outputs + 1
            files[NO_PROMPT] = {
                "inputs": {name: shapes[name] for name in inputs},
                "outputs": {"masks": [1, classes, 4 * g, 4 * g]},
                "calibrated": spec.calibration,
            }
        manifest = {
            "source": str(source.path),
            "kind": source.kind,
            "checkpoint": source.checkpoint,
            "opset": opset,
            "preprocess": {
                "image_size": s,
                "mode": cfg.preprocess,
                "pixel_mean": list(cfg.pixel_mean),
                "pixel_std": list(cfg.pixel_std),
            },
            "model": dataclasses.asdict(cfg),
            "files": files,
        }
        write_json(tmp / MANIFEST, manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m weights_conversion export-onnx",
        description="Export a run or converted SAM directory as ONNX models (image encoder, SAM's "
        f"ONNX decoder, a few-shot run's prompt-free decoder). Needs the `{EXTRA}` extra.",
    )
    parser.add_argument("source", help="run workdir or converted SAM directory")
    parser.add_argument("out_dir", help="output folder (sam.pth, *.onnx, export.json)")
    parser.add_argument(
        "--checkpoint", default="best", choices=CHECKPOINT_KINDS, help="few-shot runs (best)"
    )
    parser.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    args = parser.parse_args(argv)

    def body() -> int:
        manifest = export_onnx(
            args.source, args.out_dir, args.checkpoint, args.opset, args.overwrite
        )
        names = ", ".join(n for n in manifest["files"] if n.endswith(".onnx"))
        print(f"exported {args.source} -> {args.out_dir} ({names}; see {MANIFEST})")
        if STATE_DICT + EXTRA_SUFFIX in manifest["files"]:
            print(
                f"side file: {Path(args.out_dir) / (STATE_DICT + EXTRA_SUFFIX)} holds what the "
                "official model has no place for (baked into no_prompt.onnx for few-shot runs)"
            )
        if "image_encoder.onnx" not in manifest["files"]:
            print("image encoder: not exported (TinyViT has no official PyTorch code)")
        return 0

    return guarded(body, f"nothing was written to {args.out_dir}")
