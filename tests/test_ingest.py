"""Ingest: labels, hashing and the deterministic stratified split, on real images."""

from __future__ import annotations

import collections
import shutil

import pytest

from crackjax.digests import file_digest
from crackjax.errors import DatasetError
from crackjax.ingest import (
    dataset_digest,
    dataset_table,
    folder_fingerprint,
    label_from_prefix,
    scan_folder,
    split_records,
)


def test_scan_sdnet_labels_from_folders(sdnet_dir):
    scan = scan_folder(sdnet_dir)

    labels = collections.Counter(record.label for record in scan.records)
    assert labels == {"CD": 200, "UD": 200}
    assert scan.rejected == []
    first = scan.records[0]
    assert first.path == "CD/7001-115.jpg"
    assert first.sha256 == file_digest(sdnet_dir / "CD" / "7001-115.jpg")


def test_split_matches_tutorial_fractions(sdnet_dir):
    assigned = split_records(scan_folder(sdnet_dir).records)

    counts = collections.Counter((record.label, split) for record, split in assigned)
    for label in ("CD", "UD"):
        assert counts[(label, "train")] == 140
        assert counts[(label, "validation")] == 54
        assert counts[(label, "test")] == 6


def test_split_deterministic_and_seeded(sdnet_dir):
    records = scan_folder(sdnet_dir).records

    first = dataset_table(split_records(records, seed=0))
    again = dataset_table(split_records(list(reversed(records)), seed=0))
    other = dataset_table(split_records(records, seed=1))

    assert first.equals(again)
    assert dataset_digest(first) == dataset_digest(again)
    assert dataset_digest(first) != dataset_digest(other)


def test_split_fractions_configurable(sdnet_dir):
    assigned = split_records(scan_folder(sdnet_dir).records, train_fraction=0.5, validation_fraction=0.5)

    counts = collections.Counter(split for _, split in assigned)
    assert counts == {"train": 200, "validation": 100, "test": 100}


def test_adding_image_keeps_most_assignments(tmp_path, sdnet_images):
    root = tmp_path / "assets"
    for label, paths in sdnet_images.items():
        (root / label).mkdir(parents=True)
        for path in paths[:50]:
            shutil.copy(path, root / label / path.name)
    before = {record.path: split for record, split in split_records(scan_folder(root).records)}

    shutil.copy(sdnet_images["CD"][60], root / "CD" / "new.jpg")
    after = {record.path: split for record, split in split_records(scan_folder(root).records)}

    moved = [path for path in before if before[path] != after[path]]
    assert len(moved) <= 2


def test_labels_from_file_name_prefix(tmp_path, sdnet_images):
    root = tmp_path / "flat"
    root.mkdir()
    for label, paths in sdnet_images.items():
        for path in paths[:10]:
            shutil.copy(path, root / f"{label}_{path.name}")

    scan = scan_folder(root, label_from="prefix", prefix_separator="_")

    assert collections.Counter(record.label for record in scan.records) == {"CD": 10, "UD": 10}
    assert label_from_prefix("CD_7001-1.jpg", "_") == "CD"
    assert label_from_prefix("7001-1.jpg", "_") is None


def test_nested_folders_take_top_label(tmp_path, sdnet_images):
    root = tmp_path / "assets"
    for label, paths in sdnet_images.items():
        nested = root / label / "2026-05" / "bridge 12"
        nested.mkdir(parents=True)
        for path in paths[:5]:
            shutil.copy(path, nested / path.name)

    scan = scan_folder(root)

    assert {record.label for record in scan.records} == {"CD", "UD"}
    assert all("/2026-05/bridge 12/" in record.path for record in scan.records)


def test_one_label_is_rejected(tmp_path, sdnet_images):
    root = tmp_path / "assets"
    (root / "CD").mkdir(parents=True)
    for path in sdnet_images["CD"][:10]:
        shutil.copy(path, root / "CD" / path.name)

    with pytest.raises(DatasetError, match="only one label found"):
        split_records(scan_folder(root).records)


def test_folder_fingerprint_changes_on_add(tmp_path, sdnet_images):
    root = tmp_path / "assets"
    (root / "CD").mkdir(parents=True)
    shutil.copy(sdnet_images["CD"][0], root / "CD" / "a.jpg")
    before = folder_fingerprint(root)

    shutil.copy(sdnet_images["CD"][1], root / "CD" / "b.jpg")

    assert folder_fingerprint(root) != before
