/* ratelimit — see include/ratelimit.h. */
#include "ratelimit.h"

#include <stdlib.h>
#include <string.h>

int ratelimit_init(struct ratelimit *rl, int cap, double window_s)
{
	memset(rl, 0, sizeof(*rl));
	rl->window_s = window_s;
	rl->sent_at = malloc((size_t)(cap < 1 ? 1 : cap) * sizeof(*rl->sent_at));
	if (rl->sent_at == NULL)
		return -1;
	rl->cap = cap < 1 ? 1 : cap;
	return 0;
}

bool ratelimit_slot(const struct ratelimit *rl, double now, double *wait_s)
{
	return ratelimit_slot_keep(rl, now, 0, wait_s);
}

bool ratelimit_slot_keep(const struct ratelimit *rl, double now, int keep, double *wait_s)
{
	double wait;
	int aged;

	if (keep > rl->cap - 1)
		keep = rl->cap - 1;
	if (keep < 0)
		keep = 0;
	if (rl->count + keep < rl->cap)
		return true;
	/* The oldest `aged` sends (aged <= keep < count) must have left the
	 * window. One expression decides both, so that a refusal never comes
	 * with a wait that rounds to 0 (a timer armed for it would spin). */
	aged = rl->count + keep - rl->cap;
	wait = rl->sent_at[(rl->head + aged) % rl->cap] + rl->window_s - now;
	if (wait <= 0.0)
		return true;
	*wait_s = wait;
	return false;
}

int ratelimit_available(const struct ratelimit *rl, double now, double horizon_s)
{
	int busy = 0;

	/* A send at t holds its slot until t + window_s. */
	for (int i = 0; i < rl->count; i++)
		if (rl->sent_at[(rl->head + i) % rl->cap] + rl->window_s > now + horizon_s)
			busy++;
	return rl->cap - busy;
}

void ratelimit_record(struct ratelimit *rl, double now)
{
	if (rl->count < rl->cap) {
		rl->sent_at[(rl->head + rl->count) % rl->cap] = now;
		rl->count++;
	} else {
		rl->sent_at[rl->head] = now;
		rl->head = (rl->head + 1) % rl->cap;
	}
}

int ratelimit_resized(const struct ratelimit *rl, int new_cap, struct ratelimit *out)
{
	int keep;

	if (ratelimit_init(out, new_cap, rl->window_s) != 0)
		return -1;
	keep = rl->count < out->cap ? rl->count : out->cap;
	for (int i = 0; i < keep; i++)
		out->sent_at[i] = rl->sent_at[(rl->head + rl->count - keep + i) % rl->cap];
	out->count = keep;
	return 0;
}

void ratelimit_free(struct ratelimit *rl)
{
	if (rl == NULL)
		return;
	free(rl->sent_at);
	rl->sent_at = NULL;
	rl->cap = rl->head = rl->count = 0;
}
