#include <stdio.h>

int main(void)
{
#ifdef LOUD
	puts("HELLO FROM GREET");
#else
	puts("hello from greet");
#endif
	return 0;
}
