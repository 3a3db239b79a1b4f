"""Faults in real processes: a killed bottleneck, damaged parts, a full disk, two writers at once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crackjax.bottleneck import compute_features, load_backbone, load_feature_matrix
from crackjax.images import load_image
from crackjax.ingest import dataset_table, scan_folder, split_records
from crackjax.preprocess import pixel_store, plan_preprocess, preprocess_images, preprocess_shard
from crackjax.store import CorruptPartError, PartStore

from reliability_helpers import REPO_ROOT, WORKERS, link_images

FEATURE_SIZE = 1280  # EfficientNet-Lite0
INPUT_SIZE = 224
# Features computed in another batch composition differ by float rounding only.
FEATURE_TOLERANCE = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture
def stores(workspace_copy):
    """The copied workspace's pixel store and clean feature store (all 400 images)."""
    pixels = PartStore(next((workspace_copy / "pixels").iterdir()))
    clean = PartStore(next((workspace_copy / "features").iterdir()))
    return pixels, clean


@pytest.fixture(scope="module")
def loaded():
    from crackjax.backbones import resolve_backbone

    resolved = resolve_backbone("efficientnet_lite0", None, download=False)
    return load_backbone(resolved.backbone.name, resolved.weights.name, resolved.weights_path)


def start_worker(command: str, arguments: dict) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, str(WORKERS), command, json.dumps(arguments)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def store_files(folder: Path) -> dict[str, list[str]]:
    names = sorted(path.name for path in folder.iterdir())
    return {
        "parts": [name for name in names if name.startswith("part-") and name.endswith(".parquet")],
        "temporary": [name for name in names if name.startswith(".tmp-")],
        "corrupt": [name for name in names if name.endswith(".corrupt")],
    }


def keys_read_once(store: PartStore) -> list[str]:
    """Return every key that `iter_batches` yields, in order; duplicates would repeat."""
    return [key for batch in store.iter_batches(None) for key in batch.column("sha256").to_pylist()]


def test_killed_bottleneck_resumes_from_written_parts(tmp_path, stores, loaded):
    pixels, clean = stores
    keys = sorted(pixels.keys())[:48]
    features = PartStore(tmp_path / "features")

    worker = start_worker("bottleneck", {"pixels": str(pixels.folder), "features": str(features.folder), "keys": keys, "batch_size": 8, "part_size": 8})
    deadline = time.monotonic() + 180
    while not store_files(features.folder)["parts"]:
        assert worker.poll() is None, worker.communicate()
        assert time.monotonic() < deadline, "no part written within 180 s"
        time.sleep(0.02)
    worker.send_signal(signal.SIGKILL)
    worker.communicate()
    assert worker.returncode == -signal.SIGKILL

    written = features.keys()
    assert 0 < len(written) < len(keys)
    assert store_files(features.folder)["corrupt"] == []

    cached, computed, _ = compute_features(loaded, pixels, features, keys, batch_size=8)

    assert cached == len(written)
    assert computed == len(keys) - len(written)
    resumed = load_feature_matrix(features, keys, FEATURE_SIZE)
    np.testing.assert_allclose(resumed, load_feature_matrix(clean, keys, FEATURE_SIZE), **FEATURE_TOLERANCE)
    assert sorted(keys_read_once(features)) == keys


def copy_rows(source: PartStore, target: PartStore, keys: list[str], part_size: int) -> list[Path]:
    """Write the rows of `keys` from `source` into `target` as parts of `part_size` rows."""
    rows = pa.Table.from_batches(list(source.iter_batches(set(keys))))
    rows = rows.take(np.argsort(rows.column("sha256").to_pylist()))
    return [target.write_part(rows.slice(start, part_size)) for start in range(0, rows.num_rows, part_size)]


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        value = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([value ^ 0xFF]))


def middle_of_features_page(path: Path) -> int:
    """Return the offset of the middle of the first data page of the `features` column.

    The column chunk may start with a dictionary page; the data pages follow it.
    """
    column = pq.ParquetFile(path).metadata.row_group(0).column(1)
    start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
    end = start + column.total_compressed_size
    return column.data_page_offset + (end - column.data_page_offset) // 2


def test_damaged_feature_parts_recomputed(tmp_path, stores, loaded):
    pixels, clean = stores
    keys = sorted(clean.keys())[:32]
    features = PartStore(tmp_path / "features")
    intact, truncated, page_edited, footer_edited = copy_rows(clean, features, keys, 8)

    truncated.write_bytes(truncated.read_bytes()[:-100])
    flip_byte(page_edited, middle_of_features_page(page_edited))
    flip_byte(footer_edited, footer_edited.stat().st_size - 200)  # in the Thrift footer

    present = features.keys()

    assert len(present) == 8
    files = store_files(features.folder)
    assert files["parts"] == [intact.name]
    assert sorted(files["corrupt"]) == sorted(path.name + ".corrupt" for path in (truncated, page_edited, footer_edited))

    cached, computed, _ = compute_features(loaded, pixels, features, keys, batch_size=8)
    assert (cached, computed) == (8, 24)
    np.testing.assert_allclose(load_feature_matrix(features, keys, FEATURE_SIZE), load_feature_matrix(clean, keys, FEATURE_SIZE), **FEATURE_TOLERANCE)


def test_page_checksum_catches_edit_without_name_digest(tmp_path, stores):
    # Parts written before names carried a content digest rely on Parquet page checksums.
    _, clean = stores
    keys = sorted(clean.keys())[:8]
    features = PartStore(tmp_path / "features")
    (part,) = copy_rows(clean, features, keys, 8)
    legacy = part.with_name(part.name.split("-")[0] + "-" + part.name.split("-")[1] + ".parquet")
    part.rename(legacy)
    flip_byte(legacy, middle_of_features_page(legacy))

    assert features.keys() == set(keys)  # the key column's pages are intact
    with pytest.raises(CorruptPartError, match="CRC checksum verification failed"):
        load_feature_matrix(features, keys, FEATURE_SIZE)
    assert store_files(features.folder) == {"parts": [], "temporary": [], "corrupt": [legacy.name + ".corrupt"]}


@pytest.fixture
def small_dataset(tmp_path, sdnet_images):
    """40 real images (20 per label) with their dataset table written to `dataset.parquet`."""
    root = tmp_path / "assets"
    for label, paths in sdnet_images.items():
        link_images(root / label, paths[:20])
    table = dataset_table(split_records(scan_folder(root).records))
    pq.write_table(table, tmp_path / "dataset.parquet")
    return root, table, tmp_path / "dataset.parquet"


def test_damaged_pixel_part_decoded_again(tmp_path, small_dataset):
    root, table, _ = small_dataset
    workspace = tmp_path / "workspace"
    preprocess_images(root, table, workspace, INPUT_SIZE, shard_size=8)
    store = pixel_store(workspace, INPUT_SIZE)
    damaged = store.part_paths()[2]
    flip_byte(damaged, damaged.stat().st_size // 2)

    again = preprocess_images(root, table, workspace, INPUT_SIZE, shard_size=8)

    assert (again.cached, again.computed) == (32, 8)
    by_key = dict(zip(table["sha256"].to_pylist(), table["path"].to_pylist()))
    for batch in store.iter_batches(None):
        for key, data in zip(batch.column("sha256").to_pylist(), batch.column("pixels").to_pylist()):
            np.testing.assert_array_equal(np.frombuffer(data, np.uint8).reshape(INPUT_SIZE, INPUT_SIZE, 3), load_image(root / by_key[key], INPUT_SIZE))


def check_store_after_failure(folder: Path, expected_keys: int) -> None:
    store = PartStore(folder)
    files = store_files(folder)
    assert files["temporary"] == []
    assert files["corrupt"] == []
    assert len(store.keys()) == expected_keys
    assert len(set(keys_read_once(store))) == expected_keys


def test_file_size_limit_gives_clear_error(tmp_path, small_dataset):
    root, table, dataset = small_dataset
    workspace = tmp_path / "workspace"
    store = pixel_store(workspace, INPUT_SIZE)
    shards, _ = plan_preprocess(table, store, shard_size=8)
    for shard in shards[:2]:
        preprocess_shard(root, shard, store, INPUT_SIZE)
    folder = store.folder

    # A part of 8 decoded images is about 420 kB; a 200 kB limit fails the next write with EFBIG.
    worker = start_worker("preprocess", {
        "root": str(root), "dataset": str(dataset), "workspace": str(workspace),
        "input_size": INPUT_SIZE, "shard_size": 8, "file_size_limit": 200_000,
    })
    _, stderr = worker.communicate(timeout=120)

    assert worker.returncode == 3, stderr
    assert "Traceback" not in stderr
    assert "error: DiskFullError: cannot write" in stderr
    assert str(folder) in stderr
    assert "File too large" in stderr
    assert "free space" in stderr
    check_store_after_failure(folder, 16)

    resumed = preprocess_images(root, table, workspace, INPUT_SIZE, shard_size=8)
    assert (resumed.cached, resumed.computed) == (16, 24)


def test_full_tmpfs_gives_clear_error(tmp_path, small_dataset):
    root, _, dataset = small_dataset
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("this platform cannot create a private mount namespace (unshare -rm), so no small tmpfs can be mounted")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    arguments = json.dumps({"root": str(root), "dataset": str(dataset), "workspace": str(mount / "workspace"), "input_size": INPUT_SIZE, "shard_size": 4})
    check = (
        "import json, sys; from crackjax.preprocess import pixel_store; store = pixel_store(sys.argv[1], 224); "
        "keys = [k for b in store.iter_batches(None) for k in b.column('sha256').to_pylist()]; "
        "print(json.dumps({'keys': len(store.keys()), 'read': len(keys), 'unique': len(set(keys)), "
        "'files': sorted(p.name for p in store.folder.iterdir())}))"
    )
    # A part of 4 decoded images is about 210 kB; a 1 MiB tmpfs has room for a few, then the disk is full (ENOSPC).
    script = (
        f"mount -t tmpfs -o size=1m tmpfs {mount} && "
        f"{sys.executable} {WORKERS} preprocess '{arguments}'; echo exit=$?; "
        f"{sys.executable} -c \"{check}\" {mount / 'workspace'}"
    )
    child = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), capture_output=True, text=True, timeout=120)

    assert "exit=3" in child.stdout, child.stderr
    assert "Traceback" not in child.stderr
    assert "error: DiskFullError: cannot write" in child.stderr
    assert "No space left on device" in child.stderr
    state = json.loads(child.stdout.strip().splitlines()[-1])
    assert state["keys"] > 0
    assert state["keys"] % 4 == 0
    assert state["read"] == state["unique"] == state["keys"]
    assert not [name for name in state["files"] if name.startswith(".tmp-") or name.endswith(".corrupt")]


def test_concurrent_preprocess_runs_agree(tmp_path, small_dataset):
    root, table, dataset = small_dataset
    workspace = tmp_path / "workspace"
    arguments = {"root": str(root), "dataset": str(dataset), "workspace": str(workspace), "input_size": INPUT_SIZE}
    workers = [start_worker("preprocess", {**arguments, "shard_size": size}) for size in (8, 6)]
    outputs = [worker.communicate(timeout=120) for worker in workers]

    for worker, (_, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr
    store = pixel_store(workspace, INPUT_SIZE)
    assert store_files(store.folder)["temporary"] == []
    assert store_files(store.folder)["corrupt"] == []
    read = keys_read_once(store)
    assert sorted(read) == sorted(set(table["sha256"].to_pylist()))
    by_key = dict(zip(table["sha256"].to_pylist(), table["path"].to_pylist()))
    for batch in store.iter_batches(None):
        for key, data in zip(batch.column("sha256").to_pylist(), batch.column("pixels").to_pylist()):
            np.testing.assert_array_equal(np.frombuffer(data, np.uint8).reshape(INPUT_SIZE, INPUT_SIZE, 3), load_image(root / by_key[key], INPUT_SIZE))


def test_concurrent_bottleneck_runs_agree(tmp_path, stores):
    pixels, clean = stores
    keys = sorted(pixels.keys())[100:124]
    features = PartStore(tmp_path / "features")
    arguments = {"pixels": str(pixels.folder), "features": str(features.folder), "keys": keys, "batch_size": 8}
    # Different part sizes give parts that overlap in keys, so readers must drop duplicates.
    workers = [start_worker("bottleneck", {**arguments, "part_size": size}) for size in (8, 12)]
    outputs = [worker.communicate(timeout=300) for worker in workers]

    for worker, (_, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr
    files = store_files(features.folder)
    assert files["temporary"] == []
    assert files["corrupt"] == []
    assert features.keys() == set(keys)
    read = keys_read_once(features)
    assert sorted(read) == keys
    np.testing.assert_allclose(load_feature_matrix(features, keys, FEATURE_SIZE), load_feature_matrix(clean, keys, FEATURE_SIZE), **FEATURE_TOLERANCE)
