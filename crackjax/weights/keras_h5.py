"""Read a Keras 2 weights file (`.h5`) and map it onto Flax variables by layer name.

The layout is the one `model.save_weights("x.h5")` writes in Keras 2, and
`keras.src.legacy.saving.legacy_h5_format.save_weights_to_hdf5_group` in Keras 3:

* the root (or its `model_weights` group, in a file from `model.save`) has the
  attribute `layer_names`, the model's layers in order. Keras splits a long
  list into `layer_names0`, `layer_names1`, ... when it exceeds the 64 KiB
  HDF5 attribute limit.
* each layer is a group of that name with the attribute `weight_names`, the
  dataset paths inside the group, such as `conv1_conv/kernel:0` (Keras 2) or
  `conv1_conv/kernel` (Keras 3). Layers without weights have an empty list.

Keras stores convolution kernels as `(height, width, in, out)` and dense
kernels as `(in, out)`, the same layout as `flax.linen.Conv` and `nn.Dense`,
so the arrays need no transposition.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from crackjax.weights.entry import WeightsError, WeightsMissingError

# Keras weight name (the last path component, without ":0") -> (Flax collection, Flax variable name).
KERAS_TO_FLAX = {
    "kernel": ("params", "kernel"),
    "bias": ("params", "bias"),
    "gamma": ("params", "scale"),
    "beta": ("params", "bias"),
    "moving_mean": ("batch_stats", "mean"),
    "moving_variance": ("batch_stats", "var"),
}

# Layer names of the ImageNet classifier in full (`include_top=True`) Keras files.
# keras-applications `resnet_common.py` names it `probs`, Keras 3.15 `predictions`.
CLASSIFIER_LAYERS = ("predictions", "probs")


def _read_name_list(attrs: h5py.AttributeManager, name: str) -> list[str] | None:
    """Return the string list attribute `name`, joined from its numbered chunks if Keras split it."""
    if name in attrs:
        chunks = [attrs[name]]
    elif f"{name}0" in attrs:
        chunks = []
        while f"{name}{len(chunks)}" in attrs:
            chunks.append(attrs[f"{name}{len(chunks)}"])
    else:
        return None

    names = []
    for chunk in chunks:
        for item in np.atleast_1d(chunk):
            names.append(item.decode("utf8") if isinstance(item, bytes) else str(item))
    return names


def _weight_key(weight_name: str) -> str:
    """Return the Keras weight name without its layer path and TensorFlow suffix: `a/b/kernel:0` -> `kernel`."""
    return weight_name.rsplit("/", 1)[-1].split(":", 1)[0]


def read_keras_h5(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """Read every layer's weights from a Keras 2 `.h5` weights file.

    Returns `{layer name: {weight key: array}}` in the file's layer order, with
    weight keys such as `kernel`, `bias`, `gamma` or `moving_mean`. Layers
    without weights are left out. Raises WeightsError when the file is not HDF5
    or is not in the Keras 2 layout (for example a Keras 3 `.weights.h5` file),
    and WeightsMissingError when `path` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsMissingError(f"weights file {path} not found")
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise WeightsError(f"weights file {path} is not a readable HDF5 file: {error}") from error

    with handle:
        root = handle["model_weights"] if "model_weights" in handle else handle
        layer_names = _read_name_list(root.attrs, "layer_names")
        if layer_names is None:
            raise WeightsError(
                f"weights file {path} has no `layer_names` attribute, so it is not in the Keras 2 `.h5` layout; "
                "use the file that Keras Applications publishes, or save it with Keras 2 `model.save_weights`"
            )

        layers: dict[str, dict[str, np.ndarray]] = {}
        for layer_name in layer_names:
            if layer_name not in root:
                raise WeightsError(f"weights file {path} lists layer {layer_name} in `layer_names` but has no group for it")
            group = root[layer_name]
            weight_names = _read_name_list(group.attrs, "weight_names") or []
            if not weight_names:
                continue

            weights = {}
            for weight_name in weight_names:
                key = _weight_key(weight_name)
                if key in weights:
                    raise WeightsError(f"weights file {path} has two weights named {key} in layer {layer_name}")
                if weight_name not in group:
                    raise WeightsError(
                        f"tensor {layer_name}/{weight_name} is listed in `weight_names` of weights file {path} "
                        "but has no dataset; the file is damaged, so download it again"
                    )
                weights[key] = np.asarray(group[weight_name])
            layers[layer_name] = weights
    return layers


def _flatten_expected(variables: Mapping[str, Any]) -> dict[str, dict[str, tuple[str, tuple[int, ...]]]]:
    """Turn `{collection: {layer: {variable: array-like}}}` into `{layer: {flax name: (collection, shape)}}`."""
    expected: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    for collection, layers in variables.items():
        for layer_name, layer_variables in layers.items():
            for variable_name, value in layer_variables.items():
                if not hasattr(value, "shape"):
                    raise TypeError(
                        f"variables[{collection!r}][{layer_name!r}][{variable_name!r}] is a "
                        f"{type(value).__name__}; expected a flat layout of arrays, one level per layer"
                    )
                expected.setdefault(layer_name, {})[f"{collection}/{variable_name}"] = (collection, tuple(value.shape))
    return expected


def keras_h5_to_variables(
    path: str | Path,
    expected_variables: Mapping[str, Any],
    ignore_layers: Iterable[str] = CLASSIFIER_LAYERS,
) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """Load a Keras 2 `.h5` weights file into Flax variables matched by layer name.

    `expected_variables` is the variables tree of the Flax model, or its
    `jax.eval_shape` of `module.init`: `{collection: {layer name: {variable: array}}}`
    with Flax layer names equal to the Keras layer names. Only shapes are read
    from it. Layers in `ignore_layers` that the model lacks are skipped, which
    drops the ImageNet classifier of a full (`include_top=True`) file.

    Returns `{"params": ..., "batch_stats": ...}` (the collections of
    `expected_variables`) holding float32 numpy arrays. Raises WeightsError
    naming the file and the first layer or tensor that is missing from the
    file, has another shape than the model expects, or is in the file but not
    in the model.
    """
    path = Path(path)
    file_layers = read_keras_h5(path)
    expected = _flatten_expected(expected_variables)
    ignored = set(ignore_layers)

    variables: dict[str, dict[str, dict[str, np.ndarray]]] = {collection: {} for collection in expected_variables}
    for layer_name, layer_expected in expected.items():
        if layer_name not in file_layers:
            tensors = ", ".join(f"{name} {shape}" for name, (_, shape) in layer_expected.items())
            raise WeightsError(
                f"layer {layer_name} (expected tensors {tensors}) not found in weights file {path}; "
                "check that the file is for this backbone and depth"
            )

        # Flax "collection/variable" -> (Keras weight key, array).
        found: dict[str, tuple[str, np.ndarray]] = {}
        for key, array in file_layers[layer_name].items():
            if key not in KERAS_TO_FLAX:
                raise WeightsError(
                    f"tensor {layer_name}/{key} in weights file {path} has an unknown Keras weight name; "
                    f"expected one of {', '.join(KERAS_TO_FLAX)}"
                )
            collection, variable_name = KERAS_TO_FLAX[key]
            flax_name = f"{collection}/{variable_name}"
            if flax_name in found:
                raise WeightsError(
                    f"tensors {layer_name}/{found[flax_name][0]} and {layer_name}/{key} in weights file {path} "
                    f"both map to {collection}/{layer_name}/{variable_name}"
                )
            found[flax_name] = (key, array)

        for flax_name, (collection, shape) in layer_expected.items():
            variable_name = flax_name.split("/", 1)[1]
            if flax_name not in found:
                raise WeightsError(
                    f"tensor for {collection}/{layer_name}/{variable_name} (expected shape {shape}) not found "
                    f"in weights file {path}, whose layer {layer_name} contains {', '.join(file_layers[layer_name])}"
                )
            key, array = found[flax_name]
            if array.shape != shape:
                raise WeightsError(
                    f"tensor {layer_name}/{key} has shape {array.shape} in weights file {path}, but "
                    f"{collection}/{layer_name}/{variable_name} expects {shape}; "
                    "check that the file is for this backbone and depth"
                )
            variables[collection].setdefault(layer_name, {})[variable_name] = array.astype(np.float32)

        extra = sorted(set(found) - set(layer_expected))
        if extra:
            key = found[extra[0]][0]
            raise WeightsError(f"tensor {layer_name}/{key} in weights file {path} has no matching variable in the model")

    for layer_name in file_layers:
        if layer_name not in expected and layer_name not in ignored:
            raise WeightsError(
                f"layer {layer_name} in weights file {path} has weights but no matching layer in the model; "
                "check that the file is for this backbone and depth"
            )
    return variables
