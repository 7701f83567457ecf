# Test package for gentoo-binhost.py: has a runtime dependency on app-misc/hello.
EAPI=8

DESCRIPTION="An application that needs hello (binhost test package)"
HOMEPAGE="https://example.invalid/hello-app"
S="${WORKDIR}"

LICENSE="MIT"
SLOT="0"
KEYWORDS="amd64"

RDEPEND=">=app-misc/hello-1.0"

src_unpack() {
	cp "${FILESDIR}/hello-app.c" "${S}/" || die
}

src_compile() {
	${CC:-gcc} ${CFLAGS} ${CPPFLAGS} -c -o hello-app.o hello-app.c || die
	${CC:-gcc} ${CFLAGS} ${LDFLAGS} -o hello-app hello-app.o || die
}

src_install() {
	dobin hello-app
}
