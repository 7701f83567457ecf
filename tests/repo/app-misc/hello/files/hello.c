#include <stdio.h>

int main(void)
{
	puts("hello from binhost");
	return 0;
}
