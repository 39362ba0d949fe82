/* admin_probe — `pgmq-dispatcher --health-check`: the blocking libcurl
 * probe of the local /healthz (see admin_health_check in include/admin.h),
 * and the local URL of an admin path that `ctl` asks (admin_local_url).
 * Runs outside the loop; knows nothing of the listener's state. */
#include "admin.h"
#include "admin_int.h"
#include "log.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#define HEALTH_DEFAULT_TIMEOUT_MS 5000

static int health_fail(const char *addr, const char *what, const char *detail)
{
	log_msg(LOG_WARN, "health_check_failed", "%s: %s%s%s", addr, what, detail ? ": " : "",
		detail ? detail : "");
	return 1;
}

/* The reply body ("ok\n") is not needed: only the status counts. */
static size_t discard_body(char *ptr, size_t size, size_t nmemb, void *arg)
{
	(void)ptr;
	(void)arg;
	return size * nmemb;
}

/* "http://127.0.0.1:9187/healthz" or "http://[::1]:9187/healthz" (path
 * from /) for the resolved address, a wildcard bind replaced by loopback.
 * 0, or -1. */
static int local_url(struct sockaddr_storage *ss, const char *path, char *url, size_t len)
{
	char host[INET6_ADDRSTRLEN];
	int port, n;

	if (ss->ss_family == AF_INET) {
		struct sockaddr_in *in = (struct sockaddr_in *)ss;
		if (in->sin_addr.s_addr == htonl(INADDR_ANY))
			in->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		if (inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host)) == NULL)
			return -1;
		port = ntohs(in->sin_port);
		n = snprintf(url, len, "http://%s:%d%s", host, port, path);
	} else if (ss->ss_family == AF_INET6) {
		struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
		if (IN6_IS_ADDR_UNSPECIFIED(&in6->sin6_addr))
			in6->sin6_addr = in6addr_loopback;
		if (inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host)) == NULL)
			return -1;
		port = ntohs(in6->sin6_port);
		n = snprintf(url, len, "http://[%s]:%d%s", host, port, path);
	} else {
		return -1;
	}
	return n < 0 || (size_t)n >= len ? -1 : 0;
}

int admin_local_url(const char *listen_addr, const char *path, char *url, size_t len)
{
	struct sockaddr_storage ss;
	socklen_t sslen = 0;

	if (admin_parse_listen(listen_addr, &ss, &sslen, NULL, 0) != 0)
		return -1;
	return local_url(&ss, path, url, len);
}

int admin_health_check(const char *listen_addr, int timeout_ms)
{
	struct sockaddr_storage ss;
	socklen_t sslen = 0;
	char err[256], url[128], cerr[CURL_ERROR_SIZE] = "";
	long status = 0;
	CURLcode rc;
	CURL *h;

	if (timeout_ms <= 0)
		timeout_ms = HEALTH_DEFAULT_TIMEOUT_MS;
	if (admin_parse_listen(listen_addr, &ss, &sslen, err, sizeof(err)) != 0)
		return health_fail(listen_addr ? listen_addr : "", err, NULL);
	if (local_url(&ss, "/healthz", url, sizeof(url)) != 0)
		return health_fail(listen_addr, "cannot form the /healthz URL", NULL);
	h = curl_easy_init();
	if (h == NULL)
		return health_fail(listen_addr, "curl_easy_init failed", NULL);
	/* Only our own listener is asked: http only, never through a proxy
	 * (http_proxy in the environment must not send the probe elsewhere). */
	if (curl_easy_setopt(h, CURLOPT_URL, url) != CURLE_OK ||
	    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http") != CURLE_OK ||
	    curl_easy_setopt(h, CURLOPT_PROXY, "") != CURLE_OK ||
	    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L) != CURLE_OK ||
	    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, (long)timeout_ms) != CURLE_OK ||
	    curl_easy_setopt(h, CURLOPT_USERAGENT, "pgmq-dispatcher") != CURLE_OK ||
	    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, discard_body) != CURLE_OK ||
	    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, cerr) != CURLE_OK) {
		curl_easy_cleanup(h);
		return health_fail(listen_addr, "curl_easy_setopt failed", NULL);
	}
	rc = curl_easy_perform(h);
	if (rc == CURLE_OK)
		curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
	curl_easy_cleanup(h);
	if (rc != CURLE_OK)
		return health_fail(listen_addr, url, cerr[0] ? cerr : curl_easy_strerror(rc));
	if (status != 200) {
		char code[24];
		snprintf(code, sizeof(code), "%ld", status);
		return health_fail(listen_addr, "/healthz answered", code);
	}
	return 0;
}
