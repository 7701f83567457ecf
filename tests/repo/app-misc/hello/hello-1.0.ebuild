# Test package for gentoo-binhost.py: a real C program, built with ${CC} ${CFLAGS}.
EAPI=8

DESCRIPTION="Prints a greeting (binhost test package)"
HOMEPAGE="https://example.invalid/hello"
S="${WORKDIR}"

LICENSE="MIT"
SLOT="0"
KEYWORDS="amd64"

src_unpack() {
	cp "${FILESDIR}/hello.c" "${S}/" || die
}

src_compile() {
	${CC:-gcc} ${CFLAGS} ${CPPFLAGS} -c -o hello.o hello.c || die
	${CC:-gcc} ${CFLAGS} ${LDFLAGS} -o hello hello.o || die
}

src_install() {
	dobin hello
	insinto /usr/share/hello
	newins - version <<<"${PV}"
}
