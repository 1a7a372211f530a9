"""Shared tensorflow-datasets builder for manually downloaded image/mask segmentation sets."""

import abc
import dataclasses
import io
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from amsam_jax.data.folder import DataError, Sample, list_samples, load_sample


@dataclasses.dataclass(eq=False)
class SegmentationConfig(tfds.core.BuilderConfig):
    """How the sorted samples become splits.

    Attributes:
        num_test: for builders that cut one sorted pool: the last `num_test` samples are "test",
            the rest "train" (docs/fewshot.md §4.2).
        split_sizes: expected ((split, count), ...), checked before anything is written (a
            partial download would silently shift "first/last N"); empty: not checked.
    """

    num_test: int = 0
    split_sizes: tuple[tuple[str, int], ...] = ()


class SegmentationBuilder(tfds.core.GeneratorBasedBuilder):
    """Images and binary masks from a manual download, one example per image.

    Features: "image" (the original file's bytes, never re-encoded), "filename" (its name),
    "mask" (8-bit PNG, 0 background / 255 foreground, binarised as value > 0 of the first
    channel, EXIF orientation applied like the image's), "stem". Examples keep the sorted order
    of the file names (shuffling is disabled), so records 0..N-1 are the paper's "first N".
    Every image is decoded once while building: a corrupt file, a missing mask or a mask of
    another size stops the build with a one-line `DataError`.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    HOMEPAGE = ""
    CITATION = ""
    # tfds 4.9.10 locates a builder's checksums file through `code_path`, which for a builder
    # inside a package touches `importlib_resources` (a backport it installs only for
    # Python < 3.9: ModuleNotFoundError). Manual downloads have no checksums file.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(self.__doc__ or "").strip().splitlines()[0],
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "filename": tfds.features.Text(),
                    "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                    "stem": tfds.features.Text(),
                }
            ),
            homepage=self.HOMEPAGE,
            citation=self.CITATION,
            disable_shuffling=True,
        )

    @abc.abstractmethod
    def split_samples(self, manual_dir: Path) -> dict[str, list[Sample]]:
        """The samples of each split, sorted by file name, from the manual download."""

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = Path(dl_manager.manual_dir)
        splits = self.split_samples(manual_dir)
        sizes = {name: len(samples) for name, samples in splits.items()}
        expected = dict(self.builder_config.split_sizes)
        if expected and sizes != expected:
            raise DataError(
                manual_dir,
                f"split sizes {sizes}, expected {expected} for {self.name}/"
                f"{self.builder_config.name} (incomplete or different download?)",
            )
        return {name: self._generate_examples(samples) for name, samples in splits.items()}

    def cut_sorted_pool(self, samples: list[Sample], root: Path) -> dict[str, list[Sample]]:
        """The last `num_test` sorted samples are "test", the others "train" (docs/fewshot.md §4.2).

        Raises:
            DataError: the pool size differs from the config's total, or is too small.
        """
        config = self.builder_config
        expected = sum(n for _, n in config.split_sizes)
        if expected and len(samples) != expected:
            raise DataError(
                root,
                f"{len(samples)} image/mask pairs, expected {expected} for {self.name}/"
                f"{config.name} (incomplete or different download?)",
            )
        if not 0 < config.num_test < len(samples):
            raise DataError(
                root, f"cannot take the last {config.num_test} of {len(samples)} samples as test"
            )
        return {"train": samples[: -config.num_test], "test": samples[-config.num_test :]}

    def _generate_examples(self, samples: list[Sample]):
        for sample in samples:
            _, mask = load_sample(sample)  # decodes both: corrupt files and size mismatches
            yield (
                sample.stem,
                {
                    "image": sample.image_path.read_bytes(),
                    "filename": sample.image_path.name,
                    "mask": encode_mask(mask),
                    "stem": sample.stem,
                },
            )


def encode_mask(mask: np.ndarray) -> bytes:
    """(H, W) bool -> 8-bit grayscale PNG bytes with 0 / 255."""
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


def find_root(manual_dir: Path, required: tuple[str, ...]) -> Path:
    """`manual_dir` or its single subfolder (an extracted archive) holding all `required`.

    Raises:
        DataError: neither holds them.
    """
    candidates = [manual_dir]
    if manual_dir.is_dir():
        candidates += sorted(p for p in manual_dir.iterdir() if p.is_dir())
    for root in candidates:
        if all((root / name).is_dir() for name in required):
            return root
    raise DataError(manual_dir, f"expected folders {', '.join(required)} here or one level down")


def export_to_folder(
    builder_name: str,
    manual_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    config: str | SegmentationConfig | None = None,
) -> dict[str, int]:
    """Builds (or reuses) a tfds dataset and writes it in the folder format of `amsam_jax.data`.

    Writes `out_dir/<split>/images/<original file>` (bytes as downloaded) and
    `out_dir/<split>/masks/<stem>.png` (0/255), then lists every split with `list_samples`.

    Args:
        builder_name: "tiktok", "human_seg" or "isic2018".
        manual_dir: the manual download (see the builder's docstring).
        out_dir: the folder to create; must not exist or be empty.
        data_dir: tfds data folder (default: tfds's, `~/tensorflow_datasets`).
        config: builder config or its name (default: the builder's first, "paper"/"official").

    Returns:
        Samples written per split.

    Raises:
        DataError: a bad download, or a non-empty `out_dir`.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DataError(out_dir, "exists and is not empty")
    builder = tfds.builder_cls(builder_name)(
        data_dir=None if data_dir is None else os.fspath(data_dir),
        config=config,
        file_format="array_record",
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
    )
    counts = {}
    for split, source in builder.as_data_source().items():
        for sub in ("images", "masks"):
            (out_dir / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(len(source)):
            example = source[i]
            stem = example["stem"].decode()
            (out_dir / split / "images" / example["filename"].decode()).write_bytes(
                example["image"]
            )
            Image.fromarray(example["mask"][..., 0]).save(out_dir / split / "masks" / f"{stem}.png")
        counts[split] = len(list_samples(out_dir, split))
    return counts
