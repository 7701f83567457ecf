# Test package for gentoo-binhost.py: needs app-misc/build-tool to build (BDEPEND), so the
# root method merges that into the build machine's / as well.
EAPI=8

DESCRIPTION="Built with a build-time tool (binhost test package)"
HOMEPAGE="https://example.invalid/uses-build-tool"
S="${WORKDIR}"

LICENSE="MIT"
SLOT="0"
KEYWORDS="amd64"
BDEPEND="app-misc/build-tool"

src_install() {
	insinto /usr/share/uses-build-tool
	newins - built-with <<<"build-tool"
}
