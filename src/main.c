/* pgmq-dispatcher — moves PGMQ messages to RunPod Serverless /run. */
#include "main.h"
#include "config.h"
#include "dispatcher.h"
#include "route.h"
#include "commands.h"
#include "admin.h"
#include "dispatches.h"
#include "log.h"
#include "metrics.h"
#include "sdnotify.h"

#include <curl/curl.h>
#include <errno.h>
#include <ev.h>
#include <fcntl.h>
#include <getopt.h>
#include <libpq-fe.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>
#include <time.h>
#include <unistd.h>

struct app {
	struct ev_loop *loop;
	struct config *cfg;     /* the snapshot in use (owned by routes once they exist) */
	struct config_input in; /* kept for reloads */
	struct routes *routes;
	int exit_code;
	int signals; /* TERM/INT received */
	struct admin *admin;
	struct dispatches *ds; /* GET /dispatches, on a connection of its own */
	ev_signal sig_int, sig_term, sig_hup;
};

static void usage(FILE *fp)
{
	fprintf(fp,
		"Usage: pgmq-dispatcher [options] [command]\n"
		"Reads batches from a PGMQ queue and submits them to a RunPod Serverless endpoint.\n\n"
		"  -c, --config FILE     configuration file (default " CONFIG_DEFAULT_PATH ")\n"
		"  -v, --verbose         more output: -v debug, -vv trace (SQL and HTTP metadata)\n"
		"  -q, --quiet           warnings and errors only\n"
		"      --log-format FMT  logfmt (default) or json\n"
		"      --once            one read-and-dispatch cycle, then exit:\n"
		"                        0 dispatched or queue empty, 69 failed, 75 outcome unknown\n"
		"      --dry-run         print the /run bodies the next read would send; changes nothing\n"
		"      --health-check    query the local admin /healthz; exit 0 healthy, 1 not\n"
		"  -t, --check-config    validate the configuration (no network), exit 0 or 78\n"
		"  -T, --dump-config     print the effective configuration, secrets masked\n"
		"  -V, --version         print the version\n"
		"  -h, --help            this help\n\n"
		"Runtime control of the running daemon (admin endpoint):\n"
		"  ctl routes | ctl pause|resume|drain ROUTE\n\n"
		"Commands on the dispatch ledger (after the options; add --json for JSON):\n"
		"  migrate               create or upgrade the ledger schema; exit 0 when up to date\n"
		"  status MSG_ID...      every dispatch of those messages, and where each is now\n"
		"  jobs [--state S] [--since 15m|TIME] [--limit N]   dispatches, newest first\n"
		"  redrive [--dry-run] MSG_ID... | --archived-from TIME [--archived-to TIME]\n"
		"                        archived messages back into the queue\n\n"
		"Every key can also be set as PGMQD_<SECTION>_<KEY>; see pgmq-dispatcher(8).\n");
}

static void on_config_error(void *arg, const char *key, const char *source, const char *problem)
{
	struct log_line *l = log_begin(LOG_ERROR, "config_invalid");

	(void)arg;
	log_str(l, "key", key);
	log_str(l, "source", source);
	log_str(l, "problem", problem);
	log_end(l);
}

/* Masks the database password and the API key in every later line. */
static void register_secrets(const struct config *cfg)
{
	PQconninfoOption *opts;
	const char *pgpassword = getenv("PGPASSWORD");

	const char *conninfos[2] = { cfg->conninfo, cfg->listen_conninfo };

	/* Secrets accumulate across reloads, so a rotated-out key stays masked;
	 * when the table is full it starts again from the current ones. */
	if (log_secret_add(cfg->api_key) != 0) {
		log_secret_clear();
		log_secret_add(cfg->api_key);
	}
	for (int i = 0; i < cfg->nroutes; i++)
		log_secret_add(config_route(cfg, i)->api_key);
	if (cfg->admin_token[0])
		log_secret_add(cfg->admin_token);
	if (pgpassword)
		log_secret_add(pgpassword);
	for (int i = 0; i < 2; i++) {
		opts = conninfos[i][0] ? PQconninfoParse(conninfos[i], NULL) : NULL;
		for (PQconninfoOption *o = opts; o && o->keyword; o++)
			if (o->val && o->dispchar && strchr(o->dispchar, '*'))
				log_secret_add(o->val);
		PQconninfoFree(opts);
	}
}

static void on_done(void *arg, enum dispatcher_result result)
{
	struct app *app = arg;

	switch (result) {
	case DISPATCH_DONE_DISPATCHED:
	case DISPATCH_DONE_STOPPED:
		app->exit_code = 0;
		break;
	case DISPATCH_DONE_EMPTY:
		/* A cron tick that finds nothing to do has succeeded. */
		log_msg(LOG_INFO, "once_queue_empty",
			"the queue had no visible messages: nothing "
			"to dispatch");
		app->exit_code = EXIT_ONCE_EMPTY;
		break;
	case DISPATCH_DONE_FAILED:
		app->exit_code = EX_UNAVAILABLE;
		break;
	case DISPATCH_DONE_UNKNOWN:
		app->exit_code = EX_TEMPFAIL;
		break;
	case DISPATCH_DONE_FATAL:
		app->exit_code = EX_CONFIG;
		break;
	}
	ev_break(app->loop, EVBREAK_ALL);
}

static const char *signal_name(int signum)
{
	switch (signum) {
	case SIGINT:
		return "SIGINT";
	case SIGTERM:
		return "SIGTERM";
	case SIGHUP:
		return "SIGHUP";
	}
	return "signal";
}

static void on_stop_signal(struct ev_loop *loop, ev_signal *w, int revents)
{
	struct app *app = w->data;

	(void)revents;
	if (++app->signals > 1) {
		log_msg(LOG_WARN, "exit_now", "second %s: exiting without waiting",
			signal_name(w->signum));
		routes_abort(app->routes); /* may finish the drain and call on_done */
		app->exit_code = 1;
		ev_break(loop, EVBREAK_ALL);
		return;
	}
	{
		struct log_line *l = log_begin(LOG_INFO, "signal");
		log_str(l, "signal", signal_name(w->signum));
		log_str(l, "action", "graceful stop");
		log_end(l);
	}
	sdnotify_stopping();
	sdnotify_status("stopping: in-flight requests finish, then exit");
	routes_stop(app->routes);
}

/* systemd STATUS= on every state change and after each metrics refresh. */
static void on_state(void *arg)
{
	struct app *app = arg;
	char status[512];

	routes_status(app->routes, status, sizeof(status));
	sdnotify_status("%s", status);
}

static bool admin_ready(void *arg, char *why, size_t len)
{
	struct app *app = arg;

	return routes_ready(app->routes, why, len);
}

static char *admin_routes(void *arg)
{
	struct app *app = arg;

	return routes_describe(app->routes);
}

static int admin_control(void *arg, const char *route, const char *action)
{
	return routes_control(((struct app *)arg)->routes, route, action);
}

static char *admin_metrics(void *arg, size_t *len)
{
	(void)arg;
	return metrics_render(len);
}

static void on_dispatches_done(void *ctx, unsigned status, const char *type, char *body, size_t len)
{
	admin_answer(ctx, status, type, body, len);
}

static void admin_dispatches(void *arg, struct admin_call *call, const char *const *keys,
			     const char *const *vals, int n)
{
	struct app *app = arg;

	dispatches_serve(app->ds, app->cfg, keys, vals, n, on_dispatches_done, call);
}

static void on_ignored_key(void *arg, const char *key)
{
	struct log_line *l = log_begin(LOG_WARN, "reload_key_ignored");

	(void)arg;
	log_str(l, "key", key);
	log_str(l, "msg", "cannot change while running; restart to apply");
	log_end(l);
}

/* SIGHUP: build a new snapshot from the file, the environment and the
 * *_FILE secrets, validate it, and swap it in whole; on any error the old
 * one stays. */
static void on_hup(struct ev_loop *loop, ev_signal *w, int revents)
{
	struct app *app = w->data;
	struct config *next = calloc(1, sizeof(*next));
	int errors;

	(void)loop;
	(void)revents;
	log_msg(LOG_INFO, "reloading", "SIGHUP: reloading the configuration");
	sdnotify_reloading();
	if (next == NULL) {
		log_msg(LOG_ERROR, "reload_failed",
			"out of memory; the configuration in use is unchanged");
		sdnotify_ready();
		return;
	}
	errors = config_load(&app->in, next, on_config_error, NULL);
	if (errors) {
		free(next);
		sdnotify_ready(); /* still running on the old configuration */
		/* Each problem was one config_invalid error line already: this
		 * summary is a warning, so an invalid file makes one error per problem. */
		struct log_line *l = log_begin(LOG_WARN, "reload_failed");
		log_int(l, "errors", errors);
		log_str(l, "msg", "the configuration in use is unchanged");
		log_end(l);
		return;
	}
	if (next->routes || app->cfg->routes)
		config_keep_static_common(app->cfg,
					  next); /* the top level is only routes[0]'s copy */
	else
		config_keep_static(app->cfg, next, on_ignored_key, NULL);
	for (int i = 0; next->routes && i < next->nroutes; i++)
		config_keep_static_common(app->cfg, &next->routes[i]);
	if (routes_reload(app->routes, next) != 0) {
		log_msg(LOG_ERROR, "reload_failed", "the configuration in use is unchanged");
		config_free(next);
		free(next);
		sdnotify_ready();
		return;
	}
	/* The routes took next over, and retire the old snapshot once nothing
	 * points into it. */
	app->cfg = next;
	log_setup((enum log_level)app->cfg->log_level, (enum log_format)app->cfg->log_format);
	register_secrets(app->cfg);
	log_msg(LOG_INFO, "reloaded", "configuration reloaded");
	sdnotify_watchdog_start(app->loop);
	sdnotify_ready();
	on_state(app);
}

/* Opens /dev/null on each of fds 0-2 that is closed, so that no later
 * descriptor (the epoll fd, libcurl's socketpair, a socket) takes its
 * number and receives log lines or reads. Must run before anything opens a
 * descriptor. Returns 0, or -1 when /dev/null cannot be opened. */
static int open_closed_std_fds(void)
{
	for (int fd = 0; fd <= 2; fd++) {
		int got;

		if (fcntl(fd, F_GETFD) != -1 || errno != EBADF)
			continue;
		/* open() takes the lowest free number: fd itself, as the lower
		 * ones are open by now. */
		got = open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY);
		if (got != fd) {
			if (got >= 0)
				close(got);
			return -1;
		}
	}
	return 0;
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "config", required_argument, NULL, 'c' },
		{ "verbose", no_argument, NULL, 'v' },
		{ "quiet", no_argument, NULL, 'q' },
		{ "log-format", required_argument, NULL, 'F' },
		{ "once", no_argument, NULL, 'O' },
		{ "dry-run", no_argument, NULL, 'D' },
		{ "health-check", no_argument, NULL, 'H' },
		{ "check-config", no_argument, NULL, 't' },
		{ "dump-config", no_argument, NULL, 'T' },
		{ "version", no_argument, NULL, 'V' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct app app;
	struct command cmd = { .path = CONFIG_DEFAULT_PATH };
	bool path_explicit = false, once = false;
	int verbose = 0, quiet = 0, opt;
	char level_override[32], format_override[32];
	const char *overrides[3] = { NULL, NULL, NULL };
	int noverrides = 0;
	char masked[1024];

	if (open_closed_std_fds() != 0)
		return EX_OSERR;
	memset(&app, 0, sizeof(app));
	format_override[0] = '\0';
	/* "+": options stop at the command (status, jobs, ...), whose own
	 * options its module parses. */
	while ((opt = getopt_long(argc, argv, "+c:vqtTVh", longopts, NULL)) != -1) {
		switch (opt) {
		case 'c':
			cmd.path = optarg;
			path_explicit = true;
			break;
		case 'v':
			verbose++;
			break;
		case 'q':
			quiet++;
			break;
		case 'F':
			snprintf(format_override, sizeof(format_override), "log.format=%s", optarg);
			break;
		case 'O':
			once = true;
			break;
		case 'D':
			cmd.dry_run = true;
			break;
		case 'H':
			cmd.health_check = true;
			break;
		case 't':
			cmd.check = true;
			break;
		case 'T':
			cmd.dump = true;
			break;
		case 'V':
			printf("pgmq-dispatcher %s\n", PGMQD_VERSION);
			return 0;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return EX_USAGE;
		}
	}
	if (command_pick(&cmd, argc, argv, optind) != 0) {
		usage(stderr);
		return EX_USAGE;
	}
	if ((int)once + (int)cmd.check + (int)cmd.dump + (int)cmd.dry_run + (int)cmd.health_check >
		    1 &&
	    !(cmd.check && cmd.dump)) {
		fprintf(stderr,
			"pgmq-dispatcher: --once, --dry-run, --health-check, -t and -T exclude "
			"each other\n");
		return EX_USAGE;
	}
	if (verbose && quiet) {
		fprintf(stderr, "pgmq-dispatcher: -v and -q exclude each other\n");
		return EX_USAGE;
	}
	if (verbose || quiet) {
		snprintf(level_override, sizeof(level_override), "log.level=%s",
			 quiet          ? "warn"
			 : verbose == 1 ? "debug"
					: "trace");
		overrides[noverrides++] = level_override;
	}
	if (format_override[0])
		overrides[noverrides++] = format_override;

	log_setup(LOG_INFO, LOG_FORMAT_LOGFMT);
	app.in = (struct config_input){ .path = cmd.path,
					.path_explicit = path_explicit,
					.envp = environ,
					.cli_overrides = overrides };
	app.cfg = calloc(1, sizeof(*app.cfg));
	if (app.cfg == NULL)
		return EX_OSERR;
	if (config_load(&app.in, app.cfg, on_config_error, NULL) != 0) {
		free(app.cfg);
		return EX_CONFIG;
	}
	log_setup((enum log_level)app.cfg->log_level, (enum log_format)app.cfg->log_format);
	register_secrets(app.cfg);
	if (command_is_oneshot(&cmd)) {
		int rc = command_run(&cmd, app.cfg);
		config_free(app.cfg);
		free(app.cfg);
		return rc;
	}

	signal(SIGPIPE, SIG_IGN);
	srandom((unsigned)time(NULL) ^ (unsigned)getpid());
	if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
		log_msg(LOG_ERROR, "startup_failed", "curl_global_init failed");
		config_free(app.cfg);
		free(app.cfg);
		return EX_SOFTWARE;
	}
	app.loop = ev_default_loop(EVFLAG_AUTO);
	if (app.loop == NULL) {
		log_msg(LOG_ERROR, "startup_failed", "cannot create the event loop");
		config_free(app.cfg);
		free(app.cfg);
		return EX_OSERR;
	}
	metrics_init();
	/* From here on a stalled stderr never blocks the loop. */
	log_attach_loop(app.loop);
	app.routes = routes_new(app.loop, app.cfg, once, on_done, &app);
	if (app.routes == NULL) {
		log_detach_loop(1000);
		config_free(app.cfg);
		free(app.cfg);
		return EX_SOFTWARE;
	}
	routes_set_state_hook(app.routes, on_state, &app);
	if (!once && strcmp(app.cfg->admin_listen, "off") != 0) {
		struct admin_hooks hooks = { .ready = admin_ready,
					     .metrics = admin_metrics,
					     .routes = admin_routes,
					     .control = admin_control,
					     .token = app.cfg->admin_token,
					     .arg = &app };
		if ((app.ds = dispatches_new(app.loop)) != NULL)
			hooks.dispatches = admin_dispatches;
		char err[256];
		app.admin = admin_start(app.loop, app.cfg->admin_listen, &hooks, err, sizeof(err));
		if (app.admin == NULL) {
			struct log_line *l = log_begin(LOG_ERROR, "startup_failed");
			log_str(l, "key", "admin.listen");
			log_str(l, "error", err);
			log_end(l);
			dispatches_free(app.ds);
			routes_free(app.routes); /* and app.cfg */
			log_detach_loop(1000);
			return EX_OSERR;
		}
	}
	ev_signal_init(&app.sig_int, on_stop_signal, SIGINT);
	ev_signal_init(&app.sig_term, on_stop_signal, SIGTERM);
	ev_signal_init(&app.sig_hup, on_hup, SIGHUP);
	app.sig_int.data = app.sig_term.data = app.sig_hup.data = &app;
	ev_signal_start(app.loop, &app.sig_int);
	ev_signal_start(app.loop, &app.sig_term);
	ev_signal_start(app.loop, &app.sig_hup);

	{
		struct log_line *l = log_begin(LOG_INFO, "started");
		log_str(l, "version", PGMQD_VERSION);
		log_int(l, "routes", app.cfg->nroutes);
		log_str(l, "queue", app.cfg->queue_name);
		log_str(l, "endpoint_id", app.cfg->endpoint_id);
		log_str(l, "base_url", app.cfg->base_url);
		log_str(l, "conninfo",
			config_mask_conninfo(app.cfg->conninfo, masked, sizeof(masked)));
		log_int(l, "batch_size", app.cfg->batch_size);
		log_int(l, "vt_seconds", app.cfg->vt_seconds);
		log_int(l, "poll_interval_ms", app.cfg->poll_interval_ms);
		log_str(l, "mode", once ? "once" : "daemon");
		if (app.admin)
			log_int(l, "admin_port", admin_port(app.admin));
		log_end(l);
	}
	routes_start(app.routes);
	/* Ready: config valid, signals and admin up, first connect started.
	 * A database that is down shows in STATUS= and /readyz. */
	sdnotify_ready();
	on_state(&app);
	sdnotify_watchdog_start(app.loop);
	ev_run(app.loop, 0);
	sdnotify_watchdog_stop(app.loop);
	admin_stop(app.admin);
	dispatches_free(app.ds); /* requests still waiting: answered to nobody */

	{
		/* Free first: requests and statements still pending log their
		 * msg ids as they fail, and the last line sums everything up. */
		struct dispatcher_stats s = routes_stats(app.routes);
		struct log_line *l;

		routes_free(app.routes); /* and the snapshots */
		l = log_begin(LOG_INFO, "exiting");
		log_int(l, "exit_code", app.exit_code);
		log_int(l, "messages_read", (long long)s.messages_read);
		log_int(l, "messages_accepted", (long long)s.messages_accepted);
		log_int(l, "messages_released", (long long)s.messages_released);
		log_int(l, "messages_archived", (long long)s.messages_archived);
		log_int(l, "requests_accepted", (long long)s.requests_accepted);
		log_int(l, "requests_rejected", (long long)s.requests_rejected);
		log_int(l, "requests_unknown", (long long)s.requests_unknown);
		log_end(l);
	}
	ev_signal_stop(app.loop, &app.sig_int);
	ev_signal_stop(app.loop, &app.sig_term);
	ev_signal_stop(app.loop, &app.sig_hup);
	/* Lines still waiting for a slow reader get a little time, not forever. */
	log_detach_loop(2000);
	ev_loop_destroy(app.loop);
	curl_global_cleanup();
	log_secret_clear();
	return app.exit_code;
}
