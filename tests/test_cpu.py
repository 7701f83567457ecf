"""`cpu`: -march=native of the target as explicit flags for the binhost, and CPU_FLAGS_X86.

No Portage needed. tests/data/cc1/*.probe are recorded outputs of CPU_PROBE_SCRIPT for real
CPUs (see tests/data/cc1/README.md), expected.json what they must resolve to.

The correctness criterion is checked with this machine's gcc: the resolved flags must define
exactly the same macros (`gcc -dM -E`) as -march=native. The complete macro lists are compared,
nothing filtered: on the development machine (gcc 12, AMD Zen 4) they are identical, including
__BIGGEST_ALIGNMENT__, __tune_*__ and the __code_model_*__ macros, so no filter was needed.
"""

import json
import os
import platform
import shutil
import stat
import subprocess

import pytest

from conftest import TESTS_DIR, need

DATA = TESTS_DIR / "data" / "cc1"
PROBES = sorted(path.name for path in DATA.glob("*.probe"))
EXPECTED = json.loads((DATA / "expected.json").read_text())
X86_PROBES = [name for name in PROBES if not name.startswith("aarch64")]

# cpuid2cpuflags' own expectation for an AMD Zen 4 (projg2/cpuid2cpuflags,
# tests/x86/amd-zen4.txt), from before it learned bmi1/bmi2 (its 2024 table has both).
CPUID2CPUFLAGS_ZEN4 = (
    "aes avx avx2 avx512_bf16 avx512_bitalg avx512_vbmi2 avx512_vnni avx512_vpopcntdq avx512bw"
    " avx512cd avx512dq avx512f avx512ifma avx512vbmi avx512vl f16c fma3 mmx mmxext pclmul"
    " popcnt rdrand sha sse sse2 sse3 sse4_1 sse4_2 sse4a ssse3 vpclmulqdq").split()


def probe(gb, name):
    return gb.parse_sections((DATA / name).read_text())


def cc1_line(*options):
    return " /usr/libexec/gcc/x86_64-pc-linux-gnu/13/cc1 -E -quiet -v /dev/null -o /dev/null " \
        + " ".join(options) + " -dumpbase null"


def help_text(*extra_lines, **states):
    """A `gcc -Q --help=target` text: help_text(avx="enabled", march="haswell")."""
    lines = ["The following options are target specific:"] + list(extra_lines)
    for name, state in sorted(states.items()):
        option = "-m" + name.replace("_", "-")
        if state in ("enabled", "disabled"):
            lines.append("  %-28s\t\t[%s]" % (option, state))
        else:
            lines.append("  %-28s\t\t%s" % (option + "=", state))
    return "\n".join(lines) + "\n\n  Known valid arguments for -march= option:\n    i386\n"


# ---- recorded CPUs ---------------------------------------------------------------------------

def test_every_probe_has_expectations():
    assert sorted(EXPECTED) == PROBES
    assert len(PROBES) >= 5


@pytest.mark.parametrize("name", PROBES)
def test_recorded_probe_resolves_to_expected_flags(gb, name):
    sections = probe(gb, name)
    flags = gb.resolve_native_flags(sections["cc1"], sections.get("baseline", ""),
                                    sections.get("native", ""))
    assert flags == EXPECTED[name]["flags"].split()


@pytest.mark.parametrize("name", PROBES)
def test_recorded_cc1_line_alone_keeps_every_feature_flag(gb, name):
    """Without help texts nothing can be proven redundant: every -m feature flag stays, only
    cache --params, ABI words and a -mtune equal to the arch go."""
    cc1 = probe(gb, name)["cc1"]
    words = gb.parse_cc1_flags(cc1)
    arch = next(w for w in words if w.startswith(("-march=", "-mcpu="))).split("=", 1)[1]
    wanted = [w for w in words
              if not w.startswith(("--param", "-mabi=")) and w not in ("-mlittle-endian", "-m64")
              and w != "-mtune=" + arch]
    assert gb.resolve_native_flags(cc1) == wanted
    assert gb.resolve_native_flags(cc1, "", "") == wanted


@pytest.mark.parametrize("name", [n for n in PROBES if set(EXPECTED[n]) - {"flags"}])
def test_recorded_cpu_flags_x86(gb, name):
    sections = probe(gb, name)
    expected = EXPECTED[name]
    if "cpu_flags_x86_from_cpuinfo" in expected:
        assert (gb.cpu_flags_x86_from_cpuinfo(sections["cpuinfo"])
                == expected["cpu_flags_x86_from_cpuinfo"].split())
    if "cpu_flags_x86_from_cpuid2cpuflags" in expected:
        assert (gb.parse_cpuid2cpuflags(sections["cpuid2cpuflags"])
                == expected["cpu_flags_x86_from_cpuid2cpuflags"].split())


def test_zen4_cpuinfo_maps_like_cpuid2cpuflags(gb):
    """The development machine is a Zen 4: its /proc/cpuinfo must give what cpuid2cpuflags
    gives from CPUID for a Zen 4, plus the bmi1/bmi2 it added later."""
    cpuinfo = probe(gb, "this-machine-amd-epyc-zen4.probe")["cpuinfo"]
    assert gb.cpu_flags_x86_from_cpuinfo(cpuinfo) == sorted(CPUID2CPUFLAGS_ZEN4 + ["bmi1", "bmi2"])


def test_zen4_needs_avx512_flags_beyond_znver3(gb):
    """gcc 12 does not know Zen 4 and says znver3: the explicit AVX-512 flags are the point."""
    flags = EXPECTED["this-machine-amd-epyc-zen4.probe"]["flags"].split()
    assert flags[0] == "-march=znver3"
    assert {"-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512bf16"} <= set(flags)


# ---- the traps -------------------------------------------------------------------------------

def test_sse41_only_cpu_never_gets_msse4(gb):
    """-msse4 means SSE4.1 *and* SSE4.2: on a Core 2 it made binaries die with SIGILL."""
    sections = probe(gb, "core2-harpertown-sse41-only.probe")
    options = gb.enabled_target_options(sections["native"])
    # What misled resolve-march-native: a separate "-mno-sse4" entry next to "-msse4".
    assert options["-mno-sse4"] == "disabled" and options["-msse4"] == "disabled"
    assert options["-msse4.1"] == "enabled" and options["-msse4.2"] == "disabled"
    for flags in (gb.resolve_native_flags(sections["cc1"], sections["baseline"],
                                          sections["native"]),
                  gb.resolve_native_flags(sections["cc1"])):
        assert "-msse4.1" in flags
        assert not {"-msse4", "-mno-sse4", "-msse4.2"} & set(flags)
    assert "-mno-sse4.2" in gb.resolve_native_flags(sections["cc1"])


def test_bogus_msse4_in_the_input_is_not_passed_on(gb):
    # What resolve-march-native 5.0.2 printed for a Core 2 (issue #197).
    flags = gb.resolve_native_flags(cc1_line("-march=core2", "-msse4", "-msse4.1", "-mno-sse4.2",
                                             "-mxsave"))
    assert flags == ["-march=core2", "-msse4.1", "-mno-sse4.2", "-mxsave"]
    # Alone, the alias keeps its meaning in explicit form.
    assert gb.resolve_native_flags(cc1_line("-march=x86-64", "-msse4")) == ["-march=x86-64",
                                                                           "-msse4.2"]
    assert gb.resolve_native_flags(cc1_line("-march=x86-64", "-mno-sse4")) == ["-march=x86-64",
                                                                              "-mno-sse4.1"]


def test_no_mno_flag_for_options_with_values(gb):
    """resolve-march-native turned -mbranch-cost=2 into the invalid -mno-branch-cost=2."""
    sections = probe(gb, "pentium-m-i686.probe")
    baseline = gb.enabled_target_options(sections["baseline"])
    native = gb.enabled_target_options(sections["native"])
    assert (baseline["-mbranch-cost="], native["-mbranch-cost="]) == ("2", "3")
    flags = gb.resolve_native_flags(sections["cc1"], sections["baseline"], sections["native"])
    assert not [flag for flag in flags if flag.startswith("-mno-") and "=" in flag]
    assert not [flag for flag in flags if "branch-cost" in flag]  # -mtune=generic implies it
    assert "-mtune=generic" in flags and "-mno-sahf" in flags
    assert "-m32" not in flags
    assert gb.resolve_native_flags(cc1_line("-march=pentium-m", "-mno-branch-cost=2",
                                            "-mtune=generic")) == ["-march=pentium-m",
                                                                   "-mtune=generic"]


def test_mtune_is_dropped_only_when_it_names_the_arch(gb):
    assert "-mtune=k8" in EXPECTED["amd-k8-sse3.probe"]["flags"].split()
    assert "-mtune=haswell" not in EXPECTED["intel-haswell-cfarm14.probe"]["flags"]
    arm = "/usr/libexec/gcc/aarch64-unknown-linux-gnu/14/cc1 -E -mlittle-endian -mabi=lp64 %s"
    assert gb.resolve_native_flags(arm % "-mcpu=neoverse-n1+crc+crypto -mtune=neoverse-n1") \
        == ["-mcpu=neoverse-n1+crc+crypto"]
    assert gb.resolve_native_flags(arm % "-mcpu=neoverse-n1+crc -mtune=cortex-a72") \
        == ["-mcpu=neoverse-n1+crc", "-mtune=cortex-a72"]


def test_cache_params_and_abi_words_are_dropped(gb):
    line = cc1_line("-m64", "-march=znver3", "-mavx512f", "--param", "l1-cache-size=32",
                    "--param=l2-cache-size=1024", "-mabi=sysv", "-mtune=znver3")
    assert gb.resolve_native_flags(line) == ["-march=znver3", "-mavx512f"]
    assert gb.resolve_native_flags(probe(gb, "aarch64-neoverse-v2.probe")["cc1"]) \
        == ["-mcpu=neoverse-v2+crc+sve2-aes+sve2-sha3+sve2-sm4+norng+nossbs"]


def test_feature_the_base_implies_but_the_cpu_lacks_is_kept(gb):
    """A Celeron without AVX is -march=sandybridge -mno-avx (resolve-march-native #110)."""
    cc1 = probe(gb, "intel-sandybridge-celeron-no-avx.probe")["cc1"]
    baseline = help_text(avx="enabled", aes="disabled", pclmul="enabled", sahf="enabled",
                         march="sandybridge")
    flags = gb.resolve_native_flags(cc1, baseline)
    assert "-mno-avx" in flags
    assert "-mno-aes" not in flags and "-mpclmul" not in flags and "-msahf" not in flags
    assert "-mno-avx2" in flags  # not in this baseline: kept, since nothing proves it redundant


def test_flag_kept_when_the_help_display_contradicts_the_cc1_line(gb):
    """gcc 12 shows -mhle [enabled] whatever -mno-hle says: such a display cannot prove a
    flag redundant."""
    line = cc1_line("-march=haswell", "-mno-hle", "-mtune=haswell")
    assert gb.resolve_native_flags(line, help_text(hle="disabled"), help_text(hle="enabled")) \
        == ["-march=haswell", "-mno-hle"]
    assert gb.resolve_native_flags(line, help_text(hle="disabled"), help_text(hle="disabled")) \
        == ["-march=haswell"]


def test_native_help_adds_features_the_cc1_line_does_not_mention(gb):
    """As resolve-march-native does, but never from the separate "-mno-FOO" entries of the
    help text (-mno-sse4 there made it print -msse4)."""
    line = cc1_line("-march=x86-64", "-mavx")
    baseline = help_text("  -mno-sse4                   \t\t[enabled]", crc32="disabled",
                         avx="disabled", red_zone="enabled", mwait="enabled", sse4="disabled")
    native = help_text("  -mno-sse4                   \t\t[disabled]", crc32="enabled",
                       avx="enabled", red_zone="enabled", mwait="disabled", sse4="disabled")
    assert gb.resolve_native_flags(line, baseline, native) == ["-march=x86-64", "-mavx",
                                                               "-mcrc32", "-mno-mwait"]


def test_unresolved_native_gives_no_flags(gb):
    """gcc may not know an aarch64 core and expand -mcpu=native to nothing (resolve-march-native
    #136): -march=native then meant gcc's defaults, and so must the binhost's flags."""
    line = " /usr/libexec/gcc/aarch64-unknown-linux-gnu/13/cc1 -E -quiet -v /dev/null -o " \
           "/dev/null -mlittle-endian -mabi=lp64 -dumpbase null"
    assert gb.resolve_native_flags(line) == []


@pytest.mark.parametrize("output", ["", "sh: 1: gcc: not found", "\n\n"])
def test_missing_cc1_line_is_an_error(gb, output):
    with pytest.raises(ValueError):
        gb.resolve_native_flags(output)


# ---- parsers ---------------------------------------------------------------------------------

def test_parse_sections(gb):
    text = ("Welcome to the target!\r\n==arch\r\nx86_64\r\n==gcc\n13\n==cpuid2cpuflags\n"
            "==cpuinfo\nflags\t\t: fpu sse\n\n==gcc\n14\n")
    assert gb.parse_sections(text) == {"arch": "x86_64", "gcc": "14", "cpuid2cpuflags": "",
                                       "cpuinfo": "flags\t\t: fpu sse"}
    assert gb.parse_sections("no markers at all\n") == {}


def test_parse_cc1_flags_reads_only_the_cc1_line(gb):
    output = (
        "Using built-in specs.\n"
        "COLLECT_GCC=gcc\n"
        "Target: x86_64-pc-linux-gnu\n"
        "COLLECT_GCC_OPTIONS='-v' '-E' '-march=native' '-c' '-o' '/dev/null'\n"
        " /usr/libexec/gcc/x86_64-pc-linux-gnu/13/cc1 -E -quiet -v /dev/null -o /dev/null"
        " -march=alderlake -mmmx -mno-avx512f -mabm --param l1-cache-size=48"
        " --param=l2-cache-size=1280 -mtune=alderlake -dumpbase null\n"
        "ignoring nonexistent directory \"/usr/local/include\"\n")
    assert gb.parse_cc1_flags(output) == [
        "-march=alderlake", "-mmmx", "-mno-avx512f", "-mabm", "--param=l1-cache-size=48",
        "--param=l2-cache-size=1280", "-mtune=alderlake"]
    assert gb.parse_cc1_flags("") == []
    # No cc1 line (gcc failed): nothing, not the '-march=native' of COLLECT_GCC_OPTIONS.
    assert gb.parse_cc1_flags("Using built-in specs.\nCOLLECT_GCC_OPTIONS='-march=native'\n"
                              "gcc: error: unrecognized command-line option '-mfoo'\n") == []
    assert gb.parse_cc1_flags("-march=haswell -maes --param l1-cache-size=32") == [
        "-march=haswell", "-maes", "--param=l1-cache-size=32"]


def test_enabled_target_options(gb):
    text = (
        "The following options are target specific:\n"
        "  -mabi=ABI                   \t\tlp64\n"
        "  -march=                     \t\tznver3\n"
        "  -mavx2                      \t\t[enabled]\n"
        "  -mavx256-split-unaligned-load \t[disabled]\n"
        "  -mbranch-cost=<0,5>         \t\t3\n"
        "  -mcmodel=                   \t\t[default]\n"
        "  -mcpu=                      \t\t\n"
        "  -mcpu=CPU                   \t\t\n"
        "  -mlarge-data-threshold=<number> \t65536\n"
        "  -msdata=[none,data,sysv,eabi] \tnone\n"
        "  -msse5                      \t\t-mavx\n"
        "  -mstack-protector-guard-offset= \t\n"
        "  -mtune=                     \t\tcortex-\n"
        "                              \t\ta720+crc+sve2-aes\n"
        "\n"
        "  Known valid arguments for -march= option:\n"
        "    i386 i486\n"
        "  -mnot-an-option             \t\t[enabled]\n")
    assert gb.enabled_target_options(text) == {
        "-mabi=": "lp64", "-march=": "znver3", "-mavx2": "enabled",
        "-mavx256-split-unaligned-load": "disabled", "-mbranch-cost=": "3",
        "-mcmodel=": "default", "-mcpu=": "", "-mlarge-data-threshold=": "65536",
        "-msdata=": "none", "-msse5": "-mavx", "-mstack-protector-guard-offset=": "",
        "-mtune=": "cortex-a720+crc+sve2-aes"}


def test_enabled_target_options_of_recorded_help(gb):
    sections = probe(gb, "aarch64-cfarm185-armv8-a-crypto-crc.probe")
    options = gb.enabled_target_options(sections["native"])
    assert options["-march="] == "armv8-a+crypto+crc" and options["-mabi="] == "lp64"
    assert options["-msve-vector-bits="] == "scalable" and options["-mcpu="] == ""
    assert options["-mfix-cortex-a53-835769"] == "enabled"
    haswell = gb.enabled_target_options(probe(gb, "intel-haswell-cfarm14.probe")["native"])
    assert haswell["-mavx2"] == "enabled" and haswell["-march="] == "haswell"
    assert "-mi386" not in haswell and len(haswell) > 150


# ---- CPU_FLAGS_X86 ---------------------------------------------------------------------------

def test_cpuinfo_names_that_differ(gb):
    line = ("flags\t\t: fpu mmx sse sse2 pni ssse3 fma pclmulqdq sha_ni abm 3dnowprefetch"
            " avx512_bf16 avx512vbmi avx_vnni bmi1 rdrand constant_tsc")
    assert gb.cpu_flags_x86_from_cpuinfo(line) == [
        "avx512_bf16", "avx512vbmi", "avx_vnni", "bmi1", "fma3", "mmx", "mmxext", "pclmul",
        "popcnt", "rdrand", "sha", "sse", "sse2", "sse3", "ssse3"]
    # VIA PadLock hash engine; AMD's own mmxext and 3DNow! names.
    assert gb.cpu_flags_x86_from_cpuinfo("phe mmxext 3dnow 3dnowext popcnt") == [
        "3dnow", "3dnowext", "mmxext", "padlock", "popcnt"]
    # ssse3 is not sse3, 3dnowprefetch is not 3dnow.
    assert gb.cpu_flags_x86_from_cpuinfo("flags : ssse3 3dnowprefetch") == ["ssse3"]


def test_cpuinfo_names_are_valid_use_flags(gb):
    cpuinfo = probe(gb, "this-machine-amd-epyc-zen4.probe")["cpuinfo"]
    names = gb.cpu_flags_x86_from_cpuinfo(cpuinfo)
    assert names == sorted(names) and set(names) <= gb.CPU_FLAGS_X86_NAMES
    assert "sha_ni" not in names and "fma" not in names and "pni" not in names


def test_arm_features_line_is_not_x86(gb):
    # AWS Graviton3 (published lscpu/cpuinfo): "aes" and "sha2" here are Arm features.
    features = ("Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid"
                " asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit")
    assert gb.cpu_flags_x86_from_cpuinfo(features) == []


def test_parse_cpuid2cpuflags(gb):
    assert gb.parse_cpuid2cpuflags("CPU_FLAGS_X86: sse2 aes avx mmx\n") == ["aes", "avx", "mmx",
                                                                             "sse2"]
    assert gb.parse_cpuid2cpuflags("") == []
    assert gb.parse_cpuid2cpuflags("CPU_FLAGS_ARM: edsp neon thumb v4\n") == []
    assert gb.parse_cpuid2cpuflags("CPU_FLAGS_ARM: neon edsp\n", "CPU_FLAGS_ARM") == ["edsp",
                                                                                     "neon"]


def test_missing_isa(gb):
    target = EXPECTED["this-machine-amd-epyc-zen4.probe"]["cpu_flags_x86_from_cpuinfo"]
    haswell_host = "aes avx avx2 bmi1 bmi2 f16c fma3 mmx mmxext pclmul popcnt rdrand sse sse2" \
                   " sse3 sse4_1 sse4_2 ssse3"
    missing = gb.missing_isa(target.split(), haswell_host.split())
    assert missing[:2] == ["avx512_bf16", "avx512_bitalg"] and "sha" in missing
    assert "sse4a" in missing and "avx2" not in missing and missing == sorted(missing)
    assert gb.missing_isa(haswell_host, target) == []


# ---- make.conf and package.use ---------------------------------------------------------------

NEW = ["-march=znver3", "-mavx512f", "-mshstk"]

STAGE3 = """\
# These settings were set by the catalyst build script that automatically
# built this stage.
COMMON_FLAGS="-O2 -pipe"
CFLAGS="${COMMON_FLAGS}"
CXXFLAGS="${COMMON_FLAGS}"
FCFLAGS="${COMMON_FLAGS}"
FFLAGS="${COMMON_FLAGS}"

LC_MESSAGES=C.utf8
"""


def test_set_common_flags_stage3(gb):
    result = gb.set_common_flags(STAGE3, NEW)
    assert result == STAGE3.replace('COMMON_FLAGS="-O2 -pipe"',
                                    'COMMON_FLAGS="-O2 -pipe -march=znver3 -mavx512f -mshstk"')
    assert gb.set_common_flags(result, NEW) == result
    assert gb.set_common_flags(result, " ".join(NEW)) == result


@pytest.mark.parametrize("before, after", [
    ('COMMON_FLAGS="-march=native -O2 -pipe"\n',
     'COMMON_FLAGS="-march=znver3 -mavx512f -mshstk -O2 -pipe"\n'),
    ('COMMON_FLAGS="-O2 -march=haswell -maes -mabm --param l1-cache-size=32 -mno-hle'
     ' --param=l2-cache-size=1024 -pipe -mno-omit-leaf-frame-pointer -mfpmath=sse"\n',
     'COMMON_FLAGS="-O2 -march=znver3 -mavx512f -mshstk -pipe -mno-omit-leaf-frame-pointer'
     ' -mfpmath=sse"\n'),
    ("COMMON_FLAGS='-O2 -march=native'  # mine\n",
     "COMMON_FLAGS='-O2 -march=znver3 -mavx512f -mshstk'  # mine\n"),
    ("COMMON_FLAGS=-O2\n", 'COMMON_FLAGS="-O2 -march=znver3 -mavx512f -mshstk"\n'),
    ('COMMON_FLAGS="-O2 -pipe\n    -march=native -mtune=native\n    -fno-semantic-interposition"\n',
     'COMMON_FLAGS="-O2 -pipe\n    -march=znver3 -mavx512f -mshstk\n'
     '    -fno-semantic-interposition"\n'),
    ('COMMON_FLAGS="-O2 -pipe"\nCOMMON_FLAGS="${COMMON_FLAGS} -march=native"\n',
     'COMMON_FLAGS="-O2 -pipe"\nCOMMON_FLAGS="${COMMON_FLAGS} -march=znver3 -mavx512f -mshstk"\n'),
    ('COMMON_FLAGS="-march=native -O2"\nCOMMON_FLAGS="-O3 -pipe"\n',
     'COMMON_FLAGS="-O2"\nCOMMON_FLAGS="-O3 -pipe -march=znver3 -mavx512f -mshstk"\n'),
    ('export COMMON_FLAGS="-O2"\n', 'export COMMON_FLAGS="-O2 -march=znver3 -mavx512f -mshstk"\n'),
])
def test_set_common_flags_replaces_only_cpu_words(gb, before, after):
    assert gb.set_common_flags(before, NEW) == after
    assert gb.set_common_flags(after, NEW) == after


def test_set_common_flags_leaves_comments_and_other_variables(gb):
    text = ('#COMMON_FLAGS="-march=native"\n'
            'FEATURES="-march=native is just text here"\n'
            'COMMON_FLAGS="-O2" # -march=native in a comment\n'
            'USE="x -march"\n')
    assert gb.set_common_flags(text, NEW) == text.replace(
        'COMMON_FLAGS="-O2" #', 'COMMON_FLAGS="-O2 -march=znver3 -mavx512f -mshstk" #')


def test_set_common_flags_other_flags_variables(gb):
    """Their own -march=native would override ours (and mean the binhost's CPU)."""
    text = ('COMMON_FLAGS="-O2 -pipe"\n'
            'CFLAGS="${COMMON_FLAGS} -march=native"\n'
            'CXXFLAGS="${CFLAGS} -mavx2"\n'
            'FCFLAGS="-O2 -march=native"\n'
            'FFLAGS="-O2"\n')
    assert gb.set_common_flags(text, NEW) == (
        'COMMON_FLAGS="-O2 -pipe -march=znver3 -mavx512f -mshstk"\n'
        'CFLAGS="${COMMON_FLAGS}"\n'
        'CXXFLAGS="${CFLAGS}"\n'
        'FCFLAGS="-O2 -march=znver3 -mavx512f -mshstk"\n'
        'FFLAGS="-O2"\n')


def test_set_common_flags_without_common_flags(gb):
    text = 'CFLAGS="-O2 -march=native -pipe"\nCXXFLAGS="${CFLAGS}"\n'
    assert gb.set_common_flags(text, NEW) == (
        'CFLAGS="-O2 -march=znver3 -mavx512f -mshstk -pipe"\nCXXFLAGS="${CFLAGS}"\n')
    assert gb.set_common_flags('CFLAGS="-O2"\n', NEW) == (
        'CFLAGS="-O2 -march=znver3 -mavx512f -mshstk"\n')
    result = gb.set_common_flags('FEATURES="buildpkg"', NEW)
    assert result == ('FEATURES="buildpkg"\n'
                      'COMMON_FLAGS="-O2 -pipe -march=znver3 -mavx512f -mshstk"\n'
                      'CFLAGS="${COMMON_FLAGS}"\nCXXFLAGS="${COMMON_FLAGS}"\n'
                      'FCFLAGS="${COMMON_FLAGS}"\nFFLAGS="${COMMON_FLAGS}"\n')
    assert gb.set_common_flags(result, NEW) == result


def test_set_common_flags_with_resolved_probe_flags(gb):
    flags = EXPECTED["core2-harpertown-sse41-only.probe"]["flags"].split()
    first = gb.set_common_flags(STAGE3.replace("-O2 -pipe", "-O2 -pipe -march=native"), flags)
    assert 'COMMON_FLAGS="-O2 -pipe -march=core2 -msse4.1 -mxsave"\n' in first
    second = gb.set_common_flags(first, NEW)
    assert 'COMMON_FLAGS="-O2 -pipe -march=znver3 -mavx512f -mshstk"\n' in second


def test_set_cpu_flags_x86_make_conf(gb):
    text = 'USE="X"\nCPU_FLAGS_X86="mmx sse sse2"\n'
    assert gb.set_cpu_flags(text, ["aes", "avx"], "make.conf") \
        == 'USE="X"\nCPU_FLAGS_X86="aes avx"\n'
    assert gb.set_cpu_flags("CPU_FLAGS_X86='mmx'\n", "aes sse", "make.conf") \
        == "CPU_FLAGS_X86='aes sse'\n"
    assert gb.set_cpu_flags('USE="X"', ["aes"], "make.conf") \
        == 'USE="X"\nCPU_FLAGS_X86="aes"\n'


def test_set_cpu_flags_x86_package_use(gb):
    text = ("# cpuid2cpuflags\n"
            "*/* CPU_FLAGS_X86: mmx sse sse2  # from the old box\n"
            "media-video/ffmpeg CPU_FLAGS_X86: -avx2\n"
            "*/* -* CPU_FLAGS_ARM: neon\n")
    result = gb.set_cpu_flags(text, ["aes", "avx", "sse4_2"], "package.use")
    assert result == ("# cpuid2cpuflags\n"
                      "*/* CPU_FLAGS_X86: aes avx sse4_2 # from the old box\n"
                      "media-video/ffmpeg CPU_FLAGS_X86: -avx2\n"
                      "*/* -* CPU_FLAGS_ARM: neon\n")
    assert gb.set_cpu_flags(result, ["aes", "avx", "sse4_2"], "package.use") == result
    assert gb.set_cpu_flags("*/* CPU_FLAGS_X86: -* mmx VIDEO_CARDS: intel\n", ["sse"],
                                "package.use") == "*/* CPU_FLAGS_X86: -* sse VIDEO_CARDS: intel\n"
    assert gb.set_cpu_flags("", ["aes"], "package.use") == "*/* CPU_FLAGS_X86: aes\n"
    with pytest.raises(ValueError):
        gb.set_cpu_flags("", ["aes"], "make.defaults")


# ---- the probe script ------------------------------------------------------------------------

def run_probe(gb, path_dirs, shell="sh"):
    """Run CPU_PROBE_SCRIPT as Remote.script does (`sh -c SCRIPT gentoo-binhost`) with only
    `path_dirs` on PATH; returns its sections."""
    env = {"PATH": os.pathsep.join(str(d) for d in path_dirs), "HOME": "/nonexistent"}
    shell = shutil.which(shell) or shell  # looked up on our PATH, not the script's
    proc = subprocess.run([shell, "-c", gb.CPU_PROBE_SCRIPT, "gentoo-binhost"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return gb.parse_sections(proc.stdout)


def fake_tools(directory, machine, cc1_by_option):
    """A fake `uname` and `gcc` in `directory`: gcc -v prints the cc1 line for the native option
    given, --help=target echoes its arguments."""
    directory.mkdir(exist_ok=True)
    cases = "".join('            *" %s "*) echo "%s" >&2 ;;\n' % (option, line)
                    for option, line in cc1_by_option.items())
    scripts = {
        "uname": "#!/bin/sh\necho %s\n" % machine,
        "gcc": ('#!/bin/sh\ncase " $* " in\n'
                '    *" -v "*)\n        case " $* " in\n' + cases + '        esac ;;\n'
                '    *" --help=target "*) echo "The following options are target specific:";'
                ' echo "  -menv=   LC_ALL=$LC_ALL COLUMNS=$COLUMNS"; echo "  -margs=   $*" ;;\n'
                '    *) echo 13.2.1 ;;\nesac\n'),
    }
    for name, text in scripts.items():
        path = directory / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_probe_script_without_gcc_or_cpuid2cpuflags(gb, tmp_path):
    need(shutil.which("sh") and shutil.which("awk"), "sh and awk needed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("awk", "uname"):
        os.symlink(shutil.which(tool), str(bin_dir / tool))
    sections = run_probe(gb, [bin_dir])
    assert set(sections) == {"arch", "gcc", "cc1", "baseline", "native", "cpuid2cpuflags",
                             "cpuinfo"}
    assert sections["cc1"] == "" and sections["cpuid2cpuflags"] == ""
    with pytest.raises(ValueError):
        gb.resolve_native_flags(sections["cc1"])


def test_probe_script_reads_cpuid2cpuflags(gb, tmp_path):
    need(shutil.which("sh") and shutil.which("awk"), "sh and awk needed")
    fake_tools(tmp_path / "bin", "x86_64", {"-march=native": cc1_line("-march=haswell", "-maes")})
    tool = tmp_path / "bin" / "cpuid2cpuflags"
    tool.write_text("#!/bin/sh\necho 'CPU_FLAGS_X86: aes avx avx2'\n")
    tool.chmod(0o755)
    sections = run_probe(gb, [tmp_path / "bin", "/usr/bin", "/bin"])
    assert gb.parse_cpuid2cpuflags(sections["cpuid2cpuflags"]) == ["aes", "avx", "avx2"]
    assert sections["gcc"] == "13.2.1" and sections["arch"] == "x86_64"
    # gcc translates [enabled] and wraps long values at the terminal width unless told not to.
    options = gb.enabled_target_options(sections["native"])
    assert options["-menv="] == "LC_ALL=C COLUMNS=10000"


@pytest.mark.parametrize("machine, cc1_by_option, native, baseline", [
    # x86: the baseline gets -mtune only when it differs from the arch.
    ("x86_64", {"-march=native": cc1_line("-march=haswell", "-maes", "-mtune=haswell")},
     "-march=native", "-march=haswell"),
    ("i686", {"-march=native": cc1_line("-march=pentium-m", "-mno-sahf", "-mtune=generic")},
     "-march=native", "-march=pentium-m -mtune=generic"),
    # aarch64 uses -mcpu=native ...
    ("aarch64", {"-mcpu=native": cc1_line("-mlittle-endian", "-mabi=lp64",
                                          "-mcpu=neoverse-n1+crc+crypto")},
     "-mcpu=native", "-mcpu=neoverse-n1+crc+crypto"),
    # ... and -march=native when gcc cannot name the core (resolve-march-native #136).
    ("aarch64", {"-mcpu=native": cc1_line("-mlittle-endian", "-mabi=lp64"),
                 "-march=native": cc1_line("-mlittle-endian", "-mabi=lp64",
                                           "-march=armv8.4-a+crc+sb+ssbs")},
     "-march=native", "-march=armv8.4-a+crc+sb+ssbs"),
])
def test_probe_script_native_option_and_baseline(gb, tmp_path, machine, cc1_by_option, native,
                                                 baseline):
    need(shutil.which("sh") and shutil.which("awk"), "sh and awk needed")
    fake_tools(tmp_path / "bin", machine, cc1_by_option)
    sections = run_probe(gb, [tmp_path / "bin", "/usr/bin", "/bin"])
    assert sections["arch"] == machine
    assert sections["native"].endswith("-Q --help=target %s" % native)
    assert sections["baseline"].endswith("-Q --help=target %s" % baseline)
    assert gb.resolve_native_flags(sections["cc1"])[0] == baseline.split()[0]


@pytest.mark.parametrize("shell", ["sh", "dash", "bash", "busybox"])
def test_probe_script_is_posix_sh(gb, tmp_path, shell):
    if not shutil.which(shell):  # an extra shell to try, not a prerequisite of the suite
        pytest.skip(shell + " not installed")
    fake_tools(tmp_path / "bin", "x86_64", {"-march=native": cc1_line("-march=haswell")})
    if shell == "busybox":
        wrapper = tmp_path / "busybox-sh"
        wrapper.write_text('#!/bin/sh\nexec busybox sh "$@"\n')
        wrapper.chmod(0o755)
        shell = str(wrapper)
    elif shell == "bash":
        wrapper = tmp_path / "bash-posix"
        wrapper.write_text('#!/bin/sh\nexec bash --posix "$@"\n')
        wrapper.chmod(0o755)
        shell = str(wrapper)
    sections = run_probe(gb, [tmp_path / "bin", "/usr/bin", "/bin"], shell=shell)
    assert gb.resolve_native_flags(sections["cc1"]) == ["-march=haswell"]


# ---- the criterion, on this machine's gcc ----------------------------------------------------

def gcc_macros(flags):
    proc = subprocess.run(["gcc", "-dM", "-E", "-x", "c", "/dev/null"] + list(flags),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, env=dict(os.environ, LC_ALL="C"))
    assert proc.returncode == 0 and not proc.stderr, (flags, proc.stderr)
    return set(proc.stdout.splitlines())


def gcc_help(*flags):
    proc = subprocess.run(["gcc", "-Q", "--help=target"] + list(flags), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True,
                          env=dict(os.environ, LC_ALL="C", COLUMNS="10000"))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_this_machine_macro_criterion(gb):
    """The acceptance criterion: run the probe here, resolve, and compare every macro."""
    need(shutil.which("gcc"), "gcc not installed")
    sections = run_probe(gb, os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep))
    flags = gb.resolve_native_flags(sections["cc1"], sections["baseline"], sections["native"])
    native = "-mcpu=native" if " -mcpu=" in sections["cc1"] else "-march=native"
    if " -march=" in sections["cc1"] or " -mcpu=" in sections["cc1"]:
        assert flags[0].startswith(("-march=", "-mcpu=")), sections["cc1"]
    assert gcc_macros(flags) == gcc_macros([native])
    assert gcc_macros(gb.resolve_native_flags(sections["cc1"])) == gcc_macros([native])


@pytest.mark.parametrize("name", X86_PROBES)
def test_recorded_cpu_macro_criterion_on_this_gcc(gb, name):
    """Every recorded x86 CPU, resolved with help texts from this machine's gcc, must define
    the same macros as its whole cc1 line. A newer gcc's -mno-FOO for a FOO this gcc does not
    know is left out of both (FOO cannot be generated anyway); an unknown -mFOO skips."""
    need(shutil.which("gcc"), "gcc not installed")
    if platform.machine() not in ("x86_64", "i686", "i386", "amd64", "AMD64"):
        pytest.skip("needs an x86 gcc")
    sections = probe(gb, name)
    abi = ["-m32"] if sections["arch"] == "i686" else []
    known = gb.enabled_target_options(gcc_help())
    flags = [flag for flag in gb.parse_cc1_flags(sections["cc1"]) if not flag.startswith("--")]
    unknown = [flag for flag in flags if flag.startswith("-m") and "=" not in flag
               and "-m" + flag[len("-mno-" if flag.startswith("-mno-") else "-m"):] not in known]
    if [flag for flag in unknown if not flag.startswith("-mno-")]:
        pytest.skip("this gcc does not know %s" % " ".join(unknown))
    flags = [flag for flag in flags if flag not in unknown]
    arch, tune = flags[0], [f for f in flags if f.startswith("-mtune=")]
    if tune and tune[0].split("=")[1] == arch.split("=")[1]:
        tune = []
    line = cc1_line(*flags)
    resolved = gb.resolve_native_flags(line, gcc_help(*(abi + [arch] + tune)),
                                       gcc_help(*(abi + flags)))
    everything = gcc_macros(abi + flags)
    assert gcc_macros(abi + resolved) == everything, resolved
    assert gcc_macros(abi + gb.resolve_native_flags(line)) == everything
    assert len(resolved) < len(flags) / 3  # the base arch really implies most of it
    assert gcc_macros(abi + [arch]) != everything  # the explicit flags matter for all of these
    if name == "intel-sandybridge-celeron-no-avx.probe":
        assert resolved[:2] == ["-march=sandybridge", "-mno-avx"]
    if name == "core2-harpertown-sse41-only.probe":
        assert resolved == ["-march=core2", "-msse4.1", "-mxsave"]


# ---- CPU_FLAGS_ARM ---------------------------------------------------------------------------

ARM_BOARDS = json.loads((TESTS_DIR / "data" / "cpu_flags_arm" / "boards.json").read_text())


@pytest.mark.parametrize("board", sorted(ARM_BOARDS))
def test_cpu_flags_arm_from_cpuinfo_as_cpuid2cpuflags_names_them(gb, board):
    """What the kernel prints in /proc/cpuinfo gives the flags cpuid2cpuflags names from the same
    hwcap bits (tests/data/cpu_flags_arm/README.md)."""
    recorded = ARM_BOARDS[board]
    line = "Features\t: " + recorded["features"]
    assert gb.cpu_flags_arm_from_cpuinfo(line, recorded["machine"]) == sorted(recorded["cpuid2cpuflags"].split())


def test_a_32_bit_userland_under_a_64_bit_kernel_is_an_armv8_in_its_32_bit_state(gb):
    """uname -m says aarch64, /proc/cpuinfo (read by a 32-bit awk) names the 32-bit units."""
    recorded = ARM_BOARDS["armv8l-neoverse-n1"]
    assert gb.cpu_flags_arm_from_cpuinfo(recorded["features"], "aarch64") == \
        sorted(recorded["cpuid2cpuflags"].split())
    assert gb.cpu_flags_arm_from_cpuinfo("", "aarch64") == []
    assert gb.cpu_flags_arm_from_cpuinfo("fp asimd", "riscv64") == []


def test_target_cpu_names_its_cpu_flags_variable(gb):
    assert gb.TargetCpu("x86_64", "13", [], [], "").cpu_flags_variable == "CPU_FLAGS_X86"
    assert gb.TargetCpu("aarch64", "13", [], [], "").cpu_flags_variable == "CPU_FLAGS_ARM"
    assert gb.TargetCpu("armv7l", "13", [], [], "").cpu_flags_variable == "CPU_FLAGS_ARM"
    assert gb.TargetCpu("riscv64", "13", [], [], "").cpu_flags_variable is None


def test_set_cpu_flags_arm(gb):
    assert gb.set_cpu_flags('COMMON_FLAGS="-O2"\n', ["crc32", "neon"], "make.conf", "CPU_FLAGS_ARM") \
        == 'COMMON_FLAGS="-O2"\nCPU_FLAGS_ARM="crc32 neon"\n'
    text = "*/* CPU_FLAGS_X86: aes\n*/* CPU_FLAGS_ARM: -* v8\n"
    assert gb.set_cpu_flags(text, ["crc32", "v8"], "package.use", "CPU_FLAGS_ARM") \
        == "*/* CPU_FLAGS_X86: aes\n*/* CPU_FLAGS_ARM: -* crc32 v8\n"


def test_probe_script_on_arm64_reads_cpu_flags_arm_from_cpuid2cpuflags(gb, tmp_path):
    need(shutil.which("sh") and shutil.which("awk"), "sh and awk needed")
    fake_tools(tmp_path / "bin", "aarch64", {"-mcpu=native": cc1_line("-mlittle-endian", "-mabi=lp64",
                                                                      "-mcpu=cortex-a72+crc")})
    tool = tmp_path / "bin" / "cpuid2cpuflags"
    tool.write_text("#!/bin/sh\necho 'CPU_FLAGS_ARM: edsp neon thumb vfp crc32 v8'\n")
    tool.chmod(0o755)
    sections = run_probe(gb, [tmp_path / "bin", "/usr/bin", "/bin"])
    assert gb.parse_cpuid2cpuflags(sections["cpuid2cpuflags"], "CPU_FLAGS_ARM") == \
        ["crc32", "edsp", "neon", "thumb", "v8", "vfp"]
    assert gb.parse_cpuid2cpuflags(sections["cpuid2cpuflags"]) == []
