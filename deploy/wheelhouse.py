"""The wheelhouse: every wheel a serving image installs, downloaded on the host before the build.

Inside a container, TLS to the package registries fails on machines that reach them through
an intercepting proxy, and an air-gapped build reaches none: the image build downloads
nothing. `prepare_wheelhouse` downloads (`pip download`, binary wheels only) the Bento's
requirements plus pip itself for the image's Python (its exact version, manylinux for glibc
2.36, the host's architecture), pinned to the versions this environment runs (so the image
serves with what the tests ran), into a folder named by a hash of all of that: a second
build with the same inputs downloads nothing.

pip evaluates environment markers against the interpreter it runs on, not the target
(`redis` needs `async-timeout` only on Python < 3.11.3: Debian's 3.11.2 needs it, the host's
3.11.7 does not), so after pip's pass the wheels' own metadata is walked with the target's
markers and whatever is missing is downloaded too, until nothing is.
"""

from __future__ import annotations

import email.parser
import hashlib
import importlib.metadata
import json
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from models.errors import CanaryError

GLIBC_MINOR = 36  # Debian bookworm's glibc 2.36 (the official python:3.11-slim-bookworm too)
OWN_DISTRIBUTIONS = {"bento-canary"}
MAX_ROUNDS = 5
LAYOUT = 2  # bump when what a wheelhouse folder holds changes: older folders are not reused


def platform_tags() -> list[str]:
    """Every manylinux tag that runs on the image's glibc: pip matches `--platform` exactly."""
    return [f"manylinux_2_{minor}_{platform.machine()}" for minor in range(GLIBC_MINOR, 4, -1)]


def constraints_of_this_environment() -> list[str]:
    """`name==version` of every distribution installed here (the project itself excepted)."""
    pins = {}
    for dist in importlib.metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"] or "")
        if name and name not in OWN_DISTRIBUTIONS and "+" not in dist.version:
            pins[name] = f"{name}=={dist.version}"
    return sorted(pins.values())


def target_environment(python: str) -> dict[str, str]:
    """Marker variables of the image's interpreter: CPython `python` on Linux, this machine's arch."""
    host = {str(key): str(value) for key, value in default_environment().items()}
    return {**host, "python_full_version": python, "implementation_version": python,
            "python_version": ".".join(python.split(".")[:2]), "sys_platform": "linux", "os_name": "posix",
            "platform_system": "Linux", "platform_machine": platform.machine(),
            "implementation_name": "cpython", "platform_python_implementation": "CPython"}  # fmt: skip


def prepare_wheelhouse(requirements: Sequence[str], python: str, cache: Path, say=lambda line: None) -> Path:
    """A folder of wheels for `requirements` (+ pip) on CPython `python` (e.g. "3.11.2"), with
    requirements.txt and constraints.txt beside them; reused when one for the same inputs exists."""
    wanted = sorted({*requirements, "pip"})
    constraints = constraints_of_this_environment()
    inputs = {"requirements": wanted, "constraints": constraints, "python": python, "platforms": platform_tags(),
              "layout": LAYOUT}  # fmt: skip
    key = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]
    folder = cache / "wheelhouse" / key
    if (folder / "requirements.txt").is_file():
        say(f"wheelhouse {folder} (cached)")
        return folder
    partial = folder.with_name(f".{key}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    (partial / "constraints.txt").write_text("\n".join(constraints) + "\n")
    say(f"downloading the wheels of {len(wanted)} requirements for CPython {python} into {folder}")
    try:
        _download(partial, wanted, python, deps=True)
        for _ in range(MAX_ROUNDS):
            missing = missing_requirements(partial, wanted, target_environment(python))
            if not missing:
                break
            say(f"also needed on Python {python}: {', '.join(missing)}")
            _download(partial, missing, python, deps=False)
        else:
            raise CanaryError(f"the wheelhouse is still incomplete after {MAX_ROUNDS} rounds: {', '.join(missing)}")
    except CanaryError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    # requirements.txt last: its presence marks a complete wheelhouse. pip's wheel is the
    # installer the image runs, not one of its requirements.
    (partial / "requirements.txt").write_text("\n".join(sorted(requirements)) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def missing_requirements(folder: Path, wanted: Sequence[str], env: dict[str, str]) -> list[str]:
    """Requirements of `wanted`, followed through the wheels' metadata with the target's
    markers (extras included), that no wheel in `folder` provides."""
    requires: dict[str, list[Requirement]] = {}
    for wheel in folder.glob("*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            name = next(n for n in archive.namelist() if re.match(r"[^/]+\.dist-info/METADATA$", n))
            metadata = email.parser.Parser().parsestr(archive.read(name).decode("utf-8", errors="replace"))
        requires[canonicalize_name(metadata["Name"])] = [
            Requirement(r) for r in metadata.get_all("Requires-Dist") or []
        ]
    todo = [r for r in map(Requirement, wanted) if r.marker is None or r.marker.evaluate(env)]
    seen: set[tuple[str, tuple[str, ...]]] = set()
    missing: dict[str, str] = {}
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if (name, tuple(sorted(requirement.extras))) in seen:
            continue
        seen.add((name, tuple(sorted(requirement.extras))))
        if name not in requires:
            missing.setdefault(name, f"{requirement.name}{requirement.specifier}")
            continue
        extras = {"", *requirement.extras}
        for dependency in requires[name]:
            if dependency.marker is None or any(dependency.marker.evaluate({**env, "extra": e}) for e in extras):
                todo.append(dependency)
    return sorted(missing.values())


def _download(folder: Path, requirements: Sequence[str], python: str, deps: bool) -> None:
    listing = folder / "download.txt"
    listing.write_text("\n".join(requirements) + "\n")
    argv = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--python-version", python,
            "--implementation", "cp", "--abi", f"cp{''.join(python.split('.')[:2])}",
            *(arg for tag in platform_tags() for arg in ("--platform", tag)), "--dest", str(folder),
            "-r", str(listing), "-c", str(folder / "constraints.txt"), *(() if deps else ("--no-deps",))]  # fmt: skip
    done = subprocess.run(argv, stdout=sys.stderr, stderr=subprocess.PIPE, text=True, check=False)
    listing.unlink()
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip().startswith("ERROR")]
        raise CanaryError(f"downloading the wheelhouse failed: {lines[-1] if lines else done.returncode}")


def pip_wheel(folder: Path) -> str:
    """The file name of pip's own wheel in the wheelhouse (the image installs with it)."""
    for wheel in sorted(folder.glob("pip-*.whl")):
        if re.match(r"pip-\d", wheel.name):
            return wheel.name
    raise CanaryError(f"the wheelhouse {folder} has no pip wheel; delete it and build again")
