"""Export a fine-tuned model as an official segment-anything state dict, without torch.

    python -m weights_conversion export-sam runs/am_sam sam_am.pth [--checkpoint best]
    python -m weights_conversion export-sam runs/sum sam_sum.pth          # its sam_finetuned/
    python -m weights_conversion export-sam checkpoints/sam_vit_b sam_vit_b.pth

The source is a few-shot run (the trainable state of `ckpt/<checkpoint>` on the run's SAM, LoRA
merged into the decoder projections: W + scale * A B), a SUM run (its `sam_finetuned/`) or a
converted SAM directory. The keys are the official ones: `amsam_jax/conversion/mapping.py` read
backwards (`mapping.source_of`), with the inverse transforms. What the official model has no place
for goes to the side file `OUT.extra.npz` (docs/export.md §2): a few-shot run's learned prompt
(also in the state dict, as `prompt_encoder.no_mask_embed.weight`, the slot it was trained in),
its box residual and forward settings, and a SUM run's trained task table.

The `.pth` is written by `torch_pickle.write_state_dict` (torch.save's zip format); it and the
side file appear together or not at all.
"""

import argparse
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from flax import nnx

from amsam_jax.build_sam import SamConfig
from amsam_jax.checkpoint import CONFIG_FILE, FORMAT, load_sam, read_sam_config
from amsam_jax.conversion.mapping import TASK_PREFIX, Transform, source_of
from amsam_jax.conversion.torch_pickle import write_state_dict
from amsam_jax.fewshot.blo import BoxResidual, TrainingModel, split_trainable
from amsam_jax.fewshot.config import FewShotConfig
from amsam_jax.fewshot.lora import LoRALinear, apply_lora, mark_trainable
from amsam_jax.fewshot.trainer import CHECKPOINT_KINDS, step_config
from amsam_jax.modeling.sam import Sam
from amsam_jax.sum.config import is_sum_config
from amsam_jax.training.prompt_decoder import PromptDecoder
from amsam_jax.training.run import read_run_config
from amsam_jax.training.sam import resolve_sam
from amsam_jax.training.state import restore_state
from amsam_jax.utils.cli import guarded
from amsam_jax.utils.errors import AmsamError
from amsam_jax.utils.io import atomic_outputs, check_output_file

EXTRA_SUFFIX = ".extra.npz"
SUM_EXPORT = "sam_finetuned"  # what a finished SUM run writes (`sum.trainer.finish`)
REGISTRY_TYPES = ("vit_b", "vit_l", "vit_h")  # segment_anything's sam_model_registry
MOBILE_SAM_CLASSES = 1000  # MobileSAM's unused ImageNet head (TinyViT's num_classes)
# Model state that is configuration in segment_anything (non-persistent buffers).
FROM_CONFIG = ("pixel_mean", "pixel_std")


class ExportError(AmsamError):
    """A source or output that cannot be exported; one line."""


@dataclasses.dataclass
class Source:
    """A model to export, as the project runs it.

    Attributes:
        sam: the model; a few-shot run's keeps its `LoRALinear` projections (merged on export).
        cfg: its architecture.
        kind: "sam" (a converted directory), "fewshot" or "sum" (runs).
        path: the directory given.
        run: a few-shot run's config (None otherwise).
        box_residual: a few-shot run's learned (2, C) offset on the box tokens, or None.
        checkpoint: a few-shot run's checkpoint kind and step, e.g. "best (step 150)".
    """

    sam: Sam
    cfg: SamConfig
    kind: str
    path: Path
    run: FewShotConfig | None = None
    box_residual: np.ndarray | None = None
    checkpoint: str | None = None


def load_source(path: str | os.PathLike, checkpoint: str = "best") -> Source:
    """The model in a few-shot run, a SUM run or a converted SAM directory (told apart by their
    config.json).

    Raises:
        ExportError: a missing path, a file, a folder that is none of the three, a run without
            the checkpoint (few-shot) or without `sam_finetuned/` (SUM, not finished).
        AmsamError: from the loaders (a damaged SAM directory or checkpoint, a run whose SAM
            cannot be found).
    """
    path = Path(path).absolute()
    if not path.exists():
        raise ExportError(path, "no such directory")
    if not path.is_dir():
        raise ExportError(path, "is a file; expected a run workdir or a converted SAM directory")
    if checkpoint not in CHECKPOINT_KINDS:
        raise ExportError("--checkpoint", f"{checkpoint!r}: one of {', '.join(CHECKPOINT_KINDS)}")
    config_path = path / CONFIG_FILE
    meta = None
    if config_path.is_file():
        try:
            meta = json.loads(config_path.read_bytes())
        except ValueError:
            meta = None  # reported below with what the folder was expected to be
    if isinstance(meta, dict) and meta.get("format") == FORMAT:
        cfg, _ = read_sam_config(path)
        return Source(load_sam(path), cfg, "sam", path)
    if not isinstance(meta, dict) or not {"sam", "train"} <= set(meta):
        raise ExportError(
            path, "not a training workdir nor a converted SAM directory (no matching config.json)"
        )
    if is_sum_config(read_run_config(path)):
        export = path / SUM_EXPORT
        if not (export / CONFIG_FILE).is_file():
            raise ExportError(path, f"a SUM run without {SUM_EXPORT}/ (it has not finished)")
        cfg, _ = read_sam_config(export)
        return Source(load_sam(export), cfg, "sum", path)
    return _fewshot_source(path, checkpoint)


def _fewshot_source(workdir: Path, checkpoint: str) -> Source:
    """The fine-tuned model of a few-shot run: its SAM as `fewshot.trainer.build_setup` prepares
    it (LoRA, partition, box residual), with the trainable state of `ckpt/<checkpoint>`.

    The training data is not needed: only the model half of the setup is rebuilt, and only the
    parameters are restored (the optimiser states in the checkpoint are left unread).
    """
    cfg = FewShotConfig.from_dict(read_run_config(workdir))
    if not (workdir / "ckpt" / checkpoint).is_dir():
        raise ExportError(workdir / "ckpt" / checkpoint, "no checkpoint (train the run first)")
    sam, sam_cfg, _, _ = resolve_sam(cfg)
    apply_lora(sam, rank=cfg.lora.rank, alpha=cfg.lora.alpha, seed=cfg.seed)
    mark_trainable(sam, train_iou_head=cfg.lora.train_iou_head)
    residual = BoxResidual(sam_cfg.prompt_embed_dim) if cfg.boxes.residual else None
    model = TrainingModel(PromptDecoder(sam), residual)
    trainable = split_trainable(model)
    template = {"lower": trainable.lower, "prompt": trainable.prompt}
    restored = restore_state(workdir, checkpoint, template)
    if restored is None:
        raise ExportError(workdir / "ckpt" / checkpoint, "no complete checkpoint")
    state, meta = restored
    nnx.update(model, state["lower"], state["prompt"])
    delta = None if residual is None else np.asarray(residual.delta[...])
    label = f"{checkpoint} (step {meta['step']})"
    return Source(sam, sam_cfg, "fewshot", workdir, cfg, delta, label)


def merged_state(sam: Sam) -> tuple[dict[str, np.ndarray], int]:
    """Every array of `sam` by dotted path, each `LoRALinear` folded into its kernel.

    y = x W + b + scale (x A) B = x (W + scale A B) + b, with W (in, out), A (in, r), B (r, out);
    the sum is formed in float64 and rounded once to float32.

    Returns:
        (path -> array, number of merged projections).
    """
    flat = {
        ".".join(map(str, p)): np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(sam))
    }
    merged = 0
    for path, node in nnx.iter_graph(sam):
        if isinstance(node, LoRALinear):
            prefix = ".".join(map(str, path))
            a = flat.pop(f"{prefix}.lora_a").astype(np.float64)
            b = flat.pop(f"{prefix}.lora_b").astype(np.float64)
            kernel = flat[f"{prefix}.kernel"]
            flat[f"{prefix}.kernel"] = (kernel + node.scale * (a @ b)).astype(kernel.dtype)
            merged += 1
    return flat, merged


def _inverse(transform: Transform, x: np.ndarray) -> np.ndarray:
    """The torch layout of an NNX array (the inverse of `Transform.apply`)."""
    if transform is Transform.LINEAR:
        return np.ascontiguousarray(x.T)
    if transform is Transform.CONV:
        return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return x


def official_state_dict(
    sam: Sam, cfg: SamConfig
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """The official segment-anything state dict of a model (LoRA merged).

    Strict as the conversion: an array no rule of `mapping.py` produces is an error (all are
    collected). Entries the conversion reads and drops are written back so that strict loading
    succeeds: TinyViT's batch-norm counters (0) and MobileSAM's never-run classifier head (LayerNorm
    ones/zeros, Linear zeros).

    Args:
        sam: the model.
        cfg: its config.

    Returns:
        (torch key -> float32 array in torch layout (int64 counters), the trained SUM task table
        by its SUM key (empty when it is all zeros: official SAM has none), a report).

    Raises:
        ExportError: arrays without an official key.
    """
    flat, merged = merged_state(sam)
    sd: dict[str, np.ndarray] = {}
    task: dict[str, np.ndarray] = {}
    unmapped = []
    for path, x in flat.items():
        if path in FROM_CONFIG:
            continue
        found = source_of(path)
        if found is None:
            unmapped.append(path)
            continue
        key, transform = found
        value = np.asarray(_inverse(transform, x), np.float32)
        if path.startswith(TASK_PREFIX):
            task[key] = value
        else:
            sd[key] = value
    if unmapped:
        more = f" (+{len(unmapped) - 5} more)" if len(unmapped) > 5 else ""
        raise ExportError(f"no official key for {', '.join(unmapped[:5])}{more}")
    filled = []
    if cfg.encoder == "tiny_vit":
        for key in [k for k in sd if k.endswith(".bn.running_var")]:
            sd[key.removesuffix("running_var") + "num_batches_tracked"] = np.array(0, np.int64)
        if cfg.tiny_vit_patch_stride == 4:  # MobileSAM's layout (LiteMedSAM's has no head)
            width = cfg.tiny_vit_embed_dims[-1]
            sd["image_encoder.norm_head.weight"] = np.ones(width, np.float32)
            sd["image_encoder.norm_head.bias"] = np.zeros(width, np.float32)
            sd["image_encoder.head.weight"] = np.zeros((MOBILE_SAM_CLASSES, width), np.float32)
            sd["image_encoder.head.bias"] = np.zeros(MOBILE_SAM_CLASSES, np.float32)
            filled.append("image_encoder.norm_head, image_encoder.head (MobileSAM's unused head)")
    if not any(np.any(v) for v in task.values()):
        task = {}
    report = {"tensors": len(sd), "lora_merged": merged, "filled": filled}
    return dict(sorted(sd.items(), key=lambda kv: _official_order(kv[0]))), task, report


def _official_order(key: str) -> tuple:
    """image_encoder, prompt_encoder, mask_decoder (segment_anything's Sam attribute order), then
    numeric-aware within a part."""
    part = key.split(".", 1)[0]
    rank = {"image_encoder": 0, "prompt_encoder": 1, "mask_decoder": 2}.get(part, 3)
    return (rank, *[(0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split(".")])


def registry_type(cfg: SamConfig) -> str | None:
    """The `segment_anything.sam_model_registry` key that builds exactly this architecture."""
    if cfg.model_type not in REGISTRY_TYPES:
        return None
    preset = SamConfig.preset(cfg.model_type)
    settings = {"num_tasks", "freeze_task0", "encoder_dtype"}  # not architecture
    same = all(
        getattr(cfg, f.name) == getattr(preset, f.name)
        for f in dataclasses.fields(SamConfig)
        if f.name not in settings
    )
    return cfg.model_type if same else None


def loader_hint(cfg: SamConfig) -> str:
    """How the official code builds the model the state dict loads into (docs/export.md §1)."""
    name = registry_type(cfg)
    if name is not None:
        return f"segment_anything.sam_model_registry[{name!r}](checkpoint=...)"
    if cfg.encoder == "tiny_vit":
        layout = "MobileSAM's" if cfg.tiny_vit_patch_stride == 4 else "LiteMedSAM's"
        return f"{layout} TinyViT SAM at {cfg.image_size} px"
    return (
        f"segment_anything's Sam built for {cfg.model_type} at {cfg.image_size} px with "
        f"{cfg.num_multimask_outputs + 1} mask tokens (docs/export.md)"
    )


def side_arrays(source: Source, task: dict[str, np.ndarray], sd: dict) -> dict[str, np.ndarray]:
    """What the side file holds (empty: no side file); `meta` is a JSON string."""
    arrays: dict[str, np.ndarray] = {}
    meta: dict = {"source": str(source.path), "kind": source.kind}
    if source.kind == "fewshot":
        run = source.run
        scfg = step_config(run)
        arrays["prompt"] = sd["prompt_encoder.no_mask_embed.weight"]
        if source.box_residual is not None:
            arrays["box_residual"] = source.box_residual.astype(np.float32)
        meta.update(
            checkpoint=source.checkpoint,
            boxes=bool(run.boxes.file or run.boxes.detector),
            semantic_head=scfg.semantic_head,
            calibration={
                "enabled": scfg.calibration,
                "alpha": scfg.calibration_alpha,
                "average": scfg.calibration_average,
                "channels": source.cfg.prompt_embed_dim // 8,
            },
        )
    arrays.update(task)
    if not arrays:
        return {}
    described = {
        "prompt": "learned dense prompt (1, C); also prompt_encoder.no_mask_embed.weight",
        "box_residual": "learned offset (2, C) added to the two box-corner tokens",
        "prompt_encoder.task_prompt_embedding": "SUM task table, one (1, C) row per task",
    }
    meta["arrays"] = {
        name: text for name, text in described.items() if any(k.startswith(name) for k in arrays)
    }
    arrays["meta"] = np.array(json.dumps(meta))
    return arrays


def export_sam(
    source_path: str | os.PathLike,
    out: str | os.PathLike,
    checkpoint: str = "best",
    overwrite: bool = False,
    source: Source | None = None,
) -> dict:
    """Writes the official state dict of a run or SAM directory to `out` (and the side file).

    Args:
        source_path: a few-shot run, a SUM run or a converted SAM directory.
        out: the `.pth` to write; its side file is `<out>.extra.npz`.
        checkpoint: a few-shot run's checkpoint kind.
        overwrite: replace existing outputs (a stale side file is removed).
        source: the loaded source, when the caller has it already (`load_source(source_path)`).

    Returns:
        {"output", "side_file" (or None), "loader", "tensors", "lora_merged", "filled", "kind"}.

    Raises:
        ExportError: a bad source (see `load_source`), existing outputs without `overwrite`.
        WriteError: an output that cannot be written (nothing is left then).
    """
    out = check_output_file(Path(out).absolute())
    side = out.with_name(out.name + EXTRA_SUFFIX)
    check_output_file(side)
    existing = [p for p in (out, side) if p.exists()]
    if existing and not overwrite:
        raise ExportError(existing[0], "already exists (pass --overwrite to replace it)")
    source = source if source is not None else load_source(source_path, checkpoint)
    sd, task, report = official_state_dict(source.sam, source.cfg)
    extra = side_arrays(source, task, sd)
    with atomic_outputs() as outputs:
        outputs.file(out, lambda f: write_state_dict(sd, f))
        if extra:
            outputs.file(side, lambda f: np.savez(f, **extra))
    if not extra and side.exists():
        side.unlink()  # an earlier export's side file would describe another model
    return {
        "output": str(out),
        "side_file": str(side) if extra else None,
        "side_arrays": sorted(k for k in extra if k != "meta"),
        "loader": loader_hint(source.cfg),
        "kind": source.kind,
        "cfg": source.cfg,
        **report,
    }


def summary_lines(result: dict, source_path: str) -> list[str]:
    """The lines the command prints: what was written, and the side file if there is one."""
    cfg = result["cfg"]
    lora = (
        f", LoRA merged into {result['lora_merged']} projections" if result["lora_merged"] else ""
    )
    lines = [
        f"exported {source_path} -> {result['output']} ({cfg.model_type}, {cfg.image_size} px, "
        f"{result['tensors']} tensors{lora}; loads into {result['loader']})"
    ]
    if result["side_file"]:
        lines.append(
            f"side file: {result['side_file']} holds {', '.join(result['side_arrays'])} "
            "(no place in the official model; docs/export.md)"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m weights_conversion export-sam",
        description="Write a few-shot run (LoRA merged), a SUM run or a converted SAM directory as "
        "an official segment-anything state dict (.pth). No torch is needed.",
    )
    parser.add_argument("source", help="run workdir or converted SAM directory")
    parser.add_argument("out", help="output .pth (side file: OUT.extra.npz when needed)")
    parser.add_argument(
        "--checkpoint", default="best", choices=CHECKPOINT_KINDS, help="few-shot runs (best)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = parser.parse_args(argv)

    def body() -> int:
        result = export_sam(args.source, args.out, args.checkpoint, args.overwrite)
        for line in summary_lines(result, args.source):
            print(line)
        return 0

    return guarded(body, f"nothing was written to {args.out}")
