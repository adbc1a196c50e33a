// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/*
 * hmmgpu-faults reset flr|aer: catalogue entry 7: with data in both kinds
 * of VRAM, a PCI function reset through sysfs (flr), or AER errors (aer:
 * correctable and non-fatal change nothing, a fatal one resets the bus):
 * reset_prepare evicts everything, every byte reads back intact, the device
 * works after.
 *
 * Tests: fault-pci-reset and fault-aer (ci/xtask/src/tests/reset.rs).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "faults.h"

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

static int run_reset_how(const char *how)
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
	fdc = open_dev_at(COHERENT_DEV_PATH);
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

static int run_reset(int argc, char **argv)
{
	if (argc != 1)
		usage();
	return run_reset_how(argv[0]);
}

const struct fault_mode mode_reset = {
	.name = "reset",
	.args = "flr|aer",
	.run = run_reset,
};
