/* SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0 */
/*
 * hmmgpu-faults: the guest workloads of the fault-injection VM tests, one
 * file per entry of docs/fault-injection.md's catalogue (that document's
 * "Where each fault is tested" joins each to its xtask test). This header:
 * what the modes share (common.c, data.c) and the mode table (main.c).
 *
 * Conventions of every mode: checks print "hmmgpu-faults: PASS: WHAT" or
 * "hmmgpu-faults: FAIL: WHAT" and the mode ends with verdict(); exit status
 * 0 all checks passed, 1 a check failed, 2 usage error, 3 the injection
 * handshake with the host failed (inject()).
 */
#ifndef HMMGPU_FAULTS_H
#define HMMGPU_FAULTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dmirror.h"
#include "pattern.h"

#define TAG "hmmgpu-faults: "

/* One mode: `hmmgpu-faults [-d DEV] NAME ARGS`. */
struct fault_mode {
	const char *name;
	const char *args;	/* its arguments, for the usage message */
	/* argv[0..argc) are the arguments after NAME; returns the exit status. */
	int (*run)(int argc, char **argv);
};

extern const struct fault_mode mode_copy_error, mode_data, mode_storm, mode_loss, mode_mce,
	mode_irq, mode_reset, mode_ecc, mode_unplug, mode_responsive, mode_restart;

/* The device-private dmirror device (-d, default /dev/hmm_dmirror0). */
extern const char *dev_path;
/* The device-coherent one of the same GPU. */
#define COHERENT_DEV_PATH "/dev/hmm_dmirror2"

/* main.c */
void usage(void) __attribute__((noreturn));
/* The number of option `opt` (K/M/G suffixes allowed); exits 2 if it is none. */
uint64_t number(const char *opt, const char *s);

/* common.c: reporting */
void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Records a failed check. */
void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void check(bool ok, const char *what);
/*
 * Ends a mode: prints its verdict (the tests look for "PASS: MODE" or
 * "PASS: MODE (ARG)") and returns the exit status.
 */
int verdict(const char *mode, const char *arg);
/* Checks failed so far. */
extern int failures;

/* common.c: the host, the device, the driver */
/* Asks the host to inject `fault` (JSON) into GPU 0; exits 3 if it did not. */
void inject(const char *fault);
/* Opens a dmirror device; exits 1 if it cannot. */
int open_dev_at(const char *path);
/* Opens dev_path; exits 1 if it cannot. */
int open_dev(void);
/*
 * Counts the pages of buf that SNAPSHOT on fd shows with the kind `kind`
 * (HMM_DMIRROR_PROT_*), or (size_t)-1 (reported); *pmd (if not NULL):
 * whether the first is PMD-mapped.
 */
size_t pages_of_kind(int fd, void *buf, size_t npages, uint8_t kind, bool *pmd);
/* Counts the pages of buf that SNAPSHOT shows in this device's private memory. */
size_t device_pages(int fd, void *buf, size_t npages);
/* A counter of /sys/kernel/debug/hmmgpu0/counters (device's and driver's). */
uint64_t counter(const char *name);
/* Prints every counter as "hmmgpu-faults: counter NAME VALUE" (tests read them). */
void print_counters(void);

/* common.c: memory */
/* Touches every byte; returns whether all match the pattern of seed. */
bool pattern_ok(const void *buf, size_t size, uint64_t seed, const char *what);
/* What a forked child saw when it read a page (touch_page). */
enum touch {
	TOUCH_SIGBUS,		/* it died of SIGBUS */
	TOUCH_READ,		/* it read the page, every word as expected */
	TOUCH_WRONG_DATA,	/* it read the page, and a word was not as expected */
	TOUCH_ERROR,		/* another signal or exit, or fork failed (reported) */
};

/*
 * Forks a child that reads every word of the 4 KiB page at `page`: each
 * must be the word of `want` (the page's data; NULL: any) or, with
 * ones_ok, all-ones (the stand-in page the driver maps in place of a
 * poisoned device-coherent page until the poisoning takes effect). Word by
 * word, since the page may be replaced while the child reads it.
 */
enum touch touch_page(const void *page, const void *want, bool ones_ok, const char *what);
/*
 * touch_page() every 100 ms, for up to 20 s, until a child does not read
 * the page as expected (the kernel poisons pages asynchronously, so SIGBUS
 * may take a while): returns how the last child ended.
 */
enum touch poll_for_sigbus(const void *page, const void *want, bool ones_ok, const char *what);

/* /proc/self/pagemap's fields (Documentation/admin-guide/mm/pagemap.rst). */
#define PM_PRESENT (1ULL << 63)
#define PM_SWAP (1ULL << 62)
#define PM_PFRAME_MASK ((1ULL << 55) - 1)
/* A swap entry's frame is its type in the low 5 bits, then its offset. */
#define PM_SWAP_TYPE_BITS 5

/* The pagemap entry of the page at va (root reads PFNs), or 0. */
uint64_t pagemap_entry(const void *va);
/* The physical address of the page at va, or 0 if it is not present. */
uint64_t phys_of(const void *va);
/*
 * The pfn of the page at va, present or a device-private entry (pagemap
 * reports those as swap entries whose offset is the pfn, see
 * fs/proc/task_mmu.c), or 0.
 */
uint64_t pfn_of(const void *va);

/* data.c */
/*
 * One round of the checksummed workload on a fresh buffer; returns the
 * MIGRATE_TO_DEV time in ms, or -1 after a failure (reported).
 */
double data_round(int fd, size_t size, uint64_t seed, bool nohuge);

#endif
