"""Building for another architecture: a binhost root whose programs are of another architecture
than this machine's (an arm64 stage3 on an amd64 desktop, for a Raspberry Pi).

* The root's architecture is read from its /bin/sh, this machine's from the running interpreter.
* The root method is refused for it, naming the fix; `build-method = auto` picks the chroot method.
* The chroot method needs binfmt_misc with an entry that runs such programs with the fix-binary
  flag (F); what is missing is named with the fix.

Real components: binfmt_misc of this machine's kernel, Debian's qemu-user-static (its
binfmt.d entry for aarch64, registered here as systemd-binfmt does), chroot, and a real AArch64
program (a minimal static ELF that exits 42), which must run inside a root that lacks qemu."""

import os
import shutil
import struct
import sys
from pathlib import Path

import pytest

from conftest import SCRIPT, need, run

AARCH64_EXIT_CODE = 42


def aarch64_program(exit_code=AARCH64_EXIT_CODE):
    """A static AArch64 ELF executable: exit(exit_code), nothing else."""
    code = struct.pack("<3I", 0xD2800000 | (exit_code << 5),  # mov x0, #exit_code
                       0xD2800000 | (93 << 5) | 8,             # mov x8, #93 (exit)
                       0xD4000001)                             # svc #0
    base, entry_offset = 0x400000, 64 + 56
    size = entry_offset + len(code)
    header = (b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
              + struct.pack("<HHIQQQIHHHHHH", 2, 183, 1, base + entry_offset, 64, 0, 0, 64, 56, 1, 0, 0, 0))
    program_header = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)
    return header + program_header + code


def arm64_root(base, with_tools=True):
    """A root whose /bin/sh (and emerge, gcc) are AArch64 programs, /bin a link into usr/bin as
    in a merged-usr stage3."""
    root = base / "arm64-root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    for name in ("sh",) + (("emerge", "gcc") if with_tools else ()):
        program = root / "usr/bin" / name
        program.write_bytes(aarch64_program())
        program.chmod(0o755)
    (root / "etc/portage").mkdir(parents=True)
    (root / "var/cache/binpkgs").mkdir(parents=True)
    return root


DEBIAN_AARCH64_ENTRY = ("enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: POF\noffset 0\n"
                        "magic 7f454c460201010000000000000000000200b700\n"
                        "mask ffffffffffffff00fffffffffffffffffeffffff\n")


def fake_binfmt_misc(base, entry=DEBIAN_AARCH64_ENTRY, status="enabled"):
    directory = base / "binfmt_misc"
    directory.mkdir(parents=True)
    (directory / "register").write_text("")
    if status is not None:
        (directory / "status").write_text(status + "\n")
    if entry is not None:
        (directory / "qemu-aarch64").write_text(entry)
    return directory


def test_architectures_from_elf_headers(gb, tmp_path):
    root = arm64_root(tmp_path)
    assert gb.elf_architecture(gb.program_header(str(root), "/bin/sh")) == ("arm64", "aarch64")
    with open(sys.executable, "rb") as handle:
        ours = gb.elf_architecture(handle.read(64))
    assert ours is not None
    foreign = gb.foreign_architecture(str(root))
    if ours[0] == "arm64":
        assert foreign is None
    else:
        assert foreign[:2] == ("arm64", "aarch64") and foreign[3] == ours[0]
    assert gb.elf_architecture(b"#!/bin/sh\n") is None
    # Byte order counts: a big-endian ppc64 root is foreign to a little-endian one.
    ppc64 = bytearray(aarch64_program()[:64])
    ppc64[18:20] = (21).to_bytes(2, "little")
    big = bytearray(ppc64)
    big[5], big[18:20] = 2, (21).to_bytes(2, "big")
    assert gb.elf_architecture(bytes(ppc64)) == ("ppc64", "ppc64le") and gb.elf_architecture(bytes(big)) == ("ppc64", "ppc64")
    assert gb.elf_identity(bytes(ppc64)) != gb.elf_identity(bytes(big))
    mips = bytearray(ppc64)
    mips[18:20] = (8).to_bytes(2, "little")
    assert gb.elf_architecture(bytes(mips)) == ("ELF machine 8 (64-bit, little-endian)", None)
    (root / "usr/bin/sh").unlink()
    (root / "usr/bin/sh").symlink_to("/usr/bin/gcc")  # absolute: inside the root, not this machine's
    assert gb.elf_architecture(gb.program_header(str(root), "/bin/sh")) == ("arm64", "aarch64")


def test_what_is_missing_for_emulation_is_named_with_the_fix(gb, tmp_path):
    header = aarch64_program()[:128]
    problem, by = gb.emulation_problem(header, "arm64", "aarch64", str(fake_binfmt_misc(tmp_path / "ok")))
    assert problem is None and by == "/usr/libexec/qemu-binfmt/aarch64-binfmt-P (binfmt_misc qemu-aarch64, flags POF)"
    problem, _ = gb.emulation_problem(header, "arm64", "aarch64",
                                      str(fake_binfmt_misc(tmp_path / "no-f", DEBIAN_AARCH64_ENTRY.replace("POF", "OC"))))
    assert "without the fix-binary flag (F)" in problem and "apt install qemu-user-static" in problem
    problem, _ = gb.emulation_problem(header, "arm64", "aarch64", str(fake_binfmt_misc(tmp_path / "none", None)))
    assert problem.startswith("no binfmt_misc entry runs arm64 programs") and 'QEMU_USER_TARGETS="aarch64"' in problem
    problem, _ = gb.emulation_problem(header, "arm64", "aarch64",
                                      str(fake_binfmt_misc(tmp_path / "off", DEBIAN_AARCH64_ENTRY.replace("enabled\n", "disabled\n"))))
    assert problem == f"the binfmt_misc entry qemu-aarch64 for arm64 programs is disabled: echo 1 > {tmp_path}/off/binfmt_misc/qemu-aarch64"
    problem, _ = gb.emulation_problem(header, "arm64", "aarch64", str(tmp_path / "not-mounted"))
    assert problem.startswith("binfmt_misc is not mounted: mount -t binfmt_misc binfmt_misc")


def write_config(tmp_path, root, method):
    config = tmp_path / f"{method}.conf"
    config.write_text(f"[binhost]\nroot = {root}\nbuild-method = {method}\ngpg-home = {tmp_path}/g\n")
    return config


def test_the_root_method_is_refused_for_a_root_of_another_architecture(gb, tmp_path):
    with open(sys.executable, "rb") as handle:
        need(gb.elf_architecture(handle.read(64))[0] != "arm64", "this machine is arm64 itself")
    root = arm64_root(tmp_path)
    result = run([sys.executable, SCRIPT, "--color=n", "-c", write_config(tmp_path, root, "root"), "build",
                  "app-misc/hello"], env={"NO_COLOR": "1"}, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith(f"!!! the binhost root {root} is arm64, this machine ")
    assert "set build-method = chroot in" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_emulated_builds_run_the_roots_programs_through_binfmt_misc(gb, tmp_path, binfmt_aarch64, monkeypatch):
    """auto picks the chroot method; the check finds qemu-user-static's entry; and an AArch64
    program really runs inside a root that has no qemu (the F flag)."""
    with open(sys.executable, "rb") as handle:
        need(gb.elf_architecture(handle.read(64))[0] != "arm64", "this machine is arm64 itself")
    root = arm64_root(tmp_path)
    chrooted = run(["chroot", str(root), "/bin/sh"], check=False)
    assert chrooted.returncode == AARCH64_EXIT_CODE, chrooted.stderr
    config = gb.load_config(str(write_config(tmp_path, root, "auto")), gb.Runner(gb.Output(color=False, verbosity=0)))
    method, why = config.environment_for().method
    assert method is gb.EMULATED_METHOD and method.name == "chroot", method
    assert "builds run in it emulated (qemu-user through binfmt_misc)" in why, why
    host = config.environment_for().host
    assert host.emulated_by.startswith("/usr/libexec/qemu-binfmt/aarch64-binfmt-P (binfmt_misc qemu-aarch64")
    # Without an entry with F, nothing of the root runs, and what to do is said.
    monkeypatch.setattr(gb, "BINFMT_MISC", str(fake_binfmt_misc(tmp_path, DEBIAN_AARCH64_ENTRY.replace("POF", "PO"))))
    with pytest.raises(gb.BinhostError, match=r"is arm64, this machine \w+: its programs run here emulated, but the"
                                              r" binfmt_misc entry qemu-aarch64 .* without the fix-binary flag"):
        host.emulated_by  # asked again before each mount
