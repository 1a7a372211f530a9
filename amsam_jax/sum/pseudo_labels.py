"""SAM pseudo-labels for a folder of images: SA-1B JSON plus a uint8 probability sidecar.

One `<stem>.json` and `<stem>.prob.npz` per image (docs/sum.md §2.2), each written atomically,
the JSON last: an image whose JSON exists is skipped, so an interrupted run resumes.

In a multi-process run (docs/scale.md §3) every process lists the images still missing, they
agree on that list, and each labels every `process_count()`-th of it: no two processes write one
file, and a rerun on any number of processes labels only what is still missing.
"""

from pathlib import Path

import numpy as np

from amsam_jax.automatic_mask_generator import SamAutomaticMaskGenerator
from amsam_jax.data.sa1b import image_id_of, records_to_annotations, write_annotations
from amsam_jax.training.mesh import process_shard, sync
from amsam_jax.utils.image import ImageReadError, list_images, read_image


def label_image(
    generator: SamAutomaticMaskGenerator, image_path: Path, out_dir: Path, keep_prob: bool
) -> int:
    """Labels one image; returns the number of masks written."""
    image = read_image(image_path)
    records = generator.generate(image)
    h, w = image.shape[:2]
    info = {
        "image_id": image_id_of(image_path.name),
        "file_name": image_path.name,
        "height": h,
        "width": w,
    }
    prob = None
    if keep_prob:
        prob = np.zeros((len(records), h, w), np.uint8)
        for k, r in enumerate(records):
            prob[k] = r["probability"]
    write_annotations(
        out_dir / f"{image_path.stem}.json", info, records_to_annotations(records), prob
    )
    return len(records)


def pending_images(images_dir, out_dir) -> list[Path]:
    """The images of `images_dir` without a `<stem>.json` in `out_dir`, in name order."""
    out_dir = Path(out_dir)
    return [p for p in list_images(images_dir) if not (out_dir / f"{p.stem}.json").exists()]


def label_folder(
    model, images_dir, out_dir, points_per_side: int = 32, keep_prob: bool = True, say=print, **amg
) -> list[str]:
    """Pseudo-labels every image of `images_dir` without a `<stem>.json` in `out_dir`.

    In a multi-process run every process calls it; each labels its share of the missing images
    (`pending_images`, then `process_shard`) and returns once all are done.

    Args:
        model: the SAM.
        images_dir: folder of images.
        out_dir: output folder (created).
        points_per_side: the generator's grid.
        keep_prob: write the `.prob.npz` sidecars.
        say: progress printer.
        **amg: other `SamAutomaticMaskGenerator` arguments.

    Returns:
        one-line errors of the images that could not be read (nothing is written for them).
    """
    out_dir = Path(out_dir)
    generator = SamAutomaticMaskGenerator(
        model, points_per_side=points_per_side, keep_probabilities=keep_prob, **amg
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = pending_images(images_dir, out_dir)
    for image_path in sorted(set(list_images(images_dir)) - set(todo)):
        say(f"skip {image_path.name} (done)")
    sync("pseudo-labels-listed")  # every process listed the same folder state
    errors = []
    for image_path in process_shard(todo):
        try:
            n = label_image(generator, image_path, out_dir, keep_prob)
        except ImageReadError as e:
            errors.append(str(e))
            continue
        say(f"{image_path.name}: {n} masks")
    sync("pseudo-labels-written")
    return errors
