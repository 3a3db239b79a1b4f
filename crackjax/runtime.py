"""JAX set-up for crackjax processes: XLA CPU flags and the persistent compilation cache.

`configure_jax()` must run before the first JAX computation of the process,
because XLA reads `XLA_FLAGS` once, when it creates its backends. It is
idempotent; the command line calls it first thing, and `load_backbone` calls it
again for library users. Both settings can be turned off from the environment:

* `CRACKJAX_XNN_FUSION=0` leaves XLA's default CPU code generation. Otherwise
  XNNPACK graph fusion is turned on, which runs convolutions and matrix products
  through XNNPACK. On 2 AMD EPYC (Zen 4) cores with jaxlib 0.10.2, a ResNet50-v2
  forward process (batch 32) used 0.65x the CPU time with it (docs/benchmarks.md).
  A flag for the same setting already in `XLA_FLAGS` is left as it is.
* `CRACKJAX_JAX_CACHE=0` turns the compilation cache off. Otherwise compiled
  programs are stored in `cache_dir()/jax`, so a new `crackjax predict` process
  loads its backbone program from disk instead of compiling it again. A cache
  folder already set through `JAX_COMPILATION_CACHE_DIR` wins.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

XNN_FUSION_FLAG = "--xla_cpu_experimental_xnn_graph_fusion_mode"
XNN_FUSION_GREEDY = f"{XNN_FUSION_FLAG}=XNN_GRAPH_FUSION_MODE_GREEDY"

# Programs that compile faster than this are not worth a cache file; the head's
# small training steps compile in well under a second.
MIN_CACHED_COMPILE_SECONDS = 0.5

_configured = False


def _disabled(variable: str) -> bool:
    return os.environ.get(variable, "").strip().lower() in ("0", "false", "no", "off")


def xla_flags_with_fusion(flags: str) -> str:
    """Return `flags` with XNNPACK graph fusion added, unless `flags` already sets that option."""
    if XNN_FUSION_FLAG in flags:
        return flags
    return f"{flags} {XNN_FUSION_GREEDY}".strip()


def jax_cache_dir() -> Path:
    """Return the folder of the persistent compilation cache: `cache_dir()/jax`."""
    from crackjax.weights.cache import cache_dir

    return cache_dir() / "jax"


def configure_jax() -> None:
    """Set the XLA CPU flags and the compilation cache for this process; later calls do nothing."""
    global _configured
    if _configured:
        return
    _configured = True

    from jax._src import xla_bridge

    if not _disabled("CRACKJAX_XNN_FUSION"):
        if xla_bridge.backends_are_initialized():
            # NOTE: XLA has read XLA_FLAGS already, so the flag would not apply to this process.
            log.debug("runtime: JAX backends already exist; XNNPACK graph fusion is left as XLA_FLAGS set it")
        else:
            os.environ["XLA_FLAGS"] = xla_flags_with_fusion(os.environ.get("XLA_FLAGS", ""))

    if not _disabled("CRACKJAX_JAX_CACHE"):
        import jax

        if not jax.config.jax_compilation_cache_dir:
            folder = jax_cache_dir()
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                log.warning("runtime: compilation cache folder %s cannot be created (%s); compiling without it", folder, error)
                return
            jax.config.update("jax_compilation_cache_dir", str(folder))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_CACHED_COMPILE_SECONDS)
