"""Deployment files: manifests valid against the Kubernetes schemas, their config loadable, a sound unit."""

from __future__ import annotations

import configparser
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
from kubernetes_validate import utils as kubernetes_files

from lemonade_grpc.config import Overrides, load

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
MANIFEST = DEPLOY / "kubernetes" / "lemonade-grpc.yaml"


def resources() -> dict[str, dict[str, Any]]:
    found = kubernetes_files.resources_from_file(str(MANIFEST))
    return {resource["kind"]: resource for resource in found}


def test_the_manifests_pass_the_kubernetes_schemas_strictly() -> None:
    found = resources()
    assert set(found) == {"Namespace", "ConfigMap", "Secret", "DaemonSet", "Service"}
    for resource in found.values():
        kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)


def test_the_pod_probes_grpc_health_on_the_port_its_config_listens_on(tmp_path: Path) -> None:
    found = resources()
    [container] = found["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    config_text = found["ConfigMap"]["data"]["config.toml"]
    listen = tomllib.loads(config_text)["server"]["listen"]
    port = int(listen.rpartition(":")[2])
    assert container["readinessProbe"]["grpc"]["port"] == port
    assert container["livenessProbe"]["grpc"]["port"] == port
    assert container["resources"]["requests"]
    # The config is one `serve` accepts: its files made real under tmp_path.
    for path in ("/etc/lemonade-grpc/tokens/admin", "/etc/lemonade-grpc/tokens/inference"):
        real = tmp_path / path.lstrip("/")
        real.parent.mkdir(parents=True, exist_ok=True)
        real.write_text(found["Secret"]["stringData"][real.name])
    model = tmp_path / "models" / "qwen2.5-0.5b-instruct-q4_k_m.gguf"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"GGUF")
    config = tmp_path / "config.toml"
    config.write_text(
        config_text.replace("/etc/", f"{tmp_path}/etc/").replace("/models/", f"{tmp_path}/models/")
    )
    loaded = load(Overrides(config=config), env={})
    assert loaded.listen == listen  # a remote address, allowed because tokens are configured
    assert loaded.tokens.admin
    assert loaded.tokens.inference


def test_the_systemd_unit_runs_serve_hardened_with_its_state_directory() -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive in units
    unit.read(DEPLOY / "systemd" / "lemonade-grpc.service")
    service = unit["Service"]
    assert " serve " in service["ExecStart"]
    assert "--state-dir /var/lib/lemonade-grpc" in service["ExecStart"]
    assert service["StateDirectory"] == "lemonade-grpc"
    assert service["ExecReload"].endswith("-HUP $MAINPID")
    for option in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "RestrictSUIDSGID"):
        assert service[option] == "yes", option
    assert service["ProtectSystem"] == "strict"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
