"""Rollback that holds: one publication per command, rollback holds back what it withdraws, release.

* `update` makes ONE publication (its builds for every target of the environment and what its
  clean retires); one target's failing emerge does not stop the others, and the builds that emerge
  left in PKGDIR before it failed are not published.
* `rollback` publishes the publication before the current one again and holds back what it
  withdraws (the newer version, and a package that was new): the next `update` (the nightly
  timer) keeps it out, builds nothing for it and does not fail; a target that had installed the
  held version goes back to the published one; `release` ends the hold and the next `update`
  offers the released build again, so the target upgrades.
* `rollback` to the current publication changes nothing.
* `history --json` keeps each publication's added/updated/removed as written when it was
  published, whatever is published later.

Real components only: Portage 3.0.83 from PyPI builds in fresh binhost roots (each its own PKGDIR,
port and gpg home), our `serve` serves them, targets (each its own ROOT and PKGDIR, its own world
file) are reached through the session's sshd and install with their real `emerge
--getbinpkgonly`. Tiny ebuilds (nothing is compiled). The tests of a module-scoped scenario run in
the order written: each continues where the one before it left the binhost and its targets.
"""

import difflib
import json
import re
import tempfile
from pathlib import Path

import pytest

from conftest import eroot
from conftest import tiny_ebuild as tiny
from test_publish import (BROKEN_EBUILD, Binhost, add_ebuild, copy_repo, cpvs, entries,  # noqa: F401
                          installed_versions, pworld, summary_line)


def shown(result):
    return result.stdout + result.stderr


def row(result, name):
    """The update summary row of target ``name``."""
    lines = [line for line in result.stdout.splitlines() if line.startswith(name + " ")]
    assert len(lines) == 1, f"one summary row for {name} expected:\n{shown(result)}"
    return lines[0]


def set_world(world, root, *atoms):
    path = eroot(root, world.eprefix) / "var/lib/portage/world"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(atom + "\n" for atom in atoms))


def vdb_entry(world, root, cpv):
    return eroot(root, world.eprefix) / "var/db/pkg" / cpv


def assert_from_our_binary(world, binhost, root, cpv):
    """cpv is installed on the target from one of our PKGDIR's package files (not compiled)."""
    entry = vdb_entry(world, root, cpv)
    assert entry.is_dir(), f"{cpv} is not installed in {root}"
    assert (entry / "BINPKGMD5").is_file(), f"{cpv} was compiled on the target, not installed from a binary"
    build_id = (entry / "BUILD_ID").read_text().strip()
    category, pf = cpv.split("/")
    package = binhost.pkgdir / category / re.sub(r"-\d.*$", "", pf) / f"{pf}-{build_id}.gpkg.tar"
    assert package.is_file(), f"the target's {cpv} (build {build_id}) is not in our PKGDIR"
    return int(build_id)


def served(binhost):
    """The CPVs the running serve offers (/Packages), checked against the current publication."""
    index = binhost.fetch("Packages")
    current = (binhost.pkgdir / ".published/current/Packages").read_bytes()
    assert index == current, "serve answers /Packages with something else than the current publication"
    for entry in entries(index):
        assert (binhost.pkgdir / entry["PATH"]).is_file(), f"the served index names {entry['PATH']}, gone"
    return cpvs(index)


def in_pkgdir(binhost):
    """The CPVs PKGDIR's own (working) index names."""
    return cpvs((binhost.pkgdir / "Packages").read_text())


def build_files(binhost, pf):
    """The package files of one CPV's builds (PF, e.g. rb-1.1) in PKGDIR."""
    return sorted(p.name for p in binhost.pkgdir.rglob(f"{pf}-[0-9]*.gpkg.tar"))


def list_states(binhost, config):
    """{(cpv, build_id): state} from `list --json`."""
    records = json.loads(binhost.cli("list", "--json", config=config).stdout)
    return {(record["cpv"], record["build_id"]): record["state"] for record in records}


def written_changes(history):
    """What history says each publication was, as written when it was published."""
    return {entry["id"]: {key: entry[key] for key in ("why", "published", "packages", "added", "updated", "removed")}
            for entry in history}


def index_difference(binhost, one, other):
    """A unified diff of two publications' indexes (what changed for the targets)."""
    texts = [(binhost.pkgdir / ".published" / str(each) / "Packages").read_text().splitlines()
             for each in (one, other)]
    return "\n".join(difflib.unified_diff(*texts, str(one), str(other), lineterm=""))


def assert_no_traceback(result):
    assert "Traceback" not in result.stderr, result.stderr


# ------------------------------------------------------------------------------------------------
# The scenario: one binhost, two targets (one environment), app-misc/rb 1.0 -> 1.1 -> rollback
# ------------------------------------------------------------------------------------------------

class Scenario:
    """A binhost serving two targets of one environment; both have app-misc/rb in their world,
    `new` also app-misc/newpkg (a package first published with rb-1.1)."""

    def __init__(self, world):
        self.world = world
        base = Path(tempfile.mkdtemp(prefix="rollback-holds-", dir=world.base))
        base.chmod(0o755)
        self.repo = copy_repo(base)
        add_ebuild(self.repo, "app-misc/rb-1.0", tiny("rb", "Gets a new version, then a rollback"))
        self.binhost = Binhost(world, "rbh", repo=self.repo)
        self.binhost.cli("keygen")
        self.old_root, self.old_config = self.binhost.new_target("rbh-old")
        self.new_root, self.new_config = self.binhost.new_target("rbh-new")
        self.both = self.binhost.base / "both.conf"
        self.both.write_text(self.old_config.read_text() + "\n"
                             + "[target" + self.new_config.read_text().split("[target", 1)[1])
        set_world(world, self.old_root, "app-misc/rb")
        set_world(world, self.new_root, "app-misc/rb")
        self.results = {}

    def cli(self, *args, **options):
        options.setdefault("config", self.both)
        return self.binhost.cli(*args, **options)

    def history(self):
        return json.loads(self.cli("history", "--json").stdout)

    def rb(self, root):
        return installed_versions(self.world, root, "app-misc/rb")


@pytest.fixture(scope="module")
def scenario(pworld):
    scenario = Scenario(pworld)
    with scenario.binhost.serving():
        for config in (scenario.old_config, scenario.new_config):
            scenario.binhost.cli("setup-target", config=config)
        yield scenario


def test_update_is_one_publication_and_keeps_what_targets_run(scenario):
    world, binhost = scenario.world, scenario.binhost
    # The first update: rb-1.0 for both targets, one publication; they install it.
    first = scenario.cli("update", "--no-sync", check=False)
    assert first.returncode == 0, shown(first)
    assert [entry["id"] for entry in scenario.history()] == [1], shown(first)
    assert served(binhost) == ["app-misc/rb-1.0"]
    for root, config in ((scenario.old_root, scenario.old_config), (scenario.new_root, scenario.new_config)):
        binhost.cli("install", "-uDN", "@world", config=config)
        assert scenario.rb(root) == ["rb-1.0"]

    # The repository moves on: rb-1.1, and the `new` target wants app-misc/newpkg too.
    add_ebuild(scenario.repo, "app-misc/rb-1.1", tiny("rb", "Gets a new version, then a rollback"))
    add_ebuild(scenario.repo, "app-misc/newpkg-1.0", tiny("newpkg", "First published with rb-1.1"))
    set_world(world, scenario.new_root, "app-misc/rb", "app-misc/newpkg")
    before = scenario.history()
    updated = scenario.cli("update", "--no-sync", check=False)
    assert updated.returncode == 0, shown(updated)
    after = scenario.history()
    assert len(after) == len(before) + 1, ("update made more (or fewer) than one publication:\n"
                                           + json.dumps(after, indent=1) + "\n" + shown(updated))
    newest = after[0]
    assert newest["current"] and newest["id"] == binhost.current() == 2, after
    assert re.search(rf"\bok: publication {newest['id']}\b", summary_line(updated, binhost.root)), updated.stdout
    assert sorted(newest["added"]) == ["app-misc/newpkg-1.0", "app-misc/rb-1.1"], newest
    assert newest["removed"] == [], newest
    assert "ok: 1 of 1 package(s) from the binhost" in row(updated, "rbh-old"), updated.stdout
    assert "ok: 2 of 2 package(s) from the binhost" in row(updated, "rbh-new"), updated.stdout
    # rb-1.0 is no longer installed in the binhost root (rb-1.1 replaced it there), but the
    # targets had it installed at their plans: clean keeps it, published.
    assert served(binhost) == ["app-misc/newpkg-1.0", "app-misc/rb-1.0", "app-misc/rb-1.1"]
    scenario.results["history after the update"] = after

    # The `new` target installs the new version before the rollback; `old` does not.
    binhost.cli("install", "-uDN", "@world", config=scenario.new_config)
    assert scenario.rb(scenario.new_root) == ["rb-1.1"]
    assert installed_versions(world, scenario.new_root, "app-misc/newpkg") == ["newpkg-1.0"]
    assert scenario.rb(scenario.old_root) == ["rb-1.0"]


def test_rollback_offers_the_old_version_only_and_holds_the_new(scenario):
    binhost = scenario.binhost
    rb11_builds = build_files(binhost, "rb-1.1")
    assert rb11_builds, "the scenario needs a build of rb-1.1"
    rolled = scenario.cli("rollback", check=False)
    assert rolled.returncode == 0, shown(rolled)
    history = scenario.history()
    assert [entry["id"] for entry in history] == [3, 2, 1], history
    rollback = history[0]
    assert rollback["current"], rollback
    assert sorted(rollback["holds"]) == ["app-misc/newpkg-1.0", "app-misc/rb-1.1"], rollback
    assert sorted(rollback["removed"]) == ["app-misc/newpkg-1.0", "app-misc/rb-1.1"], rollback
    assert served(binhost) == ["app-misc/rb-1.0"]
    text = scenario.cli("history").stdout
    line = next((line for line in text.splitlines() if re.match(r"\s*3 \*", line)), None)
    assert line, text
    assert "holds back app-misc/newpkg-1.0 app-misc/rb-1.1 until release" in line, line
    # list marks the held builds (the files stay in PKGDIR)
    states = list_states(binhost, scenario.both)
    held = {key: state for key, state in states.items() if key[0] in ("app-misc/rb-1.1", "app-misc/newpkg-1.0")}
    assert held and all(state == "held back by rollback 3" for state in held.values()), states
    assert all(state == "" for key, state in states.items() if key[0] == "app-misc/rb-1.0"), states
    listed = scenario.cli("list").stdout
    assert re.search(r"^app-misc/rb-1\.1\s.*\(held back by rollback 3\)$", listed, re.MULTILINE), listed
    assert build_files(binhost, "rb-1.1") == rb11_builds


def test_target_that_installed_the_new_version_goes_back(scenario):
    """(b) After the rollback, `install -uDN @world` leaves the target on the published version,
    from a binary; a held package with no other version published stays, with a warning."""
    world, binhost = scenario.world, scenario.binhost
    assert scenario.rb(scenario.new_root) == ["rb-1.1"]
    result = binhost.cli("install", "-uDN", "@world", config=scenario.new_config, check=False)
    assert_no_traceback(result)
    assert result.returncode == 0, shown(result)
    assert scenario.rb(scenario.new_root) == ["rb-1.0"], shown(result)
    assert_from_our_binary(world, binhost, scenario.new_root, "app-misc/rb-1.0")
    assert world.installed(scenario.new_root, "usr/share/rb/version").read_text() == "1.0\n"
    # newpkg has no other version published: it stays, and install says so.
    assert installed_versions(world, scenario.new_root, "app-misc/newpkg") == ["newpkg-1.0"]
    assert re.search(r"app-misc/newpkg-1\.0 stays on rbh-new: a rollback holds it back and no other version"
                     r" of app-misc/newpkg is published", result.stderr), shown(result)
    # (Measured: Portage's own binary-only -uDN @world downgraded it; install's explicit
    # `--oneshot =app-misc/rb-1.0` was not needed, so it is not asserted either way.)


def test_rollback_to_the_current_publication_changes_nothing(scenario):
    """(c)"""
    binhost = scenario.binhost
    before, current = scenario.history(), binhost.current()
    holds = (binhost.pkgdir / ".published/holds.json").read_text()
    result = scenario.cli("rollback", str(current), check=False)
    assert result.returncode == 0, shown(result)
    assert f"Publication {current} is the current one: nothing changes" in shown(result), shown(result)
    assert scenario.history() == before
    assert binhost.current() == current
    assert (binhost.pkgdir / ".published/holds.json").read_text() == holds


def test_nightly_update_keeps_the_rollback(scenario):
    """(a) The timer's `update` after the rollback: the old version is still all that is offered,
    nothing is built for the held version, it is not a failure; the target stays on the old one."""
    world, binhost = scenario.world, scenario.binhost
    rb11_builds, newpkg_builds = build_files(binhost, "rb-1.1"), build_files(binhost, "newpkg-1.0")
    publication = binhost.current()
    updated = scenario.cli("update", "--no-sync", check=False)
    assert_no_traceback(updated)
    assert updated.returncode == 0, shown(updated)
    for name in ("rbh-old", "rbh-new"):
        assert "ok: 0 of 1 package(s) from the binhost, 1 held back by a rollback" in row(updated, name), \
            updated.stdout
    assert re.search(r"app-misc/rb-1\.1\S*\s+\(held back by rollback 3: '[^']*gentoo-binhost\.py release' ends it\)",
                     updated.stdout), updated.stdout
    assert build_files(binhost, "rb-1.1") == rb11_builds, "update built the held version again"
    assert build_files(binhost, "newpkg-1.0") == newpkg_builds
    assert served(binhost) == ["app-misc/rb-1.0"]
    scenario.results["nightly update"] = (publication, binhost.current(), updated)

    # The tool's emerge (the gate, then the install) on the target that never had rb-1.1: it stays.
    emerged = binhost.cli("emerge", "-uDN", "@world", config=scenario.old_config, check=False)
    assert_no_traceback(emerged)
    assert emerged.returncode == 0, shown(emerged)
    assert scenario.rb(scenario.old_root) == ["rb-1.0"], shown(emerged)
    assert build_files(binhost, "rb-1.1") == rb11_builds, "emerge built the held version again"
    assert served(binhost) == ["app-misc/rb-1.0"]

    # install, as a target's own nightly job would run it: it stays on the old version, exit 0.
    installed = binhost.cli("install", "-uDN", "@world", config=scenario.old_config, check=False)
    assert_no_traceback(installed)
    assert scenario.rb(scenario.old_root) == ["rb-1.0"], shown(installed)
    assert_from_our_binary(world, binhost, scenario.old_root, "app-misc/rb-1.0")
    assert installed.returncode == 0, shown(installed)


def test_nightly_update_after_the_rollback_publishes_nothing_new(scenario):
    """The update after the rollback changes nothing for the targets: it makes no publication
    (its summary says 'ok: nothing new')."""
    before, after, updated = scenario.results["nightly update"]
    binhost = scenario.binhost
    assert after == before, (
        f"the update published {after} though nothing changed for the targets; the two indexes differ:\n"
        + index_difference(binhost, before, after) + "\n" + updated.stdout)
    assert "ok: nothing new" in summary_line(updated, binhost.root), updated.stdout


def test_release_and_the_next_update_offer_the_new_version_again(scenario):
    """(a) release, update: the released build is published again (not rebuilt) and the target
    upgrades."""
    world, binhost = scenario.world, scenario.binhost
    rb11_builds = build_files(binhost, "rb-1.1")
    # One package first: the other stays held.
    released = scenario.cli("release", "app-misc/rb", check=False)
    assert released.returncode == 0, shown(released)
    assert "Released app-misc/rb-1.1" in released.stdout and "newpkg" not in released.stdout, shown(released)
    states = list_states(binhost, scenario.both)
    assert {state for (cpv, _), state in states.items() if cpv == "app-misc/rb-1.1"} == {""}, states
    assert {state for (cpv, _), state in states.items() if cpv == "app-misc/newpkg-1.0"} == \
        {"held back by rollback 3"}, states
    rollback = next(entry for entry in scenario.history() if entry["id"] == 3)
    assert rollback["holds"] == ["app-misc/newpkg-1.0"], rollback
    # Then every hold.
    released = scenario.cli("release", check=False)
    assert released.returncode == 0, shown(released)
    assert "Released app-misc/newpkg-1.0" in released.stdout and "rb-1.1" not in released.stdout, shown(released)
    assert served(binhost) == ["app-misc/rb-1.0"], "release itself publishes nothing"
    assert not [state for state in list_states(binhost, scenario.both).values() if state.startswith("held")]

    before = binhost.current()
    updated = scenario.cli("update", "--no-sync", check=False)
    assert_no_traceback(updated)
    assert updated.returncode == 0, shown(updated)
    assert binhost.current() == before + 1, shown(updated)
    assert re.search(rf"\bok: publication {before + 1}\b", summary_line(updated, binhost.root)), updated.stdout
    assert served(binhost) == ["app-misc/newpkg-1.0", "app-misc/rb-1.0", "app-misc/rb-1.1"]
    assert build_files(binhost, "rb-1.1") == rb11_builds, "the released build was built again"
    newest = scenario.history()[0]
    assert sorted(newest["added"]) == ["app-misc/newpkg-1.0", "app-misc/rb-1.1"], newest

    for root, config in ((scenario.old_root, scenario.old_config), (scenario.new_root, scenario.new_config)):
        installed = binhost.cli("install", "-uDN", "@world", config=config, check=False)
        assert installed.returncode == 0, shown(installed)
        assert scenario.rb(root) == ["rb-1.1"], shown(installed)
        assert_from_our_binary(world, binhost, root, "app-misc/rb-1.1")
        assert world.installed(root, "usr/share/rb/version").read_text() == "1.1\n"


def test_history_keeps_what_each_publication_changed(scenario):
    """(e) A later update (its clean retires rb-1.0: no target runs it any more) publishes again;
    every earlier entry still says what it said."""
    binhost = scenario.binhost
    before = scenario.history()
    updated = scenario.cli("update", "--no-sync", check=False)
    assert updated.returncode == 0, shown(updated)
    after = scenario.history()
    assert after[0]["id"] == before[0]["id"] + 1 and after[0]["current"], shown(updated)
    assert {entry["id"] for entry in after} - {entry["id"] for entry in before} == {after[0]["id"]}, after
    assert after[0]["removed"] == ["app-misc/rb-1.0"], after[0]
    assert "app-misc/rb-1.0" not in served(binhost)
    states = list_states(binhost, scenario.both)
    assert {state for (cpv, _), state in states.items() if cpv == "app-misc/rb-1.0"} == {"retired"}, states

    then, now = written_changes(before), written_changes(after)
    common = sorted(set(then) & set(now))
    assert common, (before, after)
    for publication in common:
        assert now[publication] == then[publication], f"publication {publication}'s history changed"
    # ... and the entries seen right after the first update's publication 2, too.
    early = written_changes(scenario.results["history after the update"])
    for publication in sorted(set(early) & set(now)):
        assert now[publication] == early[publication], f"publication {publication}'s history changed"
    assert now[2]["added"] == ["app-misc/newpkg-1.0", "app-misc/rb-1.1"], now[2]
    assert sorted(now[3]["removed"]) == ["app-misc/newpkg-1.0", "app-misc/rb-1.1"], now[3]


# ------------------------------------------------------------------------------------------------
# (d) One publication per update; one target failing does not stop the other
# ------------------------------------------------------------------------------------------------

def failing_repo(base):
    repo = copy_repo(base)
    add_ebuild(repo, "app-misc/seed-1.0", tiny("seed", "Published before the update"))
    add_ebuild(repo, "app-misc/good-1.0", tiny("good", "The good target's package"))
    add_ebuild(repo, "app-misc/fails-dep-1.0", tiny("fails-dep", "Built before fails dies"))
    add_ebuild(repo, "app-misc/fails-1.0", BROKEN_EBUILD.format(rdepend="app-misc/fails-dep"))
    return repo


class FailingPair:
    """A binhost with two targets in one environment: `bad` wants app-misc/fails (its dependency
    app-misc/fails-dep builds; fails dies in src_compile), `good` wants app-misc/good. `bad` comes
    first in the configuration."""

    def __init__(self, world, prefix="rbf", names=("rbf-bad", "rbf-good")):
        self.world = world
        base = Path(tempfile.mkdtemp(prefix=prefix + "-", dir=world.base))
        base.chmod(0o755)
        self.repo = failing_repo(base)
        self.binhost = Binhost(world, prefix, repo=self.repo)
        self.binhost.cli("keygen")
        self.targets = [self.binhost.new_target(name) for name in names]
        self.both = self.binhost.base / "both.conf"
        self.both.write_text(self.targets[0][1].read_text() + "".join(
            "\n[target" + config.read_text().split("[target", 1)[1] for _root, config in self.targets[1:]))
        set_world(world, self.targets[0][0], "app-misc/fails")
        for root, _config in self.targets[1:]:
            set_world(world, root, "app-misc/good")

    def update(self):
        return self.binhost.cli("update", "--no-sync", config=self.both, check=False)

    def history(self):
        return json.loads(self.binhost.cli("history", "--json", config=self.both).stdout)


def assert_failed_update(pair, result, bad="rbf-bad", good="rbf-good"):
    assert_no_traceback(result)
    assert result.returncode == 1, shown(result)
    assert "FAILED" in row(result, bad), result.stdout
    if good:
        assert re.search(r"\bok\b", row(result, good)) and "FAILED" not in row(result, good), result.stdout
    assert "FAILED" in summary_line(result, pair.binhost.root), result.stdout
    assert "app-misc/fails-dep-1.0" in in_pkgdir(pair.binhost), \
        "the scenario needs Portage to have indexed fails-dep in PKGDIR before fails died:\n" + shown(result)
    assert not build_files(pair.binhost, "fails-1.0")


def test_failing_target_does_not_stop_the_others_publication(pworld):
    """One publication for the update: the good target's build is published, the build the failed
    emerge left in PKGDIR (fails-dep) is not."""
    pair = FailingPair(pworld)
    binhost = pair.binhost
    with binhost.serving():
        for _root, config in pair.targets:
            binhost.cli("setup-target", config=config)
        binhost.cli("build", "app-misc/seed", config=pair.both)
        before = pair.history()
        assert [entry["id"] for entry in before] == [1], before
        assert served(binhost) == ["app-misc/seed-1.0"]

        result = pair.update()
        assert_failed_update(pair, result)
        after = pair.history()
        assert [entry["id"] for entry in after] == [2, 1], ("not one publication for the update:\n"
                                                            + json.dumps(after, indent=1) + "\n" + shown(result))
        assert after[0]["current"] and after[0]["added"] == ["app-misc/good-1.0"], after[0]
        offered = served(binhost)
        assert offered == ["app-misc/good-1.0", "app-misc/seed-1.0"], (
            "the update's publication is not seed + the good target's build:\n" + shown(result))
        assert "ok: 1 of 1 package(s) from the binhost" in row(result, "rbf-good"), result.stdout
        # The good target installs what was published.
        good_root, good_config = pair.targets[1]
        binhost.cli("install", "-uDN", "@world", config=good_config)
        assert installed_versions(pair.world, good_root, "app-misc/good") == ["good-1.0"]


def test_failing_update_before_any_publication_publishes_no_leftover(pworld):
    """The binhost's first publication, made by an update whose only target fails after its
    emerge built fails-dep: what that emerge left in PKGDIR is not published."""
    pair = FailingPair(pworld, prefix="rbf1", names=("rbf1-bad",))
    binhost = pair.binhost
    with binhost.serving():
        binhost.cli("setup-target", config=pair.targets[0][1])
        result = pair.update()
        assert_failed_update(pair, result, bad="rbf1-bad", good=None)
        published = binhost.current()
        offered = cpvs((binhost.pkgdir / ".published/current/Packages").read_text()) if published else []
    assert "app-misc/fails-dep-1.0" not in offered, (
        f"publication {published}, the first, offers fails-dep, which the failed emerge left in PKGDIR"
        f" (history: {pair.history()}):\n" + shown(result))
