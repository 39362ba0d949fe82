/* libFuzzer target: the configuration loader on arbitrary file contents.
 * The input is the INI file; a fixed environment supplies required keys so
 * that validation of every key is reached. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "config.h"

static void ignore(void *arg, const char *key, const char *source, const char *problem)
{
	(void)arg;
	/* Touch every byte: an unterminated string would trip ASan here. */
	(void)strlen(key);
	(void)strlen(source);
	(void)strlen(problem);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static int fd = -1;
	static char path[64];
	static char *env[] = { "RUNPOD_API_KEY=fuzz-key-123", NULL };
	struct config cfg;
	struct config_input in = { .path = path, .path_explicit = true, .envp = env };

	if (fd < 0) {
		fd = memfd_create("fuzz-config", 0);
		if (fd < 0)
			return 0;
		snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	}
	if (ftruncate(fd, 0) != 0 || pwrite(fd, data, size, 0) != (ssize_t)size)
		return 0;
	if (config_load(&in, &cfg, ignore, NULL) == 0) {
		FILE *devnull = fopen("/dev/null", "w");
		config_dump(&cfg, devnull);
		fclose(devnull);
		config_free(&cfg);
	}
	return 0;
}
