"""The box file: every image's YOLO box prompt, computed once per dataset and resumable.

A JSON file keyed by image stem (docs/fewshot.md §6.1). `compute_box_file` reuses entries whose
detector settings and image SHA-256 match, and rewrites the file atomically as it goes, so a
killed run resumes where it stopped. A run that fails before it finished any image writes
nothing: no empty or partial box file is ever left in place of a missing one.

Several processes (docs/scale.md §3) split the images: process i of n labels every n-th image
into its own part file `<output>.part-<i>-of-<n>`, seeded with every entry an earlier run of any
process count left, and process 0 merges the parts into `output` at the end. No two processes
write one file, and a rerun on another number of processes reuses every finished entry.
"""

import contextlib
import dataclasses
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from amsam_jax.boxes.detector import (
    MAX_DET,
    POLICIES,
    BoxError,
    Detections,
    YoloDetector,
    postprocess,
    select_box,
)
from amsam_jax.boxes.geometry import Letterbox, letterbox
from amsam_jax.data.folder import (
    DataError,
    check_mask_size,
    list_samples,
    read_mask_file,
    resize_nearest,
)
from amsam_jax.utils.image import ImageReadError, image_size, list_images, read_image
from amsam_jax.utils.io import (
    WriteError,
    atomic_outputs,
    check_output_file,
    remove_stale_temporaries,
    sha256_bytes,
    sha256_file,
)

FALLBACKS = ("full_image", "none")
SPLITS = ("train", "test")
# Settings that must match for a box file entry to be reused.
SETTING_KEYS = ("sha256", "imgsz", "conf", "iou", "classes", "policy", "fallback", "max_det")


def part_files(output: Path) -> list[Path]:
    """The part files of `output` that runs on several processes left, in name order."""
    return sorted(output.parent.glob(f"{output.name}.part-*-of-*"))


def _compute_sharded(detector, image_paths, output: Path, shard, sync, settings) -> dict:
    """`compute_box_file` on process `shard[0]` of `shard[1]` (see the module docstring)."""
    index, count = shard
    check_output_file(output)
    seed: dict[str, Any] | None = None  # every finished entry of earlier runs
    for path in [output, *part_files(output)]:
        if path.is_file():
            old = load_box_file(path)
            seed = seed or {"detector": old["detector"], "boxes": {}}
            seed["boxes"].update(old["boxes"])
    sync("boxes-read")  # nobody rewrites a part before every process read them all
    mine = [Path(p) for p in image_paths][index::count]
    part = output.with_name(f"{output.name}.part-{index}-of-{count}")
    if seed is not None:
        stems = {p.stem for p in mine}
        boxes = {k: v for k, v in seed["boxes"].items() if k in stems}
        write_box_file({"detector": seed["detector"], "boxes": boxes}, part)
    data = compute_box_file(detector, mine, part, **settings)
    sync("boxes-written")
    if index == 0:
        merged = {"detector": data["detector"], "boxes": dict(seed["boxes"]) if seed else {}}
        for i in range(count):
            merged["boxes"].update(load_box_file(part.with_name(
                f"{output.name}.part-{i}-of-{count}"))["boxes"])  # fmt: skip
        write_box_file(merged, output)
        for path in part_files(output):
            path.unlink()
        data = merged
    sync("boxes-merged")
    return data


def list_split_images(data_dir: str | os.PathLike, split: str = "all") -> list[Path]:
    """Lists `DIR/{train,test}/images/*`, sorted by file name within each split.

    Args:
        data_dir: the data folder.
        split: "train", "test" or "all" (the splits that exist, train first).

    Returns:
        Image paths.

    Raises:
        BoxError: missing folder, no images, or two images with the same stem (their box file
            keys would collide).
    """
    data_dir = Path(data_dir)
    if split not in (*SPLITS, "all"):
        raise BoxError(data_dir, f"unknown split {split!r}; expected train, test or all")
    if not data_dir.exists():
        raise BoxError(data_dir, "no such folder")
    if not data_dir.is_dir():
        raise BoxError(data_dir, "not a folder")
    splits = SPLITS if split == "all" else (split,)
    folders = [data_dir / s / "images" for s in splits]
    if split == "all":
        folders = [f for f in folders if f.is_dir()]
        if not folders:
            raise BoxError(data_dir, "no train/images or test/images folder")
    paths, seen = [], {}
    for folder in folders:
        try:
            found = list_images(folder)
        except ImageReadError as e:
            raise BoxError(e.path, e.problem) from None
        for p in found:
            if p.stem in seen:  # across splits: box file keys are stems
                raise BoxError(p, f"duplicate image stem {p.stem!r} (also {seen[p.stem]})")
            seen[p.stem] = p
        paths += found
    return paths


def _entry(
    detections: Detections, image_shape: tuple[int, int], sha: str, policy: str, fallback: str
) -> dict[str, Any]:
    selected = select_box(detections, policy)
    if selected is None:
        h, w = image_shape
        box = [0.0, 0.0, float(w), float(h)] if fallback == "full_image" else None
        entry = {"box": box, "score": 0.0, "class": -1, "fallback": True}
    else:
        box, score, cls = selected
        entry = {"box": [float(v) for v in box], "score": score, "class": cls, "fallback": False}
    if policy == "all":
        entry["boxes_all"] = [
            {"box": [float(v) for v in b], "score": float(s), "class": int(c)}
            for b, s, c in zip(detections.boxes, detections.scores, detections.classes, strict=True)
        ]
    entry["image_sha256"] = sha
    return entry


def load_box_file(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a box file written by `compute_box_file`.

    Returns:
        {"detector": {...}, "boxes": {stem: {"box", "score", "class", "fallback", ...}}}.

    Raises:
        BoxError: missing file, a folder, invalid JSON or not a box file.
    """
    path = Path(path)
    if path.is_dir():
        raise BoxError(path, "is a directory, not a box file")
    if not path.is_file():
        raise BoxError(path, "no such file")
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise BoxError(path, "not a box file (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise BoxError(path, f"not a JSON box file ({e})") from None
    except OSError as e:
        raise BoxError(path, f"cannot read ({e.strerror or e})") from None
    if not (isinstance(data, dict) and isinstance(data.get("detector"), dict)):
        raise BoxError(path, "not a box file (no 'detector' section)")
    if not isinstance(data.get("boxes"), dict):
        raise BoxError(path, "not a box file (no 'boxes' section)")
    return data


def _check_box(value: Any, path: str | os.PathLike, where: str) -> list[float]:
    """`value` as [x0, y0, x1, y1] (four finite numbers, x0 <= x1, y0 <= y1), else a BoxError."""
    numbers = isinstance(value, list | tuple) and len(value) == 4
    numbers = numbers and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    if not numbers or not all(np.isfinite(value)):
        raise BoxError(path, f"{where} is not [x0, y0, x1, y1] (four finite numbers): {value!r}")
    x0, y0, x1, y1 = (float(v) for v in value)
    if x1 < x0 or y1 < y0:
        raise BoxError(path, f"{where} has x1 < x0 or y1 < y0: {value!r}")
    return [x0, y0, x1, y1]


def entry_boxes(entry: Any, path: str | os.PathLike, stem: str) -> list[list[float]] | None:
    """The list of boxes of one box file entry, highest score first (docs/inputs.md §7).

    The list is the entry's `boxes_all` (what `--policy all` writes) or `boxes` (written by
    hand); each item is [x0, y0, x1, y1] or {"box": [x0, y0, x1, y1], "score": s, ...}. Items
    are sorted by score, highest first; an item without a score counts as score 1 and equal
    scores keep the file's order, so a hand-written list is used in its own order.

    Args:
        entry: `box_file["boxes"][stem]`.
        path: the box file, for messages.
        stem: the image, for messages.

    Returns:
        The boxes in image pixels (possibly empty: nothing was detected), or None when the
        entry has no list (then its `box` is the image's only box).

    Raises:
        BoxError: one line naming the file and the image: an entry that is not an object, both
            keys, a list that is not a list, or an item that is not a box.
    """
    if not isinstance(entry, dict):
        raise BoxError(path, f"image {stem!r}: the entry is not an object: {entry!r}")
    keys = [k for k in ("boxes_all", "boxes") if k in entry]
    if not keys:
        return None
    if len(keys) == 2:
        raise BoxError(path, f"image {stem!r}: has both 'boxes_all' and 'boxes'; keep one")
    key = keys[0]
    items = entry[key]
    if not isinstance(items, list):
        raise BoxError(path, f"image {stem!r}: {key!r} is not a list of boxes: {items!r}")
    scored = []
    for i, item in enumerate(items):
        where = f"image {stem!r}: {key}[{i}]"
        score = 1.0
        if isinstance(item, dict):
            if "box" not in item:
                raise BoxError(path, f"{where} has no 'box'")
            score = item.get("score", 1.0)
            if isinstance(score, bool) or not isinstance(score, int | float):
                raise BoxError(path, f"{where} has a score that is not a number: {score!r}")
            item = item["box"]
        scored.append((-float(score), i, _check_box(item, path, where)))
    return [box for _, _, box in sorted(scored)]


def image_box(entry: Any, path: str | os.PathLike, stem: str) -> list[float] | None:
    """An entry's single box (`box`): [x0, y0, x1, y1] in image pixels, or None (no box).

    Raises:
        BoxError: the entry is not an object, has no `box`, or its `box` is not a box or null.
    """
    if not isinstance(entry, dict):
        raise BoxError(path, f"image {stem!r}: the entry is not an object: {entry!r}")
    if "box" not in entry:
        listed = "boxes_all" in entry or "boxes" in entry
        hint = " (its list of boxes is read with boxes.max_per_image > 1)" if listed else ""
        raise BoxError(path, f"image {stem!r}: no 'box'{hint}")
    box = entry["box"]
    return None if box is None else _check_box(box, path, f"image {stem!r}: box")


def write_box_file(data: dict[str, Any], path: str | os.PathLike) -> None:
    """Writes atomically (temporary file + `os.replace`): a killed run leaves the old file.

    Raises:
        WriteError: (an `AmsamError`) the file or its folder cannot be written; a folder
            created for it is removed again.
    """
    with atomic_outputs() as outputs:
        outputs.file(path, json.dumps(data, indent=1) + "\n")


def box_file_from_masks(
    data_dir: str | os.PathLike, split: str = "all", components: bool = False
) -> dict[str, Any]:
    """A box file whose boxes are the ground-truth masks' bounding boxes (an oracle detector).

    For a data folder without a detector that knows its objects (the bundled synthetic set), or
    for an upper bound: each image's box is the tight box of its mask's foreground (x1, y1
    exclusive, as a detector's), `boxes_all` one box per distinct non-zero mask value, or with
    `components` one per 8-connected component of each value (one box per object, for
    `boxes.max_per_image` > 1), largest first. An image whose mask is empty gets the full-image
    fallback.

    A mask stored at a lower resolution (same aspect ratio, `data.folder.same_aspect`) is resized
    to its image first, so the boxes are in image pixels.

    Raises:
        DataError: as `list_samples`, an unreadable mask or image header, or a mask of another
            aspect ratio.
    """
    data_dir = Path(data_dir)
    splits = [s for s in SPLITS if (data_dir / s).is_dir()] if split == "all" else [split]
    if not splits:
        raise BoxError(data_dir, "no train/ or test/ split folder")
    boxes: dict[str, Any] = {}
    for name in splits:
        for sample in list_samples(data_dir, name):
            values = read_mask_file(sample.mask_path)
            try:
                h, w = image_size(sample.image_path)
            except ImageReadError as e:
                raise DataError(e.path, e.problem) from None
            check_mask_size(sample, values.shape, (h, w))
            values = resize_nearest(values, (h, w))  # boxes in image pixels, as a detector's
            found = []
            for v in np.unique(values[values != 0]):
                regions = [values == v]
                if components:
                    labels, count = ndimage.label(regions[0], np.ones((3, 3), bool))
                    regions = sorted((labels == i for i in range(1, count + 1)),
                                     key=lambda r: -int(r.sum()))  # fmt: skip
                for region in regions:
                    ys, xs = np.nonzero(region)
                    found.append([float(xs.min()), float(ys.min()), float(xs.max() + 1),
                                  float(ys.max() + 1)])  # fmt: skip
            if found:
                b = np.asarray(found)
                box = [b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()]
                entry = {"box": [float(v) for v in box], "score": 1.0, "class": 0,
                         "fallback": False}  # fmt: skip
            else:
                entry = {"box": [0.0, 0.0, float(w), float(h)], "score": 0.0, "class": -1,
                         "fallback": True}  # fmt: skip
            entry["boxes_all"] = [{"box": b, "score": 1.0, "class": 0} for b in found]
            entry["image_sha256"] = sha256_file(sample.image_path)
            boxes[sample.stem] = entry
    header = {"name": "ground-truth masks", "policy": "union", "fallback": "full_image"}
    return {"detector": header, "boxes": boxes}


@dataclasses.dataclass(frozen=True)
class _Loaded:
    path: Path
    sha: str
    image_shape: tuple[int, int] | None  # None: reused, not decoded
    boxed: np.ndarray | None
    geometry: Letterbox | None


def _prefetch(
    paths: Sequence[Path], load: Callable[[Path], _Loaded], depth: int
) -> Iterator[_Loaded]:
    """Runs `load` on the next `depth` paths in one worker thread while the caller infers."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: deque[Future] = deque()
        for path in paths:
            pending.append(pool.submit(load, path))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def compute_box_file(
    detector: str | os.PathLike | YoloDetector,
    image_paths: Sequence[str | os.PathLike],
    output: str | os.PathLike | None = None,
    *,
    conf: float = 0.25,
    iou: float = 0.7,
    classes: Sequence[str | int] | None = None,
    policy: str = "top1",
    fallback: str = "full_image",
    max_det: int = MAX_DET,
    progress: bool = False,
    save_every: float = 30.0,
    shard: tuple[int, int] = (0, 1),
    sync: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Computes (or completes) the box file of a set of images.

    Entries of an existing `output` whose image SHA-256 matches are reused; its detector settings
    (model SHA-256, imgsz, thresholds, classes, policy, fallback, max_det) must match. The file is
    rewritten atomically every `save_every` seconds and when the run stops, also on an error,
    as long as it has new entries: a run that fails before finishing an image leaves `output`
    as it was (absent, or the previous file).

    Args:
        detector: a YoloDetector or a path to the ONNX export.
        image_paths: images; their stems are the keys and must be unique.
        output: box file to resume and write; None computes in memory only.
        conf: confidence threshold.
        iou: NMS IoU threshold.
        classes: class names or ids to keep; None keeps all.
        policy: "top1", "union" or "all" (see `select_box`; "all" adds "boxes_all").
        fallback: box for an image with no detection: "full_image" ([0, 0, W, H]) or "none" (null).
        max_det: kept boxes per image at most.
        progress: show a progress bar on stderr.
        save_every: seconds between intermediate saves.
        shard: (this process's index, process count); with a count above 1 every process
            calls this with the same arguments (see the module docstring).
        sync: sync(name) returns once every process called it (`training.mesh.sync`);
            required with several processes.

    Returns:
        The box file: {"detector": {...}, "boxes": {stem: entry}} (with several processes,
        process 0's is the merged file, the others' their own share).

    Raises:
        BoxError: a bad detector, image or existing box file, or a detector that fails.
        WriteError: `output` cannot be written (checked before the detector is loaded).
    """
    settings = dict(conf=conf, iou=iou, classes=classes, policy=policy, fallback=fallback,
                    max_det=max_det, progress=progress, save_every=save_every)  # fmt: skip
    if shard[1] > 1 and output is not None:
        if sync is None:
            raise ValueError("compute_box_file with several processes needs `sync`")
        return _compute_sharded(detector, image_paths, Path(output), shard, sync, settings)
    if output is not None:
        check_output_file(output)
        remove_stale_temporaries(output)  # of a killed run; the box file has one writer
    if policy not in POLICIES:
        raise BoxError(output or "<boxes>", f"unknown policy {policy!r}; expected {POLICIES}")
    if fallback not in FALLBACKS:
        raise BoxError(output or "<boxes>", f"unknown fallback {fallback!r}; expected {FALLBACKS}")
    if not isinstance(detector, YoloDetector):
        detector = YoloDetector(detector)
    class_ids = detector.resolve_classes(classes)
    header = {
        "name": detector.name,
        "sha256": detector.sha256,
        "metadata": detector.metadata,
        "imgsz": list(detector.imgsz),
        "conf": conf,
        "iou": iou,
        "classes": class_ids,
        "policy": policy,
        "fallback": fallback,
        "max_det": max_det,
        "input": "original image, EXIF-transposed, RGB uint8",
    }
    paths = [Path(p) for p in image_paths]
    stems = {}
    for p in paths:
        if p.stem in stems:
            raise BoxError(p, f"duplicate image stem {p.stem!r} (also {stems[p.stem]})")
        stems[p.stem] = p
    data = {"detector": header, "boxes": {}}
    if output is not None and Path(output).exists():
        old = load_box_file(output)
        header_json = json.loads(json.dumps(header))  # tuples and int keys as stored
        diff = [k for k in SETTING_KEYS if old["detector"].get(k) != header_json[k]]
        if diff:
            raise BoxError(
                output,
                f"made with other detector settings ({', '.join(diff)}); use another --output",
            )
        data["boxes"] = old["boxes"]
    boxes = data["boxes"]

    def load(path: Path) -> _Loaded:
        if not path.is_file():
            raise BoxError(path, "no such file")
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise BoxError(path, f"cannot read ({e.strerror or e})") from None
        sha = sha256_bytes(raw)
        if boxes.get(path.stem, {}).get("image_sha256") == sha:
            return _Loaded(path, sha, None, None, None)
        try:
            image = read_image(raw, name=str(path))
        except ImageReadError as e:
            raise BoxError(e.path, e.problem) from None
        boxed, geometry = letterbox(image, detector.imgsz)
        return _Loaded(path, sha, image.shape[:2], boxed, geometry)

    def flush(batch: list[_Loaded]) -> None:
        nonlocal unsaved
        raw = detector.run(np.stack([item.boxed for item in batch]))
        for pred, item in zip(raw, batch, strict=True):
            det = postprocess(pred, item.geometry, conf, iou, class_ids, max_det)
            boxes[item.path.stem] = _entry(det, item.image_shape, item.sha, policy, fallback)
        unsaved = True

    def save() -> None:  # only when there is something new: never an empty file
        nonlocal unsaved, last_save
        if output is not None and unsaved:
            write_box_file(data, output)
            unsaved = False
        last_save = time.monotonic()

    unsaved = False
    last_save = time.monotonic()
    batch: list[_Loaded] = []
    bar = tqdm(total=len(paths), disable=not progress, unit="img", desc="boxes")
    try:
        for item in _prefetch(paths, load, depth=2 * detector.batch_size):
            if item.boxed is not None:
                batch.append(item)
            if len(batch) == detector.batch_size:
                flush(batch)
                bar.update(len(batch))
                batch = []
            if item.boxed is None:
                bar.update(1)
            if time.monotonic() - last_save > save_every:
                save()
        if batch:
            flush(batch)
            bar.update(len(batch))
    except BaseException:  # an error or Ctrl-C: keep what was finished, for the resume
        with contextlib.suppress(WriteError):  # the error that stopped the run is reported
            save()
        raise
    finally:
        bar.close()
    unsaved = True  # a complete run writes the file, also when every entry was reused
    save()
    return data
