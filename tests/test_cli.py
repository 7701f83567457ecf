"""Command line, configuration, quoting and error handling (no Portage needed)."""

import os
import shlex
import stat
import subprocess
import sys
import textwrap

import pytest

from conftest import SCRIPT


def cli(*args, env=None, config=None):
    """Run the script as a user would; returns the CompletedProcess."""
    argv = [sys.executable, str(SCRIPT), "--color=n"]
    if config is not None:
        argv += ["-c", str(config)]
    full_env = dict(os.environ)
    full_env.pop("GENTOO_BINHOST_CONFIG", None)
    full_env.update(env or {})
    return subprocess.run(argv + list(args), capture_output=True, text=True, env=full_env, timeout=60)


def assert_one_line_error(result, code, *fragments):
    assert result.returncode == code, (result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("!!!")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture
def config(tmp_path):
    root = tmp_path / "binhost"
    (root / "etc/portage").mkdir(parents=True)
    path = tmp_path / "gentoo-binhost.conf"
    path.write_text(textwrap.dedent(f"""\
        [binhost]
        root = {root}
        url = http://binhost.lan:8080/

        [target laptop]
        host = alice@laptop.invalid
        ssh-port = 2222
        ssh-options = -i /root/.ssh/binhost -o 'ConnectTimeout=5'
        root = /mnt/gentoo
        path = /usr/local/bin
        """))
    return path


# ---- argument splitting ------------------------------------------------------------------------


def test_everything_after_a_passthrough_command_belongs_to_emerge(gb):
    head, tail = gb.split_passthrough(["-c", "x.conf", "--target", "t", "-p", "emerge", "-pv", "--target", "y"])
    assert head == ["-c", "x.conf", "--target", "t", "-p", "emerge"]
    assert tail == ["-pv", "--target", "y"]
    assert gb.split_passthrough(["serve", "--port", "1"]) == (["serve", "--port", "1"], None)


# ---- configuration -----------------------------------------------------------------------------


def test_defaults_without_a_config_file(gb, tmp_path):
    config = gb.load_config(str(tmp_path / "missing.conf"), gb.Runner(gb.Output(color=False)))
    assert config.binhost.root == "/binhost"
    assert config.binhost.pkgdir == "/binhost/var/cache/binpkgs"
    assert config.binhost.port == 8080
    assert gb.target_url(config.binhost, tunnel=False).endswith(":8080/")
    assert gb.target_url(config.binhost, tunnel=False, port=9000).endswith(":9000/")


def test_single_target_is_the_default(gb, config):
    target = gb.load_config(str(config), gb.Runner(gb.Output(color=False))).target()
    assert (target.name, target.host, target.ssh_port) == ("laptop", "alice@laptop.invalid", 2222)
    assert target.ssh_options == ["-i", "/root/.ssh/binhost", "-o", "ConnectTimeout=5"]
    assert target.portage_environment == {"ROOT": "/mnt/gentoo", "PORTAGE_CONFIGROOT": "/mnt/gentoo"}


def test_a_setting_changed_through_one_of_several_environments_stays(gb, tmp_path):
    path = tmp_path / "c.conf"
    path.write_text("[binhost]\nroot = /b/main\n\n[target a]\nhost = root@a\n\n"
                    "[target b]\nhost = root@b\nbinhost-root = /b/second\n")
    config = gb.load_config(str(path), gb.Runner(gb.Output(color=False)))
    assert sorted(config.environments()) == ["main", "second"]
    second = config.environment_for(config.target("b"))
    second.settings.distcc_hosts = "helper/4"
    assert config.environments()["second"] is second
    assert config.environment_for(config.target("b")).distcc_hosts == "helper/4"
    assert config.environment_for(config.target("a")).distcc_hosts != "helper/4"
    # A target added meanwhile (add-target) leaves each root's environment as it was.
    config.targets["c"] = gb.TargetSettings("c", {"host": "root@c", "binhost-root": "/b/third"}, str(path))
    assert sorted(config.environments()) == ["main", "second", "third"]
    assert config.environments()["second"] is second and second.distcc_hosts == "helper/4"
    with pytest.raises(AttributeError, match="change env.settings.distcc_hosts"):
        second.distcc_hosts = "lost/1"


def test_the_only_environment_stays_when_a_target_brings_a_second(gb, tmp_path):
    path = tmp_path / "c.conf"
    path.write_text("[binhost]\nroot = /b/main\n\n[target a]\nhost = root@a\n")
    config = gb.load_config(str(path), gb.Runner(gb.Output(color=False)))
    only = config.environment_for()
    only.decisions["asked"] = "once"
    assert list(config.environments()) == [None]
    config.targets["b"] = gb.TargetSettings("b", {"host": "root@b", "binhost-root": "/b/second"}, str(path))
    assert sorted(config.environments()) == ["main", "second"]
    assert config.environments()["main"] is only and only.decisions == {"asked": "once"}
    # One Remote per target for the command: what it learnt of the target (its ssh user) stays.
    remote = only.remote(config.target("a"))
    assert only.remote(config.target("a")) is remote and remote.user == "root"
    assert only.remote(config.targets["b"]) is not remote


def test_root_slash_sets_no_portage_environment(gb, tmp_path):
    path = tmp_path / "c.conf"
    path.write_text("[target a]\nhost = root@a\n")
    assert gb.load_config(str(path), gb.Runner(gb.Output(color=False))).target().portage_environment == {}


@pytest.mark.parametrize("text, fragments", [
    ("[binhost]\nrooot = /x\n", ["[binhost] unknown key 'rooot'"]),
    ("[target laptop]\nssh-port = 22\n", ["[target laptop] has no 'host' key"]),
    ("[binhost]\nport = http\n", ["[binhost] port = http is not a port number"]),
    ("[targets laptop]\nhost = x\n", ["unknown section [targets laptop]"]),
    ("[binhost\n", ["line 1: '[binhost' comes before any section"]),
    ("[binhost]\nroot = /x\n[target a\nhost = x\n",
     ["line 3: '[target a' is neither a section header", "nor key = value"]),
    ("[binhost]\nroot = /x\n[binhost]\n", ["line 3: section 'binhost' already exists"]),
])
def test_bad_configuration_is_a_one_line_usage_error(tmp_path, text, fragments):
    path = tmp_path / "bad.conf"
    path.write_text(text)
    assert_one_line_error(cli("install", "foo", config=path), 2, str(path), *fragments)


def test_unknown_target_names_the_file_and_the_known_targets(config):
    assert_one_line_error(cli("--target", "desktop", "install", "foo", config=config), 2,
                          str(config), "[target desktop]", "laptop")


def test_several_targets_need_a_choice(tmp_path):
    path = tmp_path / "two.conf"
    path.write_text("[target a]\nhost = root@a\n[target b]\nhost = root@b\n")
    assert_one_line_error(cli("install", "foo", config=path), 2, "--target NAME")


def test_config_from_environment_variable(config):
    result = cli("-p", "install", "foo", env={"GENTOO_BINHOST_CONFIG": str(config)})
    assert result.returncode == 0, result.stderr
    assert "alice@laptop.invalid" in result.stdout


def test_unknown_command_is_a_usage_error():
    assert_one_line_error(cli("frobnicate"), 2, "unknown command 'frobnicate'", "see 'gentoo-binhost.py --help'")
    assert_one_line_error(cli("instal", "foo"), 2, "did you mean install")
    assert_one_line_error(cli("rolback"), 2, "did you mean rollback?")


def test_usage_errors_point_to_the_commands_own_help(config):
    assert_one_line_error(cli("clean", "--bogus", config=config), 2, "unrecognized arguments: --bogus",
                          "see 'gentoo-binhost.py clean --help'")
    assert_one_line_error(cli("rollback", "x", config=config), 2, "see 'gentoo-binhost.py rollback --help'")


def test_help_lists_commands_as_a_user_meets_them_and_the_passthrough_commands_own_options():
    commands = cli("--help").stdout.split("  COMMAND\n", 1)[1].split("\n\n", 1)[0]
    listed = [line.split()[0] for line in commands.splitlines() if not line.startswith("     ")]
    assert listed[:4] == ["add-target", "emerge", "update", "doctor"], listed
    assert len(listed) == 19 and listed[-1] == "remove-target"
    for command, options in (("build", ["--for-target", "--distcc HOSTS", "--target NAME"]),
                             ("install", ["--target NAME", "--all"]),
                             ("emerge", ["--target NAME", "--all"])):
        shown = cli(command, "--help")
        assert shown.returncode == 0 and "EMERGE ARGS" in shown.stdout, shown.stderr
        for option in options:
            assert f"\n  {option}" in shown.stdout, (command, shown.stdout)


def test_set_config_values_understands_what_configparser_accepts(gb):
    text = "[binhost] ; mine\nSigning-Key: OLD\n"
    updated = gb.set_config_values(text, "binhost", {"signing-key": "NEW"})
    assert updated == "[binhost] ; mine\nsigning-key = NEW\n"


@pytest.mark.parametrize("args, fragment", [
    (["-c", "/tmp"], "is a directory"),
    (["serve", "--port", "99999"], "--port 99999"),
    (["serve", "--timeout", "nan"], "--timeout"),
])
def test_more_bad_input_is_one_line(tmp_path, args, fragment):
    if args[0] != "-c":
        config = tmp_path / "c.conf"
        config.write_text(f"[binhost]\npkgdir = {tmp_path}\n")
        args = ["-c", str(config)] + args
    else:
        args = args + ["serve"]
    result = cli(*args)
    assert_one_line_error(result, 2, fragment)


def test_set_config_values_keeps_comments_and_other_sections(gb):
    text = "# mine\n[binhost]\nroot = /b  \n; note\nsigning-key = OLD\n\n[target t]\nhost = x\n"
    updated = gb.set_config_values(text, "binhost", {"signing-key": "NEW", "gpg-home": "/g"})
    assert updated == "# mine\n[binhost]\nroot = /b  \n; note\nsigning-key = NEW\ngpg-home = /g\n\n[target t]\nhost = x\n"
    assert gb.set_config_values("", "binhost", {"a": "1"}) == "[binhost]\na = 1\n"


# ---- --pretend shows exact commands and runs nothing --------------------------------------------


def test_pretend_build_shows_the_emerge_command_with_its_environment(config, tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    emerge = fake_bin / "emerge"
    emerge.write_text("#!/bin/sh\ntouch %s/ran\n" % tmp_path)
    emerge.chmod(0o755)
    result = cli("-p", "build", "-uDN", ">=dev-lang/python-3.12", config=config,
                 env={"PATH": f"{fake_bin}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr
    root = tmp_path / "binhost"
    # Whatever the copied configuration says, builds never take binaries from another binhost.
    # EMERGE_DEFAULT_OPTS: the target's, filtered (none here); every build a file of its own.
    expected = (f"ROOT={root}/ PORTAGE_CONFIGROOT={root}/ PKGDIR={root}/var/cache/binpkgs PORTAGE_BINHOST="
                f" EMERGE_DEFAULT_OPTS= 'FEATURES=-getbinpkg binpkg-multi-instance -binpkg-signing -binpkg-request-signature binpkg-ignore-signature buildpkg' {emerge}"
                " --root-deps --getbinpkg=n --getbinpkgonly=n"
                " -uDN '>=dev-lang/python-3.12'")
    assert expected in result.stdout.splitlines()
    assert not (tmp_path / "ran").exists()


def test_pretend_install_quotes_every_word_for_the_remote_shell(config):
    result = cli("-p", "install", "-av", ">=dev-lang/python-3.12", "foo bar", config=config)
    assert result.returncode == 0, result.stderr
    ssh_line = next(line for line in result.stdout.splitlines() if line.startswith("ssh "))
    argv = shlex.split(ssh_line)
    assert argv[:12] == ["ssh", "-p", "2222", "-i", "/root/.ssh/binhost", "-o", "ConnectTimeout=5",
                         "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4", "--"]
    assert argv[12] == "alice@laptop.invalid"
    remote = shlex.split(argv[13])
    assert remote == ["sudo", "env", "ROOT=/mnt/gentoo", "PORTAGE_CONFIGROOT=/mnt/gentoo",
                      "EMERGE_DEFAULT_OPTS=", "PATH=/usr/local/bin:$PATH", "emerge", "--getbinpkgonly",
                      "--binpkg-respect-use=y", "-av", ">=dev-lang/python-3.12", "foo bar"]


def test_remote_command_line_survives_a_real_shell(gb, tmp_path):
    """The string sent over ssh, run by sh, gives emerge exactly our argv (no redirection)."""
    fake = tmp_path / "emerge"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    fake.chmod(0o755)
    target = gb.TargetSettings("t", {"host": "root@h", "path": str(tmp_path)}, "c.conf")
    remote = gb.Remote(target, gb.Runner(gb.Output(color=False)), gb.Output(color=False))
    args = [">=dev-lang/python-3.12", "<x/y-2", "a b", "$(touch pwned)", "'q'", "*"]
    line = remote.command_line(["emerge"] + args)
    result = subprocess.run(["sh", "-c", line], capture_output=True, text=True, cwd=tmp_path)
    assert result.stdout.splitlines() == args
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "=dev-lang").exists()


def test_user_supplied_binpkg_respect_use_is_kept(config):
    result = cli("-p", "install", "--binpkg-respect-use=n", "foo", config=config)
    assert "--binpkg-respect-use=y" not in result.stdout
    assert "--binpkg-respect-use=n" in result.stdout


def test_root_login_uses_no_sudo(tmp_path):
    path = tmp_path / "c.conf"
    path.write_text("[target t]\nhost = root@h.invalid\n")
    result = cli("-p", "install", "foo", config=path)
    line = next(line for line in result.stdout.splitlines() if line.startswith("ssh "))
    assert shlex.split(line)[-1] == "env EMERGE_DEFAULT_OPTS= emerge --getbinpkgonly --binpkg-respect-use=y foo"


# test_pretend_emerge_shows_build_then_install moved to test_target_word.py (through the real target):
# test_pretend_emerge_without_a_server_shows_the_plan_and_both_commands.


# ---- expected failures are one line ---------------------------------------------------------


def test_missing_binhost_root(tmp_path):
    path = tmp_path / "c.conf"
    path.write_text(f"[binhost]\nroot = {tmp_path}/nowhere\n")
    assert_one_line_error(cli("build", "foo", config=path), 1, f"binhost root {tmp_path}/nowhere does not exist")


def test_missing_emerge(config):
    assert_one_line_error(cli("build", "foo", config=config, env={"PATH": "/nonexistent"}), 1,
                          "emerge not found in PATH")


def test_unreachable_host(tmp_path):
    path = tmp_path / "c.conf"
    path.write_text("[target gone]\nhost = root@127.0.0.1\nssh-port = 1\n"
                    "ssh-options = -o BatchMode=yes -o ConnectTimeout=5\n")
    assert_one_line_error(cli("install", "foo", config=path), 1, "cannot reach target gone",
                          "ssh-port")


# ---- output ----------------------------------------------------------------------------------


def test_color_follows_flags_and_no_color(gb, monkeypatch):
    class Terminal:
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("NOCOLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert gb.color_wanted(None, Terminal())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not gb.color_wanted(None, Terminal())
    assert gb.color_wanted(True, Terminal())
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setenv("NOCOLOR", "yes")
    assert not gb.color_wanted(None, Terminal())


def test_version():
    result = cli("-V")
    assert result.returncode == 0 and result.stdout.startswith("gentoo-binhost.py ")


def test_runner_write_file_is_atomic_with_backup(gb, tmp_path):
    output = gb.Output(color=False, verbosity=0)
    path = tmp_path / "f.conf"
    path.write_text("old\n")
    runner = gb.Runner(output)
    assert runner.write_file(str(path), "new\n", mode=0o600)
    assert path.read_text() == "new\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
    backups = list(tmp_path.glob("f.conf.*.bak"))
    assert len(backups) == 1 and backups[0].read_text() == "old\n"
    assert not runner.write_file(str(path), "new\n")
    gb.Runner(output, pretend=True).write_file(str(path), "changed\n")
    assert path.read_text() == "new\n"


def test_every_file_change_goes_through_the_runner_and_pretend_shows_it_and_makes_none(gb, tmp_path):
    """The Runner's changes to files: under --pretend each is its shell command, and nothing changes."""
    import io
    shown = io.StringIO()
    (tmp_path / "file").write_text("x\n")
    (tmp_path / "tree/inner").mkdir(parents=True)
    (tmp_path / "empty").mkdir()

    def change_everything(runner):
        runner.make_directory(str(tmp_path / "new/deeper"), 0o700)
        runner.remove(str(tmp_path / "file"))
        runner.remove_tree(str(tmp_path / "tree"))
        runner.remove_directory(str(tmp_path / "empty"))
        runner.symlink("new", str(tmp_path / "link"))
        runner.rename(str(tmp_path / "link"), str(tmp_path / "renamed"))
        return runner.make_staging_directory(str(tmp_path / "parent"), ".staging.", 0o750)

    before = sorted(path.name for path in tmp_path.rglob("*"))
    change_everything(gb.Runner(gb.Output(color=False, out=shown, err=shown), pretend=True))
    assert sorted(path.name for path in tmp_path.rglob("*")) == before
    assert shown.getvalue().splitlines() == [
        f"mkdir -p -m 700 {tmp_path}/new/deeper", f"rm -f {tmp_path}/file", f"rm -rf {tmp_path}/tree",
        f"rmdir {tmp_path}/empty", f"ln -s new {tmp_path}/link", f"mv -T {tmp_path}/link {tmp_path}/renamed",
        f"mktemp -d -p {tmp_path}/parent .staging.XXXXXXXX"]
    staging = change_everything(gb.Runner(gb.Output(color=False, verbosity=0)))
    assert sorted(path.name for path in tmp_path.glob("*")) == ["new", "parent", "renamed"]
    assert stat.S_IMODE((tmp_path / "new/deeper").stat().st_mode) == 0o700
    assert os.readlink(tmp_path / "renamed") == "new" and stat.S_IMODE(os.stat(staging).st_mode) == 0o750
    # A change that fails is one error naming its command (main() says it on one line).
    with pytest.raises(gb.BinhostError, match=f"^rmdir {tmp_path}/new failed: Directory not empty$"):
        gb.Runner(gb.Output(color=False, verbosity=0)).remove_directory(str(tmp_path / "new"))


def test_one_backup_per_file_and_run_and_none_overwritten(gb, tmp_path):
    """A run changing a file three times keeps the user's version once; two runs in the same
    second keep two backups."""
    output = gb.Output(color=False, verbosity=0)
    path = tmp_path / "c.conf"
    path.write_text("mine\n")
    runner = gb.Runner(output)
    for text in ("one\n", "two\n", "three\n"):
        runner.write_file(str(path), text)
    assert [backup.read_text() for backup in tmp_path.glob("c.conf.*.bak")] == ["mine\n"]
    gb.Runner(output).write_file(str(path), "four\n")
    gb.Runner(output).write_file(str(path), "five\n")
    assert sorted(backup.read_text() for backup in tmp_path.glob("c.conf.*.bak")) == \
        ["four\n", "mine\n", "three\n"]


def test_add_target_refuses_a_configuration_file_that_does_not_exist(tmp_path):
    missing = tmp_path / "typo.conf"
    result = cli("add-target", "t1", "root@t1.invalid", config=missing)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"configuration file {missing} (-c) does not exist" in result.stderr
    assert not missing.exists()
