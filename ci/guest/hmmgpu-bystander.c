// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/*
 * hmmgpu-bystander: an ordinary busy process beside a hostile guest (the
 * hostile-guest VM test, ci/guest/hostile-guest.sh): it must keep running
 * whatever the hostile module does to the device.
 *
 *   hmmgpu-bystander
 *
 * It spins in short work steps and reads the clock after each. Every second
 * it prints its progress:
 *   hmmgpu-bystander: t=S steps=N/s max_gap_ms=G
 * and when it gets SIGTERM or SIGINT the whole run's figures:
 *   HOSTILE-BYSTANDER seconds=S steps=N min_rate=R max_gap_us=G
 * into the kernel log (/dev/kmsg, at KERN_NOTICE), where it reaches the
 * console as one record: kernel messages can cut a line the process writes
 * to the console itself (on stdout when /dev/kmsg cannot be written).
 * min_rate is the fewest steps of any whole second and max_gap_us the
 * longest time between the ends of two steps (a stalled process shows as a
 * long gap and a low rate).
 *
 * Exit status: 0 (the host judges the figures), 2 usage error.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

static uint64_t now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000 + (uint64_t)ts.tv_nsec / 1000;
}

/* One work step: a few tens of microseconds of arithmetic. */
static uint64_t step(uint64_t x)
{
	for (int i = 0; i < 20000; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
	}
	return x;
}

int main(int argc, char **argv)
{
	uint64_t start, last, second_start, steps = 0, second_steps = 0;
	uint64_t min_rate = UINT64_MAX, max_gap = 0, second_gap = 0;
	volatile uint64_t sink;
	uint64_t x = 0x9e3779b97f4a7c15ULL;
	char summary[200];
	int kmsg;
	struct sigaction sa = { .sa_handler = on_signal };

	(void)argv;
	if (argc != 1) {
		fprintf(stderr, "usage: hmmgpu-bystander\n");
		return 2;
	}
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	start = last = second_start = now_us();
	while (!stop) {
		uint64_t t, gap;

		x = step(x);
		t = now_us();
		gap = t - last;
		last = t;
		steps++;
		second_steps++;
		if (gap > max_gap)
			max_gap = gap;
		if (gap > second_gap)
			second_gap = gap;
		if (t - second_start >= 1000000) {
			uint64_t rate = second_steps * 1000000 / (t - second_start);

			if (rate < min_rate)
				min_rate = rate;
			printf("hmmgpu-bystander: t=%.0f steps=%" PRIu64 "/s max_gap_ms=%.1f\n",
			       (t - start) / 1e6, rate, second_gap / 1e3);
			fflush(stdout);
			second_start = t;
			second_steps = 0;
			second_gap = 0;
		}
	}
	sink = x;
	(void)sink;
	snprintf(summary, sizeof(summary),
		 "<5>HOSTILE-BYSTANDER seconds=%.1f steps=%" PRIu64 " min_rate=%" PRIu64 " max_gap_us=%" PRIu64 "\n",
		 (last - start) / 1e6, steps,
		 min_rate == UINT64_MAX ? 0 : min_rate, max_gap);
	kmsg = open("/dev/kmsg", O_WRONLY);
	if (kmsg < 0 || write(kmsg, summary, strlen(summary)) < 0)
		fputs(summary + 3, stdout);
	return 0;
}
