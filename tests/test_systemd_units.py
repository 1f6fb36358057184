"""The systemd units: security exposure <= 2.0 (`systemd-analyze security
--offline=yes`), clean `systemd-analyze verify`, the settings the daemon
relies on, and the template kept in step with the plain service."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from overlapd.daemon.config import ServerConfig

UNITS = Path(__file__).resolve().parent.parent / "systemd"
MAX_EXPOSURE = 2.0


def _install_systemd() -> str | None:
    """Debian's systemd package provides systemd-analyze; None on success, else why not."""
    if shutil.which("apt-get") is None:
        return "systemd-analyze is missing and there is no apt-get to install it"
    if os.geteuid() != 0:
        return "systemd-analyze is missing and installing Debian's systemd package needs root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "systemd"]):
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` took more than 10 minutes"
        if done.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="module")
def analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        why = _install_systemd()
        path = shutil.which("systemd-analyze")
        if path is None:
            pytest.skip(why or "systemd-analyze is still missing after installing Debian's systemd package")
    return path


@pytest.fixture(scope="module")
def instance_units(tmp_path_factory) -> dict[str, Path]:
    """The template units as one instance would see them."""
    d = tmp_path_factory.mktemp("units")
    out = {}
    for suffix in ("service", "socket"):
        target = d / f"overlapd@llama.{suffix}"
        shutil.copy(UNITS / f"overlapd@.{suffix}", target)
        out[suffix] = target
    return out


def exposure(analyze: str, unit: Path) -> float:
    done = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(unit)], capture_output=True, text=True, timeout=60
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert m, f"no exposure level in the output of systemd-analyze security:\n{done.stdout[-2000:]}\n{done.stderr}"
    return float(m.group(1))


def test_plain_service_exposure_is_at_most_2(analyze):
    assert exposure(analyze, UNITS / "overlapd.service") <= MAX_EXPOSURE


def test_template_service_exposure_is_at_most_2(analyze, instance_units):
    assert exposure(analyze, UNITS / "overlapd@.service") <= MAX_EXPOSURE
    assert exposure(analyze, instance_units["service"]) <= MAX_EXPOSURE


def verify(analyze: str, *units: Path) -> None:
    done = subprocess.run([analyze, "verify", *map(str, units)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    noise = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert not noise, "systemd-analyze verify complained:\n" + "\n".join(noise)


def test_units_verify_cleanly(analyze, instance_units):
    verify(analyze, UNITS / "overlapd.service", UNITS / "overlapd.socket")
    verify(analyze, UNITS / "overlapd.service", UNITS / "overlapd.socket", UNITS / "overlapd-http.socket")
    verify(analyze, instance_units["service"], instance_units["socket"])


# ------------------------------------------------------------------ what the daemon relies on


def settings(unit: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) in order; repeated keys kept."""
    out, section = [], ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(unit: Path, key: str) -> list[str]:
    return [v for _, k, v in settings(unit) if k == key]


def one(unit: Path, key: str) -> str:
    (v,) = values(unit, key)[-1:]
    return v


@pytest.mark.parametrize("name", ["overlapd.service", "overlapd@.service"])
def test_service_settings(name):
    unit = UNITS / name
    assert one(unit, "Type") == "notify" and one(unit, "NotifyAccess") == "main"
    assert one(unit, "KillSignal") == "SIGTERM" and "-HUP" in one(unit, "ExecReload")
    assert one(unit, "ExecStart").startswith("/usr/bin/env overlapd serve --config /etc/overlapd/")
    assert int(one(unit, "WatchdogSec")) > 0
    assert float(one(unit, "TimeoutStopSec")) > ServerConfig().drain_timeout_s  # room to drain before SIGKILL
    assert one(unit, "RuntimeDirectory") == "overlapd" and one(unit, "RuntimeDirectoryPreserve") == "yes"
    assert one(unit, "LimitMEMLOCK") == "infinity"
    assert one(unit, "User") == "overlapd" and "DynamicUser" not in {k for _, k, _ in settings(unit)}
    assert one(unit, "RemoveIPC") == "no"  # the ring in /dev/shm must outlive a restart
    assert one(unit, "DevicePolicy") == "closed" and "yes" not in values(unit, "PrivateDevices")
    allowed = values(unit, "DeviceAllow")
    assert {"char-nvidia-frontend rw", "char-nvidia-uvm rw", "/dev/nvidiactl rw", "/dev/nvidia-uvm rw"} <= set(allowed)
    assert "/dev/shm" in values(unit, "ReadWritePaths")
    assert one(unit, "RestrictAddressFamilies") == "AF_UNIX" and one(unit, "PrivateNetwork") == "yes"


def test_sockets():
    plain, template = UNITS / "overlapd.socket", UNITS / "overlapd@.socket"
    assert one(plain, "ListenStream") == "/run/overlapd/overlapd.sock"
    assert one(template, "ListenStream") == "/run/overlapd/%i.sock"
    for unit in (plain, template):
        assert one(unit, "SocketMode") == "0660" and one(unit, "SocketGroup") == "overlapd"
        assert one(unit, "Accept") == "no"
    assert "--ring /dev/shm/overlapd-%i.ring" in one(UNITS / "overlapd@.service", "ExecStart")
    assert "/etc/overlapd/%i.toml" in one(UNITS / "overlapd@.service", "ExecStart")


def test_http_socket_is_handed_to_the_service_by_the_name_the_daemon_looks_for():
    from overlapd.daemon.systemd_notify import HTTP_FD_NAME

    unit = UNITS / "overlapd-http.socket"
    assert one(unit, "FileDescriptorName") == HTTP_FD_NAME
    assert one(unit, "Service") == "overlapd.service" and one(unit, "Accept") == "no"
    assert one(unit, "ListenStream").startswith("127.0.0.1:")  # loopback unless the operator says otherwise
    assert "overlapd-http.socket" in one(UNITS / "overlapd.service", "After").split()


def test_template_sandbox_matches_the_plain_service():
    per_instance = {"Description", "Requires", "After", "ExecStart", "Also"}
    plain = [s for s in settings(UNITS / "overlapd.service") if s[1] not in per_instance]
    template = [s for s in settings(UNITS / "overlapd@.service") if s[1] not in per_instance]
    assert plain == template


# ------------------------------------------------------------------ MemoryDenyWriteExecute, measured

MDWE = """
import ctypes, mmap, sys
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, REFUSE_EXEC_GAIN
    sys.exit(77)
try:
    mmap.mmap(-1, 4096, prot=7)
    sys.exit(78)  # not enforced
except OSError:
    pass
"""


def run_under_mdwe(code: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-c", MDWE + code], capture_output=True, text=True, timeout=120)
    if done.returncode in (77, 78):
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+) to emulate MemoryDenyWriteExecute=")
    return done


def test_the_daemon_itself_runs_without_writable_executable_memory():
    done = run_under_mdwe(
        "import numpy, msgspec, uvloop, structlog, tokenizers\n"
        "import overlapd.daemon.server, overlapd.daemon.client, overlapd.daemon.echo_engine\n"
        "numpy.ones((64, 64)) @ numpy.ones((64, 64))\n"
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_memory_deny_write_execute_stays_off_while_paddle_needs_it():
    """Paddle's bundled MKL has text relocations: under MDWE it cannot load.
    If a Paddle release fixes that, this test says MDWE could be turned on."""
    pytest.importorskip("paddle")
    done = run_under_mdwe("import paddle\npaddle.matmul(paddle.ones([8, 8]), paddle.ones([8, 8]))\n")
    paddle_runs = done.returncode == 0
    for name in ("overlapd.service", "overlapd@.service"):
        setting = one(UNITS / name, "MemoryDenyWriteExecute")
        if not paddle_runs:
            assert setting == "no", f"{name}: Paddle cannot run under MemoryDenyWriteExecute=yes ({done.stderr[-300:]})"
