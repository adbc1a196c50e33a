// SPDX-License-Identifier: GPL-2.0
/*
 * hmmgpu-bench: the same HMM workloads against whichever dmirror driver owns
 * /dev/hmm_dmirrorN (hmmgpu or the kernel's test_hmm), for `cargo xtask
 * bench`, which runs it on both in one boot and prints the ratios
 * (docs/running.md, "cargo xtask bench").
 *
 *   hmmgpu-bench sizes MAX_BYTES [DEV]
 *       migrate_to_dev_<size>_gbps, migrate_to_sys_<size>_gbps: a freshly
 *       written 2 MiB-aligned buffer of 4K .. 256M (at most MAX_BYTES)
 *       migrated to the device, then back; median of 5..50 repetitions
 *       (about 256 MiB per size), each on a new buffer
 *   hmmgpu-bench latency [DEV]
 *       cpu_fault_p50_us/_p99_us: a CPU read of a 4K page in device memory
 *       (one migrate_to_ram); dev_fault_p50_us/_p99_us: HMM_DMIRROR_READ of
 *       one page the device has never mapped (a device fault served by
 *       hmm_range_fault)
 *   hmmgpu-bench concurrent LABEL SIZE SECONDS DEV...
 *       conc_<LABEL>_gbps: one process per DEV (repeat a DEV for several
 *       processes on one device), each migrating its own SIZE buffer to the
 *       device and back for SECONDS; all bytes moved / wall time
 *   hmmgpu-bench oversub WORKING_SET [DEV]
 *       oversub_*: a WORKING_SET buffer (twice the device's VRAM) migrated
 *       to the device in 2 MiB chunks, then CPU faults on pages that made
 *       it, with the VRAM full
 *
 * Output: `BENCH <name> <value>` per figure and `BENCH-MOVED <bytes>`, the
 * bytes the run migrated (both directions), which the host divides its CPU
 * time by. Exit status 1 if the device lost or corrupted data or an ioctl
 * failed where it must not, 2 on a usage error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "dmirror.h"

/* Migration repetitions: about 256 MiB per size, at least 5, at most 50. */
#define MIN_REPS 5
#define MAX_REPS 50
#define REPS_BYTES (256UL << 20)
#define LAT_SAMPLES 1000
/* The oversubscription workload's unit of migration: one migrate_vma step. */
#define OVERSUB_CHUNK HUGE_SZ

static const char *default_dev = "/dev/hmm_dmirror0";

static void die(const char *what)
{
	fprintf(stderr, "hmmgpu-bench: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void fail(const char *what)
{
	fprintf(stderr, "hmmgpu-bench: %s\n", what);
	exit(1);
}

static int open_dev(const char *dev)
{
	int fd = open(dev, O_RDWR);

	if (fd < 0)
		die(dev);
	return fd;
}

/* A dmirror command that must succeed: exits 1 naming it if it fails. */
static void dmirror_or_die(int fd, unsigned long req, void *addr, void *mirror,
			   unsigned long npages)
{
	int ret = dmirror(fd, req, addr, mirror, npages, NULL);

	if (ret) {
		errno = ret;
		die(dmirror_name(req));
	}
}

/* Single pages only (no THP): exits 1 if the kernel refuses. */
static void no_huge_pages(void *buf, size_t size)
{
	if (madvise(buf, size, MADV_NOHUGEPAGE))
		die("madvise(MADV_NOHUGEPAGE)");
}

static void *xmalloc(size_t size)
{
	void *p = malloc(size);

	if (!p)
		die("malloc");
	return p;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

/* The p-th percentile (nearest rank) of v[0..n); sorts v. */
static double pct(double *v, int n, int p)
{
	qsort(v, n, sizeof(*v), cmp_double);
	return v[(n - 1) * p / 100];
}

/* Every page of buf[0..size) starts with its fill byte. */
static void check_pages(const char *buf, size_t size, char fill, const char *what)
{
	size_t off;

	for (off = 0; off < size; off += PAGE_SZ) {
		if (buf[off] != fill) {
			fprintf(stderr, "hmmgpu-bench: %s: page %zu lost its data\n",
				what, off / PAGE_SZ);
			exit(1);
		}
	}
}

static const char *size_label(size_t size, char *out, size_t len)
{
	if (size >= (1UL << 30) && !(size % (1UL << 30)))
		snprintf(out, len, "%zuG", size >> 30);
	else if (size >= (1UL << 20) && !(size % (1UL << 20)))
		snprintf(out, len, "%zuM", size >> 20);
	else
		snprintf(out, len, "%zuK", size >> 10);
	return out;
}

static size_t parse_size(const char *s)
{
	uint64_t n;

	if (!parse_u64(s, &n, true) || !n || n % PAGE_SZ) {
		fprintf(stderr, "hmmgpu-bench: '%s' is not a size in whole pages (K/M/G suffix)\n", s);
		exit(2);
	}
	return n;
}

static void migration(int fd, size_t size)
{
	double to_dev[MAX_REPS], to_sys[MAX_REPS];
	unsigned long npages = size / PAGE_SZ;
	int reps = REPS_BYTES / size, retries = 0;
	char *mirror = xmalloc(size), label[16];
	int r, ret;

	if (reps < MIN_REPS)
		reps = MIN_REPS;
	if (reps > MAX_REPS)
		reps = MAX_REPS;
	for (r = 0; r < reps; r++) {
		char *buf = map_aligned(size, HUGE_SZ);
		double t;

		memset(buf, r + 1, size);
		t = now_ms();
		ret = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, mirror, npages, NULL);
		/* Bytes per millisecond / 1e6: GB/s. */
		to_dev[r] = size / (now_ms() - t) / 1e6;
		/* A page migrate_vma could not isolate stayed behind: again. */
		if (ret == ENOENT && retries++ < MIN_REPS) {
			printf("hmmgpu-bench: a %zu-byte migration to the device left pages behind: repeated\n", size);
			dmirror_or_die(fd, HMM_DMIRROR_MIGRATE_TO_SYS, buf, mirror, npages);
			munmap(buf, size);
			r--;
			continue;
		}
		if (ret) {
			errno = ret;
			die("migration to the device");
		}
		t = now_ms();
		dmirror_or_die(fd, HMM_DMIRROR_MIGRATE_TO_SYS, buf, mirror, npages);
		to_sys[r] = size / (now_ms() - t) / 1e6;
		check_pages(buf, size, r + 1, "migration");
		munmap(buf, size);
	}
	size_label(size, label, sizeof(label));
	printf("BENCH migrate_to_dev_%s_gbps %.4f\n", label, pct(to_dev, reps, 50));
	printf("BENCH migrate_to_sys_%s_gbps %.4f\n", label, pct(to_sys, reps, 50));
	printf("BENCH-MOVED %lu\n", 2UL * reps * size);
	fflush(stdout);
	free(mirror);
}

static void sizes(size_t max, const char *dev)
{
	int fd = open_dev(dev);
	size_t size;

	/* Powers of 4 from 4K, and 2M: one THP, one migrate_vma step. */
	for (size = 4UL << 10; size <= max && size <= (256UL << 20); size *= 4) {
		migration(fd, size);
		if (size == (1UL << 20) && 2 * size <= max)
			migration(fd, 2 * size);
	}
	close(fd);
}

static void cpu_fault_latency(int fd)
{
	size_t size = LAT_SAMPLES * PAGE_SZ;
	double lat[LAT_SAMPLES];
	char *mirror = xmalloc(size);
	char *buf = map_aligned(size, HUGE_SZ);
	int i;

	/* Single pages: each touch is one migrate_to_ram of one page. */
	no_huge_pages(buf, size);
	memset(buf, 7, size);
	dmirror_or_die(fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, mirror, LAT_SAMPLES);
	for (i = 0; i < LAT_SAMPLES; i++) {
		volatile char *p = buf + i * PAGE_SZ;
		double t = now_ms();

		if (*p != 7)
			fail("cpu fault: a page lost its data");
		lat[i] = (now_ms() - t) * 1e3;
	}
	printf("BENCH cpu_fault_p50_us %.2f\n", pct(lat, LAT_SAMPLES, 50));
	printf("BENCH cpu_fault_p99_us %.2f\n", pct(lat, LAT_SAMPLES, 99));
	munmap(buf, size);
	free(mirror);
}

static void device_fault_latency(int fd)
{
	double lat[LAT_SAMPLES];
	char mirror[PAGE_SZ];
	int i;

	for (i = 0; i < LAT_SAMPLES; i++) {
		char *p = map_buffer(PAGE_SZ, false);
		double t;

		p[0] = (char)i;
		t = now_ms();
		dmirror_or_die(fd, HMM_DMIRROR_READ, p, mirror, 1);
		lat[i] = (now_ms() - t) * 1e3;
		if (mirror[0] != (char)i)
			fail("device fault: the device read wrong data");
		munmap(p, PAGE_SZ);
	}
	printf("BENCH dev_fault_p50_us %.2f\n", pct(lat, LAT_SAMPLES, 50));
	printf("BENCH dev_fault_p99_us %.2f\n", pct(lat, LAT_SAMPLES, 99));
}

static void latency(const char *dev)
{
	int fd = open_dev(dev);

	cpu_fault_latency(fd);
	device_fault_latency(fd);
	printf("BENCH-MOVED %lu\n", 2UL * LAT_SAMPLES * PAGE_SZ);
	close(fd);
}

/* Pages of buf[0..npages) the device holds (SNAPSHOT: local device memory). */
static unsigned long resident_pages(int fd, char *buf, unsigned long npages, unsigned char *snap)
{
	unsigned long i, n = 0;

	dmirror_or_die(fd, HMM_DMIRROR_SNAPSHOT, buf, snap, npages);
	for (i = 0; i < npages; i++) {
		unsigned char kind = snap[i] & DMIRROR_PROT_KIND_MASK;

		n += kind == HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL ||
		     kind == HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL;
	}
	return n;
}

/* What one process of `concurrent` reports to the parent. */
struct worker_result {
	double bytes;
	/* now_ms() after its last step. */
	double end;
	/* Migrations to the device that left pages behind (ENOENT). */
	unsigned long short_steps;
};

/*
 * Migrates a SIZE buffer to the device and back from `start` (now_ms(),
 * from `go`) for `seconds`; writes a worker_result to `out`.
 */
static void worker(const char *dev, size_t size, double seconds, int ready, int go, int out)
{
	int fd = open_dev(dev);
	unsigned long npages = size / PAGE_SZ;
	struct worker_result res = { 0, 0, 0 };
	char *mirror = xmalloc(size), fill = (char)getpid();
	unsigned char *snap = xmalloc(npages);
	char *buf = map_aligned(size, HUGE_SZ);
	double start;

	memset(buf, fill, size);
	memset(mirror, 0, size);
	if (write(ready, "r", 1) != 1)
		die("ready pipe");
	if (read(go, &start, sizeof(start)) != sizeof(start))
		die("start pipe");
	do {
		int ret = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, mirror, npages, NULL);
		double moved = size;

		/*
		 * migrate_vma moves what it can: a page it could not isolate
		 * stays behind, and both drivers then fail the read-back with
		 * ENOENT. Count what did move.
		 */
		if (ret == ENOENT) {
			moved = resident_pages(fd, buf, npages, snap) * PAGE_SZ;
			res.short_steps++;
		} else if (ret) {
			errno = ret;
			die("concurrent: migration to the device");
		}
		dmirror_or_die(fd, HMM_DMIRROR_MIGRATE_TO_SYS, buf, mirror, npages);
		res.bytes += 2.0 * moved;
		res.end = now_ms();
	} while (res.end < start + seconds * 1e3);
	check_pages(buf, size, fill, "concurrent migration");
	if (write(out, &res, sizeof(res)) != sizeof(res))
		die("result pipe");
	exit(0);
}

static void concurrent(const char *label, size_t size, double seconds, char **devs, int procs)
{
	int ready[2], go[2], out[2], i, status, failed = 0;
	double start, bytes = 0, end = 0;
	unsigned long short_steps = 0;
	char c;

	if (pipe(ready) || pipe(go) || pipe(out))
		die("pipe");
	for (i = 0; i < procs; i++) {
		pid_t pid = fork();

		if (pid < 0)
			die("fork");
		if (!pid) {
			/* Only the parent's ends stay open elsewhere: a parent that
			 * dies leaves no worker blocked. */
			close(ready[0]);
			close(go[1]);
			close(out[0]);
			worker(devs[i], size, seconds, ready[1], go[0], out[1]);
		}
	}
	close(ready[1]);
	close(go[0]);
	close(out[1]);
	/* A worker that dies before it is ready would leave us waiting. */
	alarm(120 + 2 * seconds);
	/* Everyone set up (buffers written, devices open), then one start. */
	for (i = 0; i < procs; i++) {
		if (read(ready[0], &c, 1) != 1)
			fail("a worker died before it was ready");
	}
	start = now_ms();
	for (i = 0; i < procs; i++) {
		if (write(go[1], &start, sizeof(start)) != sizeof(start))
			die("start pipe");
	}
	for (i = 0; i < procs; i++) {
		if (wait(&status) < 0)
			die("wait");
		if (!WIFEXITED(status) || WEXITSTATUS(status))
			failed++;
	}
	alarm(0);
	if (failed)
		fail("a concurrent worker failed");
	for (i = 0; i < procs; i++) {
		struct worker_result r;

		if (read(out[0], &r, sizeof(r)) != sizeof(r))
			fail("a worker sent no result");
		bytes += r.bytes;
		short_steps += r.short_steps;
		if (r.end > end)
			end = r.end;
	}
	if (short_steps)
		printf("hmmgpu-bench: concurrent %s: %lu migrations to the device left pages behind (only what moved is counted)\n",
		       label, short_steps);
	printf("BENCH conc_%s_gbps %.4f\n", label, bytes / (end - start) / 1e6);
	printf("BENCH-MOVED %.0f\n", bytes);
}

/*
 * Twice the VRAM, in 2 MiB steps: once the device is full, a driver that
 * evicts under pressure makes room (and the step's latency shows what that
 * costs); one that does not leaves the rest in system memory (resident_pct
 * shows how much). Single pages (no THP), so a CPU fault moves one page.
 */
static void oversub(size_t ws, const char *dev)
{
	if (ws % OVERSUB_CHUNK || ws < 2 * OVERSUB_CHUNK) {
		fprintf(stderr, "hmmgpu-bench: oversub: the working set must be whole 2 MiB chunks, at least two\n");
		exit(2);
	}
	int fd = open_dev(dev);
	unsigned long chunk_pages = OVERSUB_CHUNK / PAGE_SZ;
	unsigned long nchunks = ws / OVERSUB_CHUNK, k, placed = 0, errors = 0;
	double *step_lat = xmalloc(nchunks * sizeof(double));
	double *fill_lat = xmalloc(nchunks * sizeof(double));
	double fault_lat[LAT_SAMPLES], migrate_ms = 0, moved = 0;
	unsigned char *snap = xmalloc(chunk_pages);
	char *mirror = xmalloc(OVERSUB_CHUNK);
	int nfaults = 0, pressured = 0, filling = 0;
	size_t off, stride;
	char *buf = map_aligned(ws, HUGE_SZ);

	no_huge_pages(buf, ws);
	for (k = 0; k < nchunks; k++)
		memset(buf + k * OVERSUB_CHUNK, (char)(k + 1), OVERSUB_CHUNK);
	for (k = 0; k < nchunks; k++) {
		char *c = buf + k * OVERSUB_CHUNK;
		double t = now_ms();
		/* A full device may fail the step or leave pages behind. */
		int ret = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_DEV, c, mirror, chunk_pages, NULL);
		double dt = now_ms() - t;
		unsigned long n;

		migrate_ms += dt;
		errors += ret != 0;
		n = resident_pages(fd, c, chunk_pages, snap);
		placed += n;
		moved += n * PAGE_SZ;
		/* The second half: steps that find the VRAM's worth placed. */
		if (k >= nchunks / 2)
			step_lat[pressured++] = dt * 1e3;
		else
			fill_lat[filling++] = dt * 1e3;
	}
	/* CPU faults with the device full, spread over the working set. */
	stride = ws / LAT_SAMPLES / PAGE_SZ * PAGE_SZ;
	if (!stride)
		stride = PAGE_SZ;
	for (off = 0; off < ws && nfaults < LAT_SAMPLES; off += stride) {
		volatile char *p = buf + off;
		char want = (char)(off / OVERSUB_CHUNK + 1);
		double t;

		if (!resident_pages(fd, (char *)p, 1, snap))
			continue;
		t = now_ms();
		if (*p != want)
			fail("oversub: a page lost its data in a CPU fault");
		fault_lat[nfaults++] = (now_ms() - t) * 1e3;
		moved += PAGE_SZ;
	}
	/* Everything back, then every page checked. */
	for (k = 0; k < nchunks; k++) {
		char *c = buf + k * OVERSUB_CHUNK;

		moved += resident_pages(fd, c, chunk_pages, snap) * PAGE_SZ;
		dmirror_or_die(fd, HMM_DMIRROR_MIGRATE_TO_SYS, c, mirror, chunk_pages);
		check_pages(c, OVERSUB_CHUNK, (char)(k + 1), "oversub");
	}
	printf("BENCH oversub_gbps %.4f\n", placed * PAGE_SZ / migrate_ms / 1e6);
	printf("BENCH oversub_resident_pct %.1f\n", 100.0 * placed / (nchunks * chunk_pages));
	printf("BENCH oversub_step_errors_count %lu\n", errors);
	printf("BENCH oversub_fill_step_p50_us %.2f\n", pct(fill_lat, filling, 50));
	printf("BENCH oversub_step_p50_us %.2f\n", pct(step_lat, pressured, 50));
	printf("BENCH oversub_step_p99_us %.2f\n", pct(step_lat, pressured, 99));
	if (nfaults) {
		printf("BENCH oversub_cpu_fault_p50_us %.2f\n", pct(fault_lat, nfaults, 50));
		printf("BENCH oversub_cpu_fault_p99_us %.2f\n", pct(fault_lat, nfaults, 99));
	}
	printf("BENCH-MOVED %.0f\n", moved);
	munmap(buf, ws);
	free(step_lat);
	free(fill_lat);
	free(snap);
	free(mirror);
	close(fd);
}

static void usage(void)
{
	fprintf(stderr,
		"usage: hmmgpu-bench sizes MAX_BYTES [DEV]\n"
		"       hmmgpu-bench latency [DEV]\n"
		"       hmmgpu-bench concurrent LABEL SIZE SECONDS DEV...\n"
		"       hmmgpu-bench oversub WORKING_SET [DEV]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "";

	/* A worker's death must fail the run, not leave the parent waiting. */
	signal(SIGPIPE, SIG_IGN);
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (!strcmp(mode, "sizes") && (argc == 3 || argc == 4))
		sizes(parse_size(argv[2]), argc == 4 ? argv[3] : default_dev);
	else if (!strcmp(mode, "latency") && argc <= 3)
		latency(argc == 3 ? argv[2] : default_dev);
	else if (!strcmp(mode, "concurrent") && argc >= 6)
		concurrent(argv[2], parse_size(argv[3]), atof(argv[4]), argv + 5, argc - 5);
	else if (!strcmp(mode, "oversub") && (argc == 3 || argc == 4))
		oversub(parse_size(argv[2]), argc == 4 ? argv[3] : default_dev);
	else
		usage();
	return 0;
}
