/* backoff — see include/backoff.h. */
#include "backoff.h"

#include <math.h>
#include <stdlib.h>

double backoff_ms(int failures, double base_ms, double cap_ms, double min_ms, double rnd)
{
	double ceiling = base_ms * pow(2.0, failures < 1 ? 0 : (failures > 31 ? 30 : failures - 1));

	if (ceiling > cap_ms)
		ceiling = cap_ms;
	ceiling *= rnd;
	return ceiling < min_ms ? min_ms : ceiling;
}

double backoff_jitter(void)
{
	return (double)random() / ((double)RAND_MAX + 1.0);
}

double backoff_retry_after_ms(int http_status, long long retry_after_ms, long long max_ms)
{
	if (max_ms <= 0 || (http_status != 429 && http_status != 503) || retry_after_ms < 0)
		return -1;
	return retry_after_ms > max_ms ? (double)max_ms : (double)retry_after_ms;
}
