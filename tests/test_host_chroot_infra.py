"""The ``host_chroot`` fixture: a real chroot standing in for a Gentoo host.

No gentoo-binhost.py here: this proves the chroot (Debian + Portage in
/opt/portage) can build a binary package for a ROOT inside it, with
chroot-internal configuration paths, and that no mount outlives the test.
"""

from conftest import mounts_under, run, write_chroot_portage_config


def test_emerge_builds_a_binary_package_inside_the_chroot(host_chroot):
    chroot = host_chroot.path
    etc = write_chroot_portage_config(chroot, "/binhost")
    assert etc == host_chroot.host_path("/binhost/etc/portage")
    make_conf = (etc / "make.conf").read_text()
    assert 'PORTAGE_TMPDIR="/binhost/var/tmp"' in make_conf
    assert 'PKGDIR="/binhost/var/cache/binpkgs"' in make_conf
    assert str(chroot) not in make_conf
    assert str(chroot) not in (etc / "repos.conf/binhost-test.conf").read_text()
    assert str((etc / "make.profile").readlink()) == \
        "/var/db/repos/binhost-test/profiles/default"
    host_make_conf = host_chroot.host_path("/opt/portage/etc/portage/make.conf").read_text()
    assert 'PKGDIR="/var/cache/binpkgs"' in host_make_conf

    pkgdir = host_chroot.host_path("/binhost/var/cache/binpkgs")
    env = ["env", "-i", "PATH=/opt/portage/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root",
           "ROOT=/binhost", "PORTAGE_CONFIGROOT=/binhost", "PKGDIR=/binhost/var/cache/binpkgs"]
    # host_chroot.mounts(): mount -t proc; mount --rbind /sys and /dev, each then
    # --make-rslave; umount -R in a finally.
    with host_chroot.mounts():
        assert {str(chroot / d) for d in ("proc", "sys", "dev")} <= set(mounts_under(chroot))
        proc = run(["chroot", chroot] + env
                   + ["emerge", "--buildpkg", "--root-deps", "app-misc/hello"])
        # Prefix install: files merge into EROOT = /binhost + /opt/portage.
        hello = host_chroot.run(["/binhost/opt/portage/usr/bin/hello"])

    gpkgs = sorted(p.relative_to(pkgdir).as_posix() for p in pkgdir.rglob("*.gpkg.tar"))
    assert gpkgs == ["app-misc/hello/hello-1.1-1.gpkg.tar"], proc.stdout
    assert "CPV: app-misc/hello-1.1" in (pkgdir / "Packages").read_text()
    assert hello.stdout == "hello from binhost\n"
    assert mounts_under(chroot) == []
    print("host_chroot timings (s): %s" % {k: round(v, 1) for k, v in host_chroot.timings.items()})
