// SPDX-License-Identifier: GPL-2.0
/*
 * hmmgpu-bench: the same HMM workloads against whichever dmirror driver owns
 * /dev/hmm_dmirror0 (hmmgpu or the kernel's test_hmm), for `cargo xtask
 * bench`, which runs it on both in one boot and prints the ratios.
 *
 * Output: one line per figure, `BENCH <name> <value>`:
 *   migrate_to_dev_<size>_gbps, migrate_to_sys_<size>_gbps   median of 5..50
 *                                           reps (about 256 MiB per size)
 *   cpu_fault_p50_us, cpu_fault_p99_us      CPU touch of a page in device
 *                                           memory (migrate_to_ram)
 *   dev_fault_p50_us, dev_fault_p99_us      HMM_DMIRROR_READ of one page the
 *                                           device has not seen (a device
 *                                           fault served by hmm_range_fault)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "test_hmm_uapi.h"

#define PAGE_SZ 4096UL
#define TWO_MB (2UL << 20)
/* Migration repetitions: about 256 MiB per size, at least 5, at most 50. */
#define MIN_REPS 5
#define MAX_REPS 50
#define REPS_BYTES (256UL << 20)
#define LAT_SAMPLES 200

static int fd;

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
	fprintf(stderr, "hmmgpu-bench: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void dmirror(unsigned long req, void *addr, void *mirror, unsigned long npages)
{
	struct hmm_dmirror_cmd cmd = {
		.addr = (uintptr_t)addr,
		.ptr = (uintptr_t)mirror,
		.npages = npages,
	};

	while (ioctl(fd, req, &cmd) < 0) {
		if (errno != EINTR)
			die("ioctl");
	}
}

/* A 2 MiB-aligned anonymous buffer (THP-eligible when large enough). */
static void *alloc_buf(size_t size, void **base, size_t *map_len)
{
	*map_len = size + TWO_MB;
	*base = mmap(NULL, *map_len, PROT_READ | PROT_WRITE,
		     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (*base == MAP_FAILED)
		die("mmap");
	return (void *)(((uintptr_t)*base + TWO_MB - 1) & ~(TWO_MB - 1));
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

static double pct(double *v, int n, int p)
{
	qsort(v, n, sizeof(*v), cmp_double);
	return v[(n - 1) * p / 100];
}

static void migration(size_t size, const char *label)
{
	double to_dev[MAX_REPS], to_sys[MAX_REPS];
	unsigned long npages = size / PAGE_SZ;
	int reps = REPS_BYTES / size;
	void *mirror = malloc(size);
	int r;

	if (!mirror)
		die("malloc");
	if (reps < MIN_REPS)
		reps = MIN_REPS;
	if (reps > MAX_REPS)
		reps = MAX_REPS;
	for (r = 0; r < reps; r++) {
		void *base;
		size_t map_len;
		char *buf = alloc_buf(size, &base, &map_len);
		double t;

		memset(buf, r + 1, size);
		t = now_s();
		dmirror(HMM_DMIRROR_MIGRATE_TO_DEV, buf, mirror, npages);
		to_dev[r] = size / (now_s() - t) / 1e9;
		t = now_s();
		dmirror(HMM_DMIRROR_MIGRATE_TO_SYS, buf, mirror, npages);
		to_sys[r] = size / (now_s() - t) / 1e9;
		munmap(base, map_len);
	}
	printf("BENCH migrate_to_dev_%s_gbps %.4f\n", label, pct(to_dev, reps, 50));
	printf("BENCH migrate_to_sys_%s_gbps %.4f\n", label, pct(to_sys, reps, 50));
	free(mirror);
}

static void cpu_fault_latency(void)
{
	size_t size = LAT_SAMPLES * PAGE_SZ;
	double lat[LAT_SAMPLES];
	void *base, *mirror = malloc(size);
	size_t map_len;
	char *buf = alloc_buf(size, &base, &map_len);
	int i;

	if (!mirror)
		die("malloc");
	/* Single pages: each touch is one migrate_to_ram of one page. */
	madvise(buf, size, MADV_NOHUGEPAGE);
	memset(buf, 7, size);
	dmirror(HMM_DMIRROR_MIGRATE_TO_DEV, buf, mirror, LAT_SAMPLES);
	for (i = 0; i < LAT_SAMPLES; i++) {
		volatile char *p = buf + i * PAGE_SZ;
		double t = now_s();

		if (*p != 7) {
			fprintf(stderr, "hmmgpu-bench: page %d lost its data\n", i);
			exit(1);
		}
		lat[i] = (now_s() - t) * 1e6;
	}
	printf("BENCH cpu_fault_p50_us %.2f\n", pct(lat, LAT_SAMPLES, 50));
	printf("BENCH cpu_fault_p99_us %.2f\n", pct(lat, LAT_SAMPLES, 99));
	munmap(base, map_len);
	free(mirror);
}

static void device_fault_latency(void)
{
	double lat[LAT_SAMPLES];
	char mirror[PAGE_SZ];
	int i;

	for (i = 0; i < LAT_SAMPLES; i++) {
		char *p = mmap(NULL, PAGE_SZ, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		double t;

		if (p == MAP_FAILED)
			die("mmap");
		p[0] = (char)i;
		t = now_s();
		dmirror(HMM_DMIRROR_READ, p, mirror, 1);
		lat[i] = (now_s() - t) * 1e6;
		if (mirror[0] != (char)i) {
			fprintf(stderr, "hmmgpu-bench: device read wrong data\n");
			exit(1);
		}
		munmap(p, PAGE_SZ);
	}
	printf("BENCH dev_fault_p50_us %.2f\n", pct(lat, LAT_SAMPLES, 50));
	printf("BENCH dev_fault_p99_us %.2f\n", pct(lat, LAT_SAMPLES, 99));
}

int main(int argc, char **argv)
{
	static const struct { size_t size; const char *label; } sizes[] = {
		{ 4UL << 10, "4K" }, { 64UL << 10, "64K" }, { 1UL << 20, "1M" },
		{ 2UL << 20, "2M" }, { 16UL << 20, "16M" }, { 64UL << 20, "64M" },
	};
	const char *dev = argc > 1 ? argv[1] : "/dev/hmm_dmirror0";
	unsigned int i;

	fd = open(dev, O_RDWR);
	if (fd < 0)
		die(dev);
	for (i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++)
		migration(sizes[i].size, sizes[i].label);
	cpu_fault_latency();
	device_fault_latency();
	close(fd);
	return 0;
}
