"""BLO-SAM (PyTorch) mask-decoder LoRA checkpoints <-> a run's trainable state.

    python -m weights_conversion blo-sam-lora export --workdir runs/am_sam --output lora.pth
    python -m weights_conversion blo-sam-lora import --workdir runs/am_sam --input lora.pth \
        [--kind best] [--overwrite] [--skip-frozen-check]

Format: importZL/BLO-SAM `sam_lora_mask_decoder.py`, `LoRA_Sam.save_lora_parameters` (the SAMed
scheme of hitachinsk/SAMed `sam_lora_image_encoder.py`, moved to the decoder): one `torch.save`d
flat dict of float32 tensors,
- `sa_a_{i:03d}`, `sa_b_{i:03d}`: `self_attn`; `cti_a_/cti_b_`: `cross_attn_token_to_image`;
  `cit_a_/cit_b_`: `cross_attn_image_to_token`; index i = 2·layer + (0 for q_proj, 1 for v_proj);
  `_a_` is the A `nn.Linear(in, r, bias=False).weight` (r, in), `_b_` the B weight (out, r);
- `fati_qa`, `fati_qb`, `fati_va`, `fati_vb`: q/v A and B of `final_attn_token_to_image`;
- `no_mask_embed`: `prompt_encoder.no_mask_embed.weight` (1, C), the learned prompt;
- every `mask_decoder.*` entry of the wrapped SAM's `state_dict()`: the 14 wrapped projections
  appear as `<proj>.proj.{weight,bias}` (base) and `<proj>.w_a.weight`, `<proj>.w_b.weight` (the
  same tensors as the index-coded entries; `load_lora_parameters` loads both, the second wins).

Mapping: our `LoRALinear` stores lora_a = A^T (in, r) and lora_b = B^T (r, out); tables below
list every index-coded name with its path. Other `mask_decoder.*` keys map through
`amsam_jax/conversion/mapping.py` (the SAM conversion table), inverted per path and checked.
The reference has no LoRA scale (alpha / r = 1): a run with another scale is refused.

Import writes `workdir/ckpt/<kind>` with `training.state.save_state` (step 0, fresh optimizer
states, meta naming the source file), so `python -m amsam_jax.evaluate --checkpoint <kind>`
evaluates it and `--kind latest` warm-starts training from it. Strict as the SAM conversion: an
unknown key, a missing tensor, a shape mismatch, a LoRA copy that differs from its index-coded
twin, or a frozen decoder tensor that differs from the run's SAM is an error (collected, raised
once). Exception: the IoU head when the run keeps it frozen (the reference re-initialises it and
never trains it; masks do not depend on it) is left out of the comparison, reported as ignored.
"""

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from amsam_jax.conversion.convert_sam import ConversionError, load_torch_state_dict
from amsam_jax.conversion.mapping import Transform, target_of
from amsam_jax.fewshot.config import FewShotConfig
from amsam_jax.fewshot.trainer import build_setup
from amsam_jax.training.run import read_run_config
from amsam_jax.training.state import restore_state, save_state
from amsam_jax.utils.cli import guarded
from amsam_jax.utils.errors import AmsamError
from amsam_jax.utils.io import WriteError, atomic_outputs, check_output_file, sha256_file

Path_ = tuple[str | int, ...]
DECODER = ("decoder", "mask_decoder")
TRANSFORMER = (*DECODER, "transformer")
NO_MASK_EMBED = ("decoder", "prompt_encoder", "no_mask_embed", "weight")
# Index-coded prefix -> attention module of each two-way layer (BLO-SAM's three lists).
LAYER_ATTENTIONS = {
    "sa": "self_attn",
    "cti": "cross_attn_token_to_image",
    "cit": "cross_attn_image_to_token",
}
PROJECTIONS = ("q_proj", "v_proj")  # list order within a layer: q then v
FINAL_ATTENTION = {"q_proj": ("fati_qa", "fati_qb"), "v_proj": ("fati_va", "fati_vb")}
IOU_HEAD = (*DECODER, "iou_prediction_head")


class InteropError(AmsamError):
    """A file or run that cannot be converted; one line."""


def wrapped_projections(depth: int) -> dict[str, Path_]:
    """Torch module prefix -> our module path of the 14 LoRA-wrapped projections (depth 2)."""
    table = {}
    for layer in range(depth):
        for attn in LAYER_ATTENTIONS.values():
            for proj in PROJECTIONS:
                key = f"mask_decoder.transformer.layers.{layer}.{attn}.{proj}"
                table[key] = (*TRANSFORMER, "layers", layer, attn, proj)
    for proj in PROJECTIONS:
        key = f"mask_decoder.transformer.final_attn_token_to_image.{proj}"
        table[key] = (*TRANSFORMER, "final_attn_token_to_image", proj)
    return table


def lora_table(depth: int) -> dict[str, tuple[Path_, str]]:
    """Index-coded name -> (our module path, torch wrapper prefix) of every A and B."""
    table: dict[str, tuple[Path_, str]] = {}
    for prefix, attn in LAYER_ATTENTIONS.items():
        for layer in range(depth):
            for j, proj in enumerate(PROJECTIONS):
                i = 2 * layer + j
                torch_prefix = f"mask_decoder.transformer.layers.{layer}.{attn}.{proj}"
                module = (*TRANSFORMER, "layers", layer, attn, proj)
                table[f"{prefix}_a_{i:03d}"] = ((*module, "lora_a"), f"{torch_prefix}.w_a.weight")
                table[f"{prefix}_b_{i:03d}"] = ((*module, "lora_b"), f"{torch_prefix}.w_b.weight")
    for proj, (a_name, b_name) in FINAL_ATTENTION.items():
        torch_prefix = f"mask_decoder.transformer.final_attn_token_to_image.{proj}"
        module = (*TRANSFORMER, "final_attn_token_to_image", proj)
        table[a_name] = ((*module, "lora_a"), f"{torch_prefix}.w_a.weight")
        table[b_name] = ((*module, "lora_b"), f"{torch_prefix}.w_b.weight")
    return table


def _dotted(path: Path_) -> str:
    return ".".join(str(p) for p in path)


def _base_torch_key(path: Path_) -> tuple[str, Transform]:
    """The official SAM key of one of our mask-decoder paths (inverse of mapping.py, checked)."""
    nnx_path = _dotted(path[1:])  # mapping.py paths start at the Sam module
    parts = list(path[1:])
    leaf = parts[-1]
    module = parts[:-1]
    if module[:2] == ["mask_decoder", "output_upscaling"]:  # torch Sequential 0, 1, 3
        module[2] = {0: 0, 1: 1, 2: 3}[module[2]]
    name = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
    key = ".".join(str(p) for p in (*module, name))
    found = target_of(key)
    if found is None or found[0] != nnx_path:
        raise InteropError(f"{_dotted(path)}: no mask-decoder key maps to it")
    return key, found[1]


def torch_keys(depth: int, paths: list[Path_]) -> dict[str, tuple[Path_, Transform]]:
    """BLO-SAM `mask_decoder.*` key -> (our path, transform) for our decoder paths.

    Args:
        depth: two-way transformer depth.
        paths: every decoder parameter path of our model (base kernels, LoRA, heads, ...).

    Returns:
        The table, LoRA copies (`w_a`/`w_b`) included, base projections renamed `.proj.`.
    """
    wrapped = {module: prefix for prefix, module in wrapped_projections(depth).items()}
    table = {}
    for path in paths:
        module, leaf = path[:-1], path[-1]
        if module in wrapped:
            if leaf in ("lora_a", "lora_b"):
                name = {"lora_a": "w_a", "lora_b": "w_b"}[leaf]
                table[f"{wrapped[module]}.{name}.weight"] = (path, Transform.LINEAR)
                continue
            key, transform = _base_torch_key(path)
            table[f"{wrapped[module]}.proj.{key.rsplit('.', 1)[1]}"] = (path, transform)
            continue
        key, transform = _base_torch_key(path)
        table[key] = (path, transform)
    return table


def _flat(state) -> dict[Path_, np.ndarray]:
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def _decoder_depth(paths) -> int:
    layers = {p[4] for p in paths if p[:4] == (*TRANSFORMER, "layers")}
    return max(layers) + 1


def _inverse(transform: Transform, x: np.ndarray) -> np.ndarray:
    if transform is Transform.LINEAR:
        return np.ascontiguousarray(x.T)
    if transform is Transform.NONE:
        return x
    raise InteropError(f"no inverse for {transform}")


def _check_prompt(prompt: dict) -> None:
    extra = [_dotted(p) for p in prompt if p != NO_MASK_EMBED]
    if extra or NO_MASK_EMBED not in prompt:
        raise InteropError(
            "BLO-SAM stores only no_mask_embed as the prompt; this run also learns "
            f"{', '.join(extra) or '(nothing)'} (boxes.residual?)"
        )


def export_tensors(lower, prompt, frozen) -> dict[str, np.ndarray]:
    """Our trainable state + frozen decoder -> the BLO-SAM dict (reference key order).

    Args:
        lower: lower-level nnx.State (LoRA + decoder heads).
        prompt: upper-level nnx.State (`no_mask_embed`).
        frozen: frozen nnx.State (decoder base weights; the encoder is ignored).

    Returns:
        {BLO-SAM key: float32 array in torch layout}.
    """
    low, pro, fro = _flat(lower), _flat(prompt), _flat(frozen)
    _check_prompt(pro)
    decoder = {p: v for p, v in {**fro, **low}.items() if p[:2] == DECODER}
    depth = _decoder_depth(decoder)
    out = {}
    for name, (path, _) in sorted(lora_table(depth).items(), key=lambda kv: _export_order(kv[0])):
        out[name] = np.ascontiguousarray(low[path].T)
    out["no_mask_embed"] = pro[NO_MASK_EMBED]
    for key, (path, transform) in torch_keys(depth, sorted(decoder, key=str)).items():
        out[key] = _inverse(transform, decoder[path])
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def _export_order(name: str) -> tuple[int, int, str]:
    """save_lora_parameters order: sa_a, sa_b, cti_a, cti_b, cit_a, cit_b, fati_*."""
    groups = ["sa_a", "sa_b", "cti_a", "cti_b", "cit_a", "cit_b", "fati"]
    head = name.rsplit("_", 1)[0] if not name.startswith("fati") else "fati"
    return groups.index(head), 0, name


def import_tensors(
    sd: dict[str, np.ndarray], lower, prompt, frozen, check_frozen: bool = True
) -> tuple[dict, dict, list[str]]:
    """BLO-SAM dict -> new lower and prompt pure dicts (templates give paths and shapes).

    Args:
        sd: the BLO-SAM file as numpy.
        lower: template lower nnx.State.
        prompt: template prompt nnx.State.
        frozen: the run's frozen nnx.State (compared with the file's frozen decoder tensors).
        check_frozen: compare frozen decoder tensors (exact equality).

    Returns:
        (lower pure dict, prompt pure dict, notes on ignored entries).

    Raises:
        InteropError: every problem at once (unknown/missing keys, shapes, mismatches).
    """
    low, pro, fro = _flat(lower), _flat(prompt), _flat(frozen)
    _check_prompt(pro)
    decoder_frozen = {p: v for p, v in fro.items() if p[:2] == DECODER}
    depth = _decoder_depth({**low, **decoder_frozen})
    problems, ignored = [], []
    values: dict[Path_, np.ndarray] = {}

    def put(path: Path_, key: str, x: np.ndarray) -> None:
        target = low.get(path, pro.get(path))
        if x.shape != target.shape:
            problems.append(f"{key}: shape {x.shape}, expected {target.shape}")
        else:
            values[path] = x.astype(target.dtype)

    seen = set()
    for name, (path, _) in lora_table(depth).items():
        if name not in sd:
            problems.append(f"missing {name}")
            continue
        seen.add(name)
        put(path, name, np.ascontiguousarray(sd[name].T))
    if "no_mask_embed" in sd:
        seen.add("no_mask_embed")
        put(NO_MASK_EMBED, "no_mask_embed", sd["no_mask_embed"])
    else:
        problems.append("missing no_mask_embed")
    table = torch_keys(depth, sorted({**low, **decoder_frozen}, key=str))
    for key, (path, transform) in table.items():
        if key not in sd:
            problems.append(f"missing {key}")
            continue
        seen.add(key)
        x = transform.apply(sd[key])
        if path in low and path[-1] in ("lora_a", "lora_b"):  # copy of an index-coded entry
            if path in values and not np.array_equal(values[path], x):
                problems.append(f"{key}: differs from its index-coded copy")
        elif path in low:
            put(path, key, x)
        elif path[: len(IOU_HEAD)] == IOU_HEAD:
            ignored.append(key)
        elif check_frozen:
            ours = decoder_frozen[path]
            if x.shape != ours.shape:
                problems.append(f"{key}: shape {x.shape}, expected {ours.shape}")
            elif not np.array_equal(x, ours):
                diff = float(np.max(np.abs(x - ours)))
                problems.append(f"{key}: differs from the run's frozen SAM (max |diff| {diff:.3g})")
    unknown = sorted(set(sd) - seen)
    if unknown:
        more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
        problems.append(f"unknown keys {', '.join(unknown[:5])}{more}")
    unfilled = [_dotted(p) for p in (*low, *pro) if p not in values]
    if unfilled and not problems:
        problems.append(f"unfilled {', '.join(unfilled[:5])}")
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise InteropError("; ".join(problems[:3]) + more)
    notes = []
    if ignored:
        notes.append(
            f"ignored {len(ignored)} mask_decoder.iou_prediction_head tensors (frozen in this "
            "run; masks do not depend on them)"
        )
    return _nest(values, low), _nest(values, pro), notes


def _nest(values: dict[Path_, np.ndarray], paths) -> dict:
    out: dict = {}
    for path in paths:
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = values[path]
    return out


# ----------------------------------------------------------------------------------------------
# Files and workdirs


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The BLO-SAM LoRA file as float32 arrays by key."""
    try:
        return load_torch_state_dict(path)
    except ConversionError as e:
        raise InteropError(str(e)) from None


def save_file(tensors: dict[str, np.ndarray], path: str | os.PathLike) -> None:
    """torch.save of the dict, written to a temporary sibling and renamed into place.

    Raises:
        WriteError: `path` is a directory or cannot be written (nothing is left then).
    """
    import torch

    path = check_output_file(path)
    obj = {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}
    with atomic_outputs() as outputs:  # on a failure no file or folder of it is left
        outputs.file(path, lambda f: torch.save(obj, f))


def _run_setup(workdir: Path):
    cfg = FewShotConfig.from_dict(read_run_config(workdir))
    if cfg.lora.alpha is not None and cfg.lora.alpha != cfg.lora.rank:
        raise InteropError(
            f"{workdir}: LoRA scale alpha/r = {cfg.lora.alpha / cfg.lora.rank:g}; BLO-SAM has none"
        )
    return build_setup(cfg, workdir, quiet=True)


def export_workdir(workdir: str | os.PathLike, output: str | os.PathLike, kind: str = "best"):
    """Writes checkpoint `kind` of a run as a BLO-SAM LoRA file; returns {"keys", "output"}."""
    workdir = Path(workdir).absolute()
    setup = _run_setup(workdir)
    restored = restore_state(workdir, kind, setup.initial)
    if restored is None:
        raise InteropError(f"{workdir / 'ckpt' / kind}: no checkpoint")
    tensors = export_tensors(restored[0]["lower"], restored[0]["prompt"], setup.frozen)
    save_file(tensors, output)
    return {"keys": len(tensors), "output": str(output), "step": int(restored[1]["step"])}


def import_workdir(
    workdir: str | os.PathLike,
    source: str | os.PathLike,
    kind: str = "best",
    overwrite: bool = False,
    check_frozen: bool = True,
) -> dict:
    """Writes a BLO-SAM LoRA file as checkpoint `kind` of the run in `workdir`.

    Returns:
        {"checkpoint": dir written, "notes": ignored entries}.
    """
    workdir = Path(workdir).absolute()
    target = workdir / "ckpt" / kind
    if target.exists() and not overwrite:
        raise InteropError(f"{target}: exists (pass --overwrite to replace it)")
    sd = load_file(source)
    setup = _run_setup(workdir)
    init = setup.initial
    lower_values, prompt_values, notes = import_tensors(
        sd, init["lower"], init["prompt"], setup.frozen, check_frozen
    )
    lower = jax.tree.map(lambda x: x, init["lower"])  # a new State; the template is kept
    prompt = jax.tree.map(lambda x: x, init["prompt"])
    nnx.replace_by_pure_dict(lower, lower_values)
    nnx.replace_by_pure_dict(prompt, prompt_values)
    state = {
        "lower": lower,
        "prompt": prompt,
        "lower_opt": init["lower_opt"],
        "prompt_opt": init["prompt_opt"],
        "step": jnp.asarray(0, jnp.int32),
    }
    digest = sha256_file(source)
    meta = {"step": 0, "epoch": 0, "best_dice": 0.0, "imported_from": str(source), "sha256": digest}
    # An existing checkpoint is moved aside, and back if the save fails (also on Ctrl-C).
    aside = (
        Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{kind}.old-"))
        if target.exists()
        else None
    )
    try:
        if aside is not None:
            os.replace(target, aside / kind)
        save_state(workdir, kind, state, meta)
    except BaseException as e:
        shutil.rmtree(target, ignore_errors=True)  # what the failed save left
        if aside is not None:
            os.replace(aside / kind, target)
            aside.rmdir()
        if isinstance(e, OSError) and not isinstance(e, AmsamError):
            raise WriteError(target, f"cannot write ({e.strerror or e})", e) from None
        raise
    if aside is not None:
        shutil.rmtree(aside)
    return {"checkpoint": str(target), "notes": notes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m weights_conversion blo-sam-lora",
        description="BLO-SAM mask-decoder LoRA checkpoints <-> amsam_jax run checkpoints.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="run checkpoint -> BLO-SAM .pth")
    exp.add_argument("--workdir", required=True)
    exp.add_argument("--kind", default="best", choices=("best", "final", "latest"))
    exp.add_argument("--output", required=True, help="output .pth")
    imp = sub.add_parser("import", help="BLO-SAM .pth -> run checkpoint (fresh optimizer states)")
    imp.add_argument("--workdir", required=True, help="a run workdir (its config.json)")
    imp.add_argument("--input", required=True, help="BLO-SAM save_lora_parameters .pth")
    imp.add_argument("--kind", default="best", choices=("best", "final", "latest"))
    imp.add_argument("--overwrite", action="store_true", help="replace ckpt/<kind>")
    imp.add_argument(
        "--skip-frozen-check",
        action="store_true",
        help="do not compare the file's frozen decoder tensors with the run's SAM",
    )
    args = parser.parse_args(argv)

    def body() -> int:
        if args.command == "export":
            result = export_workdir(args.workdir, args.output, args.kind)
        else:
            result = import_workdir(
                args.workdir, args.input, args.kind, args.overwrite, not args.skip_frozen_check
            )
        for key, value in result.items():
            print(f"{key}: {value}")
        return 0

    target = args.output if args.command == "export" else Path(args.workdir) / "ckpt" / args.kind
    return guarded(body, f"nothing was written to {target}")
