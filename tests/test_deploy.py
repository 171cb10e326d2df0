"""The container image and the Kubernetes manifests agree with the CLI's real configuration.

No Docker engine or cluster runs here, so this parses what can be parsed: the Dockerfile
(dockerfile-parse), .dockerignore (Docker's matching rules), every manifest under
deploy/kubernetes (PyYAML), and the Prometheus files under deploy/prometheus. Ports and probe
targets are never compared with literals: the effective configuration is computed by
``sidecar.cli.parse_config`` from the environment the image and each container would give the
sidecar, so a changed default, port or env name breaks a test instead of a rollout.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import os
import posixpath
import re
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from sidecar.cli import ENV_PREFIX, build_parser, parse_config
from sidecar.config import HostPort, parse_hostport
from tools.flagtable import documented_actions, env_name

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
K8S_DIR = ROOT / "deploy" / "kubernetes"
PROM_DIR = ROOT / "deploy" / "prometheus"
OPERATIONS_MD = ROOT / "docs" / "operations.md"

# What the downward API and Secrets would give, for resolving a container's env.
SAMPLE_POD_IP = "10.244.1.7"
SAMPLE_HOST_IP = "10.0.0.7"
SAMPLE_SECRET = "sample-token"
# A fixed upstream, so that the test machine's /etc/resolv.conf does not matter.
TEST_UPSTREAM = {"DNS_SIDECAR_UPSTREAM": "127.0.0.1"}
WILDCARDS = ("0.0.0.0", "::")
SIDECAR_IMAGE = "dns-sidecar"
# Env names the crawler reads and hands to the client package (see the manifests).
CLIENT_DNS_ENV = "SIDECAR_DNS_ADDRESS"
CLIENT_API_ENV = "SIDECAR_API_URL"
CLIENT_TOKEN_ENV = "SIDECAR_API_TOKEN"


def flag_env_names() -> set[str]:
    """Every DNS_SIDECAR_* name the CLI reads."""
    return {env_name(next(o for o in a.option_strings if o.startswith("--")))
            for a in documented_actions(build_parser())}


def effective_config(env: Mapping[str, str], argv: list[str] | None = None):
    """``parse_config`` on the DNS_SIDECAR_* part of ``env`` (plus a test upstream if unset)."""
    sidecar_env = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    for key, value in TEST_UPSTREAM.items():
        sidecar_env.setdefault(key, value)
    return parse_config(list(argv or []), env=sidecar_env)


# --------------------------------------------------------------------------------------
# Dockerfile


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    assert DOCKERFILE.is_file(), "no Dockerfile at the top of the repository"
    return DockerfileParser(path=str(DOCKERFILE))


def stages(dfp: DockerfileParser) -> list[list[dict]]:
    """The instructions of each stage (comments left out), FROM first."""
    out: list[list[dict]] = []
    for ins in dfp.structure:
        if ins["instruction"] == "FROM":
            out.append([])
        if out and ins["instruction"] != "COMMENT":
            out[-1].append(ins)
    return out


def final_stage(dfp: DockerfileParser) -> list[dict]:
    return stages(dfp)[-1]


def instructions(stage: list[dict], name: str) -> list[str]:
    return [ins["value"] for ins in stage if ins["instruction"] == name]


@pytest.fixture(scope="module")
def image_env(dockerfile: DockerfileParser) -> dict[str, str]:
    """The environment of the final image (ENV of the last stage)."""
    return dict(dockerfile.envs)


@pytest.fixture(scope="module")
def image_config(image_env: dict[str, str]):
    return effective_config(image_env)


def test_dockerfile_is_multistage_on_official_slim_python(dockerfile: DockerfileParser) -> None:
    all_stages = stages(dockerfile)
    assert len(all_stages) >= 2, "expected a build stage and a runtime stage"
    for image in dockerfile.parent_images:
        repo, _, tag = image.partition(":")
        assert repo in ("python", "docker.io/library/python"), f"not the official Python image: {image}"
        assert "slim" in tag, f"not a slim base: {image}"
    first_from = all_stages[0][0]["value"]
    assert re.search(r"\sAS\s+\w+", first_from, re.IGNORECASE), "the build stage needs a name"


def test_build_stage_makes_a_wheel_and_final_stage_installs_it_with_its_extras(
        dockerfile: DockerfileParser) -> None:
    build, final = stages(dockerfile)[0], final_stage(dockerfile)
    build_name = re.search(r"\sAS\s+(\w+)", build[0]["value"], re.IGNORECASE).group(1)
    assert any("pip wheel" in run for run in instructions(build, "RUN")), "no wheel is built"
    runs = " ".join(instructions(final, "RUN"))
    copies = " ".join(instructions(final, "COPY"))
    assert f"from={build_name}" in runs or f"--from={build_name}" in copies, (
        "the final stage must take the wheel from the build stage")
    extras = re.search(r"pip install\b[^;&|]*\[([\w,]+)\]", runs)
    assert extras and {"fast", "shared"} <= set(extras.group(1).split(",")), (
        "the wheel is not installed with the [fast] and [shared] extras")
    assert "--only-binary" in runs, "without --only-binary a missing wheel would need a compiler"


def test_no_compilers_or_curl_in_final_stage(dockerfile: DockerfileParser) -> None:
    text = " ".join(ins["value"] for ins in final_stage(dockerfile))
    for tool in ("gcc", "g++", "clang", "build-essential", "apt-get install", "curl", "wget"):
        assert tool not in text, f"{tool!r} in the runtime stage"


def test_runs_as_numeric_non_root_user(dockerfile: DockerfileParser) -> None:
    users = instructions(final_stage(dockerfile), "USER")
    assert users, "no USER in the final stage: the image would run as root"
    user, _, group = users[-1].strip().partition(":")
    assert user.isdigit(), f"USER {users[-1]}: numeric, so that Kubernetes can check runAsNonRoot"
    assert int(user) != 0 and group not in ("0", "root"), f"USER {users[-1]} is root"
    runs = " ".join(instructions(final_stage(dockerfile), "RUN"))
    assert re.search(rf"--uid\s+{user}\b", runs), f"uid {user} is not created in the image"
    if group:
        assert re.search(rf"--gid\s+{group}\b", runs), f"gid {group} is not created in the image"


def test_entrypoint_is_the_console_script(dockerfile: DockerfileParser) -> None:
    entry = instructions(final_stage(dockerfile), "ENTRYPOINT")
    assert entry and json.loads(entry[-1]) == ["dns-sidecar"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts.get("dns-sidecar") == "sidecar.cli:main"
    assert not instructions(final_stage(dockerfile), "CMD"), "CMD would become dns-sidecar arguments"


def test_image_env_names_are_real_flags(image_env: dict[str, str]) -> None:
    known = flag_env_names()
    unknown = sorted(k for k in image_env if k.startswith(ENV_PREFIX) and k not in known)
    assert not unknown, f"the CLI reads no such variable: {unknown}"


def test_image_listens_on_all_interfaces(image_config) -> None:
    # Inside a container, loopback is unreachable from published ports and kubelet probes.
    assert image_config.http is not None
    assert image_config.http.host in WILDCARDS
    assert all(hp.host in WILDCARDS for hp in image_config.listen)


def exposed(dfp: DockerfileParser) -> set[str]:
    ports: set[str] = set()
    for value in instructions(final_stage(dfp), "EXPOSE"):
        for item in value.split():
            ports.add(item.lower() if "/" in item else f"{item}/tcp")
    return ports


def test_expose_matches_the_configured_ports(dockerfile: DockerfileParser, image_config) -> None:
    want = {f"{hp.port}/{proto}" for hp in image_config.listen for proto in ("udp", "tcp")}
    want.add(f"{image_config.http.port}/tcp")
    assert exposed(dockerfile) == want
    assert want == {"5353/udp", "5353/tcp", "8053/tcp"}, "the documented ports changed"


def healthcheck_argv(dfp: DockerfileParser) -> tuple[str, list[str]]:
    """(options, exec-form command) of the HEALTHCHECK."""
    checks = instructions(final_stage(dfp), "HEALTHCHECK")
    assert checks, "no HEALTHCHECK"
    parts = re.split(r"\bCMD\b", checks[-1], maxsplit=1)
    assert len(parts) == 2, f"HEALTHCHECK without CMD: {checks[-1]}"
    options, command = parts
    argv = json.loads(command.strip())  # exec form: no shell in the way
    assert isinstance(argv, list), "HEALTHCHECK CMD must be in exec (JSON) form"
    return options, argv


def run_healthcheck_inline(argv: list[str], env: Mapping[str, str],
                           monkeypatch: pytest.MonkeyPatch) -> tuple[int, list[str]]:
    """Run the HEALTHCHECK's Python code here with the HTTP layer faked; (exit code, URLs)."""
    assert argv[:2] in (["python", "-c"], ["python3", "-c"]), argv
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    urls: list[str] = []

    class Reply:
        status = 200

    def fake_open(self, url, *args, **kwargs):
        urls.append(url if isinstance(url, str) else url.full_url)
        return Reply()

    monkeypatch.setattr(urllib.request.OpenerDirector, "open", fake_open)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, *a, **k: fake_open(None, url))
    try:
        exec(compile(argv[2], "<HEALTHCHECK>", "exec"), {"__name__": "__main__"})
    except SystemExit as exc:
        code = exc.code
        return (0 if code in (None, False) else 1 if code is True else int(code)), urls
    return 0, urls


def test_healthcheck_asks_healthz_on_the_configured_api_port(
        dockerfile: DockerfileParser, image_env: dict[str, str], image_config,
        monkeypatch: pytest.MonkeyPatch) -> None:
    options, argv = healthcheck_argv(dockerfile)
    for opt in ("--interval=", "--timeout=", "--retries="):
        assert opt in options
    code, urls = run_healthcheck_inline(argv, image_env, monkeypatch)
    host = "127.0.0.1" if image_config.http.host in WILDCARDS else image_config.http.host
    assert code == 0
    assert urls == [f"http://{host}:{image_config.http.port}/healthz"]


def test_healthcheck_follows_the_env_and_the_cli_default(
        dockerfile: DockerfileParser, monkeypatch: pytest.MonkeyPatch) -> None:
    _, argv = healthcheck_argv(dockerfile)
    # An operator's override of DNS_SIDECAR_HTTP moves the health check with it.
    code, urls = run_healthcheck_inline(argv, {"DNS_SIDECAR_HTTP": "[::]:9000"}, monkeypatch)
    assert (code, urls) == (0, ["http://[::1]:9000/healthz"])
    # Without the variable: the CLI's own default address.
    default = effective_config({}).http
    code, urls = run_healthcheck_inline(argv, {}, monkeypatch)
    assert (code, urls) == (0, [f"http://{default}/healthz"])
    # API switched off: nothing to ask, and the container is not marked unhealthy for it.
    code, urls = run_healthcheck_inline(argv, {"DNS_SIDECAR_HTTP": "off"}, monkeypatch)
    assert (code, urls) == (0, [])


class _HealthHandler(http.server.BaseHTTPRequestHandler):
    status = 200
    paths: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).paths.append(self.path)
        body = b'{"status": "ok"}'
        self.send_response(type(self).status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[type[_HealthHandler], int]]:
    handler = type("Handler", (_HealthHandler,), {"status": 200, "paths": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield handler, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def run_healthcheck(argv: list[str], http_env: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env["DNS_SIDECAR_HTTP"] = http_env
    argv = [sys.executable, *argv[1:]]
    return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode


def test_healthcheck_command_against_a_real_server(
        dockerfile: DockerfileParser, health_server) -> None:
    _, argv = healthcheck_argv(dockerfile)
    handler, port = health_server
    assert run_healthcheck(argv, f"0.0.0.0:{port}") == 0
    assert handler.paths == ["/healthz"]
    handler.status = 503
    assert run_healthcheck(argv, f"127.0.0.1:{port}") != 0


def test_healthcheck_command_fails_when_nothing_listens(dockerfile: DockerfileParser) -> None:
    _, argv = healthcheck_argv(dockerfile)
    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert run_healthcheck(argv, f"127.0.0.1:{port}") != 0


# --------------------------------------------------------------------------------------
# .dockerignore (Docker's rules: last matching pattern wins, a pattern matching a parent
# directory matches everything below it, "!" re-includes, "**" spans directories)


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and "]" in pattern[i + 1:]:
            j = pattern.index("]", i + 1)
            body = pattern[i + 1:j]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = posixpath.normpath(line.lstrip("!").strip().lstrip("/"))
        rules.append((include, _pattern_regex(pattern)))
    return rules


def in_build_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for include, rx in rules:
        if include != excluded:  # as Docker: only an exclusion can change "included", ...
            continue
        if any(rx.match(c) for c in candidates):
            excluded = not include
    return not excluded


def test_dockerignore_matcher_follows_docker_rules() -> None:
    rules = [(False, _pattern_regex("*")), (True, _pattern_regex("src")),
             (False, _pattern_regex("**/__pycache__"))]
    assert not in_build_context("tests/test_a.py", rules)
    assert in_build_context("src/a.py", rules)
    assert not in_build_context("src/__pycache__/a.pyc", rules)
    assert not in_build_context("src/deep/__pycache__/a.pyc", rules)


def test_dockerignore_keeps_tests_benchmarks_and_vcs_out() -> None:
    rules = dockerignore_rules()
    for path in ("tests/test_deploy.py", "tests/__init__.py", "bench/run.py",
                 "bench/results/x.json", ".git/HEAD", ".git/objects/ab/cdef", ".gitignore",
                 ".ci/run", "docs/operations.md", "deploy/kubernetes/sidecar/crawler.yaml",
                 "examples/crawl.py", ".venv/bin/python", "build/lib/x.py",
                 "dist/dns_sidecar-0.1.0-py3-none-any.whl", "sidecar/__pycache__/cli.cpython-311.pyc",
                 "client/__pycache__/x.pyc", ".pytest_cache/v/x", "dns_sidecar.egg-info/PKG-INFO"):
        assert not in_build_context(path, rules), f"{path} would be sent to the Docker daemon"


def test_dockerignore_keeps_what_the_dockerfile_copies(dockerfile: DockerfileParser) -> None:
    rules = dockerignore_rules()
    sources: list[str] = []
    for value in instructions(stages(dockerfile)[0], "COPY"):
        sources += [s for s in value.split()[:-1] if not s.startswith("--")]
    assert {"pyproject.toml", "sidecar/", "client/"} <= set(sources)
    for src in sources:
        assert in_build_context(src.rstrip("/"), rules), f"COPY {src}: excluded by .dockerignore"
        if src == "README.md" and not (ROOT / src).exists():
            continue  # the README owner adds it; the wheel test and the build catch its absence
        assert (ROOT / src).exists(), f"COPY {src}: no such file"
    for package in ("sidecar", "client"):
        for path in (ROOT / package).rglob("*.py"):
            if "__pycache__" not in path.parts:
                rel = path.relative_to(ROOT).as_posix()
                assert in_build_context(rel, rules), f"{rel} is left out of the image"


# --------------------------------------------------------------------------------------
# Kubernetes manifests


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S_DIR.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_manifests() -> list[tuple[Path, dict]]:
    docs = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                docs.append((path, doc))
    return docs


WORKLOAD_KINDS = ("Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job")


def workloads() -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in load_manifests() if d.get("kind") in WORKLOAD_KINDS]


def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def all_containers(pod: dict) -> list[dict]:
    return list(pod.get("initContainers") or []) + list(pod.get("containers") or [])


def is_sidecar(container: dict) -> bool:
    image = container.get("image", "")
    return image.rsplit("/", 1)[-1].split("@")[0].split(":")[0] == SIDECAR_IMAGE


def sidecars(pod: dict) -> list[dict]:
    return [c for c in all_containers(pod) if is_sidecar(c)]


_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names are replaced, others kept, $$ is $."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _REF.sub(sub, value)


def container_env(container: dict, pod: dict) -> dict[str, str]:
    """The container's env as the kubelet would set it, with sample downward-API values."""
    assert not container.get("envFrom"), "envFrom hides names from review and from this test"
    host_network = bool(pod.get("hostNetwork"))
    env: dict[str, str] = {}
    for item in container.get("env") or []:
        name = item["name"]
        if "value" in item:
            env[name] = expand(str(item["value"]), env)
            continue
        source = item["valueFrom"]
        if "fieldRef" in source:
            field = source["fieldRef"]["fieldPath"]
            samples = {"status.hostIP": SAMPLE_HOST_IP,
                       "status.podIP": SAMPLE_HOST_IP if host_network else SAMPLE_POD_IP}
            env[name] = samples.get(field, f"sample-{field}")
        elif "secretKeyRef" in source:
            env[name] = SAMPLE_SECRET
        else:
            pytest.fail(f"{container['name']}: env {name}: unsupported source {source}")
    return env


def sidecar_config(container: dict, pod: dict, image_env: Mapping[str, str]):
    """The sidecar's effective config: the image's ENV, overlaid by the container's env."""
    env = {**image_env, **container_env(container, pod)}
    command = container.get("command")
    assert command in (None, ["dns-sidecar"]), "keep the image's ENTRYPOINT"
    args = [expand(str(a), env) for a in container.get("args") or []]
    return effective_config(env, args)


def port_number(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in container.get("ports") or [] if p.get("name") == port]
    assert named, f"{container['name']}: no container port named {port!r}"
    return named[0]


def probe_target_host(probe: dict, pod: dict) -> str:
    return probe["httpGet"].get("host") or (SAMPLE_HOST_IP if pod.get("hostNetwork") else SAMPLE_POD_IP)


def serves(address: HostPort, host: str, port: int) -> bool:
    return address.port == port and address.host in (host, *WILDCARDS)


def sidecar_workloads() -> list[tuple[Path, dict, dict, dict]]:
    found = []
    for path, doc in workloads():
        pod = pod_spec(doc)
        for container in sidecars(pod):
            found.append((path, doc, pod, container))
    return found


def _id(item) -> str:
    path, doc = item[0], item[1]
    return f"{path.relative_to(ROOT)}:{doc['kind']}/{doc['metadata']['name']}"


SIDECAR_WORKLOADS = sidecar_workloads()
SIDECAR_IDS = [_id(item) for item in SIDECAR_WORKLOADS]


def test_every_manifest_loads() -> None:
    files = manifest_files()
    assert files, "no manifests under deploy/kubernetes"
    docs = load_manifests()
    for path, doc in docs:
        where = path.relative_to(ROOT)
        assert isinstance(doc, dict), f"{where}: not a mapping"
        assert doc.get("apiVersion") and doc.get("kind"), f"{where}: apiVersion/kind missing"
        assert doc.get("metadata", {}).get("name"), f"{where}: {doc['kind']} without a name"
    assert {p for p, _ in docs} == set(files), "a manifest file holds no document"
    kinds = {(d["kind"], bool(pod_spec(d).get("hostNetwork"))) for _, d, _, _ in SIDECAR_WORKLOADS}
    assert ("Deployment", False) in kinds, "no crawler Deployment with the sidecar"
    assert ("DaemonSet", True) in kinds, "no node-local DaemonSet (hostNetwork)"


def test_workload_selectors_match_their_pods() -> None:
    for path, doc in workloads():
        selector = doc["spec"]["selector"]["matchLabels"]
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"{path}: selector does not select the pods"


def test_every_container_has_resource_requests() -> None:
    for path, doc in workloads():
        for container in all_containers(pod_spec(doc)):
            requests = (container.get("resources") or {}).get("requests") or {}
            assert {"cpu", "memory"} <= requests.keys(), (
                f"{path.relative_to(ROOT)}: {container['name']} lacks cpu/memory requests")


@pytest.mark.parametrize("item", SIDECAR_WORKLOADS, ids=SIDECAR_IDS)
def test_sidecar_env_names_are_real_flags(item) -> None:
    _, _, pod, container = item
    known = flag_env_names()
    names = [e["name"] for e in container.get("env") or []]
    unknown = sorted(n for n in names if n.startswith(ENV_PREFIX) and n not in known)
    assert not unknown, f"the CLI reads no such variable: {unknown}"


@pytest.mark.parametrize("item", SIDECAR_WORKLOADS, ids=SIDECAR_IDS)
def test_sidecar_probes_hit_the_configured_api(item, image_env, dockerfile) -> None:
    _, _, pod, container = item
    cfg = sidecar_config(container, pod, image_env)
    assert cfg.http is not None, "the API is off: no probe could work"
    expected_paths = {"readinessProbe": "/readyz", "livenessProbe": "/healthz",
                      "startupProbe": "/healthz"}
    for kind in ("readinessProbe", "livenessProbe"):
        assert kind in container, f"{container['name']}: no {kind}"
    for kind, path in expected_paths.items():
        probe = container.get(kind)
        if probe is None:
            continue
        assert "httpGet" in probe, f"{kind}: expected an httpGet probe"
        assert probe["httpGet"]["path"] == path, f"{kind} must ask {path}"
        assert probe["httpGet"].get("scheme", "HTTP") == "HTTP"
        port = port_number(container, probe["httpGet"]["port"])
        host = probe_target_host(probe, pod)
        assert serves(cfg.http, host, port), (
            f"{kind} asks {host}:{port} but the API listens on {cfg.http}")
        assert f"{port}/tcp" in exposed(dockerfile), f"{kind}: port {port} is not EXPOSEd"


@pytest.mark.parametrize("item", SIDECAR_WORKLOADS, ids=SIDECAR_IDS)
def test_sidecar_container_ports_are_served(item, image_env) -> None:
    _, _, pod, container = item
    cfg = sidecar_config(container, pod, image_env)
    for port in container.get("ports") or []:
        proto = port.get("protocol", "TCP")
        number = port["containerPort"]
        served = {(hp.port, p) for hp in cfg.listen for p in ("UDP", "TCP")}
        served.add((cfg.http.port, "TCP"))
        assert (number, proto) in served, f"port {number}/{proto} is declared but not served"
        if pod.get("hostNetwork") and "hostPort" in port:
            assert port["hostPort"] == number


@pytest.mark.parametrize("item", SIDECAR_WORKLOADS, ids=SIDECAR_IDS)
def test_sidecar_runs_locked_down_with_token_from_a_secret(item) -> None:
    _, _, pod, container = item
    image = container["image"]
    assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"pin {image}"
    security = {**(pod.get("securityContext") or {}), **(container.get("securityContext") or {})}
    assert security.get("runAsNonRoot") is True
    assert security.get("allowPrivilegeEscalation") is False
    token = [e for e in container.get("env") or [] if e["name"] == "DNS_SIDECAR_API_TOKEN"]
    assert token, "the mutating API calls need --api-token"
    assert "secretKeyRef" in token[0].get("valueFrom", {}), "the API token must come from a Secret"


@pytest.mark.parametrize("item", SIDECAR_WORKLOADS, ids=SIDECAR_IDS)
def test_native_sidecar_keeps_running(item) -> None:
    _, _, pod, container = item
    if container in (pod.get("initContainers") or []):
        # A plain init container would block the pod: only restartPolicy Always makes it a
        # sidecar that runs next to the crawler.
        assert container.get("restartPolicy") == "Always"
        assert "startupProbe" in container, "the crawler should start once DNS is served"


def pod_sidecars_deployment() -> list[tuple[Path, dict, dict, dict]]:
    return [item for item in SIDECAR_WORKLOADS
            if item[1]["kind"] == "Deployment" and not item[2].get("hostNetwork")]


def test_pod_sidecar_keeps_dns_on_loopback_and_points_the_crawler_at_it(image_env) -> None:
    items = pod_sidecars_deployment()
    assert items
    for path, _, pod, container in items:
        cfg = sidecar_config(container, pod, image_env)
        for hp in cfg.listen:
            assert ipaddress.ip_address(hp.host).is_loopback, (
                f"{path}: DNS on {hp} would be reachable from the pod network")
        assert any(ipaddress.ip_address("127.0.0.1") in net for net in cfg.allow)
        crawlers = [c for c in pod.get("containers") or [] if not is_sidecar(c)]
        assert crawlers, f"{path}: no crawler next to the sidecar"
        sidecar_token = next(e for e in container["env"] if e["name"] == "DNS_SIDECAR_API_TOKEN")
        for crawler in crawlers:
            env = container_env(crawler, pod)
            assert CLIENT_DNS_ENV in env, f"{crawler['name']}: no {CLIENT_DNS_ENV}"
            address = parse_hostport(env[CLIENT_DNS_ENV], 53)
            assert any(serves(hp, address.host, address.port) for hp in cfg.listen), (
                f"{crawler['name']}: {CLIENT_DNS_ENV}={address} but the sidecar listens on "
                f"{[str(hp) for hp in cfg.listen]}")
            api = urllib.parse.urlsplit(env[CLIENT_API_ENV])
            assert serves(cfg.http, api.hostname, api.port), f"{CLIENT_API_ENV} misses the API"
            token = next(e for e in crawler["env"] if e["name"] == CLIENT_TOKEN_ENV)
            assert token["valueFrom"] == sidecar_token["valueFrom"], "not the sidecar's token"


def node_local_items() -> list[tuple[Path, dict, dict, dict]]:
    return [item for item in SIDECAR_WORKLOADS if item[1]["kind"] == "DaemonSet"]


def test_node_local_daemonset_like_nodelocal_dnscache(image_env) -> None:
    items = node_local_items()
    assert items
    for path, _, pod, container in items:
        where = path.relative_to(ROOT)
        assert pod.get("hostNetwork") is True, f"{where}: not hostNetwork"
        assert pod.get("dnsPolicy") in ("Default", "ClusterFirstWithHostNet")
        names = {e["name"] for e in container.get("env") or []}
        args = [str(a) for a in container.get("args") or []]
        assert "DNS_SIDECAR_ALLOW" in names or any(a.startswith("--allow") for a in args), (
            f"{where}: --allow must admit the pod CIDR (the default is loopback only)")
        cfg = sidecar_config(container, pod, image_env)
        assert any(not net.is_loopback for net in cfg.allow), (
            f"{where}: --allow admits loopback only, every pod would be REFUSED: {cfg.allow}")
        for hp in cfg.listen:
            assert ipaddress.ip_address(hp.host).is_link_local, (
                f"{where}: DNS on {hp}: expected a link-local address")
        assert cfg.http.host not in WILDCARDS, (
            f"{where}: the API on {cfg.http} would open on every interface of the node")
        # Some init container puts the link-local address on the node.
        setup = " ".join(json.dumps(c) for c in pod.get("initContainers") or [])
        for hp in cfg.listen:
            assert hp.host in setup, f"{where}: nothing assigns {hp.host} to the node"


def test_node_local_crawlers_point_at_a_node_local_sidecar(image_env) -> None:
    listeners, apis = set(), set()
    for _, _, pod, container in node_local_items():
        cfg = sidecar_config(container, pod, image_env)
        listeners |= {(hp.host, hp.port) for hp in cfg.listen}
        apis.add((cfg.http.host, cfg.http.port))
    users = []
    for path, doc in workloads():
        pod = pod_spec(doc)
        if sidecars(pod):
            continue
        for crawler in pod.get("containers") or []:
            env = container_env(crawler, pod)
            if CLIENT_DNS_ENV not in env:
                continue
            users.append(path)
            address = parse_hostport(env[CLIENT_DNS_ENV], 53)
            assert (address.host, address.port) in listeners, (
                f"{path}: {CLIENT_DNS_ENV}={address}, no node-local sidecar listens there")
            api = urllib.parse.urlsplit(env[CLIENT_API_ENV])
            assert (api.hostname, api.port) in apis, f"{path}: {CLIENT_API_ENV} misses the API"
    assert users, "no example crawler for the node-local variant"


def test_network_policies_admit_the_api_port(image_env) -> None:
    policies = [(p, d) for p, d in load_manifests() if d["kind"] == "NetworkPolicy"]
    for path, policy in policies:
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        selected = [item for item in SIDECAR_WORKLOADS
                    if selector.items() <= item[1]["spec"]["template"]["metadata"]["labels"].items()
                    and item[1]["metadata"].get("namespace") == policy["metadata"].get("namespace")]
        assert selected, f"{path}: the policy selects no pod with the sidecar"
        ports = {(p.get("protocol", "TCP"), p["port"]) for rule in policy["spec"].get("ingress", [])
                 for p in rule.get("ports", [])}
        for _, _, pod, container in selected:
            cfg = sidecar_config(container, pod, image_env)
            assert ("TCP", cfg.http.port) in ports, f"{path}: API port {cfg.http.port} not admitted"


# --------------------------------------------------------------------------------------
# Prometheus files and docs/operations.md


def test_scrape_config_keeps_the_sidecar_api_port(image_env) -> None:
    config = yaml.safe_load((PROM_DIR / "scrape-config.yaml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "dns-sidecar")
    keep = [r for r in job["relabel_configs"] if r.get("action") == "keep"
            and r["source_labels"] == ["__meta_kubernetes_pod_container_port_name"]]
    assert keep, "the job must keep only the sidecar's API port"
    port_name = keep[0]["regex"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    for _, _, pod, container in SIDECAR_WORKLOADS:
        cfg = sidecar_config(container, pod, image_env)
        named = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
        assert named.get(port_name) == cfg.http.port, (
            f"{container['name']}: no port {port_name!r} = {cfg.http.port} to scrape")
    drops_init = [r for r in job["relabel_configs"] if r.get("action") == "drop"
                  and "__meta_kubernetes_pod_container_init" in r.get("source_labels", [])]
    assert not drops_init, "native sidecars are init containers: do not drop them"


METRIC = re.compile(r"\bdns_sidecar_[a-z_]+")


def test_alert_rules_are_well_formed_and_documented() -> None:
    rules = yaml.safe_load((PROM_DIR / "alerts.yaml").read_text())
    names = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert {"alert", "expr", "for", "labels", "annotations"} <= rule.keys(), rule
            assert rule["labels"].get("severity") in ("critical", "warning", "info")
            assert rule["annotations"].get("summary")
            names.add(rule["alert"])
    assert {"DnsSidecarNotReady", "DnsSidecarServfailRateHigh",
            "DnsSidecarUpstreamQuarantined"} <= names
    docs = OPERATIONS_MD.read_text(encoding="utf-8")
    text = (PROM_DIR / "alerts.yaml").read_text()
    for metric in set(METRIC.findall(text)):
        base = re.sub(r"_(bucket|sum|count)$", "", metric)
        assert f"`{base}" in docs, f"{metric} is not described in docs/operations.md"


def exported_metric_names() -> set[str]:
    """The names sidecar/metrics.py exports (read from its source: no server needed)."""
    src = (ROOT / "sidecar" / "metrics.py").read_text(encoding="utf-8")
    names = {f"dns_sidecar_{n}_total" for n in re.findall(r'_counter\(\s*"(\w+)"', src)}
    names |= {f"dns_sidecar_{n}" for n in re.findall(r'_gauge\(\s*"(\w+)"', src)}
    for n in re.findall(r'PREFIX\s*\+\s*"(\w+)"', src):
        names |= {f"dns_sidecar_{n}{suffix}" for suffix in ("", "_bucket", "_sum", "_count")}
    return names


def test_alerts_and_docs_use_exported_metric_names() -> None:
    if not (ROOT / "sidecar" / "metrics.py").exists():
        pytest.skip("sidecar/metrics.py does not exist yet")
    exported = exported_metric_names()
    assert "dns_sidecar_ready" in exported, "could not read the metric names of sidecar/metrics.py"
    for path in (PROM_DIR / "alerts.yaml", OPERATIONS_MD):
        used = set(METRIC.findall(path.read_text(encoding="utf-8")))
        unknown = sorted(used - exported)
        assert not unknown, f"{path.relative_to(ROOT)}: /metrics has no {unknown}"


def test_operations_doc_embeds_the_prometheus_files_verbatim() -> None:
    docs = OPERATIONS_MD.read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", docs, re.DOTALL)
    for block in blocks:
        yaml.safe_load(block)
    for name in ("scrape-config.yaml", "alerts.yaml"):
        body = (PROM_DIR / name).read_text(encoding="utf-8")
        assert any(block.strip() == body.strip() for block in blocks), (
            f"docs/operations.md does not show deploy/prometheus/{name} as it is")
    for path in ("/healthz", "/readyz", "/stats", "/metrics"):
        assert path in docs


# --------------------------------------------------------------------------------------
# CI: build the same wheel the image installs (slow-ish; the image build is not possible
# here). .ci/run then installs it in a fresh venv and starts dns-sidecar from it.


def _build_requirements_missing() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    missing = []
    for text in requires:
        req = Requirement(text)
        try:
            if not req.specifier.contains(version(req.name), prereleases=True):
                missing.append(text)
        except PackageNotFoundError:
            missing.append(text)
    return missing


@pytest.mark.skipif(not (os.environ.get("CI") or os.environ.get("DNS_SIDECAR_WHEEL_TEST")),
                    reason="slow: builds the wheel; runs when CI or DNS_SIDECAR_WHEEL_TEST is set")
def test_wheel_builds_from_the_docker_build_context(tmp_path: Path) -> None:
    # Without the build requirements in this environment (a fresh venv has an old
    # setuptools and no wheel), let pip fetch them into an isolated build environment.
    isolation = ["--no-build-isolation"] if not _build_requirements_missing() else []
    # The files `docker build` would see (after .dockerignore), built outside the work tree
    # so that no build/ or *.egg-info is left in it.
    rules = dockerignore_rules()
    context = tmp_path / "context"
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT).as_posix()
        if path.is_file() and in_build_context(rel, rules):
            (context / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, context / rel)
    out = tmp_path / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", *isolation,
         "--no-cache-dir", "-w", str(out)],
        cwd=context, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = list(out.glob("dns_sidecar-*.whl"))
    assert len(wheels) == 1, list(out.iterdir())
    with zipfile.ZipFile(wheels[0]) as whl:
        names = set(whl.namelist())
        assert {"sidecar/cli.py", "client/__init__.py"} <= names
        assert not any(n.startswith("tests/") for n in names)
        dist_info = next(n.split("/")[0] for n in names if ".dist-info/" in n)
        entry_points = whl.read(f"{dist_info}/entry_points.txt").decode()
        metadata = whl.read(f"{dist_info}/METADATA").decode()
    assert re.search(r"^dns-sidecar\s*=\s*sidecar\.cli:main$", entry_points, re.MULTILINE)
    assert re.search(r"^Provides-Extra: fast$", metadata, re.MULTILINE)
    assert re.search(r"^Requires-Dist: uvloop.*extra == \"fast\"", metadata, re.MULTILINE)
