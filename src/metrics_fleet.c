/* metrics_fleet — the fleet budget's series of include/metrics.h
 * (pgmqd_fleet_*, a kind label: "run" for /run, "status" for the
 * tracker's /status and /health): grants, denials, slots granted and left
 * unused, and the fallback gauge. Knows nothing of the budget's SQL. */
#include "metrics.h"
#include "metrics_int.h"

#include <stdatomic.h>
#include <stdbool.h>

static const char *const fleet_kinds[2] = { "run", "status" };
static struct {
	counter_t grants[2], denied[2], granted[2], unused[2];
	atomic_int fallback[2];
} mf; /* zero-initialised (static storage); never reset */

void metrics_inc_fleet_grant(int kind, int slots)
{
	if (kind < 0 || kind > 1)
		return;
	metrics_add_counter(slots > 0 ? &mf.grants[kind] : &mf.denied[kind], 1);
	if (slots > 0)
		metrics_add_counter(&mf.granted[kind], (unsigned long long)slots);
}

void metrics_add_fleet_unused(int kind, unsigned long long slots)
{
	if (kind >= 0 && kind <= 1)
		metrics_add_counter(&mf.unused[kind], slots);
}

void metrics_set_fleet_fallback(int kind, bool on)
{
	if (kind >= 0 && kind <= 1)
		atomic_store_explicit(&mf.fallback[kind], on ? 1 : 0, memory_order_relaxed);
}

void metrics_render_fleet(struct buf *b)
{
	metrics_family(b, "fleet_grants_total", "counter", "Grants of the fleet budget, by kind.");
	metrics_labelled(b, "fleet_grants_total", "kind", fleet_kinds, mf.grants, 2);
	metrics_family(b, "fleet_grants_denied_total", "counter",
		       "Grant statements that found the fleet's cap used up.");
	metrics_labelled(b, "fleet_grants_denied_total", "kind", fleet_kinds, mf.denied, 2);
	metrics_family(b, "fleet_slots_granted_total", "counter",
		       "Requests granted by the fleet budget.");
	metrics_labelled(b, "fleet_slots_granted_total", "kind", fleet_kinds, mf.granted, 2);
	metrics_family(b, "fleet_slots_unused_total", "counter",
		       "Granted requests dropped unused when their grant expired.");
	metrics_labelled(b, "fleet_slots_unused_total", "kind", fleet_kinds, mf.unused, 2);
	metrics_family(b, "fleet_fallback", "gauge",
		       "1 while no grant can be had and the local share of the cap applies.");
	for (size_t i = 0; i < 2; i++)
		bprintf(b, PREFIX "fleet_fallback{kind=\"%s\"} %d\n", fleet_kinds[i],
			atomic_load_explicit(&mf.fallback[i], memory_order_relaxed));
}
