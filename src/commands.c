/* commands — see include/commands.h. */
#include "commands.h"
#include "admin.h"
#include "ctl.h"
#include "dispatcher.h"
#include "ledger_cli.h"
#include "listenaddr.h"
#include "log.h"

#include <curl/curl.h>
#include <stdio.h>
#include <string.h>
#include <sysexits.h>

int command_pick(struct command *c, int argc, char **argv, int first)
{
	if (first < argc && strcmp(argv[first], "ctl") == 0) {
		c->ctl = true;
		c->argv = argv + first + 1;
		c->argc = argc - first - 1;
		return 0;
	}
	if (first < argc && ledger_cli_known(argv[first])) {
		c->ledger = argv[first];
		c->argc = argc - first;
		c->argv = argv + first;
		return 0;
	}
	if (first < argc) {
		fprintf(stderr, "pgmq-dispatcher: unexpected argument '%s'\n", argv[first]);
		return -1;
	}
	return 0;
}

bool command_is_oneshot(const struct command *c)
{
	return c->ctl || c->ledger || c->check || c->dump || c->health_check || c->dry_run;
}

/* The port of a valid admin.listen value, -1 for "off". */
static int listen_port(const char *listen)
{
	char host[LISTENADDR_HOST_MAX + 1];
	int port = -1;

	return listenaddr_split(listen, host, sizeof(host), &port) == NULL ? port : -1;
}

static int health_check(const struct config *cfg)
{
	bool off = strcmp(cfg->admin_listen, "off") == 0;
	int rc = off ? 1 : admin_health_check(cfg->admin_listen, 2000) == 0 ? 0 : 1;

	if (rc != 0 && off)
		log_msg(LOG_WARN, "health_check", "admin.listen is off: nothing to ask");
	else if (rc != 0 && listen_port(cfg->admin_listen) == 0)
		log_msg(LOG_WARN, "health_check",
			"admin.listen uses port 0 (any free port): "
			"set a fixed port to use --health-check");
	return rc;
}

int command_run(const struct command *c, const struct config *cfg)
{
	if (c->ctl) {
		int rc = curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK
				 ? ctl_run(cfg, c->argc, c->argv)
				 : EX_SOFTWARE;
		curl_global_cleanup();
		return rc;
	}
	if (c->dump)
		config_dump(cfg, stdout);
	if (c->check && !c->dump) {
		char used[512];
		config_describe(cfg, c->path, used, sizeof(used));
		printf("pgmq-dispatcher: configuration valid: %s\n", used);
	}
	if (c->check || c->dump)
		return 0;
	if (c->ledger)
		return ledger_cli_main(cfg, c->ledger, c->argc, c->argv);
	if (c->health_check)
		return health_check(cfg);
	return dispatcher_dry_run(cfg, stdout) == 0 ? 0 : EX_UNAVAILABLE;
}
