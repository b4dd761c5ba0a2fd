"""The object-store registry protocol on a file:// URL (no server needed): push with
CURRENT last, the mirror's checks and its refusal of a corrupted version."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.registry import MODEL_FILE, current_version, load_artifact
from models.registry_remote import ObjectRegistry, is_url
from models.registry_sync import RegistryMirror
from models.standin import publish_standin

pytest.importorskip("fsspec")


def test_push_then_mirror_then_refuse_a_corrupted_version(tmp_path: Path) -> None:
    remote = ObjectRegistry(f"file://{tmp_path}/remote")
    build = tmp_path / "build"
    remote.push(publish_standin(build, version="v1", history_length=4, output_dim=4))
    assert (tmp_path / "remote" / "CURRENT").read_text() == "v1\n"
    assert not [p for p in (tmp_path / "remote").iterdir() if p.name.startswith(".")]
    mirror = RegistryMirror(remote, tmp_path / "cache")
    assert mirror.sync().current == {"default": "v1"}
    v2 = publish_standin(build, version="v2", history_length=4, output_dim=4, seed=1)
    remote.push(v2, make_current=False)
    assert mirror.sync().current == {"default": "v1"}  # no CURRENT names it: not served
    (tmp_path / "remote" / "v2" / MODEL_FILE).write_bytes(b"corrupted")
    remote.set_current("default", "v2")
    report = mirror.sync()
    assert "sha256" in report.refused["default"]
    assert current_version(tmp_path / "cache") == "v1"
    assert load_artifact(tmp_path / "cache").version == "v1"


def test_is_url() -> None:
    assert is_url("s3://bucket/prefix") and is_url("file:///srv/registry")
    assert not is_url("var/registry") and not is_url(Path("/srv/registry"))
