"""A real systemd, booted in a container (systemd-nspawn) on the test machine, to run the
shipped units under it. Debian's ``debootstrap`` makes a minimal bookworm tree once (about
a minute, cached as a tarball under ``~/.cache/n2s-stream``); ``systemd-nspawn -b`` boots
it without needing a systemd on the host; commands run inside through ``nsenter``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "n2s-stream"
TARBALL = CACHE / "bookworm-systemd.tar"
PACKAGES = "systemd,systemd-sysv,dbus,python3"


class ContainerUnavailable(RuntimeError):
    """This machine cannot boot the container (not root, tools or network missing)."""


def missing_tools() -> str | None:
    """Why the container cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn)"
    for tool in ("systemd-nspawn", "nsenter", "tar"):
        if shutil.which(tool) is None:
            return f"no {tool} (Debian: apt install systemd-container)"
    if not TARBALL.exists() and shutil.which("debootstrap") is None:
        return "no debootstrap (Debian: apt install debootstrap)"
    return None


def root_tree(target: Path) -> None:
    """Unpack the cached minimal Debian tree into ``target`` (made first if needed)."""
    if not TARBALL.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        build = CACHE / f"bookworm-build-{os.getpid()}"
        shutil.rmtree(build, ignore_errors=True)
        made = subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={PACKAGES}",
                "bookworm",
                str(build),
                "http://deb.debian.org/debian",
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if made.returncode != 0:
            raise ContainerUnavailable(f"debootstrap failed: {made.stderr[-300:]}")
        shutil.rmtree(build / "var/cache/apt/archives", ignore_errors=True)
        subprocess.run(["tar", "-C", str(build), "-cf", str(TARBALL) + ".tmp", "."], check=True)
        os.replace(str(TARBALL) + ".tmp", TARBALL)
        shutil.rmtree(build, ignore_errors=True)
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-C", str(target), "-xf", str(TARBALL)], check=True)


class Container:
    """One booted container; ``run`` executes a command inside it."""

    def __init__(self, root: Path, *, read_only_binds: list[str]) -> None:
        self.root = root
        self.log_path = root.parent / "container.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop())
        self.nspawn = subprocess.Popen(
            [
                "systemd-nspawn",
                "-D",
                str(root),
                "-b",
                "-M",
                f"n2s-test-{os.getpid()}",
                "--register=no",
                "--keep-unit",
                "-q",
                *(f"--bind-ro={bind}" for bind in read_only_binds),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            self.pid = self._init_pid()
            self._wait_running()
        except BaseException:
            self.pid = 0
            self.stop()
            raise

    def _init_pid(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise ContainerUnavailable(f"systemd-nspawn exited: {self.log()[-500:]}")
            for children in Path(f"/proc/{self.nspawn.pid}/task").glob("*/children"):
                for pid in children.read_text().split():
                    if _is_container_init(int(pid)):
                        return int(pid)
            time.sleep(0.1)
        raise ContainerUnavailable("the container's init never started")

    def _wait_running(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.run("test", "-S", "/run/systemd/private", check=False).returncode != 0:
            if time.monotonic() > deadline or self.nspawn.poll() is not None:
                raise ContainerUnavailable(f"systemd did not come up: {self.log()[-500:]}")
            time.sleep(0.1)
        state = self.run("systemctl", "is-system-running", "--wait", check=False).stdout
        if state.strip() not in ("running", "degraded"):
            raise ContainerUnavailable(f"systemd is {state.strip()!r}")

    def log(self) -> str:
        """What the container printed (its boot messages)."""
        return self.log_path.read_text(errors="replace")

    def run(
        self, *command: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        """Run ``command`` inside the container (all its namespaces)."""
        proc = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-a", *command],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{command}: {proc.returncode}\n{proc.stdout}{proc.stderr}")
        return proc

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """``systemctl show`` values of ``unit``."""
        out = self.run("systemctl", "show", unit, "-p", ",".join(properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str) -> str:
        """The unit's journal so far."""
        return self.run("journalctl", "-u", unit, "--no-pager", "-o", "cat", check=False).stdout

    def stop(self) -> None:
        """Power off, and clean what nspawn leaves on a host without systemd."""
        if self.nspawn.poll() is None:
            if self.pid:
                self.run("systemctl", "poweroff", check=False, timeout=30)
            else:
                self.nspawn.terminate()
            try:
                self.nspawn.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait(timeout=30)
        self._log.close()
        cgroups = Path("/sys/fs/cgroup")
        for path in [*cgroups.glob("*/payload"), *cgroups.glob("*/supervisor")]:
            for directory in [*sorted(path.rglob("*"), reverse=True), path]:
                if directory.is_dir():
                    with contextlib.suppress(OSError):  # still busy: the next boot reuses it
                        directory.rmdir()


def _is_container_init(pid: int) -> bool:
    """True for the container's systemd: in a PID namespace of its own (nspawn's outer
    child still shares ours)."""
    try:
        own = os.readlink("/proc/self/ns/pid")
        return (
            os.readlink(f"/proc/{pid}/ns/pid") != own
            and Path(f"/proc/{pid}/comm").read_text().strip() == "systemd"
        )
    except OSError:
        return False


def python_binds() -> list[str]:
    """The Python installation the project's venv runs on, to bind into the container;
    none for a system Python under /usr (the container's own Python 3.11 serves: binding
    the host's /usr would hide the container's)."""
    prefix = Path(sys.base_prefix).resolve()
    return [] if prefix == Path("/usr") or Path("/usr") in prefix.parents else [str(prefix)]
