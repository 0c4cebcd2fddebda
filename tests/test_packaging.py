"""The package and the image build: what an operator installs is what we test.

* ``python -m build`` on a clean copy of the repository makes an sdist and a
  wheel that ``twine check --strict`` accepts, without setuptools warnings;
  the wheel holds only ``odmr_bridge`` (its modules, Lua scripts, py.typed).
* That wheel, installed into an empty venv, gives an ``odmr-bridge`` command
  that reports its version and serves LMTP and ODMR on its own private Redis.
* ``deploy/Dockerfile`` builds from exactly what it copies (no Docker engine
  here, so the package is built from its COPY set), and runs unprivileged
  with the spool as a volume.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
import redis

import odmr_bridge
from odmr_bridge import embedded_redis
from tests.conftest import need
from tests.peers import ROOT, free_port, port_open, wait_for

DOCKERFILE = ROOT / "deploy" / "Dockerfile"
SPOOL_VOLUME = "/var/spool/odmr-bridge"

# pip reads this machine's pip.conf, whose local indexes (file:///opt/pypi...)
# lack a page for some projects; pip says so with this warning about its own
# configuration, not about our package.  Every other warning fails the test.
MACHINE_INDEX_NOTICE = re.compile(
    r"^WARNING: Location 'file://\S+' is ignored: it is neither a file nor a directory\.$"
)


def build_env() -> dict[str, str]:
    """The environment for builds and installs.

    PYTHONDONTWRITEBYTECODE (set by some shells and CI images) makes setuptools
    print "warning: build_py: byte-compiling is disabled"; that is the caller's
    choice, not a packaging defect, so builds here run without it.  PYTHONPATH
    and PYTHONHOME could let the repository leak into the installed venv.
    """
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    return env


def warnings_in(output: str) -> list[str]:
    return [line for line in output.splitlines()
            if re.search(r"warn|deprecat", line, re.IGNORECASE)
            and not MACHINE_INDEX_NOTICE.match(line.strip())]


def run(args: list[str | Path], cwd: Path, timeout: float = 300,
        env: Mapping[str, str] | None = None) -> str:
    """Run a command; fail with its combined output unless it exits 0."""
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env or build_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        pytest.fail(f"{shlex.join(str(a) for a in args)} exited {result.returncode}:\n"
                    f"{result.stdout}")
    return result.stdout


def tracked_files() -> list[str]:
    need("git")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                         capture_output=True).stdout.decode()
    return [name for name in out.split("\0") if name]


def copy_tracked(names: list[str], destination: Path) -> None:
    """Copy files as git has them (symlinks stay symlinks, as in a checkout)."""
    for name in names:
        source = ROOT / name
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        elif source.exists():  # a file deleted in the work tree is not in a checkout
            shutil.copy2(source, target)


def require_modules(*modules: str) -> None:
    """build and twine are in the [test] extra: missing, the check cannot be made."""
    missing = [m for m in modules if subprocess.run(
        [sys.executable, "-c", f"import {m}"], capture_output=True).returncode != 0]
    if missing:
        pytest.fail(f"{sys.executable} lacks {', '.join(missing)}: pip install -e '.[test]'")


# --- python -m build on a clean copy ------------------------------------------------


@dataclass(frozen=True)
class Built:
    sdist: Path
    wheel: Path
    output: str


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    require_modules("build")
    source = tmp_path_factory.mktemp("checkout")
    copy_tracked(tracked_files(), source)
    dist = tmp_path_factory.mktemp("dist")
    output = run([sys.executable, "-m", "build", "--outdir", dist, source], cwd=source)
    sdists, wheels = sorted(dist.glob("*.tar.gz")), sorted(dist.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, f"build made {sorted(dist.iterdir())}"
    return Built(sdists[0], wheels[0], output)


def test_build_makes_an_sdist_and_a_wheel_of_this_version_without_warnings(
        built: Built) -> None:
    version = odmr_bridge.__version__
    assert built.sdist.name == f"odmr_bridge-{version}.tar.gz"
    assert built.wheel.name == f"odmr_bridge-{version}-py3-none-any.whl"
    assert "running bdist_wheel" in built.output  # setuptools' own output was seen
    assert warnings_in(built.output) == [], built.output


def test_twine_check_strict_passes_on_the_sdist_and_the_wheel(built: Built) -> None:
    require_modules("twine")
    output = run([sys.executable, "-m", "twine", "check", "--strict",
                  built.sdist, built.wheel], cwd=built.wheel.parent)
    assert output.count("PASSED") == 2, output


def test_wheel_holds_only_odmr_bridge_with_its_lua_scripts_and_py_typed(built: Built) -> None:
    with zipfile.ZipFile(built.wheel) as wheel:
        names = [n for n in wheel.namelist() if not n.endswith("/")]
        top_level = wheel.read(next(n for n in names if n.endswith(".dist-info/top_level.txt")))
        entry_points = wheel.read(
            next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    dist_info = f"odmr_bridge-{odmr_bridge.__version__}.dist-info"
    assert {PurePosixPath(n).parts[0] for n in names} == {"odmr_bridge", dist_info}
    assert top_level.split() == [b"odmr_bridge"]
    assert re.search(r"^odmr-bridge\s*=\s*odmr_bridge\.cli:main$", entry_points, re.M)

    package = sorted(n.removeprefix("odmr_bridge/") for n in names
                     if n.startswith("odmr_bridge/"))
    sources = sorted(n.removeprefix("bridge/") for n in tracked_files()
                     if re.fullmatch(r"bridge/([^/]+\.py|lua/[^/]+\.lua|py\.typed)", n)
                     and (ROOT / n).exists())
    assert package == sources
    assert "py.typed" in package and any(n.startswith("lua/") for n in package)


# --- the wheel in an empty venv -------------------------------------------------------


@dataclass(frozen=True)
class Installed:
    venv: Path
    pip_output: str
    outside: Path  # a working directory outside the repository

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def command(self) -> Path:
        return self.venv / "bin" / "odmr-bridge"


@pytest.fixture(scope="module")
def installed(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    venv = tmp_path_factory.mktemp("venv")
    outside = tmp_path_factory.mktemp("elsewhere")
    # The suite's interpreter (>= 3.11); from inside a venv, venv uses its base
    # Python, and without --system-site-packages the new venv starts empty.
    run([sys.executable, "-m", "venv", "--clear", venv], cwd=outside)
    pip_output = run([venv / "bin" / "python", "-m", "pip", "install", built.wheel],
                     cwd=outside)
    return Installed(venv, pip_output, outside)


def test_wheel_installs_into_an_empty_venv_without_warnings(installed: Installed) -> None:
    assert "Successfully installed" in installed.pip_output, installed.pip_output
    assert warnings_in(installed.pip_output) == [], installed.pip_output


def test_installed_package_is_the_venvs_and_installs_no_generic_top_level_names(
        installed: Installed) -> None:
    probe = (
        "import importlib.util, json, odmr_bridge\n"
        "print(json.dumps({'file': odmr_bridge.__file__,"
        " 'version': odmr_bridge.__version__,"
        " 'strays': [m for m in ('bridge', 'tests', 'bench')"
        "            if importlib.util.find_spec(m) is not None]}))\n"
    )
    found = json.loads(run([installed.python, "-c", probe], cwd=installed.outside))
    assert Path(found["file"]).resolve().is_relative_to(installed.venv.resolve())
    assert found["version"] == odmr_bridge.__version__
    assert found["strays"] == []
    package = Path(found["file"]).parent
    assert (package / "py.typed").is_file()
    assert sorted(p.name for p in (package / "lua").glob("*.lua")) == sorted(
        p.name for p in (ROOT / "bridge" / "lua").glob("*.lua"))


def test_installed_command_prints_its_version(installed: Installed) -> None:
    output = run([installed.command, "--version"], cwd=installed.outside)
    assert output == f"odmr-bridge {odmr_bridge.__version__}\n"


def greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        line = conn.makefile("rb").readline()
        conn.sendall(b"QUIT\r\n")
        return line


@pytest.fixture
def served(installed: Installed, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes],
                                                                   dict[str, str], Path]]:
    """``odmr-bridge serve`` from the venv, with its embedded Redis (no redis.url)."""
    need("redis-server")
    config = tmp_path / "odmr-bridge.toml"
    config.write_text("")  # not the machine's /etc/odmr-bridge: defaults + environment
    env = {k: v for k, v in build_env().items() if not k.startswith("ODMR_BRIDGE_")}
    env.update({
        "ODMR_BRIDGE_CONFIG": str(config),
        "ODMR_BRIDGE_REDIS_URL": "",
        "ODMR_BRIDGE_SPOOL_DIR": str(tmp_path / "spool"),
        "ODMR_BRIDGE_ACCOUNTS_FILE": str(tmp_path / "customers.json"),
        "ODMR_BRIDGE_LMTP_LISTEN": f"127.0.0.1:{free_port()}",
        "ODMR_BRIDGE_ODMR_LISTEN": f"127.0.0.1:{free_port()}",
        "ODMR_BRIDGE_ODMR_HOSTNAME": "provider.test",
        "ODMR_BRIDGE_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
        "ODMR_BRIDGE_POSTFIX_CONFIG_DIR": str(tmp_path / "no-postfix"),
        "ODMR_BRIDGE_BOUNCE_RELAY": f"127.0.0.1:{free_port()}",
    })
    log = tmp_path / "serve.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen([installed.command, "serve"], cwd=installed.outside,
                                   env=env, stdout=handle, stderr=subprocess.STDOUT)
        try:
            yield process, env, log
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)


def test_installed_command_serves_lmtp_and_odmr_on_a_private_redis_and_stops_cleanly(
        served: tuple[subprocess.Popen[bytes], dict[str, str], Path]) -> None:
    process, env, log = served
    ports = [int(env[f"ODMR_BRIDGE_{name}_LISTEN"].rsplit(":", 1)[1])
             for name in ("LMTP", "ODMR", "METRICS")]

    def listening() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"serve exited {process.returncode}:\n{log.read_text()}")
        return all(port_open(port) for port in ports)

    wait_for(listening, timeout=30, what="the installed bridge to listen")
    lmtp, odmr = greeting(ports[0]), greeting(ports[1])
    assert lmtp.startswith(b"220 "), lmtp
    assert odmr.startswith(b"220 "), odmr
    private = embedded_redis.socket_path(env["ODMR_BRIDGE_SPOOL_DIR"])
    assert redis.Redis(unix_socket_path=str(private)).ping()

    process.send_signal(signal.SIGTERM)
    assert process.wait(40) == 0, log.read_text()
    with pytest.raises(redis.ConnectionError):
        redis.Redis(unix_socket_path=str(private), socket_connect_timeout=2).ping()


# --- deploy/Dockerfile ----------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def instruction_words(arguments: str) -> list[str]:
    """Exec form (a JSON array) or shell form."""
    if arguments.startswith("["):
        words: list[str] = json.loads(arguments)
        return words
    return shlex.split(arguments)


def image_tree(destination: Path) -> Path:
    """Lay out what the COPY lines put into the image, each source from the repository
    as git has it; return the directory that plays the final WORKDIR."""
    tracked = tracked_files()
    workdir = PurePosixPath("/")
    for keyword, arguments in dockerfile_instructions():
        if keyword == "WORKDIR":
            workdir = workdir / arguments
        elif keyword in ("COPY", "ADD"):
            words = [w for w in instruction_words(arguments) if not w.startswith("--")]
            assert keyword == "COPY", f"ADD {arguments}: use COPY"
            *sources, target = words
            into = workdir / target
            for source in sources:
                name = os.path.normpath(source)
                if name in tracked:
                    goes_to = into / Path(name).name if target.endswith("/") else into
                    copy_one(name, destination, goes_to)
                else:
                    inside = [t for t in tracked if t.startswith(name + "/")]
                    assert inside, f"COPY {source}: not in the repository"
                    for member in inside:
                        copy_one(member, destination, into / member.removeprefix(name + "/"))
    return destination / str(workdir).lstrip("/")


def copy_one(name: str, destination: Path, in_image: PurePosixPath) -> None:
    target = destination / str(in_image).lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if (ROOT / name).exists():
        shutil.copy2(ROOT / name, target)


def test_package_builds_from_exactly_the_dockerfiles_copy_set(
        built: Built, tmp_path: Path) -> None:
    context = image_tree(tmp_path / "image")
    wheels = tmp_path / "wheels"
    # What `pip install '.[milter]'` in the image does first: build the wheel.
    output = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--verbose",
                  "--wheel-dir", wheels, context], cwd=tmp_path)
    assert "running bdist_wheel" in output  # --verbose: setuptools' output is seen
    assert warnings_in(output) == [], output
    [wheel] = wheels.glob("*.whl")
    with zipfile.ZipFile(wheel) as image_wheel, zipfile.ZipFile(built.wheel) as repo_wheel:
        assert sorted(image_wheel.namelist()) == sorted(repo_wheel.namelist())


def test_image_runs_as_a_non_root_user_with_the_spool_as_a_volume() -> None:
    instructions = dockerfile_instructions()
    users = [(i, args) for i, (keyword, args) in enumerate(instructions) if keyword == "USER"]
    assert users, "no USER: the image would run as root"
    position, user = users[-1]
    assert user.split(":")[0] not in ("root", "0")
    assert all(keyword in ("EXPOSE", "ENTRYPOINT", "CMD", "VOLUME", "LABEL", "HEALTHCHECK",
                           "STOPSIGNAL", "ENV")
               for keyword, _ in instructions[position + 1:]), "something runs after USER"
    runs = " ".join(args for keyword, args in instructions if keyword == "RUN")
    assert re.search(rf"useradd\b[^&;]*\b{re.escape(user)}\b", runs), f"{user} is not created"

    volumes = [path for keyword, args in instructions if keyword == "VOLUME"
               for path in instruction_words(args)]
    assert SPOOL_VOLUME in volumes
    # A volume starts with the image's ownership of that path: the user must own it.
    assert re.search(rf"(install -d -o {re.escape(user)}\b|chown[^&;]*{re.escape(user)})"
                     rf"[^&;]*{re.escape(SPOOL_VOLUME)}", runs), f"{user} does not own the spool"
