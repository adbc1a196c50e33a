// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/*
 * hmmgpu-faults: guest workloads of the fault-injection VM tests
 * (ci/xtask/src/tests/faults.rs, docs/fault-injection.md "Expected outcomes
 * in the guest"), on the dmirror uAPI (lib/test_hmm_uapi.h).
 *
 *   hmmgpu-faults copy-error
 *   hmmgpu-faults data [--rounds N] [--size BYTES] [--seed N] [--nohuge]
 *                      [--min-migrate-ms MS]
 *   hmmgpu-faults storm [--size BYTES]
 *   hmmgpu-faults loss kill|link
 *   hmmgpu-faults mce
 *   hmmgpu-faults irq
 *   hmmgpu-faults reset flr|aer
 *   hmmgpu-faults ecc
 *   hmmgpu-faults unplug [--vram-seed N]
 *   options of all: [-d DEV] (default /dev/hmm_dmirror0)
 *
 * irq checks catalogue entry 5: data rounds with command interrupts dropped,
 * then late, then across a stalled command queue (the driver polls, then
 * resets the device after its command timeout); data kept in VRAM across
 * the reset reads back intact.
 * reset flr|aer checks entry 7: with data in both kinds of VRAM, a PCI
 * function reset through sysfs (flr), or AER errors (aer: correctable and
 * non-fatal change nothing, a fatal one resets the bus): reset_prepare
 * evicts everything, every byte reads back intact, the device works after.
 *
 * copy-error asks the host to inject faults at precise points: the
 * program prints
 *     HMMGPU-INJECT-REQUEST gpu=0 {FAULT JSON}
 * on the console and reads the host's answer from its stdin (the console):
 *     HMMGPU-INJECT-REPLY ok {backend reply}     or
 *     HMMGPU-INJECT-REPLY error MESSAGE
 * The fault is armed when the reply arrives.
 *
 * copy-error checks catalogue entry 1 (copy-engine errors):
 *   1. MIGRATE_TO_DEV whose 17th copy (range) fails: the ioctl fails with
 *      EIO, the pages of the first 16 ranges are in device memory, the rest
 *      stayed in system memory, every byte is intact; a retry migrates
 *      everything.
 *   2. A CPU fault (migrate_to_ram) whose copy fails: a forked child touching
 *      the page dies of SIGBUS; the parent's data (that page included) is
 *      intact afterwards.
 *   3. MIGRATE_TO_SYS while the next copy fails: EIO, the pages stay in
 *      device memory; a retry brings them back intact.
 *   4. MIGRATE_TO_DEV of a 2 MiB THP whose (single, 2 MiB) copy fails: EIO,
 *      the whole THP stays in system memory intact; a retry moves it.
 * data runs rounds of a checksummed workload (device READ through device
 * faults, MIGRATE_TO_DEV, SNAPSHOT, CPU read back through migrate_to_ram,
 * device WRITE); --min-migrate-ms fails a round whose MIGRATE_TO_DEV was
 * faster (to show injected latency/bandwidth limits took effect).
 * storm is run while the host's fault plan posts FAULT events after every
 * device command (a fault storm on this context, ctx 1: the first one
 * opened, cycling over the pages it maps; spurious events on an unused
 * context): it maps a buffer on the device, runs data rounds (with device
 * READs of that buffer) until the driver's FAULT event counter has been
 * still for a round, waits until it is still for a second, checks the data
 * and that the device still works, and prints the driver's counters.
 *
 * loss checks catalogue entries 9 (kill: the backend process is killed, a
 * surprise loss) and 4 (link: the VRAM BAR's link goes down, QEMU's
 * link-down property), with 2 MiB in device-private VRAM (P), 2 MiB in
 * device-coherent VRAM (C, /dev/hmm_dmirror2) and 2 MiB in system memory
 * (S): the next ioctl fails with ENODEV (kill: after the driver's command
 * timeout), and so does the one after, at once; a child touching P dies of
 * SIGBUS; C reads intact (kill: the BAR still maps the VRAM) or all-ones
 * (link: as real hardware reads a failed link); S is intact; rmmod hmmgpu
 * works; afterwards a child touching P dies of SIGBUS (its page was
 * poisoned: the data went with the device), C is intact (kill: the CPU
 * copied it out) or a child touching it dies of SIGBUS (link), S is intact.
 *
 * mce checks catalogue entry 10: 2 MiB in device-coherent VRAM
 * (/dev/hmm_dmirror2), then a machine check (an action-optional uncorrected
 * memory error) at the BAR address of one of its pages, found in
 * /proc/self/pagemap: a child touching that page dies of SIGBUS (within
 * 20 s: the kernel handles the error asynchronously), the driver retired
 * the VRAM page, every other page reads intact, the device still migrates
 * and reads data, rmmod works.
 *
 * ecc checks catalogue entry 3, VRAM ECC errors, each asked of the host at
 * a VRAM offset found from /proc/self/pagemap (a device-private page shows
 * as a swap entry whose offset is its pfn) and the driver's debugfs `vram`
 * file: (1) in a free page: retired, 4 KiB less free VRAM; (2) in a page of
 * 2 MiB of device-private 4 KiB pages: a child touching that page dies of
 * SIGBUS, the other 511 read intact; (3) in a subpage of a device-private
 * 2 MiB THP: the same; (4) in a page of 2 MiB of device-coherent VRAM: the
 * same (SIGBUS within 20 s); (5) in the driver's link canary page: the
 * canary moves. Each time driver_retired_pages counts the page. Then, with
 * every buffer gone, the free VRAM is all of it but the retired pages (and
 * the canary), and a migration of a buffer as large as each half of the
 * VRAM (the test boots with a small one) puts exactly the free pages in
 * VRAM, none of them retired, every byte intact; rmmod works.
 *
 * unplug checks catalogue entry 8 (an orderly hot-unplug, QEMU's device_del,
 * then device_add): a 2 MiB THP (P1) and 1 MiB of 4 KiB pages (P2) in
 * device-private VRAM, 2 MiB in device-coherent VRAM (C), 2 MiB in system
 * memory (S), and a forked child that inherited them. After the unplug (the
 * host answers once QEMU deleted the device, i.e. after the driver's
 * removal evicted the VRAM): the uAPI device nodes and the PCI function are
 * gone, ioctls on the files still open fail with ENODEV, /proc/self/pagemap
 * shows every page of P1, P2 and C present in system RAM before anything
 * touches them (C's pages no longer in the BAR), and every byte is intact,
 * in this process and in the child. Then the plug: /dev/hmm_dmirror0 and 2
 * come back (within 60 s), fresh buffers migrate to both kinds of VRAM and
 * back with every byte checked, and the old buffers are still intact. With
 * --vram-seed N, 4 MiB of the pattern of seed N is left in the re-plugged
 * device's private VRAM at exit (HMMGPU-VRAM-PATTERN line, as
 * hmmgpu-demo --leave-in-vram does), so the host can find it in the VRAM
 * file it gave the device at boot.
 *
 * The pattern is ci/guest/pattern.h's (xorshift64).
 * Exit status: 0 all checks passed, 1 a check failed, 2 usage error, 3 the
 * injection handshake with the host failed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <dirent.h>
#include <time.h>
#include <unistd.h>

#include "test_hmm_uapi.h"
#include "pattern.h"

#define PAGE_SZ 4096UL
#define PROT_KIND_MASK 0xF0
#define TAG "hmmgpu-faults: "

static const char *dev_path = "/dev/hmm_dmirror0";
static int failures;

static double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void say(const char *fmt, ...)
{
	va_list ap;

	printf(TAG);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
}

/* Records a failed check. */
static void fail(const char *fmt, ...)
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

static void check(bool ok, const char *what)
{
	if (ok)
		say("PASS: %s", what);
	else
		fail("%s", what);
}

/* Touches every byte; returns whether all match the pattern of seed. */
static bool pattern_ok(const void *buf, size_t size, uint64_t seed, const char *what)
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

static void *map_buffer(size_t size, bool nohuge)
{
	void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED) {
		say("mmap %zu bytes: %s", size, strerror(errno));
		exit(1);
	}
	if (nohuge && madvise(p, size, MADV_NOHUGEPAGE)) {
		say("madvise(MADV_NOHUGEPAGE): %s", strerror(errno));
		exit(1);
	}
	return p;
}

/* One dmirror ioctl; returns 0 or the errno. */
static int dmirror(int fd, unsigned long req, void *addr, void *ptr, size_t npages,
		   struct hmm_dmirror_cmd *out)
{
	struct hmm_dmirror_cmd cmd;
	int ret;

	do {
		memset(&cmd, 0, sizeof(cmd));
		cmd.addr = (uintptr_t)addr;
		cmd.ptr = (uintptr_t)ptr;
		cmd.npages = npages;
		ret = ioctl(fd, req, &cmd);
	} while (ret && errno == EINTR);
	if (out)
		*out = cmd;
	return ret ? errno : 0;
}

/*
 * Counts the pages of buf that SNAPSHOT on fd shows with the kind `kind`
 * (HMM_DMIRROR_PROT_*); *pmd (if not NULL): whether the first is PMD-mapped.
 */
static size_t pages_of_kind(int fd, void *buf, size_t npages, uint8_t kind, bool *pmd)
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
		if (perm[i] != HMM_DMIRROR_PROT_ERROR && (perm[i] & PROT_KIND_MASK) == kind)
			n++;
	if (pmd)
		*pmd = perm[0] != HMM_DMIRROR_PROT_ERROR && (perm[0] & HMM_DMIRROR_PROT_PMD);
	free(perm);
	return n;
}

/* Counts the pages of buf that SNAPSHOT shows in this device's private memory. */
static size_t device_pages(int fd, void *buf, size_t npages)
{
	return pages_of_kind(fd, buf, npages, HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL, NULL);
}

/* A counter of /sys/kernel/debug/hmmgpu0/counters (device's and driver's). */
static uint64_t counter(const char *name)
{
	FILE *f = fopen("/sys/kernel/debug/hmmgpu0/counters", "r");
	char key[64];
	uint64_t v, found = UINT64_MAX;

	if (!f) {
		fail("open /sys/kernel/debug/hmmgpu0/counters: %s", strerror(errno));
		return UINT64_MAX;
	}
	while (fscanf(f, "%63s %" SCNu64, key, &v) == 2)
		if (!strcmp(key, name))
			found = v;
	fclose(f);
	if (found == UINT64_MAX)
		fail("no counter %s in /sys/kernel/debug/hmmgpu0/counters", name);
	return found;
}

static void print_counters(void)
{
	FILE *f = fopen("/sys/kernel/debug/hmmgpu0/counters", "r");
	char line[128];

	if (!f)
		return;
	while (fgets(line, sizeof(line), f))
		printf(TAG "counter %s", line);
	fclose(f);
	fflush(stdout);
}

/*
 * Ends a mode: prints its verdict (the tests look for "PASS: MODE" or
 * "PASS: MODE (ARG)") and returns the exit status.
 */
static int verdict(const char *mode, const char *arg)
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

/* Asks the host to inject `fault` (JSON) into GPU 0; exits 3 if it did not. */
static void inject(const char *fault)
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

static int open_dev(void)
{
	int fd = open(dev_path, O_RDWR | O_CLOEXEC);

	if (fd < 0) {
		say("FAIL: open %s: %s", dev_path, strerror(errno));
		exit(1);
	}
	return fd;
}

/* Catalogue entry 1. */
static int run_copy_error(void)
{
	const size_t na = 256, nb = 64, nc = 128;
	uint8_t *a = map_buffer(na * PAGE_SZ, true), *b = map_buffer(nb * PAGE_SZ, true);
	uint8_t *c = map_buffer(nc * PAGE_SZ, true), *out = map_buffer(na * PAGE_SZ, false);
	struct hmm_dmirror_cmd cmd;
	uint64_t errors0;
	size_t ndev;
	int fd = open_dev(), e, status;
	pid_t pid;

	errors0 = counter("driver_copy_errors");

	say("[1] migration to VRAM whose 17th copy fails (%zu pages)", na);
	fill_pattern(a, na * PAGE_SZ, 11);
	/* 16 ranges (one or more pages each) go through, the 17th fails. */
	inject("{\"kind\":\"copy_error\",\"count\":1,\"skip\":16}");
	e = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_DEV, a, out, na, NULL);
	say("  HMM_DMIRROR_MIGRATE_TO_DEV: %s", e ? strerror(e) : "ok");
	check(e == EIO, "MIGRATE_TO_DEV reports the copy error with EIO");
	ndev = device_pages(fd, a, na);
	say("  after it: %zu pages in device memory, %zu in system memory", ndev, na - ndev);
	check(ndev < na, "the pages whose copy failed stayed in system memory");
	check(ndev > 0 && ndev != (size_t)-1, "the pages copied before the failure moved to device memory");
	check(counter("driver_copy_errors") == errors0 + 1, "the driver counted one COPY_ERROR");
	check(pattern_ok(a, na * PAGE_SZ, 11, "buffer A"), "every byte of A is intact (CPU reads all)");
	e = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_DEV, a, out, na, &cmd);
	check(!e && cmd.cpages == na, "a retry without the fault migrates every page");
	check(device_pages(fd, a, na) == na, "SNAPSHOT: all of A is in device memory");
	check(pattern_ok(out, na * PAGE_SZ, 11, "A read by the device"),
	      "the device reads A back intact");

	say("[2] CPU fault (migrate_to_ram) whose copy fails, in a forked child");
	fill_pattern(b, nb * PAGE_SZ, 22);
	e = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_DEV, b, out, nb, &cmd);
	check(!e && cmd.cpages == nb && device_pages(fd, b, nb) == nb, "B is in device memory");
	inject("{\"kind\":\"copy_error\",\"count\":1}");
	pid = fork();
	if (pid < 0) {
		fail("fork: %s", strerror(errno));
	} else if (pid == 0) {
		volatile uint8_t v = b[5 * PAGE_SZ + 7];

		printf(TAG "child: read 0x%02x from a page whose copy should have failed\n", v);
		fflush(stdout);
		_exit(0);
	} else {
		if (waitpid(pid, &status, 0) != pid)
			fail("waitpid: %s", strerror(errno));
		if (WIFSIGNALED(status))
			say("  child killed by signal %d (%s)", WTERMSIG(status), strsignal(WTERMSIG(status)));
		else
			say("  child exited with status %d", WEXITSTATUS(status));
		check(WIFSIGNALED(status) && WTERMSIG(status) == SIGBUS,
		      "the child touching the page got SIGBUS");
		check(counter("driver_copy_errors") == errors0 + 2, "the driver counted a second COPY_ERROR");
		check(device_pages(fd, b, nb) == nb, "the page stayed in device memory (B all there)");
		check(pattern_ok(b, nb * PAGE_SZ, 22, "buffer B"), "the parent reads all of B intact");
		check(pattern_ok(a, na * PAGE_SZ, 11, "buffer A"), "the parent's other data (A) is intact");
	}

	say("[3] HMM_DMIRROR_MIGRATE_TO_SYS whose copy fails (%zu pages)", nc);
	fill_pattern(c, nc * PAGE_SZ, 33);
	e = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_DEV, c, out, nc, &cmd);
	check(!e && cmd.cpages == nc && device_pages(fd, c, nc) == nc, "C is in device memory");
	inject("{\"kind\":\"copy_error\",\"count\":1}");
	e = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_SYS, c, NULL, nc, NULL);
	say("  HMM_DMIRROR_MIGRATE_TO_SYS: %s", e ? strerror(e) : "ok");
	check(e == EIO, "MIGRATE_TO_SYS reports the copy error with EIO");
	check(device_pages(fd, c, nc) == nc, "every page of C stayed in device memory");
	check(counter("driver_copy_errors") == errors0 + 3, "the driver counted a third COPY_ERROR");
	e = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_SYS, c, NULL, nc, &cmd);
	check(!e && cmd.cpages == nc, "a retry migrates every page back");
	check(device_pages(fd, c, nc) == 0, "SNAPSHOT: none of C is in device memory");
	check(pattern_ok(c, nc * PAGE_SZ, 33, "buffer C"), "every byte of C is intact");

	say("[4] migration of a THP to VRAM whose copy fails");
	{
		const size_t nh = 512, huge = nh * PAGE_SZ;
		uint8_t *raw = map_buffer(2 * huge, false), *h;
		uint8_t prot = 0;

		h = (uint8_t *)(((uintptr_t)raw + huge - 1) & ~(uintptr_t)(huge - 1));
		if (madvise(h, huge, MADV_HUGEPAGE))
			say("  madvise(MADV_HUGEPAGE): %s", strerror(errno));
		fill_pattern(h, huge, 44);
		dmirror(fd, HMM_DMIRROR_SNAPSHOT, h, &prot, 1, NULL);
		say("  page 0 before: snapshot 0x%02x (%s)", prot,
		    prot & HMM_DMIRROR_PROT_PMD ? "a PMD-mapped THP" : "not a THP");
		inject("{\"kind\":\"copy_error\",\"count\":1}");
		e = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_DEV, h, out, nh, NULL);
		say("  HMM_DMIRROR_MIGRATE_TO_DEV: %s", e ? strerror(e) : "ok");
		check(e == EIO, "MIGRATE_TO_DEV reports the copy error with EIO");
		check(device_pages(fd, h, nh) == 0, "the whole THP stayed in system memory");
		check(counter("driver_copy_errors") == errors0 + 4, "the driver counted a fourth COPY_ERROR");
		check(pattern_ok(h, huge, 44, "THP"), "every byte of the THP is intact");
		e = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_DEV, h, out, nh, &cmd);
		check(!e && cmd.cpages == nh && device_pages(fd, h, nh) == nh,
		      "a retry moves the whole THP to device memory");
		check(pattern_ok(out, huge, 44, "THP read by the device"), "the device reads it intact");
		check(pattern_ok(h, huge, 44, "THP"), "the CPU reads it back intact");
	}
	close(fd);
	return failures ? 1 : 0;
}

/*
 * One round of the checksummed workload on a fresh buffer; returns the
 * MIGRATE_TO_DEV time in ms, or -1 after a failure (reported).
 */
static double data_round(int fd, size_t size, uint64_t seed, bool nohuge)
{
	size_t npages = size / PAGE_SZ;
	uint8_t *buf = map_buffer(size, nohuge), *out = map_buffer(size, false);
	struct hmm_dmirror_cmd cmd;
	int before = failures, e;
	double t, ms;

	fill_pattern(buf, size, seed);
	e = dmirror(fd, HMM_DMIRROR_READ, buf, out, npages, &cmd);
	if (e || cmd.cpages != npages || !pattern_ok(out, size, seed, "device READ"))
		fail("round %" PRIu64 ": device READ of system memory (%s)", seed, e ? strerror(e) : "data");
	t = now_ms();
	e = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, out, npages, &cmd);
	ms = now_ms() - t;
	if (e || cmd.cpages != npages || !pattern_ok(out, size, seed, "migrated data"))
		fail("round %" PRIu64 ": MIGRATE_TO_DEV (%s, cpages %" PRIu64 ")", seed,
		     e ? strerror(e) : "data", (uint64_t)cmd.cpages);
	if (device_pages(fd, buf, npages) != npages)
		fail("round %" PRIu64 ": not every page is in device memory", seed);
	if (!pattern_ok(buf, size, seed, "CPU read back"))
		fail("round %" PRIu64 ": CPU read back through migrate_to_ram", seed);
	fill_pattern(out, size, seed + 1000);
	e = dmirror(fd, HMM_DMIRROR_WRITE, buf, out, npages, &cmd);
	if (e || !pattern_ok(buf, size, seed + 1000, "device WRITE"))
		fail("round %" PRIu64 ": device WRITE (%s)", seed, e ? strerror(e) : "data");
	munmap(buf, size);
	munmap(out, size);
	return failures == before ? ms : -1;
}

static int run_data(unsigned int rounds, size_t size, uint64_t seed, bool nohuge, double min_ms)
{
	int fd = open_dev();
	unsigned int r;

	for (r = 0; r < rounds; r++) {
		double ms = data_round(fd, size, seed + r, nohuge);

		if (ms < 0)
			continue;
		say("round %u: %zu bytes verified; MIGRATE_TO_DEV took %.1f ms", r, size, ms);
		if (ms < min_ms)
			fail("round %u: MIGRATE_TO_DEV took %.1f ms, less than the %.1f ms the injected limits imply",
			     r, ms, min_ms);
	}
	close(fd);
	if (!failures)
		say("PASS: %u rounds of %zu bytes, every byte verified", rounds, size);
	return failures ? 1 : 0;
}

/* FAULT events the driver received that no device fault raised (injected). */
static uint64_t injected_events(void)
{
	return counter("driver_fault_events") - counter("faults");
}

/* Catalogue entry 6. */
static int run_storm(size_t size)
{
	const size_t np = 512;
	uint8_t *p = map_buffer(np * PAGE_SZ, true), *out = map_buffer(np * PAGE_SZ, false);
	uint64_t ev0, sp0, ev, last, seen_during = 0;
	unsigned int r = 0;
	struct hmm_dmirror_cmd cmd;
	double t0, t;
	int fd = open_dev(), e;

	/* Mapped on the device, so the storm cycles over these addresses. */
	fill_pattern(p, np * PAGE_SZ, 77);
	e = dmirror(fd, HMM_DMIRROR_READ, p, out, np, &cmd);
	check(!e && pattern_ok(out, np * PAGE_SZ, 77, "P"), "P is mapped on the device");
	ev0 = injected_events();
	sp0 = counter("driver_spurious_faults");
	t0 = now_ms();
	last = ev0;
	/*
	 * Rounds until the injected events have stopped for a round (at least 3
	 * rounds); the rounds' own device faults are events too, not counted.
	 */
	while (r < 200) {
		uint64_t before = injected_events();

		if (data_round(fd, size, 500 + r, false) < 0)
			break;
		e = dmirror(fd, HMM_DMIRROR_READ, p, out, np, &cmd);
		if (e || !pattern_ok(out, np * PAGE_SZ, 77, "P"))
			fail("round %u: device READ of P (%s)", r, e ? strerror(e) : "data");
		ev = injected_events();
		seen_during += ev - before;
		r++;
		if (ev == last && r >= 3)
			break;
		last = ev;
	}
	t = now_ms();
	say("%u workload rounds in %.0f ms; %" PRIu64 " injected FAULT events arrived during them", r, t - t0,
	    seen_during);
	/* Wait for the storm's end: the counter still for a second. */
	do {
		last = injected_events();
		usleep(1000 * 1000);
	} while (injected_events() != last && now_ms() - t < 120000);
	ev = injected_events();
	say("injected FAULT events received +%" PRIu64 ", driver_spurious_faults +%" PRIu64, ev - ev0,
	    counter("driver_spurious_faults") - sp0);
	check(seen_during > 0, "FAULT events arrived while the workload ran");
	check(counter("driver_spurious_faults") > sp0, "the driver counted spurious FAULT events");
	check(pattern_ok(p, np * PAGE_SZ, 77, "P (CPU)"), "P is intact");
	t = now_ms();
	e = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_DEV, p, out, np, &cmd);
	check(!e && cmd.cpages == np && device_pages(fd, p, np) == np,
	      "the device still migrates after the storm");
	say("a 2 MiB migration after the storm took %.1f ms", now_ms() - t);
	print_counters();
	close(fd);
	return failures ? 1 : 0;
}

/* Forks a child that reads one byte of p; returns the signal that killed it (0: none). */
static int touch_in_child(const volatile uint8_t *p)
{
	int status;
	pid_t pid = fork();

	if (pid < 0) {
		fail("fork: %s", strerror(errno));
		return -1;
	}
	if (pid == 0) {
		uint8_t v = *p;

		printf(TAG "child: read 0x%02x\n", v);
		fflush(stdout);
		_exit(0);
	}
	if (waitpid(pid, &status, 0) != pid) {
		fail("waitpid: %s", strerror(errno));
		return -1;
	}
	return WIFSIGNALED(status) ? WTERMSIG(status) : 0;
}

static bool all_ones(const uint8_t *p, size_t size)
{
	size_t i;

	for (i = 0; i < size; i++)
		if (p[i] != 0xff)
			return false;
	return true;
}

/* /proc/self/pagemap's fields (Documentation/admin-guide/mm/pagemap.rst). */
#define PM_PRESENT (1ULL << 63)
#define PM_SWAP (1ULL << 62)
#define PM_PFRAME_MASK ((1ULL << 55) - 1)
/* A swap entry's frame is its type in the low 5 bits, then its offset. */
#define PM_SWAP_TYPE_BITS 5

/* The pagemap entry of the page at va (root reads PFNs), or 0. */
static uint64_t pagemap_entry(const void *va)
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

/* The physical address of the page at va, or 0 if it is not present. */
static uint64_t phys_of(const void *va)
{
	uint64_t entry = pagemap_entry(va);

	if (!(entry & PM_PRESENT))
		return 0;
	return (entry & PM_PFRAME_MASK) * PAGE_SZ;
}

/*
 * The pfn of the page at va, present or a device-private entry (pagemap
 * reports those as swap entries whose offset is the pfn, see
 * fs/proc/task_mmu.c), or 0.
 */
static uint64_t pfn_of(const void *va)
{
	uint64_t entry = pagemap_entry(va);

	if (entry & PM_PRESENT)
		return entry & PM_PFRAME_MASK;
	if (entry & PM_SWAP)
		return (entry & PM_PFRAME_MASK) >> PM_SWAP_TYPE_BITS;
	return 0;
}

/* Catalogue entry 10. */
static int run_mce(void)
{
	const size_t n = 512, size = n * PAGE_SZ, bad = 5;
	uint8_t *c = map_buffer(size, false), *want = map_buffer(size, false);
	uint8_t *s = map_buffer(size, false), *out = map_buffer(size, false);
	struct hmm_dmirror_cmd cmd;
	char fault[128];
	uint64_t pa, retired0;
	int fd, e, sig = 0, tries;
	size_t i, mismatched = 0;

	dev_path = "/dev/hmm_dmirror2";
	fd = open_dev();
	retired0 = counter("driver_retired_pages");
	fill_pattern(c, size, 94);
	memcpy(want, c, size);
	e = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_DEV, c, out, n, &cmd);
	check(!e && cmd.cpages == n, "C migrated to device-coherent VRAM");
	pa = phys_of(c + bad * PAGE_SZ);
	say("  page %zu of C is at physical address %#" PRIx64, bad, pa);
	check(pa != 0, "its physical address is known (pagemap)");
	if (!pa)
		return 1;
	snprintf(fault, sizeof(fault), "{\"kind\":\"mce\",\"addr\":%" PRIu64 "}", pa);
	inject(fault);
	for (tries = 0; tries < 200; tries++) {
		sig = touch_in_child(c + bad * PAGE_SZ + 9);
		if (sig == SIGBUS)
			break;
		usleep(100 * 1000);
	}
	say("  a child touching the page: %s after %d tries", sig == SIGBUS ? "SIGBUS" : "no signal", tries + 1);
	check(sig == SIGBUS, "a child touching the page with the machine check dies of SIGBUS");
	check(counter("driver_retired_pages") == retired0 + 1, "the driver retired the VRAM page");
	for (i = 0; i < n; i++)
		if (i != bad && memcmp(c + i * PAGE_SZ, want + i * PAGE_SZ, PAGE_SZ))
			mismatched++;
	check(mismatched == 0, "every other page of C reads intact");
	fill_pattern(s, size, 95);
	e = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_DEV, s, out, n, &cmd);
	check(!e && cmd.cpages == n && pattern_ok(out, size, 95, "S read by the device"),
	      "the device still migrates and reads data");
	close(fd);
	check(system("rmmod hmmgpu") == 0, "rmmod hmmgpu succeeds");
	check(pattern_ok(s, size, 95, "buffer S"), "after rmmod, S is intact");
	return verdict("mce", NULL);
}

/* One half of the VRAM, from /sys/kernel/debug/hmmgpu0/vram. */
struct vram_half {
	uint64_t base, size, pfn_first, free, retired;
};

struct vram_info {
	struct vram_half private, coherent;
	uint64_t canary;	/* VRAM offset of the link canary; UINT64_MAX: none */
};

/* Reads the driver's VRAM layout and accounting; exits on failure. */
static struct vram_info vram_info(void)
{
	FILE *f = fopen("/sys/kernel/debug/hmmgpu0/vram", "r");
	struct vram_info v = { .canary = UINT64_MAX };
	char line[256], name[16];
	int halves = 0;

	if (!f) {
		say("FAIL: open /sys/kernel/debug/hmmgpu0/vram: %s", strerror(errno));
		exit(1);
	}
	while (fgets(line, sizeof(line), f)) {
		struct vram_half h;

		if (sscanf(line, "%15s base %" SCNx64 " size %" SCNx64 " pfn_first %" SCNx64 " free %" SCNx64
			   " retired %" SCNu64, name, &h.base, &h.size, &h.pfn_first, &h.free, &h.retired) == 6) {
			if (!strcmp(name, "private"))
				v.private = h, halves++;
			else if (!strcmp(name, "coherent"))
				v.coherent = h, halves++;
		} else {
			sscanf(line, "canary %" SCNx64, &v.canary);
		}
	}
	fclose(f);
	if (halves != 2) {
		say("FAIL: /sys/kernel/debug/hmmgpu0/vram does not describe both halves of the VRAM");
		exit(1);
	}
	return v;
}

/* The VRAM offset of the page at va (in device memory), or UINT64_MAX. */
static uint64_t vram_offset_of(const struct vram_info *v, const void *va)
{
	const struct vram_half *halves[] = { &v->private, &v->coherent };
	uint64_t pfn = pfn_of(va);
	size_t i;

	for (i = 0; pfn && i < 2; i++) {
		const struct vram_half *h = halves[i];

		if (h->pfn_first && pfn >= h->pfn_first && pfn < h->pfn_first + h->size / PAGE_SZ)
			return h->base + (pfn - h->pfn_first) * PAGE_SZ;
	}
	return UINT64_MAX;
}

/*
 * Asks the host for an ECC error at VRAM byte `offset` and waits (up to
 * 20 s) until the driver counts it handled.
 */
static bool inject_ecc(uint64_t offset, unsigned int bit)
{
	uint64_t before = counter("driver_ecc_events");
	char fault[128];
	double t0;

	snprintf(fault, sizeof(fault), "{\"kind\":\"ecc\",\"offset\":%" PRIu64 ",\"bit\":%u}", offset, bit);
	inject(fault);
	t0 = now_ms();
	while (counter("driver_ecc_events") == before) {
		if (now_ms() - t0 > 20000) {
			fail("the driver did not handle the ECC event within 20 s");
			return false;
		}
		usleep(10 * 1000);
	}
	say("  the driver handled the ECC event after %.0f ms", now_ms() - t0);
	return true;
}

/* Whether pages [0, n) of buf, except page skip, match the copy in want. */
static bool pages_intact(const uint8_t *buf, const uint8_t *want, size_t n, size_t skip, const char *what)
{
	size_t i, bad = 0;

	for (i = 0; i < n; i++)
		if (i != skip && memcmp(buf + i * PAGE_SZ, want + i * PAGE_SZ, PAGE_SZ)) {
			if (bad < 3)
				say("  %s: page %zu differs", what, i);
			bad++;
		}
	if (bad)
		say("  %s: %zu of %zu pages differ", what, bad, n - 1);
	return bad == 0;
}

/* Fills the VRAM offsets of the n pages at buf; returns how many it found. */
static size_t vram_offsets(const struct vram_info *v, const uint8_t *buf, size_t n, uint64_t *offsets)
{
	size_t i, found = 0;

	for (i = 0; i < n; i++) {
		offsets[i] = vram_offset_of(v, buf + i * PAGE_SZ);
		if (offsets[i] == UINT64_MAX && i == found)
			say("  page %zu at %p: pagemap entry %#" PRIx64 " is not a VRAM page", i,
			    (void *)(buf + i * PAGE_SZ), pagemap_entry(buf + i * PAGE_SZ));
		found += offsets[i] != UINT64_MAX;
	}
	return found;
}

/*
 * A buffer of n pages with pattern seed, migrated to the device `fd`
 * belongs to, with a copy of its data in *want; every page checked to be in
 * VRAM (its offsets in offsets[]).
 */
static uint8_t *vram_buffer(int fd, const struct vram_info *v, size_t n, uint64_t seed, bool huge,
			    uint8_t **want, uint64_t *offsets, const char *what)
{
	size_t size = n * PAGE_SZ;
	uint8_t *raw = map_buffer(huge ? 2 * size : size, !huge), *buf = raw;
	uint8_t *out = map_buffer(size, false);
	struct hmm_dmirror_cmd cmd;
	char msg[128];
	int e;

	if (huge) {
		buf = (uint8_t *)(((uintptr_t)raw + size - 1) & ~(uintptr_t)(size - 1));
		if (madvise(buf, size, MADV_HUGEPAGE))
			say("  madvise(MADV_HUGEPAGE): %s", strerror(errno));
	}
	fill_pattern(buf, size, seed);
	*want = map_buffer(size, false);
	memcpy(*want, buf, size);
	e = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, out, n, &cmd);
	snprintf(msg, sizeof(msg), "%s (%zu pages) migrated to VRAM and read back by the device", what, n);
	/* Against the copy: reading buf would bring device-private pages back. */
	check(!e && cmd.cpages == n && !memcmp(out, *want, size), msg);
	snprintf(msg, sizeof(msg), "pagemap gives the VRAM offset of every page of %s", what);
	check(vram_offsets(v, buf, n, offsets) == n, msg);
	munmap(out, size);
	return buf;
}

/*
 * Migrates a buffer as large as one half of the VRAM (`half`) to the
 * device behind fd, which is only as large as the free VRAM allows, and
 * checks that exactly the free pages were used, none of them one of the
 * `nbad` retired pages, and that every byte is intact.
 */
static void fill_vram(int fd, const struct vram_info *v, const struct vram_half *half, const uint64_t *bad,
		      size_t nbad, uint64_t seed, const char *what)
{
	size_t n = half->size / PAGE_SZ, size = half->size, in_vram = 0, on_bad = 0, i, j;
	uint8_t *buf = map_buffer(size, true), *out = map_buffer(size, false);
	uint64_t *offsets = calloc(n, sizeof(uint64_t));
	char msg[200];
	int e;

	if (!offsets)
		exit(1);
	fill_pattern(buf, size, seed);
	e = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, out, n, NULL);
	/* ENOENT: pages left in system memory (no VRAM for them), as test_hmm. */
	say("  MIGRATE_TO_DEV of %zu pages (all of the %s VRAM): %s", n, what, e ? strerror(e) : "ok");
	for (i = 0; i < n; i++) {
		offsets[i] = vram_offset_of(v, buf + i * PAGE_SZ);
		if (offsets[i] == UINT64_MAX)
			continue;
		in_vram++;
		for (j = 0; j < nbad; j++)
			on_bad += offsets[i] == bad[j];
	}
	say("  %zu pages went to VRAM, %zu stayed in system memory; %zu on a retired page", in_vram, n - in_vram,
	    on_bad);
	snprintf(msg, sizeof(msg), "filling the %s VRAM uses every free page (%" PRIu64 ") and none of the %zu retired",
		 what, half->free / PAGE_SZ, nbad);
	check((e == 0 || e == ENOENT) && in_vram == half->free / PAGE_SZ && on_bad == 0, msg);
	snprintf(msg, sizeof(msg), "every byte of the %s fill is intact", what);
	check(pattern_ok(buf, size, seed, what), msg);
	munmap(buf, size);
	munmap(out, size);
	free(offsets);
}

/* Catalogue entry 3. */
static int run_ecc(void)
{
	const size_t n = 512, size = n * PAGE_SZ;
	uint64_t *offs_p = calloc(n, sizeof(uint64_t)), *offs_h = calloc(n, sizeof(uint64_t));
	uint64_t *offs_c = calloc(n, sizeof(uint64_t));
	uint64_t events0, retired0, free_p0, free_c0, bad_private[3], bad_coherent[3];
	uint8_t *p, *h, *c, *want_p, *want_h, *want_c;
	struct vram_info v;
	size_t i, k, contiguous = 0;
	int fdp, fdc, sig, tries;
	uint8_t prot = 0;
	char msg[160];

	if (!offs_p || !offs_h || !offs_c)
		exit(1);
	fdp = open_dev();
	dev_path = "/dev/hmm_dmirror2";
	fdc = open_dev();
	v = vram_info();
	events0 = counter("driver_ecc_events");
	retired0 = counter("driver_retired_pages");
	free_p0 = v.private.free;
	free_c0 = v.coherent.free;
	say("VRAM: private %#" PRIx64 "+%#" PRIx64 " (pfns from %#" PRIx64 ", %#" PRIx64 " free), coherent %#" PRIx64
	    "+%#" PRIx64 " (pfns from %#" PRIx64 ", %#" PRIx64 " free), link canary at %#" PRIx64,
	    v.private.base, v.private.size, v.private.pfn_first, v.private.free, v.coherent.base, v.coherent.size,
	    v.coherent.pfn_first, v.coherent.free, v.canary);

	say("[1] an ECC error in a free VRAM page");
	bad_private[0] = v.private.base + v.private.size - PAGE_SZ;
	if (!inject_ecc(bad_private[0] + 17, 2))
		return 1;
	v = vram_info();
	check(counter("driver_retired_pages") == retired0 + 1, "driver_retired_pages counts the page");
	check(v.private.retired == 1 && v.private.free == free_p0 - PAGE_SZ,
	      "the page left the allocator (device-private free VRAM 4 KiB less)");

	say("[2] an ECC error in a device-private page in use (4 KiB pages)");
	p = vram_buffer(fdp, &v, n, 301, false, &want_p, offs_p, "P");
	k = 77;
	bad_private[1] = offs_p[k];
	say("  page %zu of P is at VRAM offset %#" PRIx64, k, bad_private[1]);
	if (!inject_ecc(bad_private[1] + 1234, 5))
		return 1;
	sig = touch_in_child(p + k * PAGE_SZ + 100);
	say("  a child touching page %zu: %s", k, sig ? strsignal(sig) : "no signal");
	check(sig == SIGBUS, "a child touching the corrupt page dies of SIGBUS");
	check(pages_intact(p, want_p, n, k, "P"), "the other 511 pages of P read intact");
	check(counter("driver_retired_pages") == retired0 + 2, "driver_retired_pages counts the page");
	v = vram_info();
	check(v.private.retired == 2 && v.private.free == free_p0 - 2 * PAGE_SZ,
	      "P's VRAM is free again (its pages came back), but for the corrupt page");

	say("[3] an ECC error in a 2 MiB THP in device-private VRAM");
	h = vram_buffer(fdp, &v, n, 303, true, &want_h, offs_h, "THP H");
	dmirror(fdp, HMM_DMIRROR_SNAPSHOT, h, &prot, 1, NULL);
	for (i = 1; i < n; i++)
		contiguous += offs_h[i] == offs_h[0] + i * PAGE_SZ;
	say("  H: device snapshot 0x%02x, VRAM %#" PRIx64 "..%#" PRIx64 " %s", prot, offs_h[0],
	    offs_h[n - 1] + PAGE_SZ, contiguous == n - 1 ? "(contiguous: a device THP)" : "(not contiguous)");
	check(contiguous == n - 1 && offs_h[0] % size == 0, "H is one 2 MiB VRAM block (a device THP)");
	k = 300;
	bad_private[2] = offs_h[k];
	if (!inject_ecc(bad_private[2] + 8, 0))
		return 1;
	sig = touch_in_child(h + k * PAGE_SZ + 5);
	say("  a child touching subpage %zu: %s", k, sig ? strsignal(sig) : "no signal");
	check(sig == SIGBUS, "a child touching the corrupt subpage dies of SIGBUS");
	check(pages_intact(h, want_h, n, k, "H"), "the other 511 subpages of H read intact");
	check(counter("driver_retired_pages") == retired0 + 3, "driver_retired_pages counts the page");

	say("[4] an ECC error in a device-coherent page in use");
	c = vram_buffer(fdc, &v, n, 304, false, &want_c, offs_c, "C");
	k = 200;
	bad_coherent[0] = offs_c[k];
	say("  page %zu of C is at VRAM offset %#" PRIx64, k, bad_coherent[0]);
	if (!inject_ecc(bad_coherent[0] + 4000, 7))
		return 1;
	/* The poisoning of its stand-in page is queued: poll, as for mce. */
	for (tries = 0; tries < 200; tries++) {
		sig = touch_in_child(c + k * PAGE_SZ + 9);
		if (sig == SIGBUS)
			break;
		usleep(100 * 1000);
	}
	say("  a child touching page %zu: %s after %d tries", k, sig ? strsignal(sig) : "no signal", tries + 1);
	check(sig == SIGBUS, "a child touching the corrupt page dies of SIGBUS");
	check(pages_intact(c, want_c, n, k, "C"), "the other 511 pages of C read intact");
	check(counter("driver_retired_pages") == retired0 + 4, "driver_retired_pages counts the page");

	say("[5] an ECC error in the driver's link canary page");
	v = vram_info();
	bad_coherent[1] = v.canary;
	check(v.canary != UINT64_MAX, "the driver has a link canary");
	if (v.canary != UINT64_MAX && !inject_ecc(v.canary + 3, 6))
		return 1;
	v = vram_info();
	bad_coherent[2] = v.canary;
	say("  the canary is at %#" PRIx64 " now", v.canary);
	check(v.canary != UINT64_MAX && v.canary != bad_coherent[1], "the canary moved to another page");
	check(counter("driver_retired_pages") == retired0 + 5, "driver_retired_pages counts the page");

	say("[6] all of the VRAM, once the buffers are gone");
	munmap(p, size);
	munmap(h, size);
	munmap(c, size);
	v = vram_info();
	say("  VRAM free: private %#" PRIx64 " of %#" PRIx64 ", coherent %#" PRIx64 " of %#" PRIx64,
	    v.private.free, v.private.size, v.coherent.free, v.coherent.size);
	snprintf(msg, sizeof(msg), "all VRAM is free again but the 3 + 2 retired pages (retired: private %" PRIu64
		 ", coherent %" PRIu64 ") and the canary", v.private.retired, v.coherent.retired);
	check(v.private.retired == 3 && v.coherent.retired == 2 && v.private.free == free_p0 - 3 * PAGE_SZ &&
	      v.coherent.free == free_c0 - 2 * PAGE_SZ, msg);
	fill_vram(fdp, &v, &v.private, bad_private, 3, 306, "device-private");
	/* The canary's page is in use, so it counts as a page not to get. */
	fill_vram(fdc, &v, &v.coherent, bad_coherent, 3, 307, "device-coherent");
	check(counter("driver_ecc_events") == events0 + 5 && counter("driver_ecc_dropped") == 0,
	      "the driver handled 5 ECC events and dropped none");
	print_counters();
	close(fdp);
	close(fdc);
	check(system("rmmod hmmgpu") == 0, "rmmod hmmgpu succeeds");
	return verdict("ecc", NULL);
}

/* Catalogue entries 9 (how = "kill") and 4 (how = "link"). */
static int run_loss(const char *how)
{
	const size_t n = 512, size = n * PAGE_SZ;
	bool link = !strcmp(how, "link");
	uint8_t *p = map_buffer(size, false), *c = map_buffer(size, false), *s = map_buffer(size, false);
	uint8_t *out = map_buffer(size, false);
	int fdp, fdc, e, sig, status;
	bool lost_ok = true;
	size_t i;
	struct hmm_dmirror_cmd cmd;
	double t0, t1;

	if (!link && strcmp(how, "kill")) {
		fprintf(stderr, "hmmgpu-faults: loss kill|link, not %s\n", how);
		exit(2);
	}
	fdp = open_dev();
	dev_path = "/dev/hmm_dmirror2";
	fdc = open_dev();
	fill_pattern(p, size, 91);
	fill_pattern(c, size, 92);
	fill_pattern(s, size, 93);
	e = dmirror(fdp, HMM_DMIRROR_MIGRATE_TO_DEV, p, out, n, &cmd);
	check(!e && cmd.cpages == n, "P migrated to device-private VRAM");
	e = dmirror(fdc, HMM_DMIRROR_MIGRATE_TO_DEV, c, out, n, &cmd);
	check(!e && cmd.cpages == n, "C migrated to device-coherent VRAM");

	inject(link ? "{\"kind\":\"link_down\",\"down\":true}" : "{\"kind\":\"kill_backend\"}");

	t0 = now_ms();
	e = dmirror(fdp, HMM_DMIRROR_MIGRATE_TO_DEV, s, out, n, NULL);
	t1 = now_ms();
	say("  MIGRATE_TO_DEV after the loss: %s after %.0f ms", e ? strerror(e) : "success", t1 - t0);
	check(e == ENODEV, "the first ioctl after the loss fails with ENODEV");
	t0 = now_ms();
	e = dmirror(fdc, HMM_DMIRROR_READ, c, out, n, NULL);
	t1 = now_ms();
	check(e == ENODEV && t1 - t0 < 1000, "the next one (the coherent device) fails with ENODEV at once");

	sig = touch_in_child(p + 3 * PAGE_SZ + 5);
	check(sig == SIGBUS, "a child touching P (its only copy in VRAM) dies of SIGBUS");
	if (link)
		check(all_ones(c, size), "C reads all-ones through the failed link");
	else
		check(pattern_ok(c, size, 92, "buffer C"), "C (device-coherent) reads intact");
	check(pattern_ok(s, size, 93, "buffer S"), "S (system memory) is intact");

	close(fdp);
	close(fdc);
	say("  rmmod hmmgpu");
	status = system("rmmod hmmgpu");
	check(status == 0, "rmmod hmmgpu succeeds");

	for (i = 0; i < n; i += 73) {
		if (touch_in_child(p + i * PAGE_SZ + 7) != SIGBUS)
			lost_ok = false;
		if (link && touch_in_child(c + i * PAGE_SZ + 7) != SIGBUS)
			lost_ok = false;
	}
	check(lost_ok, link ? "after rmmod, children touching 8 pages of P and of C each die of SIGBUS (poisoned)"
			    : "after rmmod, children touching 8 pages of P each die of SIGBUS (poisoned)");
	if (!link) {
		check(pattern_ok(c, size, 92, "buffer C"), "after rmmod, C is intact (copied out by the CPU)");
	}
	check(pattern_ok(s, size, 93, "buffer S"), "after rmmod, S is intact");
	return verdict("loss", how);
}

/* Catalogue entry 5: lost and late interrupts, a stalled queue. */
static int run_irq(void)
{
	const size_t size = 1 << 20, keep_size = 2 << 20;
	uint8_t *keep = map_buffer(keep_size, true), *out = map_buffer(keep_size, false);
	uint64_t polled0, resets0;
	struct hmm_dmirror_cmd cmd;
	double t, ms;
	int fd = open_dev(), e;

	polled0 = counter("driver_polled_completions");
	resets0 = counter("driver_resets");

	inject("{\"kind\":\"drop_interrupts\",\"count\":8}");
	ms = data_round(fd, size, 51, true);
	check(ms >= 0, "with 8 command interrupts dropped, a data round verifies every byte");
	say("  completions found by polling: %" PRIu64, counter("driver_polled_completions") - polled0);
	check(counter("driver_polled_completions") > polled0,
	      "the driver found the completions whose interrupt was dropped by polling");

	inject("{\"kind\":\"delay_interrupts\",\"ms\":600,\"count\":4}");
	ms = data_round(fd, size, 52, true);
	check(ms >= 0, "with 4 command interrupts 600 ms late, a data round verifies every byte");

	/* Data in VRAM before the stall must survive the reset that ends it. */
	fill_pattern(keep, keep_size, 53);
	e = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_DEV, keep, out, keep_size / PAGE_SZ, &cmd);
	check(!e && device_pages(fd, keep, keep_size / PAGE_SZ) == keep_size / PAGE_SZ,
	      "K (2 MiB) migrated to VRAM before the stall");
	inject("{\"kind\":\"stall_queue\"}");
	t = now_ms();
	ms = data_round(fd, size, 54, true);
	t = now_ms() - t;
	say("  the data round across the stall took %.0f ms", t);
	check(ms >= 0, "a data round across the stalled queue verifies every byte");
	check(t >= 9000, "it waited for the driver's command timeout (10 s)");
	check(counter("driver_resets") == resets0 + 1, "the driver reset the device once");
	check(pattern_ok(keep, keep_size, 53, "buffer K"), "K, in VRAM across the reset, reads back intact");
	check(data_round(fd, size, 55, false) >= 0, "after the reset the device works (a data round verifies)");
	print_counters();
	close(fd);
	return verdict("irq", NULL);
}

/* Writes "1" to the PCI reset file of the device hmmgpu is bound to. */
static bool pci_function_reset(void)
{
	char path[512], link[256];
	ssize_t n;
	int fd;

	/* /sys/bus/virtio/drivers/hmmgpu/virtioN -> .../0000:01:00.0/virtioN */
	fd = open("/sys/bus/virtio/drivers/hmmgpu", O_RDONLY | O_DIRECTORY);
	if (fd < 0) {
		fail("open /sys/bus/virtio/drivers/hmmgpu: %s", strerror(errno));
		return false;
	}
	close(fd);
	n = readlink("/sys/bus/virtio/drivers/hmmgpu/virtio0", link, sizeof(link) - 1);
	if (n < 0) {
		fail("readlink /sys/bus/virtio/drivers/hmmgpu/virtio0: %s", strerror(errno));
		return false;
	}
	link[n] = 0;
	snprintf(path, sizeof(path), "/sys/bus/virtio/drivers/hmmgpu/%s/../reset", link);
	fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0 || write(fd, "1", 1) != 1) {
		fail("reset through %s: %s", path, strerror(errno));
		if (fd >= 0)
			close(fd);
		return false;
	}
	close(fd);
	return true;
}

/* How many lines of the kernel log contain `needle`. */
static int dmesg_count(const char *needle)
{
	FILE *f = popen("dmesg", "r");
	char line[512];
	int n = 0;

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (strstr(line, needle))
			n++;
	pclose(f);
	return n;
}

/* Waits up to 30 s for the kernel log to have `count` lines with `needle`. */
static bool wait_dmesg(const char *needle, int count)
{
	double t = now_ms();

	while (dmesg_count(needle) < count) {
		if (now_ms() - t > 30000) {
			fail("the kernel did not log \"%s\" %d time(s) within 30 s", needle, count);
			return false;
		}
		usleep(100 * 1000);
	}
	return true;
}

/*
 * AER errors the guest recovers from without a reset: the driver notices
 * nothing, P stays in VRAM.
 */
static void aer_without_reset(int fdp, uint8_t *p, size_t np, uint64_t resets0)
{
	inject("{\"kind\":\"aer\",\"error\":\"correctable\"}");
	wait_dmesg("severity=Correctable", 1);
	check(counter("driver_resets") == resets0 && device_pages(fdp, p, np) == np,
	      "a correctable AER error is only logged: no reset, P still in VRAM");
	inject("{\"kind\":\"aer\",\"error\":\"nonfatal\"}");
	wait_dmesg("AER: device recovery successful", 1);
	check(counter("driver_resets") == resets0 && device_pages(fdp, p, np) == np,
	      "a non-fatal AER error is recovered without a reset: P still in VRAM");
}

/* Catalogue entry 7: a PCI function reset (flr) or AER errors (aer). */
static int run_reset(const char *how)
{
	const size_t np = 1024, nc = 512, ns = 256;
	uint8_t *p = map_buffer(np * PAGE_SZ, false), *c = map_buffer(nc * PAGE_SZ, true);
	uint8_t *s = map_buffer(ns * PAGE_SZ, false), *out = map_buffer(np * PAGE_SZ, false);
	bool aer = !strcmp(how, "aer");
	struct hmm_dmirror_cmd cmd;
	uint64_t resets0;
	int fdp, fdc, e, status;
	double t;
	pid_t pid;

	if (!aer && strcmp(how, "flr")) {
		fprintf(stderr, "hmmgpu-faults: reset flr|aer, not %s\n", how);
		exit(2);
	}
	fdp = open_dev();
	dev_path = "/dev/hmm_dmirror2";
	fdc = open_dev();
	fill_pattern(p, np * PAGE_SZ, 71);
	fill_pattern(c, nc * PAGE_SZ, 72);
	fill_pattern(s, ns * PAGE_SZ, 73);
	e = dmirror(fdp, HMM_DMIRROR_MIGRATE_TO_DEV, p, out, np, &cmd);
	check(!e && device_pages(fdp, p, np) == np, "P (4 MiB) migrated to device-private VRAM");
	e = dmirror(fdc, HMM_DMIRROR_MIGRATE_TO_DEV, c, out, nc, &cmd);
	check(!e && pages_of_kind(fdc, c, nc, HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL, NULL) == nc,
	      "C (2 MiB) migrated to device-coherent VRAM");
	resets0 = counter("driver_resets");

	if (aer)
		aer_without_reset(fdp, p, np, resets0);
	t = now_ms();
	if (aer) {
		inject("{\"kind\":\"aer\",\"error\":\"fatal\"}");
		check(wait_dmesg("AER: device recovery successful", 2),
		      "the fatal AER error is recovered (secondary bus reset)");
		check(wait_dmesg("Root Port link has been reset (0)", 1), "the root port's link was reset");
		check(dmesg_count("AER: device recovery failed") == 0, "no AER recovery failed");
	} else {
		check(pci_function_reset(), "the PCI function reset (sysfs reset) ran");
	}
	/* AER recovery runs in a kernel thread: wait for it to finish. */
	while (counter("driver_resets") == resets0 && now_ms() - t < 30000)
		usleep(100 * 1000);
	say("  the reset took %.0f ms", now_ms() - t);
	check(counter("driver_resets") == resets0 + 1, "the driver went through reset_prepare/reset_done");
	check(device_pages(fdp, p, np) == 0, "no page of P is left in device-private VRAM");
	check(pages_of_kind(fdc, c, nc, HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL, NULL) == 0,
	      "no page of C is left in device-coherent VRAM");
	pid = fork();
	if (pid == 0) {
		bool ok = pattern_ok(p, np * PAGE_SZ, 71, "child: P") &&
			  pattern_ok(c, nc * PAGE_SZ, 72, "child: C") &&
			  pattern_ok(s, ns * PAGE_SZ, 73, "child: S");

		_exit(ok ? 0 : 1);
	}
	check(pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status) && !WEXITSTATUS(status),
	      "a forked child reads P, C and S intact");
	check(pattern_ok(p, np * PAGE_SZ, 71, "buffer P"), "P (evicted before the reset) is intact");
	check(pattern_ok(c, nc * PAGE_SZ, 72, "buffer C"), "C (evicted before the reset) is intact");
	check(pattern_ok(s, ns * PAGE_SZ, 73, "buffer S"), "S (system memory) is intact");
	check(data_round(fdp, 1 << 20, 74, false) >= 0, "after the reset the device works (a data round verifies)");
	e = dmirror(fdc, HMM_DMIRROR_MIGRATE_TO_DEV, c, out, nc, &cmd);
	check(!e && cmd.cpages == nc && pattern_ok(out, nc * PAGE_SZ, 72, "C read by the device"),
	      "after the reset C migrates to device-coherent VRAM again");
	print_counters();
	close(fdp);
	close(fdc);
	return verdict("reset", how);
}

/* A 2 MiB-aligned THP-eligible buffer of 2 MiB (the rest of the mapping stays unused). */
static uint8_t *map_huge(void)
{
	const size_t huge = 512 * PAGE_SZ;
	uint8_t *raw = map_buffer(2 * huge, false);
	uint8_t *h = (uint8_t *)(((uintptr_t)raw + huge - 1) & ~(uintptr_t)(huge - 1));

	if (madvise(h, huge, MADV_HUGEPAGE))
		say("  madvise(MADV_HUGEPAGE): %s", strerror(errno));
	return h;
}

/* Pages of buf that pagemap shows present in system RAM, none of them in [lo, hi). */
static size_t pages_in_ram(const uint8_t *buf, size_t npages, uint64_t lo, uint64_t hi)
{
	size_t i, n = 0;

	for (i = 0; i < npages; i++) {
		uint64_t e = pagemap_entry(buf + i * PAGE_SZ), pa = (e & PM_PFRAME_MASK) * PAGE_SZ;

		if ((e & PM_PRESENT) && !(e & PM_SWAP) && !(pa >= lo && pa < hi))
			n++;
	}
	return n;
}

/* Whether a PCI function with the hmmgpu device id (1af4:107f) exists. */
static bool hmmgpu_pci_present(void)
{
	DIR *d = opendir("/sys/bus/pci/devices");
	struct dirent *de;
	bool found = false;

	if (!d) {
		fail("opendir /sys/bus/pci/devices: %s", strerror(errno));
		return true;
	}
	while (!found && (de = readdir(d))) {
		char path[300], id[16] = "";
		FILE *f;

		snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/device", de->d_name);
		f = fopen(path, "r");
		if (!f)
			continue;
		if (fgets(id, sizeof(id), f) && !strncmp(id, "0x107f", 6))
			found = true;
		fclose(f);
	}
	closedir(d);
	return found;
}

/* Checks every byte of the unplug workload's buffers; returns how many differ. */
struct unplug_bufs {
	uint8_t *p1, *p2, *c, *s;
	size_t n1, n2, nc, ns;
};

static int unplug_bufs_bad(const struct unplug_bufs *b, const char *who)
{
	char what[64];
	int bad = 0;

	snprintf(what, sizeof(what), "%s: P1 (THP)", who);
	bad += !pattern_ok(b->p1, b->n1 * PAGE_SZ, 81, what);
	snprintf(what, sizeof(what), "%s: P2", who);
	bad += !pattern_ok(b->p2, b->n2 * PAGE_SZ, 82, what);
	snprintf(what, sizeof(what), "%s: C", who);
	bad += !pattern_ok(b->c, b->nc * PAGE_SZ, 83, what);
	snprintf(what, sizeof(what), "%s: S", who);
	bad += !pattern_ok(b->s, b->ns * PAGE_SZ, 84, what);
	return bad;
}

/* Waits up to 60 s for path to exist; returns the ms waited, or -1. */
static double wait_for_node(const char *path)
{
	double t0 = now_ms();

	while (access(path, F_OK)) {
		if (now_ms() - t0 > 60000)
			return -1;
		usleep(20 * 1000);
	}
	return now_ms() - t0;
}

/* Catalogue entry 8. */
static int run_unplug(bool leave, uint64_t vram_seed)
{
	struct unplug_bufs b = { .n1 = 512, .n2 = 256, .nc = 512, .ns = 512 };
	const size_t n_all = b.n1 + b.n2 + b.nc;
	uint8_t *out = map_buffer(1024 * PAGE_SZ, false), *f, *g;
	uint64_t c_lo = UINT64_MAX, c_hi = 0;
	struct hmm_dmirror_cmd cmd;
	int fdp, fdc, e, status, go[2];
	size_t i, n;
	bool pmd = false;
	double t0, ms;
	char byte = 1;
	pid_t child;

	b.p1 = map_huge();
	b.p2 = map_buffer(b.n2 * PAGE_SZ, true);
	b.c = map_buffer(b.nc * PAGE_SZ, false);
	b.s = map_buffer(b.ns * PAGE_SZ, false);
	fdp = open_dev();
	dev_path = "/dev/hmm_dmirror2";
	fdc = open_dev();
	fill_pattern(b.p1, b.n1 * PAGE_SZ, 81);
	fill_pattern(b.p2, b.n2 * PAGE_SZ, 82);
	fill_pattern(b.c, b.nc * PAGE_SZ, 83);
	fill_pattern(b.s, b.ns * PAGE_SZ, 84);

	say("[1] data in VRAM: P1 a 2 MiB THP and P2 1 MiB of 4 KiB pages (device-private), C 2 MiB (device-coherent), S 2 MiB (system memory)");
	pages_of_kind(fdp, b.p1, b.n1, HMM_DMIRROR_PROT_NONE, &pmd);
	check(pmd, "P1 is a PMD-mapped THP before the migration");
	e = dmirror(fdp, HMM_DMIRROR_MIGRATE_TO_DEV, b.p1, out, b.n1, &cmd);
	check(!e && cmd.cpages == b.n1, "P1 migrated to device-private VRAM");
	n = pages_of_kind(fdp, b.p1, b.n1, HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL, &pmd);
	say("  P1: %zu pages device-private, %s", n, pmd ? "one 2 MiB entry (a device-private THP)" : "4 KiB entries");
	check(n == b.n1, "SNAPSHOT: all of P1 is in device-private VRAM");
	e = dmirror(fdp, HMM_DMIRROR_MIGRATE_TO_DEV, b.p2, out, b.n2, &cmd);
	check(!e && cmd.cpages == b.n2 && pages_of_kind(fdp, b.p2, b.n2, HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL, NULL) == b.n2,
	      "P2 is in device-private VRAM");
	e = dmirror(fdc, HMM_DMIRROR_MIGRATE_TO_DEV, b.c, out, b.nc, &cmd);
	check(!e && cmd.cpages == b.nc && pages_of_kind(fdc, b.c, b.nc, HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL, NULL) == b.nc,
	      "C is in device-coherent VRAM");
	for (i = 0; i < b.nc; i++) {
		uint64_t pa = phys_of(b.c + i * PAGE_SZ);

		if (pa && pa < c_lo)
			c_lo = pa;
		if (pa + PAGE_SZ > c_hi)
			c_hi = pa + PAGE_SZ;
	}
	say("  C's pages are at physical %#" PRIx64 "..%#" PRIx64 " (the VRAM BAR)", c_lo, c_hi);
	check(pages_in_ram(b.p1, b.n1, 0, 0) == 0 && pages_in_ram(b.p2, b.n2, 0, 0) == 0,
	      "pagemap: no page of P1 or P2 is in system RAM");

	/* A child that inherits the mappings checks them after the unplug too. */
	if (pipe(go)) {
		fail("pipe: %s", strerror(errno));
		return 1;
	}
	child = fork();
	if (child < 0) {
		fail("fork: %s", strerror(errno));
		return 1;
	}
	if (child == 0) {
		int bad = 0;

		close(go[1]);
		if (read(go[0], &byte, 1) != 1)
			_exit(3);
		n = pages_in_ram(b.p1, b.n1, c_lo, c_hi) + pages_in_ram(b.p2, b.n2, c_lo, c_hi) +
		    pages_in_ram(b.c, b.nc, c_lo, c_hi);
		printf(TAG "child: %zu of %zu pages of P1, P2, C in system RAM before any touch\n", n, n_all);
		bad += n != n_all;
		bad += unplug_bufs_bad(&b, "child");
		printf(TAG "child: %s\n", bad ? "FAIL" : "every byte of P1, P2, C, S intact");
		fflush(stdout);
		_exit(bad ? 1 : 0);
	}
	close(go[0]);

	say("[2] hot-unplug (device_del) while the data is in VRAM");
	t0 = now_ms();
	inject("{\"kind\":\"unplug\"}");
	ms = now_ms() - t0;
	say("  the device was gone %.0f ms after the request", ms);
	/* The driver's removal line (pr_info: in dmesg, not on the console). */
	check(system("dmesg | grep -E 'hmmgpu[0-9]+: removed;'") == 0, "the driver logged its removal");
	check(access("/dev/hmm_dmirror0", F_OK) && errno == ENOENT &&
	      access("/dev/hmm_dmirror2", F_OK) && errno == ENOENT,
	      "/dev/hmm_dmirror0 and /dev/hmm_dmirror2 are gone");
	check(!hmmgpu_pci_present(), "no PCI function 1af4:107f is left");
	e = dmirror(fdp, HMM_DMIRROR_MIGRATE_TO_DEV, b.s, out, 16, NULL);
	say("  MIGRATE_TO_DEV on the open file: %s", e ? strerror(e) : "success");
	check(e == ENODEV, "MIGRATE_TO_DEV on a file still open fails with ENODEV");
	e = dmirror(fdp, HMM_DMIRROR_READ, b.s, out, 16, NULL);
	check(e == ENODEV, "READ on it fails with ENODEV");
	e = dmirror(fdc, HMM_DMIRROR_SNAPSHOT, b.c, out, 16, NULL);
	check(e == ENODEV, "SNAPSHOT on the coherent file fails with ENODEV");
	n = pages_in_ram(b.p1, b.n1, c_lo, c_hi) + pages_in_ram(b.p2, b.n2, c_lo, c_hi) +
	    pages_in_ram(b.c, b.nc, c_lo, c_hi);
	say("  pagemap: %zu of %zu pages of P1, P2, C in system RAM before any touch", n, n_all);
	check(n == n_all, "every page of P1, P2 and C was evicted to system RAM at the unplug");
	check(unplug_bufs_bad(&b, "parent") == 0, "every byte of P1, P2, C and S is intact");
	if (write(go[1], &byte, 1) != 1)
		fail("waking the child: %s", strerror(errno));
	close(go[1]);
	if (waitpid(child, &status, 0) != child)
		fail("waitpid: %s", strerror(errno));
	check(WIFEXITED(status) && WEXITSTATUS(status) == 0,
	      "the forked child finds every page in RAM and every byte intact");
	close(fdp);
	close(fdc);

	say("[3] plug the device back (device_add)");
	t0 = now_ms();
	inject("{\"kind\":\"plug\"}");
	say("  device_add answered after %.0f ms", now_ms() - t0);
	ms = wait_for_node("/dev/hmm_dmirror0");
	if (ms >= 0 && wait_for_node("/dev/hmm_dmirror2") >= 0)
		say("  /dev/hmm_dmirror0 and 2 are back %.0f ms after device_add answered", ms);
	else {
		fail("/dev/hmm_dmirror0 or 2 did not come back within 60 s");
		return 1;
	}
	dev_path = "/dev/hmm_dmirror0";
	fdp = open_dev();
	dev_path = "/dev/hmm_dmirror2";
	fdc = open_dev();
	f = map_huge();
	fill_pattern(f, 512 * PAGE_SZ, 85);
	e = dmirror(fdp, HMM_DMIRROR_MIGRATE_TO_DEV, f, out, 512, &cmd);
	check(!e && cmd.cpages == 512 && pages_of_kind(fdp, f, 512, HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL, NULL) == 512,
	      "the plugged device migrates a fresh 2 MiB buffer to device-private VRAM");
	e = dmirror(fdp, HMM_DMIRROR_READ, f, out, 512, &cmd);
	check(!e && pattern_ok(out, 512 * PAGE_SZ, 85, "F read by the device"), "the device reads it back intact");
	check(pattern_ok(f, 512 * PAGE_SZ, 85, "F"), "the CPU reads it back intact (migrate_to_ram)");
	check(pages_of_kind(fdp, f, 512, HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL, NULL) == 0, "F is back in system memory");
	g = map_buffer(256 * PAGE_SZ, false);
	fill_pattern(g, 256 * PAGE_SZ, 86);
	e = dmirror(fdc, HMM_DMIRROR_MIGRATE_TO_DEV, g, out, 256, &cmd);
	check(!e && cmd.cpages == 256 && pages_of_kind(fdc, g, 256, HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL, NULL) == 256,
	      "it migrates a fresh 1 MiB buffer to device-coherent VRAM");
	e = dmirror(fdc, HMM_DMIRROR_MIGRATE_TO_SYS, g, NULL, 256, &cmd);
	check(!e && pattern_ok(g, 256 * PAGE_SZ, 86, "G"), "and back to system memory intact");
	check(unplug_bufs_bad(&b, "after the plug") == 0, "the buffers from before the unplug are still intact");
	if (leave) {
		uint8_t *v = map_buffer(1024 * PAGE_SZ, false);

		fill_pattern(v, 1024 * PAGE_SZ, vram_seed);
		e = dmirror(fdp, HMM_DMIRROR_MIGRATE_TO_DEV, v, out, 1024, &cmd);
		check(!e && cmd.cpages == 1024 && pages_of_kind(fdp, v, 1024, HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL, NULL) == 1024,
		      "4 MiB left in the plugged device's VRAM");
		printf("HMMGPU-VRAM-PATTERN seed=%" PRIu64 " bytes=%lu\n", vram_seed, 1024 * PAGE_SZ);
	}
	close(fdp);
	close(fdc);
	return verdict("unplug", NULL);
}

static void usage(void)
{
	fprintf(stderr,
		"usage: hmmgpu-faults [-d DEV] copy-error\n"
		"       hmmgpu-faults [-d DEV] data [--rounds N] [--size BYTES] [--seed N] [--nohuge] [--min-migrate-ms MS]\n"
		"       hmmgpu-faults [-d DEV] storm [--size BYTES]\n"
		"       hmmgpu-faults loss kill|link\n"
		"       hmmgpu-faults mce\n"
		"       hmmgpu-faults irq\n"
		"       hmmgpu-faults reset flr|aer\n"
		"       hmmgpu-faults ecc\n"

		"       hmmgpu-faults unplug [--vram-seed N]\n");
	exit(2);
}

static uint64_t number(const char *opt, const char *s)
{
	char *end;
	uint64_t v;

	if (!s)
		usage();
	errno = 0;
	v = strtoull(s, &end, 0);
	if (errno || end == s) {
		fprintf(stderr, "hmmgpu-faults: %s: not a number: %s\n", opt, s);
		exit(2);
	}
	switch (*end) {
	case 'K': v <<= 10; end++; break;
	case 'M': v <<= 20; end++; break;
	case 'G': v <<= 30; end++; break;
	}
	if (*end) {
		fprintf(stderr, "hmmgpu-faults: %s: not a number: %s\n", opt, s);
		exit(2);
	}
	return v;
}

int main(int argc, char **argv)
{
	unsigned long rounds = 1;
	size_t size = 4 << 20;
	uint64_t seed = 1;
	double min_ms = 0;
	bool nohuge = false;
	const char *mode;
	int i = 1;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (i + 1 < argc && !strcmp(argv[i], "-d")) {
		dev_path = argv[i + 1];
		i += 2;
	}
	if (i >= argc)
		usage();
	mode = argv[i++];
	if (!strcmp(mode, "mce")) {
		if (i != argc)
			usage();
		return run_mce();
	}
	if (!strcmp(mode, "irq")) {
		if (i != argc)
			usage();
		return run_irq();
	}
	if (!strcmp(mode, "reset")) {
		if (i + 1 != argc)
			usage();
		return run_reset(argv[i]);
	}
	if (!strcmp(mode, "ecc")) {
		if (i != argc)
			usage();
		return run_ecc();
	}
	if (!strcmp(mode, "unplug")) {
		if (i == argc)
			return run_unplug(false, 0);
		if (i + 2 != argc || strcmp(argv[i], "--vram-seed"))
			usage();
		return run_unplug(true, number(argv[i], argv[i + 1]));
	}
	if (!strcmp(mode, "loss")) {
		if (i + 1 != argc)
			usage();
		return run_loss(argv[i]);
	}
	for (; i < argc; i++) {
		const char *o = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;

		if (!strcmp(o, "--nohuge")) {
			nohuge = true;
			continue;
		}
		if (!strcmp(o, "--rounds"))
			rounds = number(o, v);
		else if (!strcmp(o, "--size"))
			size = number(o, v);
		else if (!strcmp(o, "--seed"))
			seed = number(o, v);
		else if (!strcmp(o, "--min-migrate-ms"))
			min_ms = number(o, v);
		else {
			fprintf(stderr, "hmmgpu-faults: unknown option %s\n", o);
			usage();
		}
		i++;
	}
	if (!size || size % PAGE_SZ) {
		fprintf(stderr, "hmmgpu-faults: --size must be a nonzero multiple of 4096\n");
		exit(2);
	}
	if (!strcmp(mode, "copy-error"))
		return run_copy_error();
	if (!strcmp(mode, "data"))
		return run_data(rounds, size, seed, nohuge, min_ms);
	if (!strcmp(mode, "storm"))
		return run_storm(size);

	fprintf(stderr, "hmmgpu-faults: unknown mode %s\n", mode);
	usage();
	return 2;
}
