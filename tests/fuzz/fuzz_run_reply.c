/* libFuzzer target: the /run reply parser on arbitrary bytes. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "runpod.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct runpod_run_reply r;

	if (runpod_parse_run_reply((const char *)data, size, &r) == 0) {
		/* A success must leave two terminated, bounded, non-empty-id strings. */
		if (strlen(r.id) == 0 || strlen(r.id) > RUNPOD_JOB_ID_MAX ||
		    strlen(r.status) > RUNPOD_STATUS_MAX)
			__builtin_trap();
		/* ...and no control byte, whatever the escapes said (issue 10). */
		for (const unsigned char *c = (const unsigned char *)r.id; *c; c++)
			if (*c < 0x20 || *c == 0x7f)
				__builtin_trap();
	}
	return 0;
}
