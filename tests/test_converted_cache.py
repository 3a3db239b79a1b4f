"""The cache of Flax variables converted from a weights file."""

from __future__ import annotations

import jax
import numpy as np

from crackjax import bottleneck
from crackjax.backbones import file_sha256, resolve_backbone


def test_converted_variables_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("CRACKJAX_CACHE", str(tmp_path / "cache"))
    resolved = resolve_backbone("efficientnet_lite0")
    sha256 = file_sha256(resolved.weights_path)
    direct = resolved.backbone.load_params(resolved.weights_path)

    bottleneck._write_converted("efficientnet_lite0", sha256, direct)
    cached = bottleneck._read_converted("efficientnet_lite0", sha256)

    assert jax.tree_util.tree_structure(cached) == jax.tree_util.tree_structure(direct)
    for (path, expected), actual in zip(jax.tree_util.tree_leaves_with_path(direct), jax.tree_util.tree_leaves(cached)):
        np.testing.assert_array_equal(actual, np.asarray(expected), err_msg=str(path))


def test_corrupt_converted_file_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("CRACKJAX_CACHE", str(tmp_path / "cache"))
    path = bottleneck._converted_path("efficientnet_lite0", "ab" * 32)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an npz file")

    assert bottleneck._read_converted("efficientnet_lite0", "ab" * 32) is None
