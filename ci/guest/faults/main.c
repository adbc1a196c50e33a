// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/*
 * hmmgpu-faults: guest workloads of the fault-injection VM tests
 * (ci/xtask/src/tests/, docs/fault-injection.md "Expected outcomes in the
 * guest"), on the dmirror uAPI (lib/test_hmm_uapi.h). One mode per entry of
 * the catalogue, each in its own file:
 *
 *   hmmgpu-faults [-d DEV] MODE [ARGS]     (-d: default /dev/hmm_dmirror0)
 *
 *   copy-error                  entry 1, copy_error.c
 *   data [...]                  entry 2 (and plan replay), data.c
 *   ecc                         entry 3, ecc.c
 *   loss link                   entry 4, loss.c
 *   irq                         entry 5, irq.c
 *   storm [--size BYTES]        entry 6, storm.c
 *   reset flr|aer               entry 7, reset.c
 *   unplug [--vram-seed N]      entry 8, unplug.c
 *   loss kill                   entry 9, loss.c
 *   restart                     entry 9 with a new backend, restart.c
 *   mce                         entry 10, mce.c
 *   responsive --seed N [--no-device]
 *                               after a workload: the guest still works,
 *                               responsive.c
 *
 * The pattern is ci/guest/pattern.h's (xorshift64). Exit status: 0 all
 * checks passed, 1 a check failed, 2 usage error, 3 the injection handshake
 * with the host failed.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "faults.h"

static const struct fault_mode *const modes[] = {
	&mode_copy_error, &mode_data, &mode_storm, &mode_loss, &mode_mce,
	&mode_irq, &mode_reset, &mode_ecc, &mode_unplug, &mode_responsive, &mode_restart,
};

#define NMODES (sizeof(modes) / sizeof(modes[0]))

void usage(void)
{
	size_t i;

	for (i = 0; i < NMODES; i++)
		fprintf(stderr, "%s hmmgpu-faults [-d DEV] %s%s%s\n", i ? "      " : "usage:",
			modes[i]->name, *modes[i]->args ? " " : "", modes[i]->args);
	exit(2);
}

uint64_t number(const char *opt, const char *s)
{
	uint64_t v;

	if (!s)
		usage();
	if (!parse_u64(s, &v, true)) {
		fprintf(stderr, "hmmgpu-faults: %s: not a number: %s\n", opt, s);
		exit(2);
	}
	return v;
}

int main(int argc, char **argv)
{
	int i = 1;
	size_t m;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (i + 1 < argc && !strcmp(argv[i], "-d")) {
		dev_path = argv[i + 1];
		i += 2;
	}
	if (i >= argc)
		usage();
	for (m = 0; m < NMODES; m++) {
		if (strcmp(argv[i], modes[m]->name))
			continue;
		/* A mode without arguments does not look at them. */
		if (!*modes[m]->args && i + 1 < argc)
			usage();
		return modes[m]->run(argc - i - 1, argv + i + 1);
	}
	fprintf(stderr, "hmmgpu-faults: unknown mode %s\n", argv[i]);
	usage();
}
