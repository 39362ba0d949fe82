/* libFuzzer target: the /status reply parser on arbitrary bytes. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "runpod.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct runpod_status_reply r;

	if (runpod_parse_status_reply((const char *)data, size, &r) == 0) {
		/* Bounded, terminated strings; a status is never empty. */
		if (strlen(r.status) == 0 || strlen(r.status) > RUNPOD_STATUS_MAX ||
		    strlen(r.id) > RUNPOD_JOB_ID_MAX || strlen(r.error) > RUNPOD_ERROR_MAX ||
		    r.delay_ms < -1 || r.execution_ms < -1)
			__builtin_trap();
		(void)runpod_status_is_terminal(r.status);
	}
	return 0;
}
