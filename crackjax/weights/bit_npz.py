"""Load the official BiT `.npz` checkpoints onto Flax variables by name.

A BiT `.npz` file (storage.googleapis.com/bit_models) maps names such as
`resnet/block1/unit01/a/group_norm/gamma` to numpy arrays: convolution kernels in
`(height, width, in, out)` layout and GroupNorm `gamma`/`beta` of shape `(channels,)`.
The Flax model in `crackjax.backbones.bit` uses the same names without the `resnet/`
prefix, so every parameter is looked up under `resnet/` plus its Flax path.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util
from numpy.lib.npyio import NpzFile

from crackjax.weights.entry import WeightsError, WeightsMissingError

NPZ_PREFIX = "resnet/"
# The pre-training classifier (`resnet/head/conv2d/kernel` and `.../bias`). The loader skips it
# because crackjax trains its own head.
HEAD_PREFIX = NPZ_PREFIX + "head/"


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read every array of the `.npz` file at `path`.

    Raises WeightsMissingError if the file does not exist and WeightsError if it is
    not a readable `.npz` archive (a bare `.npy` array counts as invalid too).
    """
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError as error:
        raise WeightsMissingError(f"weights file {path} not found. Check the path") from error
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise WeightsError(f"weights file {path} is not a valid .npz archive: {error}") from error

    if not isinstance(loaded, NpzFile):
        raise WeightsError(f"weights file {path} is not a valid .npz archive: it contains a single array")

    with loaded as archive:
        try:
            return {name: archive[name] for name in archive.files}
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise WeightsError(f"weights file {path} is not a valid .npz archive: {error}") from error


def load_bit_npz(path: str | Path, expected: Mapping[str, Any]) -> dict[str, Any]:
    """Load a BiT `.npz` file onto a Flax parameter tree of known shapes.

    `expected` is the nested `params` collection of the model, with arrays or
    `jax.ShapeDtypeStruct` leaves (for example from `jax.eval_shape(model.init, ...)`).
    Returns `{"params": ...}` with float32 numpy leaves in the same structure.

    Tensors under `resnet/head/` are ignored. Raises WeightsError naming the first
    tensor that is missing or has the wrong shape, or the first unexpected tensor
    (such as a unit of a deeper network), together with the file.
    """
    arrays = read_npz(path)
    expected_flat = traverse_util.flatten_dict(expected, sep="/")

    loaded: dict[str, np.ndarray] = {}
    for flax_name in sorted(expected_flat):
        npz_name = NPZ_PREFIX + flax_name
        expected_shape = tuple(expected_flat[flax_name].shape)

        if npz_name not in arrays:
            raise WeightsError(
                f"weights file {path} has no tensor {npz_name} (expected shape {expected_shape}). "
                "Check that the file is the official BiT .npz for this backbone's depth and width"
            )

        found_shape = tuple(arrays[npz_name].shape)
        if found_shape != expected_shape:
            raise WeightsError(
                f"weights file {path}: tensor {npz_name} has shape {found_shape}, expected {expected_shape}. "
                "Check that the file is the official BiT .npz for this backbone's depth and width"
            )

        loaded[flax_name] = np.asarray(arrays[npz_name], dtype=np.float32)

    expected_npz_names = {NPZ_PREFIX + name for name in expected_flat}
    unexpected = sorted(name for name in arrays if name not in expected_npz_names and not name.startswith(HEAD_PREFIX))
    if unexpected:
        raise WeightsError(
            f"weights file {path} has {len(unexpected)} tensors that the model does not use, "
            f"first {unexpected[0]} with shape {tuple(arrays[unexpected[0]].shape)}. "
            "Check that the file is the official BiT .npz for this backbone's depth and width"
        )

    return {"params": traverse_util.unflatten_dict(loaded, sep="/")}
