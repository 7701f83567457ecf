#include <stdio.h>

int main(void)
{
	puts("hello-app from binhost");
	return 0;
}
