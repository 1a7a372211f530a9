"""Shared tensorflow-datasets builder for manually downloaded image/mask segmentation sets.

The builders take a download as it is really distributed: OS junk and hidden files
(`.DS_Store`, `Thumbs.db`, `desktop.ini`, AppleDouble `._*`, `__MACOSX/`) are ignored,
extensions match in any case (`.JPG`, `.PNG`), the expected folders are found up to
`MAX_DEPTH` levels below the manual folder (an archive extracted into a folder of its own
name), and the number of pairs found is reported, never checked against a published count.
"""

import abc
import contextlib
import dataclasses
import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from amsam_jax.data.folder import DataError, Sample, is_hidden, list_samples, load_sample
from amsam_jax.utils.errors import AmsamError
from amsam_jax.utils.io import atomic_directory

# How far below the manual folder the expected folders may be: the archive's own folder
# (`Human-Segmentation-Dataset-master/`), one more of the same name (Kaggle's TikTok archive,
# or "Extract All" into a folder named after the ZIP), and the folder holding the download.
MAX_DEPTH = 3
# Folders that are never data: macOS ZIP resource forks (full of `._*` files).
JUNK_FOLDERS = frozenset({"__MACOSX"})


@dataclasses.dataclass(eq=False)
class SegmentationConfig(tfds.core.BuilderConfig):
    """How the sorted samples become splits.

    Attributes:
        num_test: for builders that cut one sorted pool: the last `num_test` samples are "test",
            the rest "train" (docs/fewshot.md §4.2).
    """

    num_test: int = 0


class SegmentationBuilder(tfds.core.GeneratorBasedBuilder):
    """Images and binary masks from a manual download, one example per image.

    Features: "image" (the original file's bytes, never re-encoded), "filename" (its name),
    "mask" (8-bit PNG, 0 background / 255 foreground, binarised as value > 0 of the first
    channel, EXIF orientation applied like the image's, at the image's resolution), "stem".
    Examples keep the sorted order of the file names (shuffling is disabled), so records 0..N-1
    are the paper's "first N". Every image is decoded once while building. A mask stored at
    another resolution with its image's aspect ratio (`data.folder.same_aspect`) is resized to
    the image with nearest neighbour (`data.folder.resize_nearest`), so exported masks are
    aligned pixel for pixel with their images. A corrupt file, an unpaired image or mask, or a
    mask of another aspect ratio stops the build with a one-line `DataError`.
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "OS junk and hidden files ignored; masks of another resolution with their "
        "image's aspect ratio resized to the image (nearest); pair counts not checked.",
    }
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
        splits = self.split_samples(Path(dl_manager.manual_dir))
        return {name: self._generate_examples(samples) for name, samples in splits.items()}

    def cut_sorted_pool(self, samples: list[Sample], root: Path) -> dict[str, list[Sample]]:
        """The last `num_test` sorted samples are "test", the others "train" (docs/fewshot.md §4.2).

        Raises:
            DataError: the pool has no more than `num_test` samples.
        """
        num_test = self.builder_config.num_test
        if not 0 < num_test < len(samples):
            raise DataError(
                root,
                f"{len(samples)} image/mask pairs: too few to take the last {num_test} as test "
                f"for {self.name}/{self.builder_config.name}",
            )
        return {"train": samples[:-num_test], "test": samples[-num_test:]}

    def _generate_examples(self, samples: list[Sample]):
        for sample in samples:
            _, mask = load_sample(sample)  # decodes both; the mask at the image's resolution
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


# ----------------------------------------------------------------------------------------------
# Finding the download's folders


def _subfolders(folder: Path) -> list[Path]:
    """The visible sub-folders of `folder`, sorted (unreadable folders have none)."""
    try:
        with os.scandir(folder) as entries:
            names = [e.name for e in entries if e.is_dir() and not is_hidden(e.name)]
    except OSError:
        return []
    return [folder / n for n in sorted(names) if n not in JUNK_FOLDERS]


def _search(
    manual_dir: Path, hit: Callable[[Path], bool], what: str, required: bool = True
) -> Path | None:
    """The one folder at most `MAX_DEPTH` levels below `manual_dir` for which `hit` is true,
    searched level by level (the shallowest level with a hit wins; two hits there are an error).
    None if there is none and not `required`.
    """
    level = [manual_dir]
    for _ in range(MAX_DEPTH + 1):
        hits = [folder for folder in level if hit(folder)]
        if len(hits) > 1:
            raise DataError(
                manual_dir,
                f"{what} found more than once: {hits[0]} and {hits[1]}; pass one of them",
            )
        if hits:
            return hits[0]
        level = [sub for folder in level for sub in _subfolders(folder)]
    if required:
        raise DataError(manual_dir, not_found(what))
    return None


def not_found(what: str) -> str:
    """The problem of a folder `_search` did not find ("folder X/ not found here or ...")."""
    return f"{what} not found here or up to {MAX_DEPTH} levels down"


def find_root(manual_dir: Path, required: tuple[str, ...]) -> Path:
    """The folder holding all `required` sub-folders: `manual_dir` or one up to `MAX_DEPTH`
    levels below it (OS junk, hidden folders and `__MACOSX/` are not searched).

    Raises:
        DataError: no such folder up to `MAX_DEPTH` levels down, or two at the same level.
    """
    return _search(
        manual_dir,
        lambda folder: all((folder / name).is_dir() for name in required),
        "folders " + ", ".join(f"{name}/" for name in required),
    )


def find_folder(manual_dir: Path, name: str, required: bool = True) -> Path | None:
    """The folder called `name` at most `MAX_DEPTH` levels below `manual_dir`; if it holds
    a folder of the same name (a ZIP extracted into a folder named after it), that one.

    Returns:
        The folder, or None if there is none and not `required`.

    Raises:
        DataError: no such folder and `required`, or two at the same level.
    """
    found = _search(
        manual_dir, lambda f: f.name == name and f != manual_dir, f"folder {name}/", required
    )
    if found is not None and (found / name).is_dir():
        return found / name
    return found


# ----------------------------------------------------------------------------------------------
# Export


def _check_manual_dir(manual_dir: Path) -> None:
    """A folder with at least one visible entry (tfds's own check is a multi-line assertion)."""
    if not manual_dir.exists():
        raise DataError(manual_dir, "no such folder (the manual download)")
    if not manual_dir.is_dir():
        raise DataError(manual_dir, "not a folder (pass the folder the download was extracted to)")
    try:
        visible = [p for p in manual_dir.iterdir() if not is_hidden(p.name)]
    except OSError as e:
        raise DataError(manual_dir, f"cannot list folder ({e.strerror or e})") from None
    if not any(p.name not in JUNK_FOLDERS for p in visible):
        raise DataError(manual_dir, "empty folder (only OS junk or hidden files)")


def _check_out_dir(out_dir: Path) -> None:
    """`out_dir` is new or an empty folder, and can be created: fails before the build."""
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise DataError(out_dir, "exists and is not a folder")
        try:
            empty = not any(out_dir.iterdir())
        except OSError as e:
            raise DataError(out_dir, f"cannot list folder ({e.strerror or e})") from None
        if not empty:
            raise DataError(out_dir, "exists and is not empty")
    parent = out_dir.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise DataError(out_dir, f"cannot create: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(out_dir, f"cannot create: {parent} is not writable")


def _builder_config(builder_cls, config: str | SegmentationConfig | None):
    """The config object or name; an unknown name is a one-line error listing the known ones."""
    if config is None or isinstance(config, SegmentationConfig):
        return config
    known = [c.name for c in builder_cls.BUILDER_CONFIGS]
    if config not in known:
        raise DataError(
            "config", f"unknown {builder_cls.name} config {config!r} (known: {', '.join(known)})"
        )
    return config


def _prepare(builder: SegmentationBuilder, manual_dir: Path) -> None:
    """`download_and_prepare`; on failure, removes the empty folders and the config metadata
    that tfds created for it (its own temporary folder it removes itself).

    Raises:
        DataError: a bad file of the download, or a tfds data folder that cannot be written.
    """
    root = Path(builder.data_dir_root)
    own = root / builder.name
    made = [root, root / "downloads", root / "downloads" / "extracted", own]
    made += [own / builder.builder_config.name, own / ".config", own / ".config" / "metadata.json"]
    made = [p for p in made if not p.exists()]
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
        )
    except BaseException as e:
        for path in reversed(made):  # deepest first; only what did not exist before
            with contextlib.suppress(OSError):  # a folder tfds filled is not empty: kept
                if path.is_file():
                    path.unlink()
                else:
                    path.rmdir()
        if isinstance(e, OSError):  # the download's own files fail as DataError
            where = e.filename or root
            raise DataError(where, f"cannot build the dataset ({e.strerror or e})") from None
        raise


def export_to_folder(
    builder_name: str,
    manual_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    config: str | SegmentationConfig | None = None,
) -> dict[str, int]:
    """Builds (or reuses) a tfds dataset and writes it in the folder format of `amsam_jax.data`.

    Writes `out_dir/<split>/images/<original file>` (bytes as downloaded) and
    `out_dir/<split>/masks/<stem>.png` (0/255, the image's size), then lists every split with
    `list_samples`. The folder is written next to `out_dir` and renamed when complete
    (`utils.io.atomic_directory`): a failure leaves no partial output. Its settings and the
    download are checked before the (possibly long) build.

    Args:
        builder_name: "tiktok", "human_seg" or "isic2018".
        manual_dir: the manual download (see the builder's docstring).
        out_dir: the folder to create; must not exist or be empty.
        data_dir: tfds data folder (default: tfds's, `~/tensorflow_datasets`).
        config: builder config or its name (default: the builder's first, "paper"/"official").

    Returns:
        Samples written per split (the counts found in the download).

    Raises:
        DataError: a bad download, an unknown config, or an `out_dir` that exists and is not an
            empty folder or cannot be written.
    """
    manual_dir, out_dir = Path(manual_dir), Path(out_dir)
    builder_cls = tfds.builder_cls(builder_name)
    config = _builder_config(builder_cls, config)
    _check_out_dir(out_dir)
    _check_manual_dir(manual_dir)
    builder = builder_cls(
        data_dir=None if data_dir is None else os.fspath(data_dir),
        config=config,
        file_format="array_record",
    )
    if not builder.is_prepared():
        builder.split_samples(manual_dir)  # folders and pairing, before tfds writes anything
        _prepare(builder, manual_dir)
    counts: dict[str, int] = {}
    try:
        with atomic_directory(out_dir, overwrite=out_dir.is_dir()) as tmp:
            for split, source in builder.as_data_source().items():
                for sub in ("images", "masks"):
                    (tmp / split / sub).mkdir(parents=True)
                for i in range(len(source)):
                    example = source[i]
                    stem = example["stem"].decode()
                    image_name = example["filename"].decode()
                    (tmp / split / "images" / image_name).write_bytes(example["image"])
                    Image.fromarray(example["mask"][..., 0]).save(
                        tmp / split / "masks" / f"{stem}.png"
                    )
                counts[split] = len(list_samples(tmp, split))
    except OSError as e:
        if isinstance(e, AmsamError):  # already one line naming the output (utils.io)
            raise
        raise DataError(out_dir, f"cannot write ({e.strerror or e})") from None
    return counts
