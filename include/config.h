/* config — the daemon's configuration as an immutable snapshot.
 *
 * Sources, highest precedence first: command line, environment
 * (PGMQD_<SECTION>_<KEY>, compatibility names such as RUNPOD_API_KEY and
 * DATABASE_URL, and X_FILE twins for secrets), $CREDENTIALS_DIRECTORY
 * (systemd LoadCredential=), the INI file, built-in defaults.
 *
 * One table in config_keys.c describes every key (type, default, range, secret);
 * it drives loading, validation and the redacted dump. */
#ifndef PGMQD_CONFIG_H
#define PGMQD_CONFIG_H

#include <stdbool.h>
#include <stddef.h>

#define CONFIG_DEFAULT_PATH "/etc/pgmq-dispatcher/pgmq-dispatcher.conf"

/* Where a key's effective value came from. */
enum config_source { SRC_DEFAULT = 0, SRC_FILE, SRC_CREDENTIAL, SRC_ENV, SRC_CLI };

#define CONFIG_MAX_KEYS 64

struct config {
	/* [database] */
	char *conninfo;        /* libpq keyword/value string or URI; "" = libpq defaults (PG*) */
	char *listen_conninfo; /* separate session connection for LISTEN; "" = use conninfo */
	int db_connect_timeout_ms;
	/* [queue] */
	char *queue_name;
	int vt_seconds; /* visibility timeout given to pgmq.read */
	int batch_size; /* qty given to pgmq.read = jobs per /run request */
	int poll_interval_ms;
	char *read_function;    /* schema-qualified SQL function name, validated identifier */
	int max_in_flight;      /* /run requests outstanding at once */
	int max_read_ct;        /* poison guard: archive messages read more often; 0 = off */
	int notify;             /* bool: LISTEN on pgmq.q_<queue>.INSERT */
	int notify_debounce_ms; /* a burst of NOTIFYs becomes one read after this */
	int idle_poll_max_ms;   /* with NOTIFY working, idle polls back off up to this */
	/* [runpod] */
	char *endpoint_id;
	char *api_key;  /* secret */
	char *base_url; /* no trailing slash */
	char *ca_file;  /* PEM CA bundle for https; "" = the system store */
	int connect_timeout_ms;
	int request_timeout_ms;
	int max_body_bytes;     /* split batches above it; archive single messages above it */
	int backoff_base_ms;    /* first pause after a failure (full jitter) */
	int backoff_max_ms;     /* cap of the exponential pause */
	int retry_after_max_ms; /* cap on a 429/503 Retry-After */
	int probe_interval_ms;  /* cap of the /health probe period while the circuit is open */
	int max_requests_per_10s; /* sliding 10 s window on /run (RunPod: 1000 per 10 s per endpoint) */
	int rate_window_ms; /* the window of both *_per_10s caps: 10000 (RunPod); other values for tests */
	char *webhook;                   /* optional "webhook" beside "input"; "" = none */
	int policy_execution_timeout_ms; /* policy.executionTimeout; 0 = not sent */
	int policy_ttl_ms;               /* policy.ttl; 0 = not sent */
	int policy_low_priority;         /* bool: policy.lowPriority = true when set */
	int dispatch_id_in_input; /* bool: input.dispatch_id carries the ledger's dispatch id */
	/* [tracker] */
	int tracker_enabled;     /* bool: follow accepted jobs through /status */
	int tracker_interval_ms; /* /status period per job (jittered) */
	int tracker_max_tracked_jobs;
	int tracker_retry_delay_s;      /* FAILED/CANCELLED/TIMED_OUT: visible again after this */
	int tracker_max_concurrent;     /* /status requests in flight at once */
	int tracker_max_status_per_10s; /* RunPod: 2000 per 10 s */
	int tracker_max_queued_jobs; /* reads pause while this many jobs wait IN_QUEUE; 0 = off */
	int tracker_max_heartbeat_s; /* no heartbeat for a job tracked longer; 0 = off */
	/* [ledger] */
	int ledger_enabled;           /* bool: the dispatch ledger in PostgreSQL */
	char *ledger_schema;          /* its schema, a plain lower-case identifier */
	int ledger_retention_days;    /* finished rows older than this are pruned */
	int ledger_lease_s;           /* a replica's hold on its sending rows and tracked jobs */
	int ledger_completed_grace_s; /* a COMPLETED job's messages should be gone by then */
	/* [fleet] */
	int fleet_enabled;     /* bool: replicas share the caps through PostgreSQL (budget.h) */
	int fleet_grant_max;   /* most slots one grant hands out */
	int fleet_validity_ms; /* a grant is spent within this or dropped */
	int fleet_expected_replicas; /* database unavailable: cap / this; 0 = send nothing */
	/* [log] */
	int log_level;  /* enum log_level */
	int log_format; /* enum log_format */
	/* [admin] */
	char *admin_listen;      /* "host:port" or "[v6]:port"; "off" disables */
	int metrics_interval_ms; /* queue length refresh (pgmq.metrics) and STATUS counts */
	/* [daemon] */
	int shutdown_timeout_ms;

	/* Where each key's value came from, indexed like the key table. */
	unsigned char source[CONFIG_MAX_KEYS];
	bool file_read; /* the configuration file existed and was read */
};

/* What to load. envp is a NULL-terminated "NAME=value" array (environ in
 * production, a fixed array in tests). cli_overrides is a NULL-terminated
 * array of "section.key=value" strings (may be NULL). When path_explicit is
 * false a missing file at path is not an error. */
struct config_input {
	const char *path;
	bool path_explicit;
	char *const *envp;
	const char *const *cli_overrides;
};

/* Receives one single-line error: the key, where the value came from and
 * what is wrong with it. Secret values are never included. */
typedef void (*config_error_fn)(void *arg, const char *key, const char *source,
				const char *problem);

/* Loads, validates and fills *out (zeroed first). Returns the number of
 * errors reported through on_error (0 = valid). On error *out is freed.
 * Strings in *out are owned by it; release with config_free(). */
int config_load(const struct config_input *in, struct config *out, config_error_fn on_error,
		void *arg);

/* For a reload: copies into next the values of keys that cannot change
 * at runtime (database.listen_conninfo, database.connect_timeout_ms,
 * queue.name, queue.notify, admin.listen: the F_STATIC rows of the key
 * table in config_keys.c) from cur, calling ignored()
 * for each such key whose value differed. */
void config_keep_static(const struct config *cur, struct config *next,
			void (*ignored)(void *arg, const char *key), void *arg);

/* Frees the strings of a snapshot loaded by config_load(). NULL-safe. */
void config_free(struct config *cfg);

/* One line for -t: which file was read (path, as given to config_load)
 * and how many keys came from each source, e.g. "file /etc/x.conf (2
 * keys); environment: 3 keys; default: 40 keys". */
void config_describe(const struct config *cfg, const char *path, char *buf, size_t len);

/* Writes the effective configuration to fp (a FILE *), one
 * "section.key = value  # source" line each; secrets print as "***" and the
 * password inside conninfo is masked through PQconninfoParse. */
void config_dump(const struct config *cfg, void *fp);

/* Copies conninfo into buf with every option libpq marks as secret
 * (dispchar "*", i.e. password) replaced by "***"; an unparsable string
 * becomes "(invalid)". Returns buf. */
char *config_mask_conninfo(const char *conninfo, char *buf, size_t len);

#endif
