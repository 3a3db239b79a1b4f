"""Shared fixtures: the real SDNET2018 sample, an isolated Prefect home, a trained workspace."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Prefect reads its settings when it is imported, so the isolated home is set here,
# before any test module imports it.
_PREFECT_HOME = Path(os.environ.get("CRACKJAX_TEST_PREFECT_HOME", "/tmp")) / f"crackjax-test-prefect-{os.getpid()}"
os.environ["PREFECT_HOME"] = str(_PREFECT_HOME)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "crackjax")
# Library functions called outside a flow log through the crackjax loggers, which
# Prefect would otherwise warn about on every record.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.pop("PREFECT_API_URL", None)


from sdnet_paths import SDNET_DIR, link_labelled  # noqa: E402


@pytest.fixture(scope="session")
def sdnet_dir() -> Path:
    """The 400 real SDNET2018 deck images (`CD/` cracked, `UD/` uncracked), read-only."""
    if not (SDNET_DIR / "CD").is_dir():
        pytest.fail(f"SDNET2018 sample not found at {SDNET_DIR}; set CRACKJAX_SDNET_DIR to the folder with CD/ and UD/")
    return SDNET_DIR


@pytest.fixture(scope="session")
def sdnet_images(sdnet_dir) -> dict[str, list[Path]]:
    """The sample's image paths by label, sorted."""
    return {label: sorted((sdnet_dir / label).glob("*.jpg")) for label in ("CD", "UD")}


@pytest.fixture
def small_assets(tmp_path, sdnet_images) -> Path:
    """A labelled folder of 20 real images per label, linked from the sample."""
    return link_labelled(tmp_path / "assets", sdnet_images, slice(20))


@pytest.fixture(scope="session")
def trained_workspace(tmp_path_factory, sdnet_dir) -> dict:
    """Run `crack-train` once on all 400 images with EfficientNet-Lite0 and return its result.

    Tests that need cached features copy this workspace instead of recomputing them.
    """
    from flows.crack_train import crack_train

    workspace = tmp_path_factory.mktemp("trained") / "workspace"
    result = crack_train(assets=str(sdnet_dir), workspace=str(workspace), backbone="efficientnet_lite0")
    return {"workspace": workspace, "result": result}


@pytest.fixture
def workspace_copy(tmp_path, trained_workspace) -> Path:
    """A private copy of the trained workspace's pixel and feature stores (no models, no Prefect cache)."""
    target = tmp_path / "workspace"
    source = trained_workspace["workspace"]
    for folder in ("pixels", "features"):
        shutil.copytree(source / folder, target / folder)
    return target


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)


def pytest_unconfigure(config):
    # Prefect stops its temporary server at interpreter exit and logs that to a stream
    # pytest has already closed; silence logging before then.
    import logging

    logging.disable(logging.CRITICAL)
