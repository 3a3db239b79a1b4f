"""The rejected-files policy on real folders: what is skipped, what is reported, what fails the run."""

from __future__ import annotations

import csv
import os
import shutil

import numpy as np
import pyarrow.compute as pc
import pytest
from PIL import Image

from crackjax.errors import DatasetError, ImageError
from crackjax.images import load_image
from crackjax.ingest import CONFLICT, UNREADABLE, UNSUPPORTED, dataset_table, scan_folder, split_records
from crackjax.preprocess import pixel_store, preprocess_images
from crackjax.stages import ingest_stage

from reliability_helpers import link_images

INPUT_SIZE = 64  # small decodes keep the suite fast; the policy does not depend on size


@pytest.fixture
def assets(tmp_path, sdnet_images):
    """20 real images per label, symlinked into `assets/CD` and `assets/UD`."""
    root = tmp_path / "assets"
    for label, paths in sdnet_images.items():
        link_images(root / label, paths[:20])
    return root


def truncate_copies(folder, sources, count):
    """Write the first half of `count` real JPEGs into `folder`: headers read, pixels do not."""
    names = []
    for index, source in enumerate(sources[-count:]):
        data = source.read_bytes()
        name = f"truncated-{index}.jpg"
        (folder / name).write_bytes(data[: len(data) // 2])
        names.append(f"{folder.name}/{name}")
    return names


def rejected_by_path(scan):
    return {item.path: item for item in scan.rejected}


def prepare(root, workspace, **options):
    """Scan, split and preprocess `root` the way the flow's first stages do."""
    scan = scan_folder(root)
    # Half of the rest goes to test, so a few rejected files cannot empty a split.
    table = dataset_table(split_records(scan.records, validation_fraction=0.5))
    return scan, preprocess_images(
        root, table, workspace, INPUT_SIZE, total_files=table.num_rows + len(scan.rejected), ingest_rejected=scan.rejected, **options
    )


def test_hidden_and_unsupported_files(assets, sdnet_images):
    (assets / "CD" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))
    (assets / "CD" / "._7001-1.jpg").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # AppleDouble resource fork
    (assets / "UD" / "notes.txt").write_text("deck 7001 inspected\n", encoding="utf-8")
    frames = [Image.open(path).convert("RGB") for path in sdnet_images["UD"][:2]]
    frames[0].save(assets / "UD" / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)

    scan = scan_folder(assets)

    assert len(scan.records) == 40
    assert scan.hidden_skipped == 2
    rejected = rejected_by_path(scan)
    assert set(rejected) == {"UD/notes.txt", "UD/animated.gif"}
    assert "unsupported file type '.txt'" in rejected["UD/notes.txt"].reason
    assert rejected["UD/notes.txt"].kind == UNSUPPORTED
    assert "animated image with 2 frames" in rejected["UD/animated.gif"].reason
    assert rejected["UD/animated.gif"].kind == UNREADABLE


def test_unicode_and_spaces_in_names(tmp_path, sdnet_images):
    root = tmp_path / "사진 assets"
    cracked = root / "균열 있음"
    sound = root / "no crack é"
    cracked.mkdir(parents=True)
    sound.mkdir(parents=True)
    for index, path in enumerate(sdnet_images["CD"][:20]):
        os.symlink(path, cracked / f"갑판 {index} ü.jpg")
    for index, path in enumerate(sdnet_images["UD"][:20]):
        os.symlink(path, sound / f"deck photo {index}.JPG")
    (sound / "메모 .txt").write_text("x", encoding="utf-8")

    ingested = ingest_stage(root, tmp_path / "workspace")
    assert ingested["labels"] == ["no crack é", "균열 있음"]
    assert sum(ingested["counts"]["균열 있음"].values()) == 20
    with open(ingested["rejected"], newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"] for row in rows] == ["no crack é/메모 .txt"]

    scan, result = prepare(root, tmp_path / "workspace")
    assert result.computed == 40
    store = pixel_store(tmp_path / "workspace", INPUT_SIZE)
    first = scan.records[-1]
    stored = next(store.iter_batches({first.sha256})).column("pixels")[0].as_py()
    np.testing.assert_array_equal(np.frombuffer(stored, np.uint8).reshape(INPUT_SIZE, INPUT_SIZE, 3), load_image(root / first.path, INPUT_SIZE))


def test_symlinked_class_folder(tmp_path, sdnet_dir, sdnet_images):
    root = tmp_path / "assets"
    link_images(root / "CD", sdnet_images["CD"][:20])
    os.symlink(sdnet_dir / "UD", root / "UD", target_is_directory=True)
    scan = scan_folder(root)
    labels = [record.label for record in scan.records]
    assert labels.count("UD") == len(sdnet_images["UD"])
    assert labels.count("CD") == 20
    assert scan.rejected == []


def test_symlink_loops_reported_not_followed(assets):
    os.symlink(assets / "CD", assets / "CD" / "again", target_is_directory=True)
    os.symlink(assets, assets / "UD" / "up", target_is_directory=True)
    os.symlink(assets / "CD" / "b.jpg", assets / "CD" / "a.jpg")
    os.symlink(assets / "CD" / "a.jpg", assets / "CD" / "b.jpg")
    os.symlink(assets / "CD" / "gone.jpg", assets / "UD" / "dangling.jpg")

    scan = scan_folder(assets)

    assert len(scan.records) == 40
    rejected = rejected_by_path(scan)
    assert set(rejected) == {"CD/again", "UD/up", "CD/a.jpg", "CD/b.jpg", "UD/dangling.jpg"}
    assert "already scanned" in rejected["CD/again"].reason
    assert "already scanned" in rejected["UD/up"].reason
    assert "symbolic link loop" in rejected["CD/a.jpg"].reason
    assert "broken symbolic link" in rejected["UD/dangling.jpg"].reason


def test_label_conflict_reported_per_file(assets, sdnet_images):
    shutil.copyfile(sdnet_images["CD"][0], assets / "UD" / "copy of a cracked deck.jpg")

    scan = scan_folder(assets)

    rejected = rejected_by_path(scan)
    conflict = {path: item for path, item in rejected.items() if item.kind == CONFLICT}
    assert set(conflict) == {f"CD/{sdnet_images['CD'][0].name}", "UD/copy of a cracked deck.jpg"}
    for item in conflict.values():
        assert "labelled CD and UD" in item.reason
        assert "UD/copy of a cracked deck.jpg" in item.reason
    assert len(scan.records) == 39

    with pytest.raises(DatasetError, match="label conflict"):
        scan_folder(assets, strict=True)


@pytest.mark.parametrize("content", ["nothing", "hidden", "unreadable"])
def test_empty_class_folder_fails(assets, content):
    empty = assets / "cracked edge"
    empty.mkdir()
    if content == "hidden":
        (empty / ".DS_Store").write_bytes(b"\x00" * 8)
    elif content == "unreadable":
        (empty / "broken.jpg").write_bytes(b"")

    with pytest.raises(DatasetError) as raised:
        scan_folder(assets)

    message = str(raised.value)
    assert str(empty) in message
    assert "has no usable images" in message
    assert "add readable images to it or remove the folder" in message
    if content == "unreadable":
        assert "cracked edge/broken.jpg: empty file" in message
        assert [item.path for item in raised.value.rejected] == ["cracked edge/broken.jpg"]


def test_only_one_class_fails(tmp_path, sdnet_images):
    root = tmp_path / "assets"
    link_images(root / "CD", sdnet_images["CD"][:10])
    scan = scan_folder(root)
    with pytest.raises(DatasetError, match=r"only one label found \('CD'\).*add a folder of images for another label"):
        split_records(scan.records)


def test_too_few_images_for_split_fails(tmp_path, sdnet_images):
    root = tmp_path / "assets"
    link_images(root / "CD", sdnet_images["CD"][:2])
    link_images(root / "UD", sdnet_images["UD"][:20])
    scan = scan_folder(root)
    with pytest.raises(DatasetError) as raised:
        split_records(scan.records)
    message = str(raised.value)
    assert "label 'CD' has 2 images, too few to split" in message
    assert "add images to 'CD'" in message


def test_undecodable_files_skipped_and_reported(assets, tmp_path, sdnet_images):
    truncated = truncate_copies(assets / "CD", sdnet_images["CD"], 3)

    scan, result = prepare(assets, tmp_path / "workspace", max_rejected_fraction=0.1)

    assert scan.rejected == []  # the headers are intact, so ingest keeps them
    assert sorted(item.path for item in result.rejected) == sorted(truncated)
    assert all("truncated" in item.reason for item in result.rejected)
    assert result.table.num_rows == 40
    assert not set(truncated) & set(result.table["path"].to_pylist())
    assert result.computed == 40


def test_rejected_fraction_over_limit_fails(assets, tmp_path, sdnet_images):
    truncated = truncate_copies(assets / "CD", sdnet_images["CD"], 3)
    for index in range(3):
        (assets / "UD" / f"noise-{index}.jpg").write_bytes(os.urandom(3000))
    (assets / "UD" / "notes.txt").write_text("not an image", encoding="utf-8")

    # 3 truncated + 3 unidentifiable of 46 image files = 13%, over 10%; notes.txt does not count.
    with pytest.raises(DatasetError) as raised:
        prepare(assets, tmp_path / "workspace", max_rejected_fraction=0.1)
    message = str(raised.value)
    assert "6 of 46 image files (13%) are unreadable, over the limit of 10%" in message
    assert "raise --max-rejected-fraction" in message
    assert {item.path for item in raised.value.rejected} >= set(truncated) | {"UD/notes.txt"}

    scan, result = prepare(assets, tmp_path / "workspace", max_rejected_fraction=0.15)
    assert result.table.num_rows == 40


def test_class_empty_after_decoding_fails(tmp_path, sdnet_images):
    root = tmp_path / "assets"
    link_images(root / "CD", sdnet_images["CD"][:20])
    (root / "UD").mkdir()
    truncate_copies(root / "UD", sdnet_images["UD"], 20)

    with pytest.raises(DatasetError) as raised:
        prepare(root, tmp_path / "workspace", max_rejected_fraction=1.0)
    message = str(raised.value)
    assert "label 'UD' has no readable images left: all 20 failed to decode" in message
    assert "UD/truncated-" in message
    assert "image file is truncated" in message


def test_strict_fails_on_first_bad_file(assets, tmp_path, sdnet_images):
    noise = assets / "UD" / "noise.jpg"
    noise.write_bytes(os.urandom(3000))
    with pytest.raises(ImageError) as raised:
        scan_folder(assets, strict=True)
    assert raised.value.path == str(noise)
    assert "--strict" in str(raised.value)

    noise.unlink()
    truncated = truncate_copies(assets / "UD", sdnet_images["UD"], 1)
    scan = scan_folder(assets, strict=True)
    table = dataset_table(split_records(scan.records))
    with pytest.raises(ImageError) as raised:
        preprocess_images(assets, table, tmp_path / "workspace", INPUT_SIZE, strict=True)
    assert raised.value.path == str(assets / truncated[0])
    assert "truncated" in raised.value.reason


def test_rejected_report_written_beside_dataset(assets, tmp_path):
    (assets / "CD" / "empty.jpg").write_bytes(b"")
    (assets / "UD" / "readme.txt").write_text("x", encoding="utf-8")

    ingested = ingest_stage(assets, tmp_path / "workspace")

    with open(ingested["rejected"], newline="", encoding="utf-8") as handle:
        rows = {row["path"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"CD/empty.jpg", "UD/readme.txt"}
    assert rows["CD/empty.jpg"]["reason"].startswith("empty file (0 bytes)")
    assert rows["CD/empty.jpg"]["kind"] == UNREADABLE
    assert rows["UD/readme.txt"]["kind"] == UNSUPPORTED
    assert os.path.dirname(ingested["rejected"]) == os.path.dirname(ingested["dataset"])
