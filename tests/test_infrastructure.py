"""The raw binhost pipeline, done by hand with real Portage, HTTP and sshd.

No gentoo-binhost.py here: this documents the recipe the script automates and
guards the fixtures in conftest.py. If this test fails, the environment (or a
fixture) is broken, not the script.
"""

import os
import shlex

from conftest import REPO, SCRIPT, eroot, http_server, portage_env, run, write_portage_config


def test_build_serve_and_install_over_ssh(tmp_path, portage_bin, eprefix, host_portage, sshd):
    # a. The binhost root B builds hello-app (and its dependency hello) into PKGDIR.
    binhost = tmp_path / "binhost"
    write_portage_config(binhost, repo=REPO)
    pkgdir = binhost / "var" / "cache" / "binpkgs"
    run(["emerge", "--buildpkg", "--root-deps", "app-misc/hello-app"],
        env=portage_env(portage_bin, root=binhost, PKGDIR=pkgdir))

    gpkgs = sorted(p.relative_to(pkgdir).as_posix() for p in pkgdir.rglob("*.gpkg.tar"))
    assert gpkgs == [
        "app-misc/hello-app/hello-app-1.0-1.gpkg.tar",
        "app-misc/hello/hello-1.1-1.gpkg.tar",
    ]
    index = (pkgdir / "Packages").read_text()
    assert "CPV: app-misc/hello-app-1.0" in index
    assert "PATH: app-misc/hello/hello-1.1-1.gpkg.tar" in index
    assert (pkgdir / "Packages.gz").is_file()
    # The binhost root itself got the packages too (EROOT = ROOT + EPREFIX).
    assert (eroot(binhost, eprefix) / "usr/bin/hello-app").is_file()
    assert "app-misc/hello-app" in (eroot(binhost, eprefix) / "var/lib/portage/world").read_text()

    # b. Serve PKGDIR over HTTP: the server root *is* PKGDIR.
    with http_server(pkgdir) as url:
        # c. The target root T: same profile and repo, a binrepos.conf for the binhost.
        target = tmp_path / "target"
        write_portage_config(target, repo=REPO, extra_make_conf=(
            'PKGDIR="%s"\n'
            'BINPKG_GPG_VERIFY_GPG_HOME="%s"\n'
            % (target / "var/cache/binpkgs", target / "etc/portage/gnupg")))
        # `location` is where downloaded packages are cached. Its default is
        # ${EPREFIX}/var/cache/binhost/<name>: /var/cache/binhost/test on a real
        # target, but here EPREFIX is the shared, persistent venv (not ROOT, not
        # PKGDIR), so every test sets it inside its own root.
        binrepos = target / "etc/portage/binrepos.conf"
        binrepos.mkdir()
        (binrepos / "test.conf").write_text(
            "[test]\n"
            "sync-uri = %s\n"
            "priority = 10\n"
            "verify-signature = false\n"
            "location = %s\n" % (url, target / "var/cache/binhost/test"))

        # d. Install from the binhost, over the real sshd, the way the script will.
        remote = " ".join(shlex.quote(w) for w in [
            "env", "ROOT=%s/" % target, "PORTAGE_CONFIGROOT=%s/" % target,
            "PATH=%s:/usr/bin:/bin" % portage_bin,
            "emerge", "--getbinpkgonly", "--binpkg-respect-use=y", ">=app-misc/hello-app-1.0",
        ])
        proc = run(["ssh", "-p", str(sshd.port)] + shlex.split(sshd.ssh_options)
                   + [sshd.host, "--", remote])
        assert "hello-app-1.0" in proc.stdout

    target_eroot = eroot(target, eprefix)
    hello_app = target_eroot / "usr/bin/hello-app"
    assert hello_app.is_file() and os.access(str(hello_app), os.X_OK)
    assert run([hello_app]).stdout == "hello-app from binhost\n"
    assert run([target_eroot / "usr/bin/hello"]).stdout == "hello from binhost\n"
    # Fetched packages land in the binrepo's location (not in PKGDIR), the
    # cached index and the world file in EROOT.
    cache = target / "var/cache/binhost/test"
    assert (cache / "app-misc/hello-app/hello-app-1.0-1.gpkg.tar").is_file()
    assert (cache / "app-misc/hello/hello-1.1-1.gpkg.tar").is_file()
    assert not list((target / "var/cache/binpkgs").iterdir())
    assert (target_eroot / "var/cache/edb/binhost/127.0.0.1/Packages").is_file()
    assert "app-misc/hello-app" in (target_eroot / "var/lib/portage/world").read_text()
    # Installed from binaries, not built: the vdb records BINPKGMD5 for binpkgs.
    assert (target_eroot / "var/db/pkg/app-misc/hello-app-1.0/BINPKGMD5").is_file()


def test_the_script_reads_low_level_to_high():
    """README (Development): the file reads from low level to high, main() last, its first comment
    a map of its layers. Every name a top-level definition uses is defined above it, but for the
    factories that reach one layer up (Config makes Environments, an Environment its Remotes) and
    format_command's abbreviation of the confinement program."""
    import ast
    source = SCRIPT.read_text()
    tree = ast.parse(source)
    defined = {}
    for node in tree.body:
        names = ([node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else
                 [target.id for target in getattr(node, "targets", []) if isinstance(target, ast.Name)])
        for name in names:
            defined.setdefault(name, node.lineno)
    later = sorted({(name.id, node.name if hasattr(node, "name") else node.lineno)
                    for node in tree.body for name in ast.walk(node)
                    if isinstance(name, ast.Name) and defined.get(name.id, 0) > node.lineno})
    assert later == [("CONFINE_PROGRAM", "format_command"), ("Environment", "Config"),
                     ("Remote", "Environment")], later
    functions = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)]
    assert functions[-1] == "main"
    lines = source.splitlines()
    layers = [line.split(":")[0][2:] for before, line in zip(lines, lines[1:])
              if before.startswith("# ----------") and line.startswith("# ") and not line.startswith("# -")]
    assert layers[:8] == ["Constants", "Errors", "Output", "File helpers", "Configuration", "Runner",
                          "HTTP server", "Pure parsers"], layers
    assert layers[8:] == ["The binhost environment", "The targets", "Capabilities", "Serving",
                          "Command line"], layers
    mapped = [line[4:].split(":")[0].split(",")[0] for line in source.splitlines() if line.startswith("# - ")]
    assert mapped[:6] == ["Infrastructure", "Pure parsers", "The binhost environment", "The targets",
                          "Capabilities", "Serving"], mapped
