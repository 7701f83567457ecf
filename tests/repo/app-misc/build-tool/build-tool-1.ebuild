# Test package for gentoo-binhost.py: a build tool, wanted only as a BDEPEND.
EAPI=8

DESCRIPTION="A build-time tool (binhost test package)"
HOMEPAGE="https://example.invalid/build-tool"
S="${WORKDIR}"

LICENSE="MIT"
SLOT="0"
KEYWORDS="amd64"

src_install() {
	insinto /usr/share/build-tool
	newins - version <<<"${PV}"
}
