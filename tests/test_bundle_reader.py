"""Bundle.open / verify / verify_file: every way a bundle can be wrong gives one clear line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edgemoe.bundle import Bundle, BundleError, reader
from edgemoe.keys import ExpertKey
from test_bundle_writer import write_small_bundle

TAMPERED = "^experts/L2/E1.onnx failed its sha256 check: the bundle is corrupt or was modified$"


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    write_small_bundle(tmp_path / "b")
    return tmp_path / "b"


def flip_byte(path: Path, at: int = 10) -> None:
    """Change one byte in place, keeping size and (to defeat coarse clocks) moving mtime on."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_open_reads_the_manifest_without_hashing(bundle_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader, "sha256_file", lambda *a, **k: pytest.fail("open() must not hash"))
    bundle = Bundle.open(bundle_dir)
    assert len(bundle.manifest.experts()) == 4
    assert bundle.path_of(bundle.expert_entry(ExpertKey(2, 1))) == bundle_dir / "experts/L2/E1.onnx"


def test_tampered_graph_is_caught(bundle_dir: Path) -> None:
    flip_byte(bundle_dir / "experts/L2/E1.onnx")
    bundle = Bundle.open(bundle_dir)  # same size: open's stat cannot tell
    with pytest.raises(BundleError, match=TAMPERED):
        bundle.verify()
    with pytest.raises(BundleError, match=TAMPERED):
        bundle.verify_file(bundle.expert_entry(ExpertKey(2, 1)))
    bundle.verify([bundle.expert_entry(ExpertKey(0, 0))])  # other files still pass


def test_verify_file_hashes_once_until_the_file_changes(bundle_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hashed: list[str] = []
    real = reader.sha256_file
    monkeypatch.setattr(reader, "sha256_file", lambda p, *a: hashed.append(Path(p).name) or real(p, *a))
    bundle = Bundle.open(bundle_dir)
    entry = bundle.expert_entry(ExpertKey(2, 1))
    assert not bundle.is_verified(entry)
    bundle.verify_file(entry)
    bundle.verify_file(entry)
    assert hashed == ["E1.onnx"] and bundle.is_verified(entry)
    bundle.verify_file(entry, recheck=True)
    assert hashed == ["E1.onnx"] * 2
    flip_byte(bundle_dir / entry.path)  # a rewrite moves mtime: the remembered result no longer counts
    with pytest.raises(BundleError, match=TAMPERED):
        bundle.verify_file(entry)


def test_truncated_file_is_caught(bundle_dir: Path) -> None:
    path = bundle_dir / "experts/L2/E1.onnx"
    bundle = Bundle.open(bundle_dir)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 7)
    message = f"^experts/L2/E1.onnx is {size - 7} bytes but the manifest says {size}: the bundle is truncated"
    with pytest.raises(BundleError, match=message):
        bundle.verify()
    with pytest.raises(BundleError, match=message):
        bundle.verify_file(bundle.expert_entry(ExpertKey(2, 1)))
    with pytest.raises(BundleError, match=message):
        Bundle.open(bundle_dir)


def test_missing_file_is_named(bundle_dir: Path) -> None:
    (bundle_dir / "routers.safetensors").unlink()
    with pytest.raises(BundleError, match="^routers.safetensors is listed in the manifest but missing from"):
        Bundle.open(bundle_dir)
    bundle = Bundle.open(bundle_dir, check_sizes=False)
    with pytest.raises(BundleError, match="routers.safetensors is listed"):
        bundle.verify()


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        Bundle.open(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="is not a directory"):
        Bundle.open(tmp_path / "file")
    with pytest.raises(BundleError, match=r"is not an edgemoe bundle \(no manifest.json\)$"):
        Bundle.open(tmp_path)


def test_bad_manifest_json_and_newer_schema(bundle_dir: Path) -> None:
    manifest = bundle_dir / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text[:-20])
    with pytest.raises(BundleError, match="manifest.json is not valid JSON"):
        Bundle.open(bundle_dir)
    d = json.loads(text)
    d["schema_version"] = 2
    manifest.write_text(json.dumps(d))
    with pytest.raises(BundleError, match=r"^bundle schema 2 is newer than this edgemoe \(reads 1\); upgrade edgemoe$"):
        Bundle.open(bundle_dir)


def test_verify_reports_progress(bundle_dir: Path) -> None:
    bundle = Bundle.open(bundle_dir)
    seen: list[tuple[int, int, str]] = []
    bundle.verify(progress=lambda done, total, label: seen.append((done, total, label)))
    assert seen[-1][0] == seen[-1][1] == bundle.manifest.total_bytes
    assert {label for _, _, label in seen} == {e.path for e in bundle.manifest.files}
