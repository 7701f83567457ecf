# Test package for gentoo-binhost.py: the build depends on USE=loud, so a
# binary package built with the wrong USE is visibly different.
EAPI=8

DESCRIPTION="Greets quietly or loudly (binhost test package)"
HOMEPAGE="https://example.invalid/greet"
S="${WORKDIR}"

LICENSE="MIT"
SLOT="0"
KEYWORDS="amd64"
IUSE="loud"

src_unpack() {
	cp "${FILESDIR}/greet.c" "${S}/" || die
}

src_compile() {
	${CC:-gcc} ${CFLAGS} ${CPPFLAGS} $(usex loud -DLOUD '') -c -o greet.o greet.c || die
	${CC:-gcc} ${CFLAGS} ${LDFLAGS} -o greet greet.o || die
	usex loud loud quiet > use.txt || die
}

src_install() {
	dobin greet
	insinto /usr/share/greet
	doins use.txt
}
