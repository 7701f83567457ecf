"""add-target and remove-target through the real components: a real sshd on 127.0.0.1 (the
session's), a local stage3 mirror with real gpg signatures (as in test_init.py), real GNU tar
extraction, real Portage building in the binhost root and installing on the target ROOT, our
real `serve`.

A target here is a ROOT on this machine reached over ssh, so add-target is given `--root` (where
its /etc/portage is) and `--path` (the venv's bin, so that the target's PATH finds Portage), which it
writes into [target NAME] as root/path. The sshd's SetEnv cannot stand in for them: a target's root
is passed to the remote scripts as an argument (CONFIG_TAR_SCRIPT reads "$1/etc/portage",
setup-target writes <root>/etc/portage/binrepos.conf), so with the default root "/" add-target
would read this machine's /etc/portage whatever the ssh session's ROOT says.

One test writes a [target NAME] section by hand before add-target (a section for a target with
another configuration, see prewrite_target): its root/path keys are the ones --root/--path write."""

import configparser
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from conftest import (REPO, REPO_NAME, SCRIPT, binhost_serving, eroot, free_port, is_signed, need, run, stop_process,
                      wait_for_port, write_portage_config)
from test_init import gpg_home, offer_stage3, tiny_stage3

BUILD = "20261120T170000Z"
#: The machine's init decides the variant add-target asks for (this container's /sbin/init is
#: systemd's even though nothing runs it): the mirror offers the tiny stage3 under both.
VARIANTS = ("openrc", "systemd")


# ------------------------------------------------------------------------------------------------
# Shared set-up
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stage3_mirror(tmp_path_factory, gb):
    """A local Gentoo mirror: the tiny stage3 as amd64 openrc and systemd, with a signed DIGESTS,
    a detached signature and a signed latest list each; the release keyring to trust."""
    need(shutil.which("gpg") and shutil.which("xz"), "gpg and xz are needed")
    base = tmp_path_factory.mktemp("add-target-mirror")
    release = gpg_home(base / "release-gnupg", "release")
    keyring = base / "gentoo-release.asc"
    keyring.write_text(run(["gpg", "--homedir", release, "--armor", "--export"]).stdout)
    autobuilds = base / "www/releases/amd64/autobuilds"
    (autobuilds / BUILD).mkdir(parents=True)
    payload = tiny_stage3()
    for variant in VARIANTS:
        tarball = autobuilds / BUILD / f"stage3-amd64-{variant}-{BUILD}.tar.xz"
        tarball.write_bytes(payload)
        offer_stage3(release, autobuilds, BUILD, f"latest-stage3-amd64-{variant}.txt", tarball)
    server = gb.make_server("127.0.0.1", 0, str(base / "www"), gb.Output(color=False, verbosity=0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield {"url": f"http://127.0.0.1:{server.server_address[1]}", "keyring": keyring}
    finally:
        server.shutdown()
        server.server_close()


class Lab:
    """A directory (0755: Portage verifies signatures as `nobody`) with configuration files, target
    ROOTs and binhost roots, and helpers to run the tool on them."""

    def __init__(self, base, portage_bin, eprefix, sshd, mirror):
        self.base = base
        self.portage_bin = portage_bin
        self.eprefix = eprefix
        self.sshd = sshd
        self.mirror = mirror

    def binhost_config(self, name, root=None, port=None):
        """A configuration file with only a [binhost] section (its root not created)."""
        port = port or free_port()
        root = root or self.base / f"{name}-binhost"
        # A directory of its own: the default gpg-home lies beside the configuration.
        config = self.base / f"{name}-etc" / "gentoo-binhost.conf"
        config.parent.mkdir(exist_ok=True)
        config.write_text(f"[binhost]\nroot = {root}\nurl = http://127.0.0.1:{port}/\n"
                          f"bind = 127.0.0.1\nport = {port}\n")
        return config, Path(root), port

    def target_root(self, name, use="loud", like=None, own_tree=False):
        """A target ROOT prepared like world.new_target does: its own PKGDIR, DISTDIR,
        PORTAGE_TMPDIR and BINPKG_GPG_VERIFY_GPG_HOME inside it. With like (another target ROOT),
        its /etc/portage is byte for byte that one's (the paths in make.conf included), as two
        machines with the same configuration have. With own_tree, its ebuild repository is a copy
        of its own in it (a real target's tree, which following the binhost's snapshot moves), and
        portageq reads its configuration (the prefix link)."""
        root = self.base / f"target-{name}"
        source = like or root
        repo = REPO
        if own_tree:
            repo = root / "var/db/repos" / REPO_NAME
            shutil.copytree(REPO, repo)
        elif like and (like / "var/db/repos" / REPO_NAME).is_dir():  # the same configuration: its tree
            repo, own_tree = like / "var/db/repos" / REPO_NAME, True
        write_portage_config(root, var_root=source, repo=repo, eprefix=self.eprefix if own_tree else None,
                             extra_make_conf=f'USE="{use}"\nBINPKG_GPG_VERIFY_GPG_HOME="{source}/etc/portage/gnupg"\n')
        return root

    def ssh_options(self, key=None):
        options = list(self.sshd.ssh_option_list)
        if key is not None:
            options[options.index("-i") + 1] = str(key)
        return options

    def target_section(self, root, port=None, key=None):
        """The [target NAME] add_target(root=root, port=port, key=key) writes: host, ssh-port,
        ssh-options, and root/path from --root/--path."""
        return {"host": self.sshd.host, "ssh-port": str(port or self.sshd.port),
                "ssh-options": " ".join(shlex.quote(option) for option in self.ssh_options(key)),
                "root": str(root), "path": str(self.portage_bin), "tree": "binhost"}

    def prewrite_target(self, config, name, root, port=None, key=None):
        """Append [target NAME] by hand, with the very keys add_target() (same root, port, key)
        would write."""
        text = config.read_text().rstrip("\n") + "\n"
        config.write_text(text + f"\n[target {name}]\n" + "".join(
            f"{k} = {v}\n" for k, v in self.target_section(root, port, key).items()))

    def cli(self, config, *args, check=True, timeout=600):
        """Run gentoo-binhost.py -c config args."""
        env = {"PATH": f"{self.portage_bin}:{os.environ['PATH']}", "NO_COLOR": "1"}
        return run([sys.executable, SCRIPT, "-c", config, "--color=n", *args], env=env, check=check,
                   timeout=timeout)

    def add_target(self, config, name, *extra, root=None, port=None, key=None, check=True, host=None,
                   options=None):
        """add-target NAME with the sshd's host, port and options; with root (a target ROOT),
        --root root --path <the venv's bin>."""
        place = ["--root", str(root), "--path", str(self.portage_bin)] if root is not None else []
        return self.cli(config, *extra, "add-target", name, host or self.sshd.host,
                        "--ssh-port", str(port or self.sshd.port),
                        *[f"--ssh-option={option}" for option in options or self.ssh_options(key)], *place,
                        "--mirror", self.mirror["url"], "--keyring", str(self.mirror["keyring"]),
                        check=check)

    def installed(self, root, path):
        return eroot(root, self.eprefix) / path


@pytest.fixture(scope="module")
def lab(portage_bin, eprefix, host_portage, sshd, stage3_mirror):
    need(os.geteuid() == 0, "add-target creates binhost roots from a stage3: needs root")
    base = Path(tempfile.mkdtemp(prefix="gentoo-binhost-add-"))
    base.chmod(0o755)
    try:
        yield Lab(base, portage_bin, eprefix, sshd, stage3_mirror)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def read_config(path):
    parser = configparser.ConfigParser(interpolation=None, default_section="no-defaults")
    parser.read_string(Path(path).read_text())
    return {section: dict(parser[section]) for section in parser.sections()}


def tree(directory):
    """{relative path: (kind, mode, content or link target)} of everything under directory."""
    found = {}
    for path in sorted(Path(directory).rglob("*")):
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            found[str(path.relative_to(directory))] = ("symlink", None, os.readlink(path))
        elif stat.S_ISDIR(info.st_mode):
            found[str(path.relative_to(directory))] = ("dir", stat.S_IMODE(info.st_mode), None)
        else:
            found[str(path.relative_to(directory))] = ("file", stat.S_IMODE(info.st_mode), path.read_bytes())
    return found


def error_lines(result):
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("!!!")]


def backups_beside(config):
    return sorted(p.name for p in Path(config).parent.glob(Path(config).name + ".*.bak"))


# ------------------------------------------------------------------------------------------------
# (1) From a config with only [binhost] to a signed binary installed on the target
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def onboarded(lab):
    """add-target laptop from a configuration with only [binhost]: no binhost root, no key."""
    config, root, port = lab.binhost_config("main")
    assert not root.exists()
    target = lab.target_root("laptop", own_tree=True)
    assert set(read_config(config)) == {"binhost"}
    result = lab.add_target(config, "laptop", root=target)
    return {"config": config, "root": root, "port": port, "target": target, "result": result}


def test_add_target_from_nothing_then_emerge_installs_a_signed_binary(lab, onboarded):
    config, root, target, result = (onboarded[key] for key in ("config", "root", "target", "result"))
    out = result.stdout
    for step in ("1/5 ssh", "2/5 environment", "3/5 configuration", "4/5 target", "5/5 doctor"):
        assert step in out, out
    assert "Next: 'gentoo-binhost.py --target laptop emerge -uDN @world'" in out
    assert "PGP signature good" in out and "match the DIGESTS" in out
    # The environment is [binhost] root, made from the verified stage3.
    assert (root / "etc/os-release").read_text() == "NAME=Gentoo\nID=gentoo\n"
    assert (root / "bin").is_symlink()
    # The target's configuration pulled into it.
    assert (root / "etc/portage/make.conf").read_bytes() == (target / "etc/portage/make.conf").read_bytes()
    sections = read_config(config)
    assert sections["target laptop"] == lab.target_section(target)
    assert len(backups_beside(config)) == 1, "one backup per run: the user's file before it"
    assert "binhost-root" not in sections["target laptop"]
    binhost = sections["binhost"]
    assert binhost.get("signing-key"), sections
    assert binhost.get("transport", "http") == "http", "the target reaches 127.0.0.1:PORT over HTTP"
    entry = (target / "etc/portage/binrepos.conf/gentoo-binhost.conf").read_text()
    assert f"sync-uri = http://127.0.0.1:{onboarded['port']}/\n" in entry
    assert "verify-signature = true\n" in entry

    with binhost_serving(config, onboarded["port"]):
        emerged = lab.cli(config, "--target", "laptop", "emerge", "app-misc/hello", timeout=900)
    # add-target wrote tree = binhost: the laptop planned from the binhost's snapshot, staged there,
    # and its tree followed once the build was published.
    assert "Staging the binhost's snapshot on laptop (not live)" in emerged.stdout, emerged.stdout
    assert "Moving laptop's live tree to the published snapshot" in emerged.stdout, emerged.stdout
    assert (target / "etc/portage/repos.conf/zz-gentoo-binhost.conf").is_file()
    packages = sorted((root / "var/cache/binpkgs").rglob("hello-*.gpkg.tar"))
    assert packages and all(is_signed(package) for package in packages)
    assert list(lab.installed(target, "var/db/pkg/app-misc").glob("hello-*/BINPKGMD5")), \
        "installed from the binary package, not built on the target"
    assert run([lab.installed(target, "usr/bin/hello")]).stdout == "hello from binhost\n"


# ------------------------------------------------------------------------------------------------
# (2) Running it again changes nothing
# ------------------------------------------------------------------------------------------------

def test_add_target_twice_changes_nothing(lab, onboarded):
    config, root = onboarded["config"], onboarded["root"]
    # Since the first run the target's world may have changed (an emerge): a run takes that in.
    lab.add_target(config, "laptop", root=onboarded["target"])
    text = config.read_bytes()
    portage_before = tree(root / "etc/portage")
    etc_before = sorted(p.name for p in (root / "etc").iterdir())
    backups = backups_beside(config)

    again = lab.add_target(config, "laptop", root=onboarded["target"])
    out = again.stdout
    assert config.read_bytes() == text
    assert backups_beside(config) == backups
    assert tree(root / "etc/portage") == portage_before, "the binhost's etc/portage was rewritten:\n" + out
    assert sorted(p.name for p in (root / "etc").iterdir()) == etc_before, \
        "a second pull left a etc/.portage.<date>.bak"
    assert "[target laptop] is in" in out and "already" in out
    assert f"2/5 environment: {root}, as before" in out
    assert "is identical" in out, "config pull found differences on an unchanged target:\n" + out
    assert "exists already" in out  # the signing key
    assert "already points to" in out  # setup-target
    assert "Installing the configuration" not in out


# ------------------------------------------------------------------------------------------------
# (3) A target ssh cannot log in to: one line with the ssh-copy-id step, nothing written
# ------------------------------------------------------------------------------------------------

#: What each ssh failure is told as, and the fix the one error line must carry.
SSH_PROBLEMS = {
    "closed-port": ("nothing answers on port", "--ssh-port"),
    "unauthorized-key": ("without a password", "ssh-copy-id -i {key} -p {port} root@127.0.0.1"),
    "changed-host-key": ("host key is not the one this machine knows", "ssh-keygen -R '[127.0.0.1]:{port}'"),
    "unknown-host-key": ("host key is not known yet", "log in once with ssh -p {port}"),
    "unknown-host-name": ("is not a host name this machine knows", "give its address"),
    "closed-port-no-config": ("does not exist", None),
}


@pytest.mark.parametrize("problem", sorted(SSH_PROBLEMS))
def test_unreachable_target_writes_nothing(lab, problem):
    """Each ssh failure is told apart by ssh's own words, with its own fix, in one line."""
    if problem == "closed-port-no-config":
        config = lab.base / "never-written.conf"
        text = None
    else:
        config, _root, _port = lab.binhost_config(f"unreachable-{problem}")
        text = config.read_bytes()
    port, key, host, options = None, None, None, None
    if problem.startswith("closed-port"):
        port = free_port()
    elif problem == "unauthorized-key":
        key = lab.base / f"not-authorized-{os.getpid()}"
        if not key.exists():
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key])
    elif problem == "changed-host-key":  # the machine was reinstalled: another host key
        other = lab.base / "other-host-key"
        if not other.exists():
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", other])
        known = lab.base / "changed_known_hosts"
        kind, value = Path(f"{other}.pub").read_text().split()[:2]
        known.write_text(f"[127.0.0.1]:{lab.sshd.port} {kind} {value}\n")
        options = [option.replace(str(lab.sshd.known_hosts), str(known)) for option in lab.ssh_options()]
    elif problem == "unknown-host-key":  # a first login: nothing in known_hosts yet
        empty = lab.base / "empty_known_hosts"
        empty.write_text("")
        options = [option.replace(str(lab.sshd.known_hosts), str(empty)) for option in lab.ssh_options()]
    else:
        host = "root@no-such-host.invalid"
    result = lab.add_target(config, "lost", port=port, key=key, host=host, options=options, check=False)
    errors = error_lines(result)
    assert len(errors) == 1, result.stdout + result.stderr
    cause, fix = SSH_PROBLEMS[problem]
    assert cause in errors[0], errors[0]
    if fix:
        assert fix.format(key=key, port=lab.sshd.port) in errors[0], errors[0]
    assert "waiting up to" in result.stdout or text is None
    if text is None:  # a -c FILE that does not exist is refused first (only the default is created)
        assert result.returncode == 2, result.stdout + result.stderr
        assert not config.exists()
    else:
        assert result.returncode == 1, result.stdout + result.stderr
        assert config.read_bytes() == text
        assert not backups_beside(config)
    assert "Traceback" not in result.stderr


def test_rerun_after_a_forgotten_path_corrects_the_section_and_another_host_is_refused(lab):
    """A forgotten --path: the failure names the missing command; the re-run for the same NAME and
    host takes the new path (shown, one backup per run); another host for the NAME is refused."""
    config, _root, _port = lab.binhost_config("forgotten-path")
    target = lab.target_root("forgotten")
    first = lab.cli(config, "add-target", "forgot", lab.sshd.host, "--ssh-port", str(lab.sshd.port),
                    *[f"--ssh-option={option}" for option in lab.ssh_options()], "--root", str(target),
                    "--mirror", lab.mirror["url"], check=False)
    assert first.returncode == 1 and "portageq not found on target forgot" in first.stderr, first.stderr
    assert "path = in [target forgot]" in first.stderr
    assert "path" not in read_config(config)["target forgot"]
    assert len(backups_beside(config)) == 1
    written = config.read_bytes()

    again = lab.add_target(config, "forgot", "-p", root=target, check=False)
    assert f"[target forgot] is in {config} already: changing path = {lab.portage_bin}" in again.stdout, \
        again.stdout + again.stderr
    assert f"+path = {lab.portage_bin}" in again.stdout, again.stdout
    assert config.read_bytes() == written, "--pretend wrote the configuration"

    other = lab.cli(config, "add-target", "forgot", "root@localhost", check=False)
    assert other.returncode == 2, other.stdout + other.stderr
    assert error_lines(other) == [f"!!! {config}: [target forgot] is {lab.sshd.host}, not root@localhost: run"
                                  " 'gentoo-binhost.py remove-target forgot' first, or choose another name"]
    assert config.read_bytes() == written and len(backups_beside(config)) == 1


def test_an_http_error_from_another_program_on_the_port_is_not_reaching_us(lab, onboarded):
    """The transport check: a 404 from some other web server on our port is no proof that the target
    reaches us; the program is named and nothing is written."""
    config = onboarded["config"]
    text = config.read_bytes()
    empty = Path(tempfile.mkdtemp(dir=lab.base))
    other = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(onboarded["port"])],
                             cwd=empty, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for_port(onboarded["port"], proc=other)
        result = lab.add_target(config, "laptop", root=onboarded["target"], check=False)
    finally:
        stop_process(other)
    assert result.returncode == 1, result.stdout + result.stderr
    assert error_lines(result) == [
        f"!!! port {onboarded['port']} here is answered by {error_lines(result)[0].split('answered by ')[1].split(',')[0]},"
        f" not by gentoo-binhost.py: stop that program, or set port (and url) in [binhost] of {config},"
        " then add-target laptop again"], result.stderr
    assert "SimpleHTTP" in result.stderr
    assert config.read_bytes() == text, "transport = tunnel written for another program's 404"


def test_the_fetch_check_names_a_target_without_wget_or_curl(gb, tmp_path):
    """The script the target runs: with neither fetcher in PATH it says so (add-target then names the
    missing prerequisite instead of choosing the tunnel)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "sed"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    result = subprocess.run([str(bin_dir / "sh"), "-c", gb.FETCH_INDEX_SCRIPT, "gentoo-binhost"],
                            input="http://127.0.0.1:9/Packages\n", capture_output=True, text=True,
                            env={"PATH": str(bin_dir)}, timeout=30)
    assert gb.fetch_outcome(result.stdout) == ("none", "127"), result.stdout + result.stderr


# ------------------------------------------------------------------------------------------------
# (4) Environments: a target with the same configuration shares, one with another USE gets its own
# ------------------------------------------------------------------------------------------------

def test_matching_target_shares_and_different_use_gets_its_own_environment(lab, onboarded):
    config, root = onboarded["config"], onboarded["root"]
    binhost_make_conf = (root / "etc/portage/make.conf").read_bytes()

    twin = lab.target_root("twin", like=onboarded["target"])
    assert (twin / "etc/portage/make.conf").read_bytes() == \
        (onboarded["target"] / "etc/portage/make.conf").read_bytes()
    shared = lab.add_target(config, "twin", root=twin)
    sections = read_config(config)
    assert "binhost-root" not in sections["target twin"], shared.stdout
    assert not Path(f"{root}-twin").exists()
    assert (root / "etc/portage/make.conf").read_bytes() == binhost_make_conf

    # quiet's section written by hand beforehand: add-target must not take it as a target already
    # placed in [binhost] root and pull its other configuration over the one laptop and twin share.
    quiet = lab.target_root("quiet", use="-loud")
    lab.prewrite_target(config, "quiet", quiet)
    own = lab.add_target(config, "quiet", root=quiet)
    own_root = Path(f"{root}-quiet")
    sections = read_config(config)
    # The shared environment must keep laptop's and twin's configuration, whatever happens.
    assert (root / "etc/portage/make.conf").read_bytes() == binhost_make_conf, \
        "quiet's USE=-loud was pulled into the environment laptop and twin use:\n" + own.stdout
    assert sections["target quiet"].get("binhost-root") == str(own_root), own.stdout
    assert (own_root / "etc/os-release").read_text() == "NAME=Gentoo\nID=gentoo\n"
    assert 'USE="-loud"' in (own_root / "etc/portage/make.conf").read_text()
    assert "binhost-root" not in sections["target laptop"]


def test_fresh_sections_share_by_fingerprint_even_after_a_second_run(lab):
    """add-target writing each [target NAME] itself (with --root/--path): the first target gets
    [binhost] root; after it is added a second time (nothing changes), a target with the very same
    /etc/portage shares that environment (fingerprints equal), one with USE=-loud gets its own."""
    config, root, port = lab.binhost_config("fresh")
    first = lab.target_root("fresh-first")
    same_root = lab.target_root("fresh-same", like=first)
    other_root = lab.target_root("fresh-other", use="-loud")
    lab.add_target(config, "first", root=first)
    written = read_config(config)["target first"]
    assert written == {"host": lab.sshd.host, "ssh-port": str(lab.sshd.port),
                       "ssh-options": " ".join(shlex.quote(option) for option in lab.ssh_options()),
                       "root": str(first), "path": str(lab.portage_bin), "tree": "binhost"}
    make_conf = (root / "etc/portage/make.conf").read_bytes()
    lab.add_target(config, "first", root=first)  # what a user does to be sure

    same = lab.add_target(config, "same", root=same_root)
    sections = read_config(config)
    assert "binhost-root" not in sections["target same"], same.stdout
    assert f"sharing {root}" in same.stdout
    assert not Path(f"{root}-same").exists()

    other = lab.add_target(config, "other", root=other_root)
    own_root = Path(f"{root}-other")
    sections = read_config(config)
    assert sections["target other"].get("binhost-root") == str(own_root), other.stdout
    assert (own_root / "etc/os-release").read_text() == "NAME=Gentoo\nID=gentoo\n"
    assert 'USE="-loud"' in (own_root / "etc/portage/make.conf").read_text()
    assert (root / "etc/portage/make.conf").read_bytes() == make_conf
    assert "binhost-root" not in sections["target first"]


# ------------------------------------------------------------------------------------------------
# (5) --pretend shows the commands and changes nothing
# ------------------------------------------------------------------------------------------------

def test_pretend_add_target_changes_nothing(lab, onboarded):
    config, root, _port = lab.binhost_config("pretend")
    text = config.read_bytes()
    target_before = tree(onboarded["target"] / "etc/portage")
    result = lab.add_target(config, "laptop", "-p", root=onboarded["target"])
    out = result.stdout
    assert "tar --extract" in out, out
    # Every step on the root step 2 would make: the files pulled, the commands that write them.
    for step in ("3/5 configuration", "4/5 target", "5/5 doctor"):
        assert step in out, out
    assert "+++ etc/portage/make.conf (new)" in out and '+USE="loud"' in out
    assert 'sh -c "$INSTALL_CONFIG_SCRIPT" gentoo-binhost ' + str(root) in out, out
    assert "--quick-generate-key" in out and "+signing-key = <new fingerprint>" in out
    assert any(line.startswith("ssh ") for line in out.splitlines()), \
        "no ssh command shown:\n" + out
    assert not root.exists()
    assert not [p.name for p in root.parent.iterdir() if p.name.startswith(f".{root.name}")]
    assert config.read_bytes() == text and not backups_beside(config)
    assert tree(onboarded["target"] / "etc/portage") == target_before


# ------------------------------------------------------------------------------------------------
# (6) remove-target
# ------------------------------------------------------------------------------------------------

def test_remove_target_removes_its_section_and_purges_only_its_own_environment(lab):
    base = Path(tempfile.mkdtemp(prefix="remove-", dir=lab.base))
    main_root, own_root, pair_root = base / "binhost", base / "binhost-own", base / "binhost-pair"
    for environment in (main_root, own_root, pair_root):
        (environment / "etc/portage").mkdir(parents=True)
        (environment / "etc/portage/make.conf").write_text('USE="loud"\n')
    config = base / "c.conf"

    def target(name, extra=""):
        return f"[target {name}]\nhost = root@127.0.0.1\nssh-port = 2222\n{extra}"
    config.write_text(
        "# my binhost\n[binhost]\n"
        f"root = {main_root}  ; the main one\nurl = http://127.0.0.1:1/\n\n"
        + target("one") + "\n"
        + target("own", f"binhost-root = {own_root}\n") + "\n"
        + target("pair-a", f"binhost-root = {pair_root}\n") + "\n"
        + target("pair-b", f"binhost-root = {pair_root}\n") + "\n"
        + target("shared") + "\n"
        + target("last"))
    original = read_config(config)

    removed = lab.cli(config, "remove-target", "one")
    assert "Removing [target one]" in removed.stdout
    expected = {name: section for name, section in original.items() if name != "target one"}
    assert read_config(config) == expected
    assert config.read_text().startswith("# my binhost\n[binhost]\n")
    assert main_root.is_dir()

    purged = lab.cli(config, "remove-target", "own", "--purge")
    assert not own_root.exists()
    assert f"Removing the environment {own_root}" in purged.stdout
    del expected["target own"]
    assert read_config(config) == expected

    kept_pair = lab.cli(config, "remove-target", "pair-a", "--purge")
    assert pair_root.is_dir(), "pair-b still builds there"
    assert "Keeping the environment" in kept_pair.stdout + kept_pair.stderr and "pair-b" in kept_pair.stderr
    del expected["target pair-a"]
    assert read_config(config) == expected

    kept = lab.cli(config, "remove-target", "shared", "--purge")
    assert main_root.is_dir() and (main_root / "etc/portage/make.conf").is_file()
    assert "Keeping the environment" in kept.stderr and "last" in kept.stderr
    del expected["target shared"]
    assert read_config(config) == expected

    # The last target on [binhost] root: still kept, it is the [binhost] root.
    kept = lab.cli(config, "remove-target", "last", "--purge")
    assert main_root.is_dir() and (main_root / "etc/portage/make.conf").is_file()
    assert "Keeping the environment" in kept.stderr and "[binhost] root" in kept.stderr
    del expected["target last"]
    assert read_config(config) == expected
    assert set(expected) == {"binhost", "target pair-b"}

    missing = lab.cli(config, "remove-target", "one", check=False)
    assert missing.returncode == 2 and "no [target one]" in missing.stderr
    assert read_config(config) == expected
