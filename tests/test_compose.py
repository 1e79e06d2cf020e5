# SPDX-License-Identifier: MIT
"""docker-compose.yml and the Dockerfile, checked without a Docker engine: every command, module,
option, port, host name, environment variable and file they name exists and fits together.

Modules are imported in subprocesses with the service's environment as compose would give it
(``${VAR:-default}`` resolved to its default), so the check does not depend on this shell.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
TEXT = COMPOSE_FILE.read_text()
COMPOSE: dict[str, Any] = yaml.safe_load(TEXT)
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<default>[^}]*))?\}")


# -- reading the compose file the way compose does ----------------------------------------------


def interpolate(value: str) -> str:
    """``${VAR}``, ``${VAR:-default}`` and ``${VAR-default}`` with no variable set: the
    defaults (``$$`` is a literal ``$``)."""

    def one(match: re.Match[str]) -> str:
        if match["op"] in (":?", "?"):
            pytest.fail(f"{match[0]} needs a variable from the shell: give it a default")
        return match["default"] or ""

    return _VAR.sub(one, value).replace("$$", "$")


def environment(service: str) -> dict[str, str]:
    """A service's environment, interpolated."""
    env = SERVICES[service].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): interpolate(str(v)) for k, v in env.items()}


def command(service: str) -> list[str]:
    cmd = SERVICES[service].get("command") or []
    words = shlex.split(cmd) if isinstance(cmd, str) else [str(w) for w in cmd]
    return [interpolate(w) for w in words]


def option(words: list[str], name: str) -> str | None:
    """The value of ``--name=value`` or ``--name value`` in a command."""
    for i, word in enumerate(words):
        if word.startswith(f"{name}="):
            return word.split("=", 1)[1]
        if word == name and i + 1 < len(words):
            return words[i + 1]
    return None


def flags(words: list[str]) -> list[str]:
    return [w.split("=", 1)[0] for w in words if w.startswith("--")]


def app_module(words: list[str]) -> str | None:
    """The module of ``celery -A module``."""
    if not words or words[0] != "celery":
        return None
    value = option(words, "-A") or option(words, "--app")
    return value.split(":", 1)[0] if value else None


def main_module(words: list[str]) -> str | None:
    """The module of ``python -m module``."""
    if len(words) >= 3 and words[0] in ("python", "python3") and words[1] == "-m":
        return words[2]
    return None


def celery_subcommand(words: list[str]) -> str | None:
    """``worker`` in ``celery -A x worker ...``."""
    if not words or words[0] != "celery":
        return None
    rest = words[1:]
    while rest and rest[0].startswith("-"):
        rest = rest[2:] if rest[0] in ("-A", "--app", "-b", "--broker") else rest[1:]
    return rest[0] if rest else None


def exposed_ports(service: str) -> set[int]:
    """The container ports a service opens on the compose network (expose and ports)."""
    found = {int(str(p).split("/")[0]) for p in SERVICES[service].get("expose") or []}
    for entry in SERVICES[service].get("ports") or []:
        target = entry.get("target") if isinstance(entry, dict) else str(entry).split(":")[-1]
        found.add(int(str(target).split("/")[0]))
    return found


def python_services() -> list[str]:
    """The services that run this repository's code (a command naming a module of it)."""
    return [s for s in SERVICES if app_module(command(s)) or main_module(command(s))]


def module_file(module: str) -> Path:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py", base / "__main__.py"):
        if candidate.is_file():
            return candidate
    pytest.fail(f"module {module} is not in the repository (no {base}.py)")


def run_python(
    code: str, env: dict[str, str], *args: str, image: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -c code`` with a service's environment: from the repository root, or with
    ``image`` (see :func:`image_tree`) from the image's working directory with only the image's
    files on the path (besides the installed packages)."""
    if image is None:
        cwd, path = ROOT, str(ROOT)
    else:
        layout = Image(dockerfile("worker"))
        cwd = image / layout.workdir.relative_to("/")
        path = os.pathsep.join(str(image / p.relative_to("/")) for p in layout.import_path())
    full = {
        **{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "SYSTEMROOT")},
        **env,
        "PYTHONPATH": path,
    }
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
    )


# -- which environment variables a module reads -------------------------------------------------


def _env_reads(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        key: ast.expr | None = None
        if isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            if func in ("os.environ.get", "os.getenv", "environ.get", "getenv") and node.args:
                key = node.args[0]
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) in (
            "os.environ",
            "environ",
        ):
            key = node.slice
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            names.add(key.value)
    return names


def _local_imports(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {m for m in found if m.split(".")[0] == "examples"}


@functools.cache
def env_reads(module: str) -> frozenset[str]:
    """Environment variables read by ``module`` and the ``examples`` modules it imports."""
    seen: set[str] = set()
    todo = [module]
    names: set[str] = set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        tree = ast.parse(module_file(current).read_text())
        names |= _env_reads(tree)
        todo.extend(_local_imports(tree))
    return frozenset(names)


def modules_of(service: str) -> list[str]:
    words = command(service)
    return [m for m in (app_module(words), main_module(words)) if m]


# -- the Dockerfile -----------------------------------------------------------------------------


def dockerfile(service: str) -> Path:
    build = SERVICES[service]["build"]
    context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
    name = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    return context / name


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


class Image:
    """What the Dockerfile puts where: COPY sources mapped to absolute paths in the image."""

    def __init__(self, path: Path) -> None:
        self.context = path.parent
        self.instructions = dockerfile_instructions(path)
        self.copies: list[tuple[str, PurePosixPath]] = []
        self.env: dict[str, str] = {}
        self.workdir = PurePosixPath("/")
        for word, rest in self.instructions:
            if word == "WORKDIR":
                self.workdir = self.workdir / rest
            elif word == "ENV":
                for pair in shlex.split(rest):
                    key, _, value = pair.partition("=")
                    self.env[key] = value
            elif word == "COPY":
                parts = [p for p in shlex.split(rest) if not p.startswith("--")]
                *sources, dest = parts
                target = self.workdir / dest
                for source in sources:
                    local = self.context / source
                    # One file to a path not ending in "/" is copied to that path.
                    if local.is_file() and not dest.endswith("/") and len(sources) == 1:
                        self.copies.append((source, target))
                    elif local.is_file():
                        self.copies.append((source, target / Path(source).name))
                    else:
                        self.copies.append((source.rstrip("/"), target))

    def local(self, path: str) -> Path | None:
        """The file of the build context at ``path`` in the image, if the image has one."""
        wanted = PurePosixPath(path)
        for source, target in reversed(self.copies):
            local = self.context / source
            if local.is_file() and wanted == target:
                return local
            if local.is_dir() and wanted.is_relative_to(target):
                candidate = local / wanted.relative_to(target)
                if candidate.exists():
                    return candidate
        return None

    def import_path(self) -> list[PurePosixPath]:
        """Where Python finds modules in the image, besides site-packages: PYTHONPATH, and
        the working directory (``python -m`` and ``celery -A`` import from it)."""
        entries = [PurePosixPath(p) for p in self.env.get("PYTHONPATH", "").split(":") if p]
        return [*entries, self.workdir]


def dockerignored(context: Path, relpath: str) -> bool:
    """Whether .dockerignore keeps ``relpath`` (or a directory above it) out of the context."""
    ignore = context / ".dockerignore"
    if not ignore.exists():
        return False
    patterns = [
        p.strip().lstrip("/")
        for p in ignore.read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    assert not any(p.startswith("!") for p in patterns), "exceptions are not checked here"
    parts = PurePosixPath(relpath).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, pattern):
                return True
            if pattern.startswith("**/") and fnmatch.fnmatchcase(
                prefix.rsplit("/", 1)[-1], pattern[3:]
            ):
                return True
    return False


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files the image holds, laid out as in the image under a temporary root: what the
    Dockerfile COPYs, without what .dockerignore keeps out of the build context."""
    assert len({dockerfile(s) for s in python_services()}) == 1, "one image for every service"
    image = Image(dockerfile(python_services()[0]))
    root = tmp_path_factory.mktemp("image")

    def ignored(directory: str, names: list[str]) -> list[str]:
        relative = Path(directory).relative_to(image.context)
        return [n for n in names if dockerignored(image.context, (relative / n).as_posix())]

    for source, target in image.copies:
        local = image.context / source
        dest = root / target.relative_to("/")
        if local.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(local, dest)
        else:
            shutil.copytree(local, dest, ignore=ignored, dirs_exist_ok=True)
    return root


# -- the tests ----------------------------------------------------------------------------------


def test_the_demo_services_are_there_and_depend_on_services_that_exist() -> None:
    """Redis, the simulated provider, workers, Flower and the producer; every depends_on target
    is a service of the file."""
    assert {"redis", "provider", "worker", "flower", "producer"} <= set(SERVICES)
    for name, service in SERVICES.items():
        for target in service.get("depends_on") or []:
            assert target in SERVICES, f"{name} depends on {target}, which is not a service"


def test_the_worker_service_scales() -> None:
    """``--scale worker=4`` works: no container_name, no hostname, no host port, and no fixed
    node name on the worker."""
    worker = SERVICES["worker"]
    for key in ("container_name", "hostname", "ports"):
        assert key not in worker, f"worker has {key}: it cannot be scaled"
    words = command("worker")
    assert celery_subcommand(words) == "worker"
    node = option(words, "-n") or option(words, "--hostname")
    assert node is None or "%h" in node, f"every replica would be the node {node}"


def test_services_that_read_redis_url_wait_for_a_healthy_redis() -> None:
    """REDIS_URL names the ``redis`` service on its port, and every service whose code reads it
    waits for Redis to be healthy."""
    redis_service = SERVICES["redis"]
    assert str(redis_service["image"]).startswith("redis:")
    assert "healthcheck" in redis_service
    readers = [
        s for s in python_services() if any("REDIS_URL" in env_reads(m) for m in modules_of(s))
    ]
    assert {"worker", "flower", "producer"} <= set(readers)
    for name in readers:
        url = urlsplit(environment(name)["REDIS_URL"])
        assert url.scheme == "redis", url
        assert url.hostname == "redis", url
        assert (url.port or 6379) in exposed_ports("redis") | {6379}
        depends = SERVICES[name].get("depends_on") or {}
        assert "redis" in depends, f"{name} does not depend on redis"
        assert isinstance(depends, dict), f"{name}: depends_on without conditions"
        assert depends["redis"] == {"condition": "service_healthy"}, f"{name} starts too early"


@pytest.mark.parametrize("service", python_services())
def test_every_environment_variable_the_code_reads_is_set(service: str) -> None:
    """Each variable the service's modules (and the examples modules they import) read with
    ``os.environ``/``os.getenv`` is set in its environment."""
    env = environment(service)
    for module in modules_of(service):
        missing = env_reads(module) - set(env)
        assert not missing, f"{service}: {module} reads {sorted(missing)}, not set in compose"


@pytest.mark.parametrize("service", [s for s in python_services() if app_module(command(s))])
def test_celery_app_modules_import_with_the_compose_environment(
    service: str, image_tree: Path
) -> None:
    """``celery -A module`` names a module that imports from the image's files, with the
    service's environment, and holds a Celery app called ``app``."""
    module = app_module(command(service))
    assert module is not None
    code = (
        "import importlib, sys, celery\n"
        "m = importlib.import_module(sys.argv[1])\n"
        "assert isinstance(m.app, celery.Celery), type(m.app)\n"
    )
    result = run_python(code, environment(service), module, image=image_tree)
    assert result.returncode == 0, f"{service}: {module} does not import:\n{result.stderr}"


@pytest.mark.parametrize("service", [s for s in python_services() if main_module(command(s))])
def test_python_m_modules_exist_and_take_the_options_given(service: str, image_tree: Path) -> None:
    """``python -m module --opt ...``: the module runs from the image's files (its ``--help``
    exits 0) and lists every option the command passes."""
    words = command(service)
    module = main_module(words)
    assert module is not None
    module_file(module)
    result = run_python(
        "import runpy, sys; sys.argv = [sys.argv[1], '--help']; "
        "runpy.run_module(sys.argv[0], run_name='__main__')",
        environment(service),
        module,
        image=image_tree,
    )
    assert result.returncode == 0, f"{service}: {module} --help failed:\n{result.stderr}"
    for flag in flags(words[3:]):
        assert re.search(rf"{re.escape(flag)}\b", result.stdout), f"{module} has no {flag}"


@pytest.mark.parametrize(
    "service", [s for s in python_services() if celery_subcommand(command(s)) == "worker"]
)
def test_worker_options_exist(service: str, image_tree: Path) -> None:
    """Every option of the ``celery worker`` command is one ``celery worker --help`` lists,
    run from the image's files."""
    words = command(service)
    result = run_python(
        "import sys; from celery.__main__ import main; sys.argv = ['celery', *sys.argv[1:]]; "
        "main()",
        environment(service),
        *words[1:],
        "--help",
        image=image_tree,
    )
    assert result.returncode == 0, result.stderr
    for flag in flags(words):
        assert re.search(rf"{re.escape(flag)}\b", result.stdout), f"celery worker has no {flag}"


def test_flower_runs_with_throttles_config_on_its_exposed_port() -> None:
    """Flower: ``celery -A <app> flower`` with options Flower defines, listening on all
    interfaces of its container on the port it exposes, its ``--conf`` the file
    ``python -m throttle.celeryext.flower`` names, as the image holds it."""
    words = command("flower")
    assert celery_subcommand(words) == "flower"
    assert app_module(words) == app_module(command("worker"))
    result = run_python(
        "import json, flower.options, tornado.options as t; "
        "print(json.dumps(sorted(t.options._options)))",
        environment("flower"),
    )
    assert result.returncode == 0, result.stderr
    known = set(json.loads(result.stdout))
    after = words[words.index("flower") + 1 :]
    for flag in flags(after):
        assert flag[2:].replace("-", "_") in known, f"Flower has no option {flag}"
    assert option(after, "--address") == "0.0.0.0"
    port = option(after, "--port")
    assert port is not None
    assert int(port) in exposed_ports("flower")
    conf = option(after, "--conf")
    assert conf is not None
    image = Image(dockerfile("flower"))
    local = image.local(conf)
    printed = run_python(
        "import runpy; runpy.run_module('throttle.celeryext.flower', run_name='__main__')", {}
    )
    assert printed.returncode == 0, printed.stderr
    assert local is not None, f"--conf={conf}: the image has no such file"
    assert local.resolve() == Path(printed.stdout.strip()).resolve(), (
        f"--conf={conf} is not throttle's Flower config in the image ({local})"
    )


def test_flower_is_not_published_without_auth() -> None:
    """Flower has no auth by default, so it is reachable on the compose network only: a host
    port needs FLOWER_BASIC_AUTH (documented in the file), and its API is never opened."""
    env = environment("flower")
    assert "FLOWER_BASIC_AUTH" in TEXT, "the file does not say how to turn auth on"
    auth = env.get("FLOWER_BASIC_AUTH") or option(command("flower"), "--basic-auth")
    assert not SERVICES["flower"].get("ports") or auth, "Flower published without auth"
    assert env.get("FLOWER_UNAUTHENTICATED_API", "false").lower() in ("false", "0", "")


def test_the_provider_url_reaches_the_provider_service() -> None:
    """PROVIDER_URL names the provider service, on the port its command listens on, and it
    listens on all interfaces of its container (loopback would be unreachable)."""
    words = command("provider")
    assert main_module(words) == "examples.agents.provider"
    assert option(words, "--host") == "0.0.0.0"
    port = int(option(words, "--port") or 0)
    assert port in exposed_ports("provider")
    for name in python_services():
        if "PROVIDER_URL" in environment(name):
            url = urlsplit(environment(name)["PROVIDER_URL"])
            assert (url.hostname, url.port) == ("provider", port), (name, url)
    depends = SERVICES["worker"].get("depends_on") or {}
    assert "provider" in depends


@pytest.mark.parametrize("service", [s for s in SERVICES if "build" in SERVICES[s]])
def test_build_contexts_and_dockerfiles_exist(service: str) -> None:
    """Every build context and Dockerfile exists; the Dockerfile starts from Python 3.11+,
    installs the package with its demo extras, and copies only what the context holds."""
    path = dockerfile(service)
    assert path.is_file(), f"{service}: no {path}"
    image = Image(path)
    base = next(rest for word, rest in image.instructions if word == "FROM")
    match = re.match(r"python:3\.(\d+)", base)
    assert match, base
    assert int(match[1]) >= 11, base
    runs = " ".join(rest for word, rest in image.instructions if word == "RUN")
    assert re.search(r"pip install [\"']?\.\[demo\][\"']?", runs), runs
    pyproject = tomllib.loads((image.context / "pyproject.toml").read_text())
    demo = " ".join(pyproject["project"]["optional-dependencies"]["demo"])
    assert "flower" in demo, "the image runs Flower: the demo extra must install it"
    for source, _ in image.copies:
        assert (image.context / source).exists(), f"COPY {source}: not in the context"
        assert not dockerignored(image.context, source), f"COPY {source}: .dockerignore'd"


@pytest.mark.parametrize("service", python_services())
def test_the_image_holds_every_module_a_command_names(service: str) -> None:
    """Each module a service's command names is copied into the image, on its import path,
    and not excluded from the build context."""
    image = Image(dockerfile(service))
    for module in modules_of(service):
        relative = module_file(module).relative_to(ROOT).as_posix()
        assert not dockerignored(image.context, relative), f"{relative} is .dockerignore'd"
        found = [
            entry
            for entry in image.import_path()
            if (local := image.local(str(entry / relative))) is not None
            and local.resolve() == (ROOT / relative).resolve()
        ]
        assert found, f"{service}: {module} ({relative}) is not on the image's import path"
