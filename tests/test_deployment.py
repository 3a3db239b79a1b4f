"""End to end on a real Prefect server: deploy prefect.yaml, run crack-train and crack-predict on a process worker.

The test starts `prefect server start` on a free 127.0.0.1 port with its own
PREFECT_HOME, deploys every deployment of prefect.yaml, starts a process worker and
runs the deployments with the test's assets and workspace as parameters. It takes
about 2 to 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from crackjax import registry
from sdnet_paths import link_labelled

REPO_ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
POOL = "crackjax-pool"
CACHED_STAGES = ("ingest", "preprocess", "train", "evaluate", "export")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_group(process: subprocess.Popen) -> None:
    """Stop a process started in its own session, with every child, and wait for it."""
    for signal_number, wait in ((signal.SIGINT, 15), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, signal_number)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # The leader exited; children of the group may still be shutting down.
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


class PrefectService:
    """A Prefect server and process worker for the test, with the CLI environment to reach them."""

    def __init__(self, home: Path):
        self.home = home
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
        self.env.update({
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_EXTRA_LOGGERS": "crackjax",
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
        })
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str) -> None:
        log = open(self.home / f"{name}.log", "wb")
        self.processes[name] = subprocess.Popen(
            [PREFECT, *args], cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )

    def wait_healthy(self, timeout: float = 90.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if self.processes["server"].poll() is not None:
                break
            time.sleep(0.5)
        pytest.fail(f"Prefect server on port {self.port} not healthy after {timeout} s:\n{self.log('server')}")

    def cli(self, *args: str, timeout: float = 240.0) -> subprocess.CompletedProcess:
        completed = subprocess.run([PREFECT, *args], cwd=REPO_ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert completed.returncode == 0, f"prefect {' '.join(args)} failed ({completed.returncode}):\n{completed.stdout}\n{completed.stderr}"
        return completed

    def run_deployment(self, name: str, parameters: dict, timeout: int = 240) -> str:
        """Run a deployment, wait for a terminal state and return the flow-run id."""
        completed = self.cli("deployment", "run", name, "--params", json.dumps(parameters), "--watch", "--watch-interval", "2", "--watch-timeout", str(timeout), timeout=timeout + 30)
        match = re.search(r"UUID:\s*([0-9a-f-]{36})", completed.stdout)
        assert match, f"no flow-run id in the output of `prefect deployment run {name}`:\n{completed.stdout}"
        return match.group(1)

    def log(self, name: str) -> str:
        return (self.home / f"{name}.log").read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        for name in ("worker", "server"):
            if name in self.processes:
                _stop_group(self.processes[name])


def _query(api_url: str, coroutine_factory):
    """Run `coroutine_factory(client)` against the test's server with a fresh Prefect client."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def main():
        with temporary_settings({PREFECT_API_URL: api_url}):
            async with get_client() as client:
                return await coroutine_factory(client)

    return asyncio.run(main())


def _flow_run_report(api_url: str, flow_run_id: str) -> dict:
    """Return the flow run's state name, its task runs' state names by task name, log text and artifacts."""
    from uuid import UUID

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    async def read(client):
        flow_run = await client.read_flow_run(UUID(flow_run_id))
        task_runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])))
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(flow_run_id)])))
        artifacts = await client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)])))
        return {
            "state": flow_run.state.name,
            # Task-run names are "<task name>-<3 hex digits>".
            "tasks": {task_run.name.rsplit("-", 1)[0]: task_run.state.name for task_run in task_runs},
            "logs": "\n".join(entry.message for entry in logs),
            "artifacts": {artifact.key: artifact.data for artifact in artifacts},
        }

    return _query(api_url, read)


@pytest.fixture
def prefect_service(tmp_path):
    service = PrefectService(tmp_path / "prefect-home")
    service.home.mkdir()
    service.start("server", "server", "start", "--host", "127.0.0.1", "--port", str(service.port), "--analytics-off", "--no-ui")
    try:
        service.wait_healthy()
        yield service
    finally:
        service.stop()
        for name, process in service.processes.items():
            assert not _group_alive(process.pid), f"{name} processes still running after the test"


@pytest.fixture
def deployment_assets(tmp_path, sdnet_images) -> Path:
    """30 real images per label, linked from the sample."""
    return link_labelled(tmp_path / "assets", sdnet_images, slice(30))


def test_deployments_train_register_predict(prefect_service, deployment_assets, tmp_path, sdnet_images):
    service = prefect_service
    workspace = tmp_path / "workspace"
    train_parameters = {"assets": str(deployment_assets), "workspace": str(workspace), "backbone": "efficientnet_lite0"}

    service.cli("work-pool", "create", POOL, "--type", "process")
    deployed = service.cli("--no-prompt", "deploy", "--all")
    for name in ("crack-train/nightly", "crack-train/manual", "crack-predict/predict"):
        assert name in deployed.stdout

    async def read_nightly(client):
        return await client.read_deployment_by_name("crack-train/nightly")

    nightly = _query(service.api_url, read_nightly)
    assert [schedule.schedule.cron for schedule in nightly.schedules] == ["0 2 * * *"]
    assert nightly.pull_steps[0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(REPO_ROOT)
    assert nightly.job_variables["env"]["PREFECT_LOGGING_EXTRA_LOGGERS"] == "crackjax"
    # Pause the nightly schedule so no scheduled run can start while the test runs.
    service.cli("deployment", "schedule", "pause", "crack-train/nightly", str(nightly.schedules[0].id))
    service.start("worker", "worker", "start", "--pool", POOL, "--type", "process", "--name", "test-worker")

    # First run: every stage computes, and the model becomes version 1 and champion.
    first = _flow_run_report(service.api_url, service.run_deployment("crack-train/manual", train_parameters))
    stored = registry.load_registry(workspace)
    assert first["state"] == "Completed", service.log("worker")
    assert len(stored["versions"]) == 1
    assert stored["versions"][0]["decision"] == "promoted"
    assert stored["champion"] == stored["versions"][0]["model_id"]
    assert stored["versions"][0]["lineage"]["code_version"]
    assert first["tasks"]["export"] == "Completed"
    assert "crack-train-model" in first["artifacts"]
    assert "Model version 1: promoted" in first["artifacts"]["crack-train-model"]
    assert (workspace / "models" / stored["champion"] / "curves.png").stat().st_size > 1000
    confusion = json.loads(first["artifacts"]["crack-train-confusion-matrix"])
    assert [row["true label"] for row in confusion] == ["CD", "UD"]

    # Second run, unchanged: the cached stages are skipped and no version is added.
    second = _flow_run_report(service.api_url, service.run_deployment("crack-train/manual", train_parameters))
    assert second["state"] == "Completed", service.log("worker")
    for stage in CACHED_STAGES:
        assert second["tasks"][stage] == "Cached", f"{stage}: {second['tasks'][stage]}"
    assert len(registry.load_registry(workspace)["versions"]) == 1
    assert "unchanged" in second["logs"]

    # A deliberately worse head (one epoch at a tiny learning rate) is kept but not promoted.
    worse_parameters = {**train_parameters, "head": {"epochs": 1, "learning_rate": 1e-6}}
    worse = _flow_run_report(service.api_url, service.run_deployment("crack-train/manual", worse_parameters))
    stored = registry.load_registry(workspace)
    assert worse["state"] == "Completed", service.log("worker")
    assert len(stored["versions"]) == 2
    assert stored["versions"][1]["decision"] == "rejected"
    assert stored["champion"] == stored["versions"][0]["model_id"]
    assert stored["versions"][1]["lineage"]["parent"] == stored["versions"][0]["model_id"]
    assert "rejected" in worse["logs"]
    assert "worse than the champion" in worse["logs"]
    assert "worse than the champion" in worse["artifacts"]["crack-train-model"]

    # Predict one real image with the champion, on the same worker.
    image = sdnet_images["CD"][-1]
    output = tmp_path / "prediction.json"
    predicted = _flow_run_report(
        service.api_url, service.run_deployment("crack-predict/predict", {"path": str(image), "workspace": str(workspace), "output": str(output)})
    )
    result = json.loads(output.read_text())
    assert predicted["state"] == "Completed", service.log("worker")
    assert result["model_id"] == stored["champion"]
    assert result["model_version"] == 1
    assert result["label"] in ("CD", "UD")
    assert 0.5 <= result["probability"] <= 1.0
    assert result["predictions"][0]["path"] == str(image)
    rows = json.loads(predicted["artifacts"]["crack-predict"])
    assert rows[0]["label"] == result["label"]
