"""`make demo`: the real gentoo-binhost.py pipeline on any Linux box, narrated.

Real Portage (PyPI, in .venv) builds and signs binary packages from the test repository into a
binhost root, `serve` serves them, `setup-target` configures a target root reached through a
real sshd on 127.0.0.1, and the target's real `emerge --getbinpkgonly` verifies and installs them.
Every command is shown exactly as run, with its output. Everything lives in one temporary
directory, removed at the end (kept with --keep). Run as root after `make deps`.
"""

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import (REPO, SCRIPT, eroot, find_portage_bin, free_port,  # noqa: E402
                      portage_eprefix, start_sshd, stop_process, wait_for_port, write_portage_config)

PACKAGE = "app-misc/hello-app"
STEP_TIMEOUT = 300


class DemoError(Exception):
    """A missing prerequisite or a failed step: printed as one `!!!` line."""


def quoted(argv):
    return " ".join(shlex.quote(str(word)) for word in argv)


def show_file(path):
    print(f"\n  --- {path} ---")
    print(textwrap.indent(Path(path).read_text(), "  "), end="")


class Demo:
    def __init__(self, base, portage_bin, eprefix, sshd):
        self.base = base
        self.portage_bin = portage_bin
        self.eprefix = eprefix
        self.sshd = sshd
        self.step = "preparation"
        self.binhost = base / "binhost"
        self.target = base / "target"
        self.config = base / "gentoo-binhost.conf"
        self.port = free_port()
        self.env = dict(os.environ, PATH=f"{portage_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}")

    def say(self, title, paragraph, gentoo=()):
        """Narrate a step: its title, what a real user would do and what happens here, and
        (gentoo) commands a real user would type on Gentoo instead of what the demo does."""
        self.step = title.split(":")[0]
        print("\n" + "=" * 78 + "\n" + title + "\n" + "=" * 78)
        print(textwrap.fill(" ".join(paragraph.split()), width=78, break_on_hyphens=False,
                            break_long_words=False))
        if gentoo:
            print("On a real Gentoo binhost, for a target called laptop:")
            print("".join(f"    # {line}\n" for line in gentoo), end="")

    def sh(self, *argv):
        """Show argv shell-quoted, run it with its output streamed; fail the demo on non-zero.

        The command gets its own session, so on Ctrl-C, SIGTERM or a timeout we stop it and
        everything it started (emerge, ssh, gpg) as one process group."""
        argv = [str(word) for word in argv]
        print(f"\n$ {quoted(argv)}")
        try:
            proc = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL, start_new_session=True)
        except FileNotFoundError:
            raise DemoError(f"{self.step}: {argv[0]} not found") from None
        try:
            returncode = proc.wait(timeout=STEP_TIMEOUT)
        except subprocess.TimeoutExpired:
            stop_group(proc)
            raise DemoError(f"{self.step}: timed out after {STEP_TIMEOUT}s: {quoted(argv)}") from None
        except BaseException:
            stop_group(proc)
            raise
        if returncode != 0:
            raise DemoError(f"{self.step} failed with exit code {returncode}: {quoted(argv)}"
                            " (see its output above)")

    def tool(self, *args):
        self.sh(sys.executable, SCRIPT, "-c", self.config, *args)

    def run(self, stack):
        self.say("Step 1/7: a binhost root holding a copy of the target's Portage configuration", f"""
            On real Gentoo you extract a stage3 into /binhost, copy the target's /etc/portage into
            /binhost/etc/portage (keeping the make.profile symlink, which scp does not) so packages
            are built with the target's profile, USE and CFLAGS, make the ebuild repository
            reachable inside /binhost for that relative symlink, and write /etc/gentoo-binhost.conf.
            Here the "target machine" is the directory {self.target}, and both it and the binhost
            root {self.binhost} get the same configuration: profile and repository from
            tests/repo ({REPO}), USE="loud". Portage from PyPI is a prefix install, so the venv's
            own etc/portage ({self.eprefix}/etc/portage) is configured too, and files installed
            into a ROOT land under ROOT{self.eprefix}: nothing of that is needed on Gentoo. The
            configuration file tells gentoo-binhost.py about both machines; the target is reached
            over ssh (a throwaway sshd on 127.0.0.1:{self.sshd.port}, root login by key), with
            Portage's bin directory as its remote PATH.""", gentoo=[
            "mkdir /binhost && tar -C /binhost -xpf stage3-amd64-openrc-*.tar.xz",
            "ssh root@laptop tar -C /etc -cpf - portage | tar -C /binhost/etc -xpf -",
            "mkdir -p /binhost/var/db/repos && ln -s /var/db/repos/gentoo /binhost/var/db/repos/",
            "printf '[binhost]\\nurl = http://binhost:8080/\\n\\n[target laptop]\\nhost = root@laptop\\n'"
            " > /etc/gentoo-binhost.conf"])
        write_portage_config(Path(self.eprefix), repo=REPO)
        write_portage_config(self.binhost, repo=REPO, extra_make_conf='USE="loud"\n')
        write_portage_config(self.target, repo=REPO, extra_make_conf=(
            f'USE="loud"\nBINPKG_GPG_VERIFY_GPG_HOME="{self.target}/etc/portage/gnupg"\n'))
        self.config.write_text(
            "[binhost]\n"
            f"root = {self.binhost}\n"
            f"url = http://127.0.0.1:{self.port}/\n"
            "bind = 127.0.0.1\n"
            f"port = {self.port}\n"
            "\n[target demo]\n"
            f"host = {self.sshd.host}\n"
            f"ssh-port = {self.sshd.port}\n"
            f"ssh-options = {self.sshd.ssh_options}\n"
            f"root = {self.target}\n"
            f"path = {self.portage_bin}\n")
        self.sh("ls", "-l", self.binhost / "etc/portage")
        self.sh("cat", self.binhost / "etc/portage/make.conf")
        show_file(self.config)

        self.say("Step 2/7: a signing key for the binhost", """
            Targets refuse unsigned binary packages by default (binrepos.conf verify-signature =
            true). `keygen` creates an ed25519 GnuPG key without a passphrase (builds run
            unattended), records its fingerprint as signing-key (and gpg-home) in the
            configuration, and prepares the public keyring Portage checks its own signatures
            with, readable by the user nobody. You do this once per binhost.""")
        self.tool("keygen")
        self.sh("grep", "-E", "^(signing-key|gpg-home) =", self.config)

        self.say(f"Step 3/7: build {PACKAGE} on the binhost", """
            `build` runs emerge --root-deps with FEATURES=buildpkg, ROOT and PORTAGE_CONFIGROOT set to the
            binhost root; binhost-only settings (PKGDIR, the signing key) travel in the
            environment, so the copied /etc/portage stays identical to the target's. The
            dependency app-misc/hello is built too. Real C is compiled with the target's CFLAGS.
            Warnings about a missing 'gentoo' repository come from PyPI Portage's default
            repos.conf and are harmless here.""")
        self.tool("build", PACKAGE)
        packages = sorted((self.binhost / "var/cache/binpkgs").rglob("*.gpkg.tar"))
        if not packages:
            raise DemoError("the build wrote no .gpkg.tar package")
        print("\nEach GPKG carries detached signatures (*.sig members) next to what they sign:")
        self.sh("tar", "-tvf", next((p for p in packages if "hello-app" in p.name), packages[-1]))
        for package in packages:
            with tarfile.open(package) as archive:
                signatures = [name for name in archive.getnames() if name.endswith(".sig")]
            if not signatures:
                raise DemoError(f"{package} is not signed")
            print(f"  signed: {package.name} ({len(signatures)} signatures)")

        self.say("Step 4/7: serve the binhost's PKGDIR over HTTP", f"""
            `serve` is a small read-only HTTP server for PKGDIR, made for Portage's fetcher
            (Packages.gz, If-Modified-Since, 404 fallbacks). On a real binhost it runs as a
            service; here it runs in the background on 127.0.0.1:{self.port}, its log in
            {self.base / 'serve.log'}. At start it prints the binrepos.conf entry targets need.""")
        argv = [sys.executable, SCRIPT, "-c", self.config, "serve"]
        print(f"\n$ {quoted(argv)} > {shlex.quote(str(self.base / 'serve.log'))} 2>&1 &")
        self.serve_log = self.base / "serve.log"
        with open(self.serve_log, "w") as log:
            server = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.STDOUT)
        stack.callback(stop_process, server)
        if not wait_for_port(self.port, proc=server):
            raise DemoError(f"{self.step}: serve did not start:\n" + self.serve_log.read_text())
        deadline = time.monotonic() + 2  # the port opens just before the banner is written
        while "verify-signature" not in self.serve_log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        print(textwrap.indent(self.serve_log.read_text(), "  "), end="")

        entry = self.target / "etc/portage/binrepos.conf/gentoo-binhost.conf"
        self.say("Step 5/7: point the target at the binhost", f"""
            `setup-target` logs in to the target with ssh and writes
            /etc/portage/binrepos.conf/gentoo-binhost.conf there (sync-uri = the binhost's URL,
            verify-signature = true), imports the signing key into the target's Portage keyring
            with ultimate trust (or lsigns it with getuto's local key on a real Gentoo), then
            signs a test message and verifies it on the target as Portage will. The target root
            here is {self.target}, so the file lands in {entry.parent}.""")
        self.tool("setup-target")
        self.sh("cat", entry)

        installed = eroot(self.target, self.eprefix) / "usr/bin/hello-app"
        self.say("Step 6/7: install on the target from the binhost", f"""
            `install` runs emerge --getbinpkgonly on the target over ssh (with
            --binpkg-respect-use=y, so a binary built with other USE flags is refused rather than
            silently installed). The target fetches the index and the packages from `serve`,
            verifies their signatures, and installs them: nothing is compiled on the target.
            Then we run the installed program from the target root, {installed}. The warnings
            that getuto (Gentoo's keyring helper) is missing and that binrepos.conf is missing
            (for the venv's own "/", not the target) are harmless here.""")
        self.tool("install", f">={PACKAGE}-1.0")
        self.sh(installed)
        print("\nWhat the target fetched from `serve` (its access log):")
        print(textwrap.indent("".join(line for line in self.serve_log.read_text().splitlines(True)
                                      if '"GET ' in line), "  "), end="")

        self.say("Step 7/7: --pretend shows every command, runs none", """
            `emerge` asks the target what it would merge, builds here whatever of that has no
            binary yet, and then installs the same atoms on the target. With --pretend,
            gentoo-binhost.py prints that plan and each command that would change something
            (shell-quoted, environment first, ready to paste) and runs none of them, here for
            app-misc/greet, which is not built yet.""")
        self.tool("--pretend", "emerge", "app-misc/greet")


def stop_group(proc):
    """SIGTERM the process group led by proc, give it 10 s, then SIGKILL what is left."""
    for signum, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)


def check_prerequisites():
    """The Portage bin directory, or DemoError naming what is missing and how to get it."""
    if os.geteuid() != 0:
        raise DemoError("run the demo as root (Portage merges as root; the target login is root@127.0.0.1)")
    debian = {"/usr/sbin/sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client",
              "gpg": "gnupg", "gpgconf": "gnupg", "gcc": "gcc", "zstd": "zstd", "bash": "bash"}
    missing = [name for name in debian if not (Path(name).exists() if name.startswith("/")
                                                else shutil.which(name))]
    if missing:
        packages = " ".join(sorted({debian[name] for name in missing}))
        raise DemoError(f"missing {', '.join(missing)}: install them (on Debian: apt-get install"
                        f" {packages}; `make deps` run as root installs all but gcc)")
    portage_bin = find_portage_bin()
    if portage_bin is None:
        raise DemoError("Portage (emerge, portageq, emaint, gpkg-sign) not found: run `make demo`,"
                        " which installs it in .venv")
    return portage_bin


def stop_gpg_agents(base):
    """gpg may have started agents for keyrings in the demo directory: stop them."""
    for directory, _dirs, files in os.walk(base):
        if "pubring.kbx" in files:
            subprocess.run(["gpgconf", "--homedir", directory, "--kill", "all"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def interrupt(_signum, _frame):
    """The first Ctrl-C or SIGTERM unwinds the demo; further ones must not cut its clean-up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the demo directory and print where")
    args = parser.parse_args()
    # Narration and the commands' own output must interleave in order, even through a pipe.
    sys.stdout.reconfigure(line_buffering=True)
    # Ctrl-C and SIGTERM unwind the demo, so sshd, the server and the temporary directory go.
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    started = time.monotonic()
    base = None
    try:
        portage_bin = check_prerequisites()
        python = portage_bin / "python"
        eprefix = portage_eprefix(python if python.exists() else sys.executable)
        # Portage verifies signatures as `nobody`, which cannot enter a 0700 directory.
        base = Path(tempfile.mkdtemp(prefix="gentoo-binhost-demo-"))
        base.chmod(0o755)
        print(f"gentoo-binhost.py demo in {base}")
        print(f"Every command runs with Portage's bin directory first in PATH, i.e. after:\n"
              f"$ export PATH={shlex.quote(str(portage_bin))}:\"$PATH\"")
        with contextlib.ExitStack() as stack:
            sshd = stack.enter_context(start_sshd(base / "sshd"))
            Demo(base, portage_bin, eprefix, sshd).run(stack)
    except (DemoError, AssertionError) as error:  # AssertionError: conftest's helpers
        print(f"\n!!! demo failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\n!!! demo interrupted", file=sys.stderr)
        return 130
    finally:
        if base is not None:
            stop_gpg_agents(base)
            if args.keep:
                print(f"\nKept {base} (sshd and serve are stopped).")
            else:
                shutil.rmtree(base, ignore_errors=True)
    print(f"\nDone in {time.monotonic() - started:.0f} s: built, signed, served, and installed over ssh"
          " with real Portage, gpg and sshd.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
