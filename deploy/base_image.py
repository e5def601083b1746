"""`canary base-image`: the bases canary's images build on, made from Debian packages.

No container registry is needed. debootstrap (variant minbase) builds a root filesystem from
the machine's own Debian mirror (read from its apt sources, never a fixed host); docs,
man pages, translations, apt lists and downloaded packages are dropped; `docker import` makes
it an image. Two images, each built once and reused until `--rebuild`:

- `bento-canary-base:bookworm`: python3, python3-venv, ca-certificates (Python 3.11), the
  base of the serving images when no official Python image is at hand;
- `bento-canary-services:bookworm`: redis-server and nginx-light with the Lua module, the
  very packages the local stack runs, for the compose stack's Redis and nginx.

Both debootstraps share one download folder, so the second fetches only what it adds.
`resolve_base` picks the serving image's base: the official slim Python image where it is
present or a registry answers (probed with a short timeout), else the Debian-built one.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from deploy.engine import Engine, last_line
from deploy.image_settings import ImageSettings
from models.errors import CanaryError
from models.home import CanaryHome

BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
SERVICES_PACKAGES = ("redis-server", "nginx-light", "libnginx-mod-http-lua", "lua-resty-core")
# What a container never reads: dropped from the root filesystem before import (~155 MB):
# docs, translations, apt's lists and downloads, logs, and glibc's iconv modules (gconv, 9 MB:
# Python's codecs are its own).
SLIM_PATHS = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "var/lib/apt/lists",
              "var/cache/apt", "var/cache/debconf/templates.dat-old", "var/log/apt", "var/log/dpkg.log",
              "var/log/bootstrap.log", "var/log/alternatives.log", "usr/lib/*-linux-gnu/gconv")  # fmt: skip


def ensure_images(engine: Engine, home: CanaryHome, settings: ImageSettings, rebuild: bool, say) -> list[str]:
    """Both Debian-built images, built when missing (or `rebuild`); one line per image."""
    lines = []
    for name, packages in ((settings.debian_base, BASE_PACKAGES), (settings.services_image, SERVICES_PACKAGES)):
        if not rebuild and image_exists(engine, name):
            lines.append(f"{name}: present ({image_size_mb(engine, name):.0f} MB)")
            continue
        build_debian_image(engine, home, settings, name, packages, say)
        lines.append(f"{name}: built ({image_size_mb(engine, name):.0f} MB)")
    return lines


def resolve_base(engine: Engine, home: CanaryHome, settings: ImageSettings, say) -> str:
    """The serving image's base, per `settings.base` (see ImageSettings.base)."""
    choice, official, debian = settings.base, settings.official_base, settings.debian_base
    if choice not in ("auto", "official", "debian"):
        return choice
    if choice != "debian" and image_exists(engine, official):
        return official
    if choice == "auto" and image_exists(engine, debian):
        return debian
    if choice != "debian" and registry_reachable(settings):
        say(f"pulling {official}")
        try:
            engine.run("pull", official, timeout=600, what=f"pulling {official}")
            return official
        except CanaryError as exc:
            if choice == "official":
                raise
            say(f"{exc}; building {debian} from Debian packages instead")
    elif choice == "official":
        raise CanaryError(f"{official} is not present and no registry answers; set CANARY_IMAGE_BASE=debian")
    if not image_exists(engine, debian):
        build_debian_image(engine, home, settings, debian, BASE_PACKAGES, say)
    return debian


def registry_reachable(settings: ImageSettings) -> bool:
    """Any HTTP answer from the registry (401 included) within the probe's timeout."""
    try:
        httpx.get(settings.registry_url, timeout=settings.probe_timeout_s)
        return True
    except httpx.HTTPError:
        return False


def image_exists(engine: Engine, name: str) -> bool:
    done = subprocess.run([engine.client, "image", "inspect", name], capture_output=True, timeout=60, check=False)
    return done.returncode == 0


def image_size_mb(engine: Engine, name: str) -> float:
    return int(engine.run("image", "inspect", "--format", "{{.Size}}", name).strip()) / 1e6


def build_debian_image(
    engine: Engine, home: CanaryHome, settings: ImageSettings, name: str, packages: tuple[str, ...], say
) -> None:
    """debootstrap `packages` into a fresh root filesystem, slim it, import it as `name`."""
    debootstrap = shutil.which("debootstrap") or (
        "/usr/sbin/debootstrap" if Path("/usr/sbin/debootstrap").exists() else None
    )
    if debootstrap is None:
        raise CanaryError(f"building {name} needs debootstrap: run `make setup` as root (apt-get install debootstrap)")
    mirror = settings.mirror or apt_mirror(settings.suite)
    cache = settings.cache_dir(home)
    rootfs, debs = cache / f"rootfs-{re.sub(r'[^a-z0-9]+', '-', name)}", cache / "debs"
    _remove_rootfs(rootfs)
    debs.mkdir(parents=True, exist_ok=True)
    say(f"building {name}: debootstrap {settings.suite} from {mirror} with {', '.join(packages)} (about a minute)")
    argv = [debootstrap, "--variant=minbase", f"--include={','.join(packages)}", f"--cache-dir={debs.resolve()}",
            settings.suite, str(rootfs), mirror]  # fmt: skip
    try:
        run = subprocess.run(argv, stdout=sys.stderr, stderr=subprocess.STDOUT, check=False)
        if run.returncode != 0:
            raise CanaryError(f"debootstrap of {name} failed with exit code {run.returncode} (output above)")
        for pattern in SLIM_PATHS:
            for target in rootfs.glob(pattern):
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
        say(f"importing {name} into {engine.kind}")
        _import(engine, rootfs, name, packages, settings.suite)
    finally:
        _remove_rootfs(rootfs)


def _import(engine: Engine, rootfs: Path, name: str, packages: tuple[str, ...], suite: str) -> None:
    changes = ["ENV LANG=C.UTF-8", 'CMD ["/bin/bash"]',
               f'LABEL org.opencontainers.image.description="Debian {suite} minbase + {" ".join(packages)}"']  # fmt: skip
    argv = [engine.client, "import", *(arg for change in changes for arg in ("--change", change)), "-", name]
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", "-", "."], stdout=subprocess.PIPE)
    try:
        done = subprocess.run(argv, stdin=tar.stdout, capture_output=True, text=True, env=engine.env(), check=False)
    finally:
        if tar.stdout:
            tar.stdout.close()
        tar.wait()
    if done.returncode != 0 or tar.returncode != 0:
        raise CanaryError(f"importing {name} failed: {last_line(done.stderr) or f'tar exit code {tar.returncode}'}")


def _remove_rootfs(rootfs: Path) -> None:
    """Remove a root filesystem, first unmounting whatever an interrupted debootstrap left
    mounted inside it (/proc, /sys): never delete through a mount."""
    if not rootfs.exists():
        return
    prefix = str(rootfs.resolve()) + "/"
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines() if len(line.split()) > 1]
    for mount in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], check=False)
    shutil.rmtree(rootfs, ignore_errors=True)


def apt_mirror(suite: str, apt_dir: Path = Path("/etc/apt")) -> str:
    """The machine's Debian mirror for `suite`: the first apt source (one-line or deb822)
    that serves it with the main component."""
    files = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for paragraph in re.split(r"\n\s*\n", text):
                fields = _deb822(paragraph)
                if "deb" in fields.get("types", "").split() and suite in fields.get("suites", "").split() \
                        and "main" in fields.get("components", "").split() and fields.get("uris"):  # fmt: skip
                    return fields["uris"].split()[0]
        elif path.name == "sources.list" or path.suffix == ".list":
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 4 and words[0] == "deb" and words[2] == suite and "main" in words[3:]:
                    return words[1]
    raise CanaryError(f"no apt source for Debian {suite} (main) in {apt_dir}; set CANARY_IMAGE_MIRROR to a mirror")


def _deb822(paragraph: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in paragraph.splitlines():
        if line.startswith("#") or ":" not in line or line[:1].isspace():
            continue
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.strip()
    return fields
