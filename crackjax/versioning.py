"""Code versions for cache keys: a digest of the source of the modules a stage depends on."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

from crackjax import __version__


@functools.cache
def code_digest(*module_names: str) -> str:
    """Return a sha256 over the crackjax version and the source files of `module_names`.

    A package name covers every `.py` file under it. Any edit to those files changes
    the digest, so cached results of a stage are recomputed after its code changes.
    """
    digest = hashlib.sha256(__version__.encode())
    for name in sorted(module_names):
        # find_spec locates the source without importing it, so keying a cached stage
        # does not pay for importing JAX.
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(f"module {name!r} not found; cannot compute its code digest")
        path = Path(spec.origin)
        files = sorted(path.parent.rglob("*.py")) if path.name == "__init__.py" else [path]
        for file in files:
            digest.update(file.name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()
