/* SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0 */
/*
 * What the guest programs (hmmgpu-demo, hmmgpu-faults, hmmgpu-bench) share
 * about driving a dmirror device (lib/test_hmm_uapi.h, implemented by
 * hmmgpu and by the kernel's test_hmm): the ioctl wrapper, buffer mapping,
 * timing and the command line's number parser. Header-only (static inline),
 * so each program stays a static binary of its own sources; a program must
 * define _GNU_SOURCE before its first #include.
 */
#ifndef HMMGPU_GUEST_DMIRROR_H
#define HMMGPU_GUEST_DMIRROR_H

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>

#include "test_hmm_uapi.h"

#define PAGE_SZ 4096UL
/* A PMD-sized (transparent) huge page on x86_64 and on ppc64le's radix MMU. */
#define HUGE_SZ (2UL << 20)
/* The memory-kind part of a SNAPSHOT byte (HMM_DMIRROR_PROT_NONE, ...). */
#define DMIRROR_PROT_KIND_MASK 0xF0

/* Monotonic time in milliseconds. */
static inline double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* Anonymous private memory; nohuge: never THP. Exits 1 if mmap fails. */
static inline void *map_buffer(size_t size, bool nohuge)
{
	void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED) {
		fprintf(stderr, "%s: mmap %zu bytes: %s\n", program_invocation_short_name, size,
			strerror(errno));
		exit(1);
	}
	if (nohuge && madvise(p, size, MADV_NOHUGEPAGE)) {
		fprintf(stderr, "%s: madvise(MADV_NOHUGEPAGE): %s\n", program_invocation_short_name,
			strerror(errno));
		exit(1);
	}
	return p;
}

/*
 * Anonymous private memory starting at a multiple of `align` (a power of
 * two): the mapping is exactly [p, p + size), so munmap(p, size) frees it.
 * Exits 1 if mmap fails.
 */
static inline void *map_aligned(size_t size, size_t align)
{
	uint8_t *raw = map_buffer(size + align, false);
	uint8_t *p = (uint8_t *)(((uintptr_t)raw + align - 1) & ~(uintptr_t)(align - 1));

	if (p > raw)
		munmap(raw, p - raw);
	munmap(p + size, raw + align - p);
	return p;
}

/*
 * A HUGE_SZ-aligned buffer the kernel backs with transparent huge pages on
 * first touch when it can (MADV_HUGEPAGE); whether it did is for the
 * caller to check (SNAPSHOT's HMM_DMIRROR_PROT_PMD). Exits 1 if mmap fails.
 */
static inline void *map_huge(size_t size)
{
	void *p = map_aligned(size, HUGE_SZ);

	if (madvise(p, size, MADV_HUGEPAGE))
		fprintf(stderr, "%s: madvise(MADV_HUGEPAGE): %s\n", program_invocation_short_name,
			strerror(errno));
	return p;
}

/*
 * One dmirror command over the npages pages at addr, with ptr as its data
 * or result buffer, retried on EINTR as hmm-tests.c does. Returns 0 or the
 * errno; *out (if not NULL) gets the command as the driver left it (cpages,
 * faults), which on an error it did not write back.
 */
static inline int dmirror(int fd, unsigned long req, void *addr, void *ptr, size_t npages,
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

static inline const char *dmirror_name(unsigned long req)
{
	switch (req) {
	case HMM_DMIRROR_READ: return "HMM_DMIRROR_READ";
	case HMM_DMIRROR_WRITE: return "HMM_DMIRROR_WRITE";
	case HMM_DMIRROR_MIGRATE_TO_DEV: return "HMM_DMIRROR_MIGRATE_TO_DEV";
	case HMM_DMIRROR_MIGRATE_TO_SYS: return "HMM_DMIRROR_MIGRATE_TO_SYS";
	case HMM_DMIRROR_SNAPSHOT: return "HMM_DMIRROR_SNAPSHOT";
	default: return "dmirror ioctl";
	}
}

/*
 * Parses an unsigned number (decimal, 0x hex or 0 octal); with suffixes a
 * K, M or G (either case) multiplies by 2^10, 2^20, 2^30. Returns false for
 * anything else, a sign or an overflow.
 */
static inline bool parse_u64(const char *s, uint64_t *out, bool suffixes)
{
	unsigned long long v;
	char *end;

	errno = 0;
	v = strtoull(s, &end, 0);
	if (errno || end == s || *s == '-' || *s == '+')
		return false;
	if (suffixes && *end) {
		unsigned int shift;

		switch (*end) {
		case 'k': case 'K': shift = 10; break;
		case 'm': case 'M': shift = 20; break;
		case 'g': case 'G': shift = 30; break;
		default: return false;
		}
		if (v > (~0ULL >> shift))
			return false;
		v <<= shift;
		end++;
	}
	if (*end)
		return false;
	*out = v;
	return true;
}

#endif
