/* SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0 */
/*
 * The guest programs' data pattern: xorshift64 over little-endian u64
 * words, state seeded with seed ^ 0x9E3779B97F4A7C15 (1 if that is 0),
 * x ^= x << 13; x ^= x >> 7; x ^= x << 17. ci/xtask/src/pattern.rs is the
 * host's copy (it finds the pattern in the VRAM file). fnv1a() is the
 * checksum guest programs print of data they read back (FNV-1a, 64 bits,
 * over bytes); the host recomputes it from the pattern (tests/faults.rs).
 */
#ifndef HMMGPU_GUEST_PATTERN_H
#define HMMGPU_GUEST_PATTERN_H

#include <stddef.h>
#include <stdint.h>

static inline uint64_t xorshift_init(uint64_t seed)
{
	uint64_t x = seed ^ 0x9E3779B97F4A7C15ULL;

	return x ? x : 1;
}

static inline uint64_t xorshift_next(uint64_t *x)
{
	*x ^= *x << 13;
	*x ^= *x >> 7;
	*x ^= *x << 17;
	return *x;
}

static inline void fill_pattern(void *buf, size_t size, uint64_t seed)
{
	uint64_t *w = buf, x = xorshift_init(seed);
	size_t i;

	for (i = 0; i < size / 8; i++)
		w[i] = xorshift_next(&x);
}

/* FNV-1a (64-bit) of size bytes. */
static inline uint64_t fnv1a(const void *buf, size_t size)
{
	const uint8_t *b = buf;
	uint64_t h = 0xcbf29ce484222325ULL;
	size_t i;

	for (i = 0; i < size; i++) {
		h ^= b[i];
		h *= 0x100000001b3ULL;
	}
	return h;
}

#endif
