// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/*
 * What the hmmgpu-faults modes share: reporting checks, the injection
 * handshake with the host, the driver's counters, the device's SNAPSHOT,
 * pattern checks and /proc/self/pagemap.
 *
 * Injection: a mode asks the host to inject a fault at a precise point by
 * printing
 *     HMMGPU-INJECT-REQUEST gpu=0 {FAULT JSON}
 * on the console and reading the host's answer from its stdin (the console):
 *     HMMGPU-INJECT-REPLY ok {backend reply}     or
 *     HMMGPU-INJECT-REPLY error MESSAGE
 * The fault is armed when the reply arrives (ci/xtask/src/tests/faults.rs
 * serves the requests).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "faults.h"

#define COUNTERS_PATH "/sys/kernel/debug/hmmgpu0/counters"

const char *dev_path = "/dev/hmm_dmirror0";
int failures;

void say(const char *fmt, ...)
{
	va_list ap;

	printf(TAG);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
}

void fail(const char *fmt, ...)
{
	va_list ap;

	printf(TAG "FAIL: ");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
	failures++;
}

void check(bool ok, const char *what)
{
	if (ok)
		say("PASS: %s", what);
	else
		fail("%s", what);
}

int verdict(const char *mode, const char *arg)
{
	if (failures) {
		say("FAIL: %d check(s) failed", failures);
		return 1;
	}
	if (arg)
		say("PASS: %s (%s): all checks passed", mode, arg);
	else
		say("PASS: %s: all checks passed", mode);
	return 0;
}

void inject(const char *fault)
{
	char line[1024];

	printf("HMMGPU-INJECT-REQUEST gpu=0 %s\n", fault);
	fflush(stdout);
	while (fgets(line, sizeof(line), stdin)) {
		char *p = strstr(line, "HMMGPU-INJECT-REPLY ");

		if (!p)
			continue;
		p += strlen("HMMGPU-INJECT-REPLY ");
		if (!strncmp(p, "ok", 2)) {
			say("injected %s", fault);
			return;
		}
		say("FAIL: the host did not inject %s: %s", fault, p);
		exit(3);
	}
	say("FAIL: no answer from the host to the injection request (stdin: %s)",
	    feof(stdin) ? "end of file" : strerror(errno));
	exit(3);
}

int open_dev_at(const char *path)
{
	int fd = open(path, O_RDWR | O_CLOEXEC);

	if (fd < 0) {
		say("FAIL: open %s: %s", path, strerror(errno));
		exit(1);
	}
	return fd;
}

int open_dev(void)
{
	return open_dev_at(dev_path);
}

size_t pages_of_kind(int fd, void *buf, size_t npages, uint8_t kind, bool *pmd)
{
	uint8_t *perm = calloc(npages, 1);
	size_t i, n = 0;
	int e;

	if (!perm)
		exit(1);
	e = dmirror(fd, HMM_DMIRROR_SNAPSHOT, buf, perm, npages, NULL);
	if (e) {
		fail("HMM_DMIRROR_SNAPSHOT: %s", strerror(e));
		free(perm);
		return (size_t)-1;
	}
	for (i = 0; i < npages; i++)
		if (perm[i] != HMM_DMIRROR_PROT_ERROR && (perm[i] & DMIRROR_PROT_KIND_MASK) == kind)
			n++;
	if (pmd)
		*pmd = perm[0] != HMM_DMIRROR_PROT_ERROR && (perm[0] & HMM_DMIRROR_PROT_PMD);
	free(perm);
	return n;
}

size_t device_pages(int fd, void *buf, size_t npages)
{
	return pages_of_kind(fd, buf, npages, HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL, NULL);
}

uint64_t counter(const char *name)
{
	FILE *f = fopen(COUNTERS_PATH, "r");
	char key[64];
	uint64_t v, found = UINT64_MAX;

	if (!f) {
		fail("open " COUNTERS_PATH ": %s", strerror(errno));
		return UINT64_MAX;
	}
	while (fscanf(f, "%63s %" SCNu64, key, &v) == 2)
		if (!strcmp(key, name))
			found = v;
	fclose(f);
	if (found == UINT64_MAX)
		fail("no counter %s in " COUNTERS_PATH, name);
	return found;
}

void print_counters(void)
{
	FILE *f = fopen(COUNTERS_PATH, "r");
	char line[128];

	if (!f)
		return;
	while (fgets(line, sizeof(line), f))
		printf(TAG "counter %s", line);
	fclose(f);
	fflush(stdout);
}

bool pattern_ok(const void *buf, size_t size, uint64_t seed, const char *what)
{
	const volatile uint64_t *w = buf;
	uint64_t x = xorshift_init(seed);
	size_t i, bad = 0;

	for (i = 0; i < size / 8; i++) {
		uint64_t want = xorshift_next(&x), got = w[i];

		if (got != want) {
			if (bad < 3)
				say("  %s: word %zu (page %zu) is 0x%016" PRIx64 ", want 0x%016" PRIx64,
				    what, i, i * 8 / PAGE_SZ, got, want);
			bad++;
		}
	}
	if (bad)
		say("  %s: %zu of %zu words differ", what, bad, size / 8);
	return bad == 0;
}

/* The child of touch_page(): reads every word of the page, checks them, exits. */
static void __attribute__((noreturn)) touch_child(const volatile uint64_t *page, const uint64_t *want,
						  bool ones_ok, const char *what)
{
	size_t i, bad = 0, ones = 0;

	for (i = 0; i < PAGE_SZ / 8; i++) {
		uint64_t got = page[i];

		if (ones_ok && got == UINT64_MAX) {
			ones++;
		} else if (want && got != want[i]) {
			if (bad < 3)
				printf(TAG "child: %s: word %zu is 0x%016" PRIx64 ", want 0x%016" PRIx64 "%s\n",
				       what, i, got, want[i], ones_ok ? " or all-ones" : "");
			bad++;
		}
	}
	if (bad)
		printf(TAG "child: %s: read %zu wrong word(s) of %lu\n", what, bad, PAGE_SZ / 8);
	else
		printf(TAG "child: %s: read the page%s\n", what,
		       ones == PAGE_SZ / 8 ? " (all-ones)" : ones ? " (some words all-ones)" : "");
	fflush(stdout);
	_exit(bad ? 2 : 0);
}

enum touch touch_page(const void *page, const void *want, bool ones_ok, const char *what)
{
	int status;
	pid_t pid = fork();

	if (pid < 0) {
		fail("fork: %s", strerror(errno));
		return TOUCH_ERROR;
	}
	if (pid == 0)
		touch_child(page, want, ones_ok, what);
	if (waitpid(pid, &status, 0) != pid) {
		fail("waitpid: %s", strerror(errno));
		return TOUCH_ERROR;
	}
	if (WIFSIGNALED(status) && WTERMSIG(status) == SIGBUS) {
		say("  a child touching %s died of SIGBUS", what);
		return TOUCH_SIGBUS;
	}
	if (WIFEXITED(status) && WEXITSTATUS(status) <= 2)
		return WEXITSTATUS(status) ? TOUCH_WRONG_DATA : TOUCH_READ;
	if (WIFSIGNALED(status))
		say("  a child touching %s was killed by signal %d (%s)", what, WTERMSIG(status),
		    strsignal(WTERMSIG(status)));
	else
		say("  a child touching %s exited with status %d", what, WEXITSTATUS(status));
	return TOUCH_ERROR;
}

enum touch poll_for_sigbus(const void *page, const void *want, bool ones_ok, const char *what)
{
	double t0 = now_ms();
	enum touch t;
	int reads = 0;

	while ((t = touch_page(page, want, ones_ok, what)) == TOUCH_READ && now_ms() - t0 < 20000) {
		reads++;
		usleep(100 * 1000);
	}
	say("  %d child(ren) read %s before: %s after %.0f ms", reads, what,
	    t == TOUCH_SIGBUS ? "SIGBUS" : t == TOUCH_READ ? "no SIGBUS" :
	    t == TOUCH_WRONG_DATA ? "wrong data" : "an error", now_ms() - t0);
	return t;
}

uint64_t pagemap_entry(const void *va)
{
	uint64_t entry = 0;
	int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return 0;
	if (pread(fd, &entry, sizeof(entry), (uintptr_t)va / PAGE_SZ * sizeof(entry)) != sizeof(entry))
		entry = 0;
	close(fd);
	return entry;
}

uint64_t phys_of(const void *va)
{
	uint64_t entry = pagemap_entry(va);

	if (!(entry & PM_PRESENT))
		return 0;
	return (entry & PM_PFRAME_MASK) * PAGE_SZ;
}

uint64_t pfn_of(const void *va)
{
	uint64_t entry = pagemap_entry(va);

	if (entry & PM_PRESENT)
		return entry & PM_PFRAME_MASK;
	if (entry & PM_SWAP)
		return (entry & PM_PFRAME_MASK) >> PM_SWAP_TYPE_BITS;
	return 0;
}
