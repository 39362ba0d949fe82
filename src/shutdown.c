/* shutdown — how a dispatcher ends: a graceful stop (no new reads,
 * in-flight requests and statements may finish), the shutdown deadline
 * that gives up on them, the abort of a second signal, and the decision
 * that a --once cycle or a stop has finished. See include/dispatcher.h. */
#include "dispatcher_int.h"
#include "log.h"

bool dispatcher_should_finish(const struct finish_inputs *f)
{
	if (f->finished)
		return false;
	/* Only a --once cycle or a shutdown ever finishes. */
	if (!f->once && !f->stopping)
		return false;
	/* --once: not before its one read has come back (or it stops). */
	if (f->once && !f->read_done && !f->stopping)
		return false;
	/* Wait for every outstanding request and statement, unless the
	 * shutdown deadline said to stop waiting for the database. */
	return f->deadline_passed || !f->busy;
}

void dispatcher_maybe_finish(struct dispatcher *d)
{
	struct finish_inputs f = {
		.finished = d->finished,
		.once = d->once,
		.read_done = d->read_done,
		.stopping = d->stopping,
		.deadline_passed = d->deadline_passed,
		.busy = d->reading || d->in_flight > 0 || d->db_pending > 0 || d->probing ||
			d->metrics_pending || ledger_busy(d->ledger),
	};

	if (!dispatcher_should_finish(&f))
		return;
	d->finished = true;
	dispatcher_stop_timers(d, NULL);
	d->done(d->done_arg, d->fatal                  ? DISPATCH_DONE_FATAL
			     : d->stopping && !d->once ? DISPATCH_DONE_STOPPED
						       : d->once_result);
}

void dispatcher_on_deadline(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct dispatcher *d = w->data;

	(void)loop;
	(void)revents;
	if (d->in_flight > 0) {
		struct log_line *l = log_begin_route(d->cfg->route_name, LOG_WARN,
						     "shutdown_deadline");
		log_int(l, "in_flight", d->in_flight);
		log_str(l, "outcome", "aborted requests are counted as outcome unknown");
		log_end(l);
	}
	/* Aborted requests end as outcome unknown (their callbacks run now). */
	dispatcher_cancel_requests(d);
	if (!d->finished) {
		int statements = d->db_pending + (d->reading ? 1 : 0);
		/* Their callbacks still run when the connection closes, and
		 * name every msg id that stays invisible. Whatever else waits
		 * for the database (ledger notes, a metrics query) is given up
		 * too: the ledger's recovery marks its rows unknown. */
		if (statements > 0 || ledger_busy(d->ledger) || d->metrics_pending) {
			struct log_line *l = log_begin_route(d->cfg->route_name, LOG_WARN,
							     "shutdown_deadline");
			log_int(l, "statements", statements);
			log_str(l, "ledger_unrecorded", ledger_busy(d->ledger) ? "yes" : "no");
			log_str(l, "msg", "database statements unfinished");
			log_end(l);
		}
		d->deadline_passed = true;
	}
	dispatcher_maybe_finish(d);
}

void dispatcher_stop(struct dispatcher *d)
{
	if (d->stopping || d->finished)
		return;
	d->stopping = true;
	tracker_stop(d->tracker);
	ledger_stop(d->ledger);
	dispatcher_stop_timers(d, &d->deadline);
	post_release_waiting(d); /* read but never sent: visible again at once */
	dispatcher_state_changed(d);
	{
		struct log_line *l = log_begin_route(d->cfg->route_name, LOG_INFO, "stopping");
		log_int(l, "in_flight", d->in_flight);
		log_int(l, "timeout_ms", d->cfg->shutdown_timeout_ms);
		log_end(l);
	}
	ev_timer_set(&d->deadline, d->cfg->shutdown_timeout_ms / 1000.0, 0.0);
	ev_timer_start(d->loop, &d->deadline);
	dispatcher_maybe_finish(d);
}

void dispatcher_abort(struct dispatcher *d)
{
	dispatcher_cancel_requests(d);
}
