"""deploy/kubernetes.yaml and deploy/compose.yaml: the settings scale-out depends on.

Parsed with PyYAML (no cluster here): three replicas, no session affinity, the Redis URL pointing at
the Redis they define, one channel prefix, a readiness probe on a path the app serves, the same JWT
secret for every replica, and an image that carries the browser bundle where the app looks for it.
"""

from __future__ import annotations

import tomllib
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
PREFIX = "BlogApp:SignalR:"
APP = "examples.blog.app:app"


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())  # type: ignore[no-any-return]


def test_k8s_three_replicas_with_backplane_env(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    blog = k8s[("Deployment", "blog")]
    assert blog["spec"]["replicas"] == 3
    pod = blog["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert APP in container["command"]
    env = env_of(container)
    redis_url = urlsplit(env["HUBWIRE_REDIS_URL"]["value"])
    assert redis_url.scheme == "redis"
    redis_service = k8s[("Service", redis_url.hostname or "")]
    assert redis_url.port in {p["port"] for p in redis_service["spec"]["ports"]}
    redis_pods = k8s[("Deployment", "redis")]["spec"]["template"]["metadata"]["labels"]
    assert redis_service["spec"]["selector"].items() <= redis_pods.items()
    assert env["HUBWIRE_CHANNEL_PREFIX"]["value"] == PREFIX
    secret_ref = env["BLOG_JWT_SECRET"]["valueFrom"]["secretKeyRef"]
    assert secret_ref["key"] in k8s[("Secret", secret_ref["name"])]["stringData"]


def test_k8s_readiness_probe_on_the_app(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    from examples.blog.app import api

    (container,) = k8s[("Deployment", "blog")]["spec"]["template"]["spec"]["containers"]
    probe = container["readinessProbe"]["httpGet"]
    assert probe["port"] == container["ports"][0]["containerPort"] == 8000
    assert probe["path"] in {getattr(route, "path", None) for route in api.routes}
    assert "--port" in container["command"] and "8000" in container["command"]


def test_k8s_pod_stops_after_it_left_the_service(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    """A preStop delay, within the grace period, before SIGTERM starts the drain."""
    pod = k8s[("Deployment", "blog")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and 0 < int(command[1]) < pod["terminationGracePeriodSeconds"] - 10


def test_k8s_service_has_no_session_affinity(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    service = k8s[("Service", "blog")]["spec"]
    assert service.get("sessionAffinity", "None") == "None"
    assert "sessionAffinityConfig" not in service
    pod_labels = k8s[("Deployment", "blog")]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= pod_labels.items()
    (container,) = k8s[("Deployment", "blog")]["spec"]["template"]["spec"]["containers"]
    named = {p.get("name"): p["containerPort"] for p in container["ports"]}
    target = service["ports"][0]["targetPort"]
    assert named.get(target, target) == 8000


def test_compose_three_replicas_on_one_redis(compose: dict[str, Any]) -> None:
    services = compose["services"]
    blog = services["blog"]
    assert blog["deploy"]["replicas"] == 3
    env = blog["environment"]
    redis_url = urlsplit(env["HUBWIRE_REDIS_URL"])
    assert redis_url.hostname in services and "redis" in services[redis_url.hostname]["image"]
    assert env["HUBWIRE_CHANNEL_PREFIX"] == PREFIX
    assert env["BLOG_JWT_SECRET"]
    assert blog["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "/healthz" in " ".join(blog["healthcheck"]["test"])
    assert blog["build"]["dockerfile"] == "deploy/Dockerfile"


def test_compose_front_round_robin_without_affinity(compose: dict[str, Any]) -> None:
    front = compose["services"]["front"]
    assert any(v.startswith("./nginx.conf:") for v in front["volumes"])
    conf = (DEPLOY / "nginx.conf").read_text()
    directives = [line.split("#", 1)[0].strip() for line in conf.splitlines()]
    assert not any(d.split(" ", 1)[0] in {"ip_hash", "hash", "sticky"} for d in directives if d)
    assert "server blog:8000;" in directives
    assert "proxy_set_header Upgrade $http_upgrade;" in directives  # WebSockets pass through


def test_image_carries_the_app_and_the_bundle() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert APP in dockerfile
    assert '".[demo]"' in dockerfile
    assert "./node_modules/@microsoft/signalr/dist/browser/signalr.min.js" in dockerfile
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "demo" in project["optional-dependencies"]
    assert any(dep.startswith("PyYAML") for dep in project["optional-dependencies"]["test"])
