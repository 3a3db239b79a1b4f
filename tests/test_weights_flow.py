"""crack-train downloads missing weights through the registry, from a server on 127.0.0.1.

The BiT entries state no checksum, so crackjax records the sha256 of the first
download and trusts the cache afterwards. The test serves a BiT-S R50x1 `.npz` in the
official layout (random values) through `CRACKJAX_WEIGHTS_MIRROR`, the variable for
sites that serve the publishers' files from an internal server.
"""

from __future__ import annotations

import functools
import http.server
import threading

import jax
import numpy as np
import pytest

from crackjax.backbones import file_sha256, get_backbone, get_weights_entry
from crackjax.export import read_manifest
from crackjax.weights.cache import cached_path
from crackjax.weights.download import read_recorded_sha256
from flows.crack_train import crack_train


def _random_bit_npz(path, backbone_name: str) -> None:
    backbone = get_backbone(backbone_name)
    shapes = jax.eval_shape(backbone.build().init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32))
    rng = np.random.default_rng(0)
    arrays = {}
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(shapes["params"]):
        name = "resnet/" + "/".join(entry.key for entry in key_path)
        if name.endswith("kernel"):
            arrays[name] = rng.normal(0.0, 0.05, leaf.shape).astype(np.float32)
        elif name.endswith("gamma"):
            arrays[name] = rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        else:
            arrays[name] = rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)
    np.savez(path, **arrays)


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def weights_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    _CountingHandler.requests = []
    handler = functools.partial(_CountingHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/bit"
    server.shutdown()
    server.server_close()


def test_flow_downloads_missing_weights(tmp_path, monkeypatch, small_assets, weights_server):
    served, base_url = weights_server
    entry = get_weights_entry("bit_s_r50x1")
    (served / "bit").mkdir()
    _random_bit_npz(served / "bit" / entry.file_name, "bit_s_r50x1")
    monkeypatch.setenv("CRACKJAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CRACKJAX_WEIGHTS_MIRROR", base_url)

    result = crack_train(assets=str(small_assets), workspace=str(tmp_path / "workspace"), backbone="bit_s_r50x1", head={"epochs": 5})

    cached = cached_path(entry)
    assert cached.is_file()
    assert _CountingHandler.requests == [f"/bit/{entry.file_name}"]
    assert read_recorded_sha256(entry) == file_sha256(cached)
    manifest = read_manifest(result["model_dir"])
    assert manifest["backbone"]["name"] == "bit_s_r50x1"
    assert manifest["backbone"]["weights_sha256"] == file_sha256(cached)

    again = crack_train(assets=str(small_assets), workspace=str(tmp_path / "workspace"), backbone="bit_s_r50x1", head={"epochs": 5})

    assert len(_CountingHandler.requests) == 1
    assert again["features_computed"] == 0
