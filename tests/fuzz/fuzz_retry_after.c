/* libFuzzer target: the Retry-After parser on arbitrary header values. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "runpod.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *v = malloc(size + 1);
	long long ms = -1;

	if (v == NULL)
		return 0;
	memcpy(v, data, size);
	v[size] = '\0';
	if (runpod_parse_retry_after(v, 1795939200, &ms) == 0 && ms < 0)
		__builtin_trap(); /* a delay is never negative */
	free(v);
	return 0;
}
