"""Host side of the VM tests: packages, kernels, initramfs, ivshmem server, QEMU.

Everything here follows docs/real-device.md, "The VM tests" (what was seen working on a
machine of this kind). In short:

* QEMU, busybox-static and zstd come from Debian's packages (``apt-get``);
* the guest kernels are Debian's own packages, fetched with ``apt-get
  download`` (names resolved through the metapackages) and unpacked into a cache
  outside the repository (``$VFIO_IRQD_VM_CACHE``, default
  ``/var/cache/vfio-irqd-vm``); nothing is installed into ``/boot``;
* each kernel gets a busybox initramfs with the ~20 modules the guest needs;
  the extracted ELF ``vmlinux`` is booted directly (PVH entry, ~3 s faster);
* the guest sees the host's root read-only over virtio-9p (overlay + tmpfs on
  top) and a writable 9p folder for results; it runs the repository's own
  ``.venv`` Python against an ``ivshmem-doorbell`` device behind an emulated
  ``intel-iommu`` with interrupt remapping, and an emulated NVMe controller
  (``-device nvme``) on a raw backing file filled with a known pattern
  (``examples/nvme/irqd_nvme.py``), which the userspace NVMe example drives;
* the ivshmem server is ours (``IvshmemServer``): it hands QEMU the shared
  memory and one eventfd per vector and keeps its own copies, so the host can
  raise MSI-X interrupts in the guest by writing them, as hardware would.

This module is imported by ``test_vm.py`` and never collected itself.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import importlib.util
import json
import lzma
import os
import re
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("VFIO_IRQD_VM_CACHE", "/var/cache/vfio-irqd-vm"))

#: Host packages (Debian names) and a file each one provides.
HOST_PACKAGES = {
    "qemu-system-x86": "/usr/bin/qemu-system-x86_64",
    "busybox-static": "/bin/busybox",
    "zstd": "/usr/bin/zstd",
    "xz-utils": "/usr/bin/xz",
}


@dataclass(frozen=True)
class KernelSpec:
    """A guest kernel: the Debian metapackage that names it, and what the test expects."""

    label: str
    metapackage: str
    #: MSI-X NORESIZE as the kernel reports it for ivshmem behind intel-iommu.
    noresize: bool


KERNELS = {
    "6.1": KernelSpec("6.1", "linux-image-amd64", noresize=True),
    "6.12": KernelSpec("6.12", "linux-image-6.12-amd64", noresize=False),
}

#: The modules the guest loads (dependencies are added from each module's
#: ``depends=``); a name missing from a kernel's package is built in there.
ROOT_MODULES = (
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "overlay",
    "vfio_pci",
    "vfio_iommu_type1",
)

#: Module parameters: on the kernel command line they are ignored for insmod.
MODULE_PARAMS: dict[str, str] = {}

#: The ivshmem-doorbell device: fixed slot, so the guest knows its address.
IVSHMEM_SLOT = 5
IVSHMEM_BDF = f"0000:00:{IVSHMEM_SLOT:02x}.0"
IVSHMEM_VECTORS = 8
IVSHMEM_SHM_SIZE = 1 << 20  # BAR2 must be a power of two

#: The NVMe controller: its slot, the serial QEMU is given, and the size of
#: its raw backing file (one namespace of that many bytes).
NVME_SLOT = 6
NVME_BDF = f"0000:00:{NVME_SLOT:02x}.0"
NVME_SERIAL = "deadbeef"
NVME_IMAGE_BYTES = 32 << 20

#: QEMU's edu device (hw/misc/edu.c: MSI, INTx, DMA), and a virtio-rng-pci with
#: the AER capability behind its own pcie-root-port (bus 1): the only device model
#: seen to deliver injected errors to vfio-pci's ERR eventfd (docs/real-device.md).
EDU_SLOT = 7
ROOT_PORT_SLOT = 8
AER_DEVICE_ID = "rng"

#: Every QEMU run is bounded by this (seconds), through timeout(1). Under TCG
#: every Python process start in the guest costs seconds (the daemon's 16 to 36),
#: and more when the host is busy: with the NVMe steps, a guest took 3.5 to 4.5
#: minutes on this 2-core machine while other work loaded it (load average 3 to 5).
GUEST_TIMEOUT = int(os.environ.get("VFIO_IRQD_VM_TIMEOUT", "420"))


class Missing(Exception):
    """Something the VM stage needs is not here and cannot be had; says what."""


# -- host packages ----------------------------------------------------------------------


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)  # type: ignore[call-overload,no-any-return]


_apt_updated = False


def _apt_update() -> None:
    global _apt_updated  # noqa: PLW0603  once per process
    if not _apt_updated:
        _run(["apt-get", "update"], timeout=300)
        _apt_updated = True


def ensure_host_packages() -> None:
    """Install what is missing with apt-get, or raise ``Missing`` saying what and why."""
    missing = [pkg for pkg, path in HOST_PACKAGES.items() if not Path(path).exists()]
    if not missing:
        return
    if os.geteuid() != 0:
        raise Missing(f"not root, cannot apt-get install {' '.join(missing)}")
    if shutil.which("apt-get") is None:
        raise Missing(f"no apt-get to install {' '.join(missing)}")
    try:
        _apt_update()
        _run(
            ["apt-get", "install", "-y", "--no-install-recommends", *missing],
            timeout=600,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        out = getattr(exc, "stderr", "") or ""
        raise Missing(
            f"apt-get install {' '.join(missing)} failed (no network to Debian's mirror?): "
            f"{out.strip()[-400:]}"
        ) from exc


def check_prerequisites() -> None:
    """Raise ``Missing`` when this machine cannot run the VM stage at all."""
    if os.geteuid() != 0:
        raise Missing("the VM stage needs root (apt-get, 9p export of /, QEMU)")
    if not (REPO / ".venv" / "bin" / "python").exists():
        raise Missing(f"no virtualenv at {REPO / '.venv'} (run make venv)")
    ensure_host_packages()


# -- kernels ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    """An unpacked guest kernel in the cache."""

    spec: KernelSpec
    release: str
    image: Path  # vmlinux (ELF, PVH) or vmlinuz
    initrd: Path


def _resolve_package(metapackage: str) -> str:
    def depends() -> str | None:
        try:
            out = _run(["apt-cache", "depends", metapackage]).stdout
        except subprocess.CalledProcessError:
            return None
        found = re.search(r"Depends: (linux-image-\S+)", out)
        return found.group(1) if found else None

    name = depends()
    if name is None:
        _apt_update()
        name = depends()
    if name is None:
        raise Missing(f"apt-cache cannot resolve {metapackage} (apt-get update failed?)")
    return name


def _extract_vmlinux(vmlinuz: Path, out: Path) -> bool:
    """Decompress the ELF vmlinux out of a bzImage (as scripts/extract-vmlinux does)."""
    data = vmlinuz.read_bytes()
    for magic, cmd in ((b"\xfd7zXZ\x00", ["xz", "-dc"]), (b"\x28\xb5\x2f\xfd", ["zstd", "-dc"])):
        pos = data.find(magic)
        while pos >= 0:
            # Trailing bytes after the stream make the tool complain; the output counts.
            proc = subprocess.run(cmd, input=data[pos:], capture_output=True, check=False)
            if proc.stdout[:4] == b"\x7fELF":
                out.write_bytes(proc.stdout)
                return True
            pos = data.find(magic, pos + 1)
    return False


def _module_index(root: Path) -> dict[str, Path]:
    index = {}
    for path in root.rglob("*.ko*"):
        name = path.name.split(".ko")[0].replace("-", "_")
        index[name] = path
    return index


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        return _run_bytes(["zstd", "-dc", str(path)])
    return data


def _run_bytes(cmd: list[str]) -> bytes:
    return subprocess.run(cmd, check=True, capture_output=True).stdout


def _depends(ko: bytes) -> list[str]:
    # The .modinfo section: NUL-separated key=value strings (there is no
    # modules.dep in the package).
    found = re.search(rb"\0depends=([^\0]*)\0", ko)
    if not found or not found.group(1):
        return []
    return [d.decode().replace("-", "_") for d in found.group(1).split(b",")]


def ensure_kernel(spec: KernelSpec) -> Kernel:
    """Download (once) and unpack a Debian kernel; build its initramfs (once)."""
    package = _resolve_package(spec.metapackage)
    release = package.removeprefix("linux-image-")
    kdir = CACHE / release
    image = kdir / "vmlinux"
    initrd = kdir / "initrd.cpio"
    if not (kdir / "done").exists():
        debs = CACHE / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        deb = next(debs.glob(f"{package}_*.deb"), None)
        if deb is None:
            try:
                _run(["apt-get", "download", package], cwd=debs, timeout=600)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                raise Missing(
                    f"apt-get download {package} failed (no network to Debian's mirror?): "
                    f"{(getattr(exc, 'stderr', '') or '').strip()[-400:]}"
                ) from exc
            deb = next(debs.glob(f"{package}_*.deb"))
        if kdir.exists():
            shutil.rmtree(kdir)
        kdir.mkdir(parents=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            _run(["dpkg-deb", "-x", str(deb), tmp], timeout=300)
            vmlinuz = next(Path(tmp, "boot").glob("vmlinuz-*"))
            if not _extract_vmlinux(vmlinuz, image):
                shutil.copy(vmlinuz, image)
            _build_initrd(Path(tmp), initrd)
        (kdir / "done").write_text(package + "\n")
        # The .deb is not needed again once unpacked.
        deb.unlink()
    return Kernel(spec, release, image, initrd)


# -- initramfs --------------------------------------------------------------------------


class _Cpio:
    """A minimal ``newc`` cpio writer (no cpio(1) on the host)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 1

    def add(self, name: str, mode: int, data: bytes = b"") -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        blob = header + name.encode() + b"\0"
        blob += b"\0" * (-len(blob) % 4) + data
        blob += b"\0" * (-len(blob) % 4)
        self.parts.append(blob)
        self.ino += 1

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return b"".join(self.parts)


def _build_initrd(unpacked: Path, out: Path) -> None:
    index = _module_index(unpacked / "lib" / "modules")
    order: list[str] = []
    blobs: dict[str, bytes] = {}

    def visit(name: str) -> None:
        if name in blobs or name not in index:
            return  # built in
        blobs[name] = _module_bytes(index[name])
        for dep in _depends(blobs[name]):
            visit(dep)
        order.append(name)

    for name in ROOT_MODULES:
        visit(name)
    cpio = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "tmp", "modules", "mnt"):
        cpio.add(d, stat.S_IFDIR | 0o755)
    cpio.add("bin/busybox", stat.S_IFREG | 0o755, Path("/bin/busybox").read_bytes())
    for name in order:
        cpio.add(f"modules/{name}.ko", stat.S_IFREG | 0o644, blobs[name])
    lines = [f"{n} {MODULE_PARAMS.get(n, '')}".strip() for n in order]
    cpio.add("modules/order", stat.S_IFREG | 0o644, ("\n".join(lines) + "\n").encode())
    out.write_bytes(cpio.finish())


def initrd_with_init(kernel: Kernel, out: Path, init: str = "init") -> Path:
    """The cached archive plus a second one carrying the current ``guest/<init>`` as /init.

    The kernel unpacks concatenated cpio archives in order, so the init script
    can change without rebuilding the cached one.
    """
    cpio = _Cpio()
    cpio.add("init", stat.S_IFREG | 0o755, (Path(__file__).parent / "guest" / init).read_bytes())
    out.write_bytes(kernel.initrd.read_bytes() + cpio.finish())
    return out


# -- ivshmem server ---------------------------------------------------------------------


class IvshmemServer:
    """A one-client ivshmem server (QEMU docs/specs/ivshmem-spec.rst).

    On connect it sends, as little-endian int64 messages: the protocol version
    (0), the client's own peer id, the shared memory (-1 with a memfd passed by
    SCM_RIGHTS), then one message per vector with the peer id and that vector's
    eventfd. It keeps the eventfds: ``fire(v)`` writes one, and QEMU raises MSI-X
    vector v in the guest. Never read them: QEMU reads the same counter.
    """

    PEER_ID = 0

    def __init__(self, path: Path, vectors: int) -> None:
        self.path = path
        self.vectors = vectors
        self.eventfds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(vectors)]
        self.shm = os.memfd_create("ivshmem", os.MFD_CLOEXEC)
        os.ftruncate(self.shm, IVSHMEM_SHM_SIZE)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _send(self, sock: socket.socket, value: int, fd: int | None = None) -> None:
        msg = struct.pack("<q", value)
        if fd is None:
            sock.sendall(msg)
        else:
            fds = array.array("i", [fd])
            sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.listener.accept()
            self.conn = conn
            self._send(conn, 0)  # protocol version
            self._send(conn, self.PEER_ID)
            self._send(conn, -1, self.shm)
            for fd in self.eventfds:
                self._send(conn, self.PEER_ID, fd)

    def fire(self, vector: int, n: int = 1) -> None:
        """Raise MSI-X ``vector`` in the guest from outside it."""
        os.eventfd_write(self.eventfds[vector], n)

    def close(self) -> None:
        self.listener.close()
        if self.conn is not None:
            self.conn.close()
        for fd in [*self.eventfds, self.shm]:
            os.close(fd)


# -- a guest run ------------------------------------------------------------------------


@dataclass
class GuestResult:
    """What one guest run left behind."""

    returncode: int
    seconds: float
    console: str
    results: dict[str, object]
    host_fire: dict[str, object]
    #: check_nvme_image's verdict on the NVMe backing file after the guest exited.
    nvme_image: dict[str, Any]
    #: Every other text file the guest left in its results folder, by name.
    files: dict[str, str] = field(default_factory=dict)

    @classmethod
    def collected(
        cls,
        returncode: int,
        seconds: float,
        console: str,
        results: dict[str, object],
        *,
        firer: HostFirer,
        image: Path,
        files: dict[str, str] | None = None,
    ) -> GuestResult:
        """The result of a guest that has exited: what the host fired, and the
        NVMe backing file checked against what the guest says it wrote."""
        reported = results.get("nvme_image")
        return cls(
            returncode,
            seconds,
            console,
            results,
            {"written": {str(k): v for k, v in firer.written.items()}},
            check_nvme_image(image, reported) if isinstance(reported, dict) else {},
            files or {},
        )


def nvme_pattern() -> Any:
    """examples/nvme/irqd_nvme.py (its data pattern), loaded by path: not a package."""
    spec = importlib.util.spec_from_file_location(
        "irqd_nvme", REPO / "examples" / "nvme" / "irqd_nvme.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Its dataclasses look their module up in sys.modules while being built.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def check_nvme_image(image: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Compare the backing file with what the guest says its drivers wrote.

    ``report`` is the guest's ``nvme_image``: ``written`` (``[lba, gen]`` pairs
    whose write completed) and ``uncertain`` (``[first, count]`` ranges a killed
    driver may have been writing). Every other block must still be the host's
    generation 0.
    """
    pattern = nvme_pattern()
    data = image.read_bytes()
    block = pattern.BLOCK
    expected = {int(lba): int(gen) for lba, gen in report.get("written", [])}
    skip: set[int] = set()
    for first, count in report.get("uncertain", []):
        skip.update(range(int(first), int(first) + int(count)))
    bad: list[list[int]] = []
    checked = 0
    for lba in range(len(data) // block):
        if lba in skip:
            continue
        got = data[lba * block : (lba + 1) * block]
        gen = expected.get(lba, 0)
        checked += 1
        if got != pattern.block(lba, gen) and len(bad) < 20:
            bad.append([lba, gen, *(pattern.decode(got) or (-1, -1))])
    return {
        "blocks": len(data) // block,
        "checked": checked,
        "written_checked": sum(1 for lba in expected if lba not in skip),
        "uncertain": len(skip),
        "bad": bad,
    }


def qemu_command(
    kernel: Kernel,
    work: Path,
    initrd: Path,
    nvme_image: Path | None = None,
    *,
    extra_append: str = "",
    timeout: int = GUEST_TIMEOUT,
) -> list[str]:
    """The QEMU command line (docs/real-device.md: what worked), bounded by timeout(1)."""
    append = (
        "console=ttyS0 rdinit=/init panic=-1 loglevel=4 no_timer_check intel_iommu=on "
        f"mitigations=off irqd_repo={REPO} irqd_label={kernel.spec.label} {extra_append}"
    ).strip()
    return [
        "timeout",
        "-k",
        "5",
        str(timeout),
        "qemu-system-x86_64",
        "-machine",
        "q35,accel=tcg",
        "-cpu",
        "qemu64",
        "-smp",
        "1",
        "-m",
        "1024",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
        "-chardev",
        f"socket,id=ctl,path={work / 'ctl.sock'},server=off",
        "-serial",
        "chardev:ctl",
        # The vIOMMU must come before the devices it translates for.
        "-device",
        "intel-iommu,intremap=on",
        "-fsdev",
        "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device",
        "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev",
        f"local,id=results,path={work / 'results'},security_model=none",
        "-device",
        "virtio-9p-pci,fsdev=results,mount_tag=results",
        "-chardev",
        f"socket,id=ivs,path={work / 'ivshmem.sock'}",
        "-device",
        f"ivshmem-doorbell,id=dut,chardev=ivs,vectors={IVSHMEM_VECTORS},addr={IVSHMEM_SLOT:#x}",
        *(
            [
                "-drive",
                f"file={nvme_image},if=none,id=nvm,format=raw",
                "-device",
                f"nvme,serial={NVME_SERIAL},drive=nvm,addr={NVME_SLOT:#x}",
            ]
            if nvme_image is not None
            else []
        ),
        *device_options(work),
        "-kernel",
        str(kernel.image),
        "-initrd",
        str(initrd),
        "-append",
        append,
    ]


def device_options(work: Path) -> list[str]:
    """edu, the AER device behind its root port, and the monitor that injects errors."""
    return [
        "-device",
        f"edu,addr={EDU_SLOT:#x}",
        "-device",
        f"pcie-root-port,id=rp1,chassis=1,addr={ROOT_PORT_SLOT:#x}",
        "-device",
        f"virtio-rng-pci,aer=on,bus=rp1,id={AER_DEVICE_ID}",
        "-monitor",
        f"unix:{work / 'monitor.sock'},server=on,wait=off",
    ]


def aer_inject(monitor: Path, device: str, error: str) -> str:
    """``pcie_aer_inject_error DEVICE ERROR`` on QEMU's human monitor; ``ok`` or why not.

    QEMU's names (hw/pci/pcie_aer.c, pcie_aer_parse_error_string): ``UNSUP``
    (non-fatal by default severity), ``MALF_TLP`` (fatal) and so on. Its answer
    starts ``OK id:`` when the error was injected.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(10)
        sock.connect(str(monitor))

        def until_prompt() -> str:
            data = b""
            while not data.endswith(b"(qemu) "):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data.decode(errors="replace")

        try:
            until_prompt()  # the banner
            sock.sendall(f"pcie_aer_inject_error {device} {error}\n".encode())
            answer = until_prompt()
        except OSError as exc:
            return f"monitor: {exc}"
    return "ok" if "OK id:" in answer else " ".join(answer.split())[-200:]


class HostFirer:
    """The host end of the control line (the guest's ttyS1).

    The guest asks for host-raised interrupts with lines on ttyS1:
    ``fire V1,V2,... N``: write each listed vector's eventfd once, N rounds, one
    round per ``next`` from the guest (a vector is written again only after the
    guest read it); ``burst V N``: write vector V N times as fast as possible.
    The host answers ``ok`` after each step.
    """

    def __init__(self, path: Path, server: IvshmemServer) -> None:
        self.server = server
        self.monitor = path.parent / "monitor.sock"  # device_options: QEMU's monitor
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.written: dict[int, int] = {}
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.listener.accept()
            with conn:
                buf = b""
                while True:
                    data = conn.recv(4096)
                    if not data:
                        return
                    buf += data
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        reply = self._handle(line.decode(errors="replace").strip())
                        if reply is not None:
                            conn.sendall(reply.encode() + b"\n")

    def _handle(self, line: str) -> str | None:
        words = line.split()
        if not words:
            return None
        if words[0] == "fire":
            vectors = [int(v) for v in words[1].split(",")]
            for v in vectors:
                self.server.fire(v)
                self.written[v] = self.written.get(v, 0) + 1
            return "ok"
        if words[0] == "burst":
            v, n = int(words[1]), int(words[2])
            for _ in range(n):
                self.server.fire(v)
            self.written[v] = self.written.get(v, 0) + n
            return "ok"
        if words[0] == "aer" and len(words) == 3:
            return aer_inject(self.monitor, words[1], words[2])
        return "?"

    def close(self) -> None:
        self.listener.close()


def precompile() -> None:
    """Byte-compile what the guest imports, on the host.

    The guest sees the tree read-only under an overlay: a stale or missing
    ``.pyc`` is compiled there again in every boot, under software emulation.
    """
    dirs = [REPO / "daemon", REPO / "proto", REPO / "tests" / "vm", REPO / "examples"]
    subprocess.run(
        [str(REPO / ".venv" / "bin" / "python"), "-m", "compileall", "-q", *map(str, dirs)],
        capture_output=True,
        check=False,
        timeout=120,
    )


def run_guest(kernel: Kernel) -> GuestResult:
    """Boot one guest, let it run the guest-side checks, return what it reported."""
    precompile()
    with tempfile.TemporaryDirectory(prefix="vfio-irqd-vm-") as tmp:
        work = Path(tmp)
        (work / "results").mkdir()
        server = IvshmemServer(work / "ivshmem.sock", IVSHMEM_VECTORS)
        firer = HostFirer(work / "ctl.sock", server)
        image = work / "nvme.img"
        image.write_bytes(nvme_pattern().image(NVME_IMAGE_BYTES))
        started = time.monotonic()
        try:
            proc = subprocess.run(
                qemu_command(kernel, work, initrd_with_init(kernel, work / "initrd.cpio"), image),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=False,
            )
        finally:
            firer.close()
            server.close()
        seconds = time.monotonic() - started
        console = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
        results_file = work / "results" / "results.json"
        results: dict[str, object] = {}
        if results_file.exists():
            with contextlib.suppress(ValueError):
                results = json.loads(results_file.read_text())
        keep = os.environ.get("VFIO_IRQD_VM_KEEP")
        if keep and results_file.exists():
            # Everything the guest reported, for a look after a passing run too.
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(results_file, Path(keep) / f"results-{kernel.spec.label}.json")
        return GuestResult.collected(
            proc.returncode, seconds, console, results, firer=firer, image=image
        )


#: A bound on each systemd boot (test_systemd.py): a passing one takes about 4 minutes
#: with both kernels' guests at once on two cores, 6 with a third CPU-bound
#: process beside them (every daemon start and restart is slower under TCG).
SYSTEMD_GUEST_TIMEOUT = int(os.environ.get("VFIO_IRQD_VM_SYSTEMD_TIMEOUT", "660"))


def start_systemd_guest(
    kernel: Kernel, work: Path, units: Path, unit: str, *, append: str = ""
) -> tuple[subprocess.Popen[bytes], IvshmemServer, HostFirer, Path]:
    """Start (without waiting) a guest whose PID 1 is the host's systemd (guest/init-systemd).

    ``units`` (a directory on the host, outside /tmp: the guest mounts a tmpfs
    there) holds the scenario's own ``*.service``/``*.target`` files, copied to
    the guest's /etc/systemd/system; systemd starts ``unit``. The guest writes
    into ``work/results``. Returns QEMU, the ivshmem server, the host end of the
    control line and the NVMe backing file; ``finish_guest`` collects.
    """
    (work / "results").mkdir(exist_ok=True)
    server = IvshmemServer(work / "ivshmem.sock", IVSHMEM_VECTORS)
    firer = HostFirer(work / "ctl.sock", server)
    image = work / "nvme.img"
    image.write_bytes(nvme_pattern().image(NVME_IMAGE_BYTES))
    initrd = initrd_with_init(kernel, work / "initrd.cpio", "init-systemd")
    extra = f"irqd_units={units} irqd_unit={unit} {append}"
    argv = qemu_command(
        kernel, work, initrd, image, extra_append=extra, timeout=SYSTEMD_GUEST_TIMEOUT
    )
    log = (work / "console.log").open("wb")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc, server, firer, image


def finish_guest(
    kernel: Kernel,
    work: Path,
    started: tuple[subprocess.Popen[bytes], IvshmemServer, HostFirer, Path],
    t0: float,
) -> GuestResult:
    """Wait for a ``start_systemd_guest`` guest; what it reported, as ``run_guest`` returns."""
    proc, server, firer, image = started
    try:
        proc.wait()
    finally:
        firer.close()
        server.close()
    seconds = time.monotonic() - t0
    console = (work / "console.log").read_text(errors="replace")
    results: dict[str, object] = {}
    files: dict[str, str] = {}
    for path in sorted((work / "results").iterdir()):
        if path.is_file():
            files[path.name] = path.read_text(errors="replace")
    with contextlib.suppress(ValueError, KeyError):
        results = json.loads(files.pop("results.json"))
    keep = os.environ.get("VFIO_IRQD_VM_KEEP")
    if keep:
        dest = Path(keep) / f"systemd-{kernel.spec.label}"
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copytree(work / "results", dest, dirs_exist_ok=True)
        shutil.copy(work / "console.log", dest / "console.log")
    return GuestResult.collected(
        proc.returncode, seconds, console, results, firer=firer, image=image, files=files
    )


# -- the installed package for the systemd boots ------------------------------------------

#: What `make install` reads: a change to any of these builds the stage again.
STAGE_INPUTS = (
    *("daemon", "proto", "systemd", "docs/vfio-irqd.8", "pyproject.toml", "setup.py"),
    *("Makefile", "README.md", "LICENSE"),
)
#: An outer make's flags and the Makefile's variables, kept out of the install's make.
_MAKE_VARIABLES = frozenset(
    (
        *("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "DESTDIR", "PREFIX", "BINDIR", "PKGLIBDIR"),
        *("MANDIR", "UNITDIR", "SYSUSERSDIR", "TMPFILESDIR", "PIP_INSTALL_FLAGS", "PYTHON", "VENV"),
    )
)


def _stage_files() -> list[str]:
    """The checkout's files that `make install` reads (tracked and new, not ignored)."""
    try:
        out = _run(
            ["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "--", *STAGE_INPUTS]
        ).stdout
        names = out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        # Not a git checkout (an unpacked release): every file there but byte code and builds.
        names = [
            str(path.relative_to(REPO))
            for top in STAGE_INPUTS
            for path in ([REPO / top] if (REPO / top).is_file() else (REPO / top).rglob("*"))
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".so"
        ]
    return sorted(name for name in names if (REPO / name).is_file())


def _stage_hash(files: list[str]) -> str:
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode() + b"\0" + (REPO / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def ensure_stage() -> Path:
    """``make install PREFIX=/usr DESTDIR=<stage>/root`` (a package build), cached by
    ``_stage_hash``; ``<stage>/package.tar`` is that tree as one archive.

    The guest unpacks the archive over its root, as a package manager would: one
    file over 9p is read in a second under TCG, the ~2,000 files of the tree in
    tens of seconds. The interpreter is Debian's /usr/bin/python3 (the units run
    with ProtectHome=yes, so the Makefile refuses one under /root), the one the
    guest sees too. Older stages are removed.
    """
    files = _stage_files()
    stage = CACHE / f"stage-{_stage_hash(files)}"
    if (stage / "done").exists():
        return stage
    CACHE.mkdir(parents=True, exist_ok=True)
    for old in CACHE.glob("stage-*"):
        shutil.rmtree(old, ignore_errors=True)
    build = CACHE / "stage.build"
    shutil.rmtree(build, ignore_errors=True)
    # From a copy of those files: pip builds in the tree's build/, which another
    # `make install` in the same checkout (tests/process/test_install.py) empties.
    source = build / "src"
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    env = {k: v for k, v in os.environ.items() if k not in _MAKE_VARIABLES}
    argv = ["make", "--no-print-directory", "-C", str(source), "install", "PREFIX=/usr"]
    proc = subprocess.run(
        [*argv, f"DESTDIR={build / 'root'}", "PYTHON=/usr/bin/python3"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    if proc.returncode != 0:
        raise AssertionError(f"make install failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    shutil.rmtree(source)
    # The staged interpreter imports the program as installed (#! lines name the final paths).
    _run([str(build / "root/usr/lib/vfio-irqd/venv/bin/python"), "-c", "import irqd.tools.cli"])
    _run(["tar", "-C", str(build / "root"), "-cf", str(build / "package.tar"), "."], timeout=300)
    (build / "done").write_text(stage.name + "\n")
    build.rename(stage)
    return stage
