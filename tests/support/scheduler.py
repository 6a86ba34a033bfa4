"""Real Triton nodes and a real scheduler process, laid out per test.

`model_repository` builds a Triton model repository of named copies of the shipped tiny_lm
(same weights and code, different names, `ignore_eos` so each request costs exactly its
max_tokens of decoding): several distinct models to place, evict and prioritise, each with a
known cost; `streaming_model_repository` does the same for the streaming tiny_lm_stream.
`SchedulerProcess` runs `python -m services.scheduler` against a catalog written for the test,
on a free port, and stops it afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import tritonclient.grpc as tritonclient
import yaml
from shepherd.common.v1 import common_pb2
from shepherd.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from tritonclient.utils import InferenceServerException

from deploy.local.launcher import wait_serving
from deploy.local.ports import free_port
from deploy.local.processes import spawn, stop, tail
from deploy.local.triton import DEFAULT_MODEL_REPOSITORY, TritonNode, TritonNodeConfig
from libs.credentials import Credentials
from libs.health import LIVENESS
from libs.peers import PeerChannel, open_channel

# The service token and admin key every scheduler started by the tests is given.
TEST_CREDENTIALS = Credentials(
    internal_tokens=("test-internal-token-0123456789",), admin_keys=("test-admin-key-0123456789",)
)

TINY_LM = DEFAULT_MODEL_REPOSITORY / "tiny_lm"
TINY_LM_STREAM = DEFAULT_MODEL_REPOSITORY / "tiny_lm_stream"


def copy_model(
    root: Path, name: str, source: Path, parameters: Mapping[str, str] | None = None
) -> None:
    """A shipped model under another name in `root`: the same code, the same config, plus
    `parameters` (e.g. ignore_eos), with Triton statistics of its own."""
    config = (source / "config.pbtxt").read_text().replace(f'name: "{source.name}"', "")
    extra = "".join(
        f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'
        for key, value in (parameters or {}).items()
    )
    (root / name / "1").mkdir(parents=True)
    (root / name / "1" / "model.py").symlink_to((source / "1" / "model.py").resolve())
    (root / name / "config.pbtxt").write_text(f'name: "{name}"\n{config}\n{extra}')


def link_shipped_models(root: Path) -> None:
    """Every model of the shipped repository, as it is, in `root`."""
    root.mkdir(parents=True, exist_ok=True)
    for shipped in DEFAULT_MODEL_REPOSITORY.iterdir():
        if shipped.is_dir():
            (root / shipped.name).symlink_to(shipped, target_is_directory=True)


def model_repository(root: Path, names: Sequence[str]) -> Path:
    """A repository holding one tiny_lm copy per name, each generating exactly max_tokens."""
    for name in names:
        copy_model(root, name, TINY_LM, {"ignore_eos": "true"})
    return root


def streaming_model_repository(root: Path, names: Sequence[str]) -> Path:
    """The shipped models, plus one tiny_lm_stream copy per name that streams exactly
    max_tokens (`ignore_eos`): a stream as long as a test needs, to cancel."""
    link_shipped_models(root)
    for name in names:
        copy_model(root, name, TINY_LM_STREAM, {"ignore_eos": "true"})
    return root


@dataclass(frozen=True)
class TritonCounts:
    """What Triton itself counts for a model: rows inferred, executions, compute time."""

    inferences: int = 0
    executions: int = 0
    compute_ns: int = 0


def triton_counts(client: tritonclient.InferenceServerClient, model: str) -> TritonCounts:
    """Triton's statistics of `model`; all zero while it is not loaded (loaded on first use)."""
    try:
        stats = client.get_inference_statistics(model).model_stats[0]
    except InferenceServerException:
        return TritonCounts()
    return TritonCounts(
        stats.inference_count, stats.execution_count, stats.inference_stats.compute_infer.ns
    )


def loaded_on(node: TritonNode) -> set[str]:
    """The models Triton itself reports READY on `node` (its repository index)."""
    client = tritonclient.InferenceServerClient(node.config.grpc_url)
    try:
        index = client.get_model_repository_index(as_json=True)
    finally:
        client.close()
    return {m["name"] for m in index.get("models", []) if m.get("state") == "READY"}


def start_node(work_dir: Path, repository: Path, load: Sequence[str] = ()) -> TritonNode:
    """One Triton node in explicit model-control mode with `load` loaded at start."""
    node = TritonNode(
        TritonNodeConfig.with_free_ports(
            work_dir=work_dir,
            model_repository=repository,
            model_control_mode="explicit",
            load_models=tuple(load),
        )
    ).start()
    try:
        node.wait_ready(timeout_s=60)
    except BaseException:
        node.stop()
        raise
    return node


def catalog(
    nodes: Sequence[str],
    models: Mapping[str, Mapping[str, Any]],
    *,
    pool: Mapping[str, Any] | None = None,
    provider_url: str = "http://127.0.0.1:9/v1",
    tenants: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A catalog with one pool `gpu` over `nodes` and the given models.

    Each model spec needs `model` (the Triton model) and may set `priority`, `batching`,
    `queue`, `memory_mb`, `max_nodes` and `hosted` (a hosted model name for spill-over).
    """
    entries = {}
    for name, spec in models.items():
        deployments: list[dict[str, Any]] = [
            {
                "kind": "triton",
                "pool": "gpu",
                "model": spec["model"],
                "memory_mb": spec.get("memory_mb", 100),
                "max_nodes": spec.get("max_nodes", 1),
            }
        ]
        if "hosted" in spec:
            deployments.append({"kind": "hosted", "provider": "sim", "model": spec["hosted"]})
        entries[name] = {
            "priority": spec.get("priority", 5),
            "price": {"input_usd_per_million": "0.02", "output_usd_per_million": "0.05"},
            "batching": spec.get("batching", {"max_batch_size": 1, "max_queue_delay_ms": 0}),
            "queue": spec.get("queue", {}),
            "deployments": deployments,
        }
    return {
        "pools": {
            "gpu": {
                "nodes": list(nodes),
                "gpu_memory_mb": 4096,
                "max_inflight_batches": 1,
                **(pool or {}),
            }
        },
        "providers": {"sim": {"base_url": provider_url, "api_key_env": "SHEPHERD_HOSTED_API_KEY"}},
        "tenants": dict(tenants or {}),
        "models": entries,
    }


class SchedulerProcess:
    """`python -m services.scheduler` on a free port with a test catalog."""

    def __init__(
        self, run_dir: Path, catalog_data: Mapping[str, Any], env: Mapping[str, str] | None = None
    ) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.catalog_path = run_dir / "catalog.yaml"
        self.catalog_path.write_text(yaml.safe_dump(dict(catalog_data)))
        self.log_path = run_dir / "scheduler.log"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._env = {
            "SHEPHERD_CATALOG": str(self.catalog_path),
            "SHEPHERD_SCHEDULER_PORT": str(self.port),
            "SHEPHERD_SCHEDULER_HEALTH_INTERVAL_S": "0.2",
            "SHEPHERD_HOSTED_API_KEY": "",
            "SHEPHERD_INTERNAL_TOKEN": TEST_CREDENTIALS.internal_tokens[0],
            "SHEPHERD_ADMIN_KEYS": TEST_CREDENTIALS.admin_keys[0],
            **(env or {}),
        }
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> SchedulerProcess:
        self._process = spawn(
            [sys.executable, "-m", "services.scheduler"],
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self._env},
            log_path=self.log_path,
        )
        try:
            # Up, not ready: a test may start a scheduler whose backends are down.
            deadline = time.monotonic() + timeout_s
            wait_serving(
                "scheduler", self._process, self.address, self.log_path, deadline, LIVENESS
            )
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The running process, e.g. to signal it; None before start and after stop."""
        return self._process

    def stop(self) -> None:
        if self._process is not None:
            stop(self._process)
            self._process = None

    def log(self) -> str:
        return tail(self.log_path)


def infer_request(
    model: str,
    *,
    request_id: str,
    max_tokens: int = 16,
    priority: int = common_pb2.PRIORITY_NORMAL,
    tenant: str = "t",
    self_hosted_only: bool = False,
) -> scheduler_pb2.InferRequest:
    return scheduler_pb2.InferRequest(
        request_id=request_id,
        tenant=tenant,
        model=model,
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=f"hello {request_id}")],
        params=common_pb2.GenerationParams(max_tokens=max_tokens),
        priority=priority,
        self_hosted_only=self_hosted_only,
    )


def stub(channel: grpc.aio.Channel | PeerChannel) -> scheduler_pb2_grpc.SchedulerServiceStub:
    return scheduler_pb2_grpc.SchedulerServiceStub(channel)


def internal_channel(address: str) -> PeerChannel:
    """A channel that calls as the router does: with the service token on every call."""
    return open_channel(address, TEST_CREDENTIALS)
