"""HashLedger: hashes remembered across processes, and only for files exactly as they were hashed."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgemoe.bundle import Bundle, BundleError, reader
from edgemoe.bundle.ledger import HashLedger, file_identity
from edgemoe.keys import ExpertKey
from test_bundle_reader import TAMPERED, flip_byte
from test_bundle_writer import write_small_bundle

SHA = "ab" * 32


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    write_small_bundle(tmp_path / "b")
    return tmp_path / "b"


def _count_hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    hashed: list[str] = []
    real = reader.sha256_file
    monkeypatch.setattr(reader, "sha256_file", lambda p, *a: hashed.append(Path(p).name) or real(p, *a))
    return hashed


def test_a_record_round_trips_through_a_new_ledger(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"x" * 100)
    identity = file_identity(target)
    HashLedger(tmp_path / "l.jsonl").record(target, identity, SHA)
    again = HashLedger(tmp_path / "l.jsonl")  # what the next process reads
    assert again.attests(target, identity, SHA)
    assert not again.attests(target, identity, "cd" * 32)  # another expected digest: a re-exported file
    assert not again.attests(tmp_path / "other.bin", identity, SHA)
    changed = (identity[0], identity[1] + 1, identity[2], identity[3])
    assert not again.attests(target, changed, SHA)


def test_a_file_reached_through_a_linked_directory_is_the_same_record(tmp_path: Path) -> None:
    """The bench runs with a temporary cache whose prepacked folder links to the user's: the twins recorded
    there must still count as verified (before, every twin was packed again through the link)."""
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "f.bin"
    target.write_bytes(b"x" * 100)
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    HashLedger(tmp_path / "l.jsonl").record(target, file_identity(target), SHA)
    linked = tmp_path / "link" / "f.bin"
    assert HashLedger(tmp_path / "l.jsonl").attests(linked, file_identity(linked), SHA)


def test_torn_and_foreign_lines_are_skipped_and_the_last_record_wins(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    ledger = HashLedger(path)
    ledger.record(tmp_path / "a", (1, 2, 3, 4), SHA)
    ledger.record(tmp_path / "a", (1, 2, 3, 5), SHA)  # the file changed and was hashed again
    with open(path, "a") as f:
        f.write('not json\n{"path": "b", "identity": [1, 2], "sha256": "x"}\n{"path": "c", "ident')
    again = HashLedger(path)
    assert len(again) == 1
    assert again.attests(tmp_path / "a", (1, 2, 3, 5), SHA) and not again.attests(tmp_path / "a", (1, 2, 3, 4), SHA)


def test_a_ledger_of_mostly_superseded_lines_is_compacted_on_open(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    ledger = HashLedger(path)
    for mtime in range(10):
        ledger.record(tmp_path / "a", (1, mtime, 3, 4), SHA)
    assert len(path.read_text().splitlines()) == 10
    again = HashLedger(path)
    assert len(path.read_text().splitlines()) == 1 and again.attests(tmp_path / "a", (1, 9, 3, 4), SHA)


def test_an_unwritable_ledger_only_costs_a_rehash(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    ledger = HashLedger(blocker / "l.jsonl")  # its directory cannot exist
    ledger.record(tmp_path / "a", (1, 2, 3, 4), SHA)
    assert ledger.attests(tmp_path / "a", (1, 2, 3, 4), SHA)  # this process still remembers
    assert len(HashLedger(blocker / "l.jsonl")) == 0


def test_a_later_process_does_not_hash_what_an_earlier_one_verified(bundle_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    hashed = _count_hashes(monkeypatch)
    ledgers = tmp_path / "verified"
    first = Bundle.open(bundle_dir, ledger=HashLedger.for_directory(bundle_dir, ledgers))
    entry = first.expert_entry(ExpertKey(2, 1))
    first.verify_file(entry)
    assert hashed == ["E1.onnx"]
    second = Bundle.open(bundle_dir, ledger=HashLedger.for_directory(bundle_dir, ledgers))
    assert second.is_verified(entry)
    second.verify_file(entry)
    assert hashed == ["E1.onnx"]  # no second hash
    second.verify_file(entry, recheck=True)
    assert hashed == ["E1.onnx"] * 2
    no_ledger = Bundle.open(bundle_dir)
    no_ledger.verify_file(entry)
    assert hashed == ["E1.onnx"] * 3


def test_a_file_changed_after_it_was_recorded_is_hashed_again_and_caught(bundle_dir: Path, tmp_path: Path) -> None:
    ledgers = tmp_path / "verified"
    first = Bundle.open(bundle_dir, ledger=HashLedger.for_directory(bundle_dir, ledgers))
    entry = first.expert_entry(ExpertKey(2, 1))
    first.verify_file(entry)
    flip_byte(bundle_dir / entry.path)
    later = Bundle.open(bundle_dir, ledger=HashLedger.for_directory(bundle_dir, ledgers))
    assert not later.is_verified(entry)
    with pytest.raises(BundleError, match=TAMPERED):
        later.verify_file(entry)


def test_a_copy_of_a_verified_bundle_is_hashed_afresh(bundle_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    ledgers = tmp_path / "verified"
    Bundle.open(bundle_dir, ledger=HashLedger.for_directory(bundle_dir, ledgers)).verify()
    copy = tmp_path / "copy"
    shutil.copytree(bundle_dir, copy)
    hashed = _count_hashes(monkeypatch)
    bundle = Bundle.open(copy, ledger=HashLedger.for_directory(copy, ledgers))
    bundle.verify_file(bundle.expert_entry(ExpertKey(0, 0)))
    assert hashed == ["E0.onnx"]
