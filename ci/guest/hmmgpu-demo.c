// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/*
 * hmmgpu-demo: exercises a dmirror device (lib/test_hmm_uapi.h) end to end.
 *
 *   hmmgpu-demo [-d DEV] [-s SIZE] [--seed N]     the demo (default)
 *   hmmgpu-demo [-d DEV] [-s SIZE] --leave-in-vram SEED
 *   hmmgpu-demo [-d DEV] [-s SIZE] [--module NAME] --rmmod-resident
 *
 * The demo fills an anonymous buffer with a seeded pattern, migrates it to
 * the device, checks the device's view (SNAPSHOT, READ), faults it back with
 * the CPU, lets the device WRITE a new pattern and checks the CPU sees it.
 *
 * --leave-in-vram fills, migrates and checks the snapshot, prints
 *   HMMGPU-VRAM-PATTERN seed=SEED bytes=N
 * and exits without touching the buffer, so the device's VRAM holds the
 * pattern when the VM powers off (the host test scans the VRAM file for it).
 *
 * --rmmod-resident migrates a buffer to the device, closes the device,
 * runs `/sbin/rmmod NAME` (default hmmgpu) and checks every byte came back
 * to system memory intact.
 *
 * The pattern is ci/guest/pattern.h's (xorshift64 over little-endian u64
 * words); ci/xtask/src/pattern.rs is the host's copy; keep them identical.
 *
 * Exit status: 0 all steps passed, 1 a step failed, 2 usage error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "dmirror.h"
#include "pattern.h"

static const char *dev_path = "/dev/hmm_dmirror0";
static int failures;
static int step_no;
static double step_start;

static void step_begin(const char *fmt, ...)
{
	va_list ap;

	printf("hmmgpu-demo: [%d] ", ++step_no);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf(" ...\n");
	fflush(stdout);
	step_start = now_ms();
}

/* Ends the current step; returns ok. */
static bool step_end(bool ok)
{
	printf("hmmgpu-demo: [%d] %s (%.1f ms)\n", step_no, ok ? "PASS" : "FAIL",
	       now_ms() - step_start);
	fflush(stdout);
	if (!ok)
		failures++;
	return ok;
}

static void fail_msg(const char *fmt, ...)
{
	va_list ap;

	printf("hmmgpu-demo:     error: ");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
}

/*
 * Compares buf against the pattern of seed, touching every byte; returns the
 * number of mismatching bytes and reports the first few.
 */
static size_t check_pattern(const void *buf, size_t size, uint64_t seed,
			    const char *what)
{
	const volatile uint8_t *b = buf;
	uint64_t x = xorshift_init(seed);
	size_t i, bad = 0;

	for (i = 0; i < size; i += 8) {
		uint64_t want = xorshift_next(&x);
		unsigned int k;

		for (k = 0; k < 8; k++) {
			uint8_t got = b[i + k], exp = (uint8_t)(want >> (8 * k));

			if (got != exp) {
				if (bad < 5)
					fail_msg("%s: byte %zu (page %zu) is 0x%02x, want 0x%02x",
						 what, i + k, (i + k) / PAGE_SZ, got, exp);
				bad++;
			}
		}
	}
	if (bad)
		fail_msg("%s: %zu of %zu bytes differ", what, bad, size);
	return bad;
}

/*
 * Issues a dmirror command over [addr, addr + npages pages) with ptr as the
 * data/result buffer, and reports it. Checks cpages.
 */
static bool dmirror_cmd(int fd, unsigned long req, void *addr, void *ptr,
			size_t npages)
{
	struct hmm_dmirror_cmd cmd;
	int e = dmirror(fd, req, addr, ptr, npages, &cmd);

	if (e) {
		fail_msg("%s(npages=%zu): %s", dmirror_name(req), npages, strerror(e));
		return false;
	}
	printf("hmmgpu-demo:     %s: npages=%zu cpages=%" PRIu64 " faults=%" PRIu64 "\n",
	       dmirror_name(req), npages, (uint64_t)cmd.cpages, (uint64_t)cmd.faults);
	if (req != HMM_DMIRROR_SNAPSHOT && cmd.cpages != npages) {
		fail_msg("%s: cpages %" PRIu64 ", want %zu", dmirror_name(req),
			 (uint64_t)cmd.cpages, npages);
		return false;
	}
	return true;
}

static const char *prot_kind(uint8_t p)
{
	if (p == HMM_DMIRROR_PROT_ERROR)
		return "ERROR";
	switch (p & DMIRROR_PROT_KIND_MASK) {
	case HMM_DMIRROR_PROT_NONE: return "system";
	case HMM_DMIRROR_PROT_ZERO: return "zero-page";
	case HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL: return "DEV_PRIVATE_LOCAL";
	case HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE: return "DEV_PRIVATE_REMOTE";
	case HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL: return "DEV_COHERENT_LOCAL";
	case HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE: return "DEV_COHERENT_REMOTE";
	default: return "unknown";
	}
}

/*
 * SNAPSHOTs the buffer; want_device: every page must be device-private on
 * this device, else every page must be a valid system-memory page.
 */
static bool check_snapshot(int fd, void *buf, size_t npages, bool want_device)
{
	uint8_t *perm = calloc(npages, 1);
	size_t i, bad = 0;
	bool ok;

	if (!perm) {
		fail_msg("out of memory");
		return false;
	}
	memset(perm, 0xAA, npages);
	ok = dmirror_cmd(fd, HMM_DMIRROR_SNAPSHOT, buf, perm, npages);
	for (i = 0; ok && i < npages; i++) {
		uint8_t p = perm[i];
		bool good;

		if (want_device)
			good = p != HMM_DMIRROR_PROT_ERROR &&
			       (p & DMIRROR_PROT_KIND_MASK) == HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL;
		else
			good = p != HMM_DMIRROR_PROT_ERROR &&
			       (p & DMIRROR_PROT_KIND_MASK) == HMM_DMIRROR_PROT_NONE &&
			       (p & (HMM_DMIRROR_PROT_READ | HMM_DMIRROR_PROT_WRITE));
		if (!good) {
			if (bad < 5)
				fail_msg("page %zu: snapshot 0x%02x (%s), want %s", i, p,
					 prot_kind(p),
					 want_device ? "DEV_PRIVATE_LOCAL" : "a system page");
			bad++;
		}
	}
	if (bad) {
		fail_msg("%zu of %zu pages are not %s", bad, npages,
			 want_device ? "in device memory" : "in system memory");
		ok = false;
	}
	free(perm);
	return ok;
}

static int open_dev(void)
{
	int fd = open(dev_path, O_RDWR | O_CLOEXEC);

	if (fd < 0) {
		fprintf(stderr, "hmmgpu-demo: open %s: %s\n", dev_path, strerror(errno));
		printf("hmmgpu-demo: FAIL (cannot open %s)\n", dev_path);
		exit(1);
	}
	return fd;
}

static int finish(void)
{
	if (failures)
		printf("hmmgpu-demo: FAIL: %d of %d steps failed\n", failures, step_no);
	else
		printf("hmmgpu-demo: PASS: all %d steps passed\n", step_no);
	fflush(stdout);
	return failures ? 1 : 0;
}

static int run_demo(size_t size, uint64_t seed)
{
	size_t npages = size / PAGE_SZ;
	uint8_t *buf = map_buffer(size, false), *mirror = map_buffer(size, false);
	int fd = open_dev();
	bool ok;

	printf("hmmgpu-demo: device %s, buffer %zu bytes (%zu pages) at %p, seed %" PRIu64 "\n",
	       dev_path, size, npages, (void *)buf, seed);

	step_begin("fill the buffer with the pattern of seed %" PRIu64, seed);
	fill_pattern(buf, size, seed);
	step_end(true);

	step_begin("HMM_DMIRROR_MIGRATE_TO_DEV: move %zu pages to device memory", npages);
	ok = dmirror_cmd(fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, mirror, npages);
	if (!step_end(ok))
		return finish();

	step_begin("HMM_DMIRROR_SNAPSHOT: every page is DEV_PRIVATE_LOCAL");
	step_end(check_snapshot(fd, buf, npages, true));

	step_begin("HMM_DMIRROR_READ: the device reads the pattern back");
	memset(mirror, 0, size);
	ok = dmirror_cmd(fd, HMM_DMIRROR_READ, buf, mirror, npages);
	step_end(ok && check_pattern(mirror, size, seed, "device read") == 0);

	step_begin("CPU reads every byte (faults pages back to system memory)");
	step_end(check_pattern(buf, size, seed, "CPU read") == 0);

	step_begin("HMM_DMIRROR_SNAPSHOT: every page is back in system memory");
	step_end(check_snapshot(fd, buf, npages, false));

	step_begin("HMM_DMIRROR_WRITE: the device writes the pattern of seed %" PRIu64,
		   seed + 1);
	fill_pattern(mirror, size, seed + 1);
	ok = dmirror_cmd(fd, HMM_DMIRROR_WRITE, buf, mirror, npages);
	step_end(ok && check_pattern(buf, size, seed + 1, "CPU read of device write") == 0);

	close(fd);
	return finish();
}

static int run_leave_in_vram(size_t size, uint64_t seed)
{
	size_t npages = size / PAGE_SZ;
	uint8_t *buf = map_buffer(size, false), *mirror = map_buffer(size, false);
	int fd = open_dev();
	bool ok;

	printf("hmmgpu-demo: leave-in-vram: device %s, %zu bytes, seed %" PRIu64 "\n",
	       dev_path, size, seed);
	step_begin("fill the buffer with the pattern of seed %" PRIu64, seed);
	fill_pattern(buf, size, seed);
	step_end(true);

	step_begin("HMM_DMIRROR_MIGRATE_TO_DEV: move %zu pages to device memory", npages);
	ok = dmirror_cmd(fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, mirror, npages);
	if (!step_end(ok))
		return finish();

	step_begin("HMM_DMIRROR_SNAPSHOT: every page is DEV_PRIVATE_LOCAL");
	if (!step_end(check_snapshot(fd, buf, npages, true)))
		return finish();

	/* Not touching buf: the pattern stays in VRAM. */
	printf("HMMGPU-VRAM-PATTERN seed=%" PRIu64 " bytes=%zu\n", seed, size);
	return finish();
}

static int run_rmmod_resident(size_t size, uint64_t seed, const char *module)
{
	size_t npages = size / PAGE_SZ;
	uint8_t *buf = map_buffer(size, false), *mirror = map_buffer(size, false);
	int fd = open_dev(), status;
	uint64_t sum_before, sum_after;
	bool ok;
	pid_t pid;

	printf("hmmgpu-demo: rmmod-resident: device %s, %zu bytes, module %s\n",
	       dev_path, size, module);
	step_begin("fill the buffer and checksum it");
	fill_pattern(buf, size, seed);
	sum_before = fnv1a(buf, size);
	printf("hmmgpu-demo:     fnv1a %016" PRIx64 "\n", sum_before);
	step_end(true);

	step_begin("HMM_DMIRROR_MIGRATE_TO_DEV: move %zu pages to device memory", npages);
	ok = dmirror_cmd(fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, mirror, npages);
	if (!step_end(ok))
		return finish();

	step_begin("HMM_DMIRROR_SNAPSHOT: every page is DEV_PRIVATE_LOCAL");
	if (!step_end(check_snapshot(fd, buf, npages, true)))
		return finish();
	/* The open file holds a module reference. */
	close(fd);

	step_begin("/sbin/rmmod %s with the buffer resident in device memory", module);
	fflush(stdout);
	pid = fork();
	if (pid < 0) {
		fail_msg("fork: %s", strerror(errno));
		step_end(false);
		return finish();
	}
	if (pid == 0) {
		execl("/sbin/rmmod", "rmmod", module, (char *)NULL);
		fprintf(stderr, "hmmgpu-demo: exec /sbin/rmmod: %s\n", strerror(errno));
		_exit(127);
	}
	while (waitpid(pid, &status, 0) < 0) {
		if (errno != EINTR) {
			fail_msg("waitpid: %s", strerror(errno));
			step_end(false);
			return finish();
		}
	}
	ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
	if (!ok)
		fail_msg("rmmod %s: %s %d", module,
			 WIFEXITED(status) ? "exit status" : "killed by signal",
			 WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
	if (!step_end(ok))
		return finish();

	step_begin("every byte is intact in system memory");
	ok = check_pattern(buf, size, seed, "after rmmod") == 0;
	sum_after = fnv1a(buf, size);
	printf("hmmgpu-demo:     fnv1a %016" PRIx64 " (before: %016" PRIx64 ")\n",
	       sum_after, sum_before);
	step_end(ok && sum_after == sum_before);
	return finish();
}

static void usage(FILE *f)
{
	fprintf(f,
		"usage: hmmgpu-demo [-d DEV] [-s SIZE] [--seed N]\n"
		"       hmmgpu-demo [-d DEV] [-s SIZE] --leave-in-vram SEED\n"
		"       hmmgpu-demo [-d DEV] [-s SIZE] [--seed N] [--module NAME] --rmmod-resident\n"
		"  -d DEV   dmirror device (default /dev/hmm_dmirror0)\n"
		"  -s SIZE  buffer size, bytes or with K/M/G suffix, a multiple of 4K (default 4M)\n");
}

int main(int argc, char **argv)
{
	enum { OPT_SEED = 256, OPT_LEAVE, OPT_RMMOD, OPT_MODULE };
	static const struct option opts[] = {
		{ "device", required_argument, NULL, 'd' },
		{ "size", required_argument, NULL, 's' },
		{ "seed", required_argument, NULL, OPT_SEED },
		{ "leave-in-vram", required_argument, NULL, OPT_LEAVE },
		{ "rmmod-resident", no_argument, NULL, OPT_RMMOD },
		{ "module", required_argument, NULL, OPT_MODULE },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	enum { DEMO, LEAVE, RMMOD } mode = DEMO;
	uint64_t size = 4UL << 20, seed = 1;
	const char *module = "hmmgpu";
	int c;

	setvbuf(stdout, NULL, _IOLBF, 0);
	while ((c = getopt_long(argc, argv, "d:s:h", opts, NULL)) != -1) {
		switch (c) {
		case 'd':
			dev_path = optarg;
			break;
		case 's':
			if (!parse_u64(optarg, &size, true) || size == 0 || size % PAGE_SZ) {
				fprintf(stderr, "hmmgpu-demo: bad size '%s': want a nonzero multiple of 4096\n", optarg);
				return 2;
			}
			break;
		case OPT_SEED:
		case OPT_LEAVE:
			if (!parse_u64(optarg, &seed, false)) {
				fprintf(stderr, "hmmgpu-demo: bad seed '%s'\n", optarg);
				return 2;
			}
			if (c == OPT_LEAVE)
				mode = LEAVE;
			break;
		case OPT_RMMOD:
			mode = RMMOD;
			break;
		case OPT_MODULE:
			module = optarg;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind != argc) {
		fprintf(stderr, "hmmgpu-demo: unexpected argument '%s'\n", argv[optind]);
		usage(stderr);
		return 2;
	}
	switch (mode) {
	case LEAVE:
		return run_leave_in_vram(size, seed);
	case RMMOD:
		return run_rmmod_resident(size, seed, module);
	default:
		return run_demo(size, seed);
	}
}
