// SPDX-License-Identifier: GPL-2.0
/*
 * hmmgpu-hostile: a hostile guest for the hmmgpu device, for the
 * hostile-guest VM test only (ci/xtask/src/tests/hostile.rs,
 * docs/device-spec.md "Against a hostile or broken guest"). Never load it
 * anywhere else: it floods the device it is bound to with work it cannot
 * finish and with garbage.
 *
 * It is a virtio driver with hmmgpu's device id that binds nothing unless
 * told which attack to run: the test unbinds hmmgpu.ko from a device
 * through sysfs, writes a phase name into /sys/module/hmmgpu_hostile/
 * parameters/phase and binds this driver to the device. The probe starts
 * the attack, bypassing hmmgpu.ko, with descriptor chains it builds itself
 * on the command queue, and keeps every descriptor of the ring in use until
 * the device is unbound (each completion is refilled at once, by a work
 * item the interrupt queues: refilling in the interrupt itself would keep
 * a vCPU of a slow guest, the debug kernel's, in hard-interrupt context
 * for as long as the device keeps up, and starve the guest's own processes
 * and the timed reads below). The phases:
 *
 *   idle   no command at all: the figures without an attack, to compare
 *   fill   FILL commands of 4096 ranges, each the whole VRAM (up to 2 GiB,
 *          aliased): 8 TiB per command with a 2 GiB VRAM
 *   vread  a context mapping one 2 MiB VRAM page at 4096 device virtual
 *          addresses; VREADs of 4096 ranges through those aliases, 8 GiB
 *          per command, into one 2 MiB buffer
 *   ring   small commands (FILL, COPY, NOP, COUNTERS), the ring kept full
 *   flood  malformed chains and commands (unknown opcodes, bad headers,
 *          bad ranges, chains without room for a response, buffers
 *          outside guest RAM), each with the outcome the spec gives it
 *
 * Meanwhile a real-time kthread reads the config space every few
 * milliseconds and times each read (a config-space read is synchronous for
 * the vCPU: QEMU asks the backend with GET_CONFIG while the vCPU waits).
 * The remove (unbind) resets the device, which abandons whatever is left.
 * For the host test the module prints (KERN_NOTICE: the test's console
 * shows levels below 6; kernel records reach the console whole, where a
 * shell's echo can be cut by them) when the probe starts the attack
 *
 *   HOSTILE-PHASE P
 *
 * and when the remove has ended it
 *
 *   HOSTILE-CONFIG phase=P reads=N bad=B slow=S p50_us=X p99_us=Y max_us=Z
 *   HOSTILE-CHAINS phase=P ring=R submitted=N completed=C unexpected=U
 *       dropped=D status=S0/S1/.../S7 abandoned=A setup_us=T reset_us=R
 *
 * (one line each). `unexpected` counts completions whose used length or
 * status is not what the spec says for that chain.
 */

#include <linux/completion.h>
#include <linux/delay.h>
#include <linux/gfp.h>
#include <linux/kthread.h>
#include <linux/ktime.h>
#include <linux/module.h>
#include <linux/scatterlist.h>
#include <linux/sched.h>
#include <linux/slab.h>
#include <linux/sort.h>
#include <linux/string.h>
#include <linux/unaligned.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>
#include <linux/workqueue.h>

#include "hmmgpu_abi.h"

static char phase[16];
module_param_string(phase, phase, sizeof(phase), 0644);
MODULE_PARM_DESC(phase, "attack the next bound device runs: idle, fill, vread, ring or flood (empty: bind nothing)");

enum hostile_phase {
	PHASE_IDLE, PHASE_FILL, PHASE_VREAD, PHASE_RING, PHASE_FLOOD, PHASES
};

static const char *const phase_names[PHASES] = {
	[PHASE_IDLE] = "idle",
	[PHASE_FILL] = "fill",
	[PHASE_VREAD] = "vread",
	[PHASE_RING] = "ring",
	[PHASE_FLOOD] = "flood",
};

/* A guest-physical address far beyond any guest's RAM. */
#define NOWHERE (1ULL << 50)
/* The device MMU context of the vread phase: the last one. */
#define HOSTILE_CTX HMMGPU_MAX_CONTEXTS
/* Where the vread phase's aliases start in the device virtual space. */
#define ALIAS_BASE (1ULL << 40)
#define FILL_PATTERN 0x21656c6974736f68ULL /* "hostile!" */
/* Config reads: one every PROBE_INTERVAL_US, at most MAX_SAMPLES kept. */
#define PROBE_INTERVAL_US 2000
#define MAX_SAMPLES 65536
/* A config read slower than this is printed as it happens, and counted. */
#define SLOW_READ_US 100000
/* How long a setup command (CTX_CREATE, MAP) may take. */
#define SETUP_TIMEOUT_MS 30000
#define NO_STATUS 0xffffffffu

/* How a chain is laid out. */
enum shape {
	SHAPE_CMD_RESP,		/* the command, then room for a response */
	SHAPE_CMD_ONLY,		/* no writable part */
	SHAPE_CMD_SHORT_RESP,	/* a writable part 8 bytes long */
	SHAPE_RESP_ONLY,	/* no readable part: no command */
	SHAPE_CMD_NOWHERE,	/* one readable descriptor outside guest RAM */
	SHAPE_RESP_NOWHERE,	/* one writable descriptor outside guest RAM */
};

/* One kind of chain: its command, its layout and its expected outcome. */
struct kind {
	const char *name;
	enum shape shape;
	/* The HMMGPU_STATUS_* it completes with, or NO_STATUS: dropped by the
	 * device (used length 0). */
	u32 status;
	u8 *cmd;
	size_t len;
};

#define MAX_KINDS 16

struct slot {
	unsigned int kind;
	bool setup;
	u8 *resp;
};

struct hostile {
	struct virtio_device *vdev;
	struct virtqueue *vq;
	enum hostile_phase phase;
	u64 vram_size;

	/* Guards the virtqueue and everything counted below. */
	spinlock_t lock;
	/* Takes the completions and refills (queued by the interrupt). */
	struct work_struct drain;
	bool stopping;
	struct kind kinds[MAX_KINDS];
	unsigned int nkinds, next_kind;
	struct slot *slots;
	unsigned int nslots;
	u8 *resps;
	struct slot setup_slot;
	struct completion setup_done;
	u32 setup_len;

	/* The vread phase's destination, and the COUNTERS block of ring. */
	struct page *buf;
	u8 *counters;

	u64 submitted, completed, unexpected, dropped, abandoned;
	u64 statuses[HMMGPU_STATUS_BAD_CONTEXT + 1];
	s64 setup_us, reset_us;

	struct task_struct *prober;
	u32 *lat_us;
	unsigned int nlat;
	u64 reads, bad_reads, slow_reads;
	u32 max_us;
};

static void put_header(u8 *b, u32 opcode, u32 ctx, u32 count)
{
	memset(b, 0, HMMGPU_CMD_HEADER_SIZE);
	put_unaligned_le32(opcode, b + HMMGPU_CMD_OFF_OPCODE);
	put_unaligned_le32(ctx, b + HMMGPU_CMD_OFF_CTX);
	put_unaligned_le64(0x686f7374696c65ULL, b + HMMGPU_CMD_OFF_TAG);
	put_unaligned_le32(count, b + HMMGPU_CMD_OFF_COUNT);
}

static void put_range(u8 *b, unsigned int i, u64 src, u64 dst, u32 len,
		      u32 flags)
{
	u8 *r = b + HMMGPU_CMD_HEADER_SIZE + (size_t)i * HMMGPU_RANGE_SIZE;

	put_unaligned_le64(src, r + HMMGPU_RANGE_OFF_SRC);
	put_unaligned_le64(dst, r + HMMGPU_RANGE_OFF_DST);
	put_unaligned_le32(len, r + HMMGPU_RANGE_OFF_LEN);
	put_unaligned_le32(flags, r + HMMGPU_RANGE_OFF_FLAGS);
}

static size_t cmd_len(unsigned int ranges)
{
	return HMMGPU_CMD_HEADER_SIZE + (size_t)ranges * HMMGPU_RANGE_SIZE;
}

/*
 * Adds a kind with a command of `ranges` ranges (the buffer is left for the
 * caller to fill); returns its buffer, or NULL.
 */
static u8 *add_kind(struct hostile *h, const char *name, enum shape shape,
		    u32 status, unsigned int ranges)
{
	struct kind *k;

	if (WARN_ON_ONCE(h->nkinds == MAX_KINDS))
		return NULL;
	k = &h->kinds[h->nkinds];
	k->len = cmd_len(ranges);
	/* Physically contiguous: one descriptor however long. */
	k->cmd = kzalloc(k->len, GFP_KERNEL);
	if (!k->cmd)
		return NULL;
	k->name = name;
	k->shape = shape;
	k->status = status;
	h->nkinds++;
	return k->cmd;
}

static void free_kinds(struct hostile *h)
{
	while (h->nkinds)
		kfree(h->kinds[--h->nkinds].cmd);
}

/* Puts `slot`'s chain of kind `kind` on the queue (not kicked). */
static int add_chain(struct hostile *h, struct slot *slot,
		     const struct kind *k, gfp_t gfp)
{
	struct scatterlist out, in, *sgs[2] = { &out, &in };

	memset(slot->resp, 0xff, HMMGPU_RESPONSE_SIZE);
	sg_init_one(&out, k->cmd, k->len);
	sg_init_one(&in, slot->resp, HMMGPU_RESPONSE_SIZE);
	switch (k->shape) {
	case SHAPE_CMD_RESP:
		return virtqueue_add_sgs(h->vq, sgs, 1, 1, slot, gfp);
	case SHAPE_CMD_ONLY:
		return virtqueue_add_outbuf(h->vq, &out, 1, slot, gfp);
	case SHAPE_CMD_SHORT_RESP:
		sg_init_one(&in, slot->resp, 8);
		return virtqueue_add_sgs(h->vq, sgs, 1, 1, slot, gfp);
	case SHAPE_RESP_ONLY:
		return virtqueue_add_inbuf(h->vq, &in, 1, slot, gfp);
	case SHAPE_CMD_NOWHERE:
		/* Premapped: the ring takes the address as it is. */
		sg_init_table(&out, 1);
		sg_dma_address(&out) = NOWHERE;
		sg_dma_len(&out) = k->len;
		return virtqueue_add_outbuf_premapped(h->vq, &out, 1, slot, gfp);
	case SHAPE_RESP_NOWHERE:
		sg_init_table(&in, 1);
		sg_dma_address(&in) = NOWHERE;
		sg_dma_len(&in) = HMMGPU_RESPONSE_SIZE;
		return virtqueue_add_inbuf_premapped(h->vq, &in, 1, slot, NULL,
						     gfp);
	}
	return -EINVAL;
}

/* Refills `slot` with the next kind of the phase. Called with the lock. */
static int refill(struct hostile *h, struct slot *slot, gfp_t gfp)
{
	int ret;

	slot->kind = h->next_kind;
	ret = add_chain(h, slot, &h->kinds[slot->kind], gfp);
	if (!ret) {
		h->submitted++;
		h->next_kind = (h->next_kind + 1) % h->nkinds;
	}
	return ret;
}

/* Counts a completion. Called with the lock. */
static void account(struct hostile *h, struct slot *slot, unsigned int len)
{
	const struct kind *k = &h->kinds[slot->kind];
	u32 status = get_unaligned_le32(slot->resp + HMMGPU_RESPONSE_OFF_STATUS);
	bool expected;

	h->completed++;
	if (len == 0) {
		h->dropped++;
		expected = k->status == NO_STATUS;
	} else {
		if (status < ARRAY_SIZE(h->statuses))
			h->statuses[status]++;
		expected = len == HMMGPU_RESPONSE_SIZE && status == k->status;
	}
	if (!expected && ++h->unexpected <= 5)
		pr_err("hmmgpu-hostile: a chain of kind %s completed with used length %u, status %u; expected %s %u\n",
		       k->name, len, status,
		       k->status == NO_STATUS ? "used length" : "status",
		       k->status == NO_STATUS ? 0 : k->status);
}

/* The command queue's interrupt: the work item takes it from here. */
static void hostile_done(struct virtqueue *vq)
{
	struct hostile *h = vq->vdev->priv;
	unsigned long flags;

	spin_lock_irqsave(&h->lock, flags);
	virtqueue_disable_cb(vq);
	spin_unlock_irqrestore(&h->lock, flags);
	queue_work(system_dfl_wq, &h->drain);
}

/*
 * Takes at most a ring's worth of completions and refills their slots,
 * then turns the interrupt back on, or queues itself again when there is
 * more: the kworker shares its CPU with the guest's processes.
 */
static void hostile_drain(struct work_struct *work)
{
	struct hostile *h = container_of(work, struct hostile, drain);
	struct virtqueue *vq = h->vq;
	unsigned int len, taken = 0;
	struct slot *slot;
	bool kick = false, more;

	spin_lock_irq(&h->lock);
	while (taken < h->nslots && (slot = virtqueue_get_buf(vq, &len))) {
		taken++;
		if (slot->setup) {
			h->setup_len = len;
			complete(&h->setup_done);
			continue;
		}
		account(h, slot, len);
		/* Every descriptor stays in use: refill at once. */
		if (!h->stopping && !refill(h, slot, GFP_ATOMIC))
			kick = true;
	}
	if (kick)
		virtqueue_kick(vq);
	more = taken == h->nslots || !virtqueue_enable_cb(vq);
	if (more)
		virtqueue_disable_cb(vq);
	spin_unlock_irq(&h->lock);
	if (more)
		queue_work(system_dfl_wq, &h->drain);
}

/*
 * Runs one setup command and waits for it; returns its status, or a
 * negative errno.
 */
static int run_setup(struct hostile *h, u8 *cmd, size_t len)
{
	struct scatterlist out, in, *sgs[2] = { &out, &in };
	struct slot *slot = &h->setup_slot;
	unsigned long left;
	int ret;

	reinit_completion(&h->setup_done);
	memset(slot->resp, 0xff, HMMGPU_RESPONSE_SIZE);
	sg_init_one(&out, cmd, len);
	sg_init_one(&in, slot->resp, HMMGPU_RESPONSE_SIZE);
	spin_lock_irq(&h->lock);
	ret = virtqueue_add_sgs(h->vq, sgs, 1, 1, slot, GFP_ATOMIC);
	if (!ret)
		virtqueue_kick(h->vq);
	spin_unlock_irq(&h->lock);
	if (ret)
		return ret;
	left = wait_for_completion_timeout(&h->setup_done,
					   msecs_to_jiffies(SETUP_TIMEOUT_MS));
	if (!left)
		return -ETIMEDOUT;
	if (h->setup_len != HMMGPU_RESPONSE_SIZE)
		return -EIO;
	return get_unaligned_le32(slot->resp + HMMGPU_RESPONSE_OFF_STATUS);
}

/* The command of a setup step without ranges. */
static int run_setup_op(struct hostile *h, u32 opcode, u32 ctx)
{
	u8 cmd[HMMGPU_CMD_HEADER_SIZE];

	put_header(cmd, opcode, ctx, 0);
	return run_setup(h, cmd, sizeof(cmd));
}

/* The largest FILL range that fits in the VRAM and in a u32: up to 2 GiB. */
static u32 fill_range_len(u64 vram_size)
{
	return vram_size >= (1ULL << 31) ? 1U << 31 : (u32)vram_size;
}

static int build_fill(struct hostile *h)
{
	u32 len = fill_range_len(h->vram_size);
	unsigned int i;
	u8 *c;

	c = add_kind(h, "fill", SHAPE_CMD_RESP, HMMGPU_STATUS_OK,
		     HMMGPU_MAX_RANGES);
	if (!c)
		return -ENOMEM;
	put_header(c, HMMGPU_OP_FILL, 0, HMMGPU_MAX_RANGES);
	for (i = 0; i < HMMGPU_MAX_RANGES; i++)
		put_range(c, i, FILL_PATTERN, 0, len, HMMGPU_RANGE_DST_VRAM);
	pr_notice("hmmgpu-hostile: fill: FILL commands of %u ranges of %u MiB (VRAM %llu MiB): %llu GiB each\n",
		  HMMGPU_MAX_RANGES, len >> 20, h->vram_size >> 20,
		  ((u64)len * HMMGPU_MAX_RANGES) >> 30);
	return 0;
}

/*
 * The vread phase: context HOSTILE_CTX maps VRAM page 0 at 4096 device
 * virtual addresses; each VREAD reads every alias into one 2 MiB buffer.
 */
static int build_vread(struct hostile *h)
{
	u64 dst = page_to_phys(h->buf);
	unsigned int i;
	ktime_t t0;
	u8 *map, *c;
	int status;

	map = kzalloc(cmd_len(HMMGPU_MAX_RANGES), GFP_KERNEL);
	if (!map)
		return -ENOMEM;
	put_header(map, HMMGPU_OP_MAP, HOSTILE_CTX, HMMGPU_MAX_RANGES);
	for (i = 0; i < HMMGPU_MAX_RANGES; i++)
		put_range(map, i, 0,
			  ALIAS_BASE + (u64)i * HMMGPU_HUGE_PAGE_SIZE,
			  HMMGPU_HUGE_PAGE_SIZE,
			  HMMGPU_RANGE_SRC_VRAM | HMMGPU_RANGE_MAP_READ |
			  HMMGPU_RANGE_MAP_HUGE);
	t0 = ktime_get();
	/* A context left by an earlier run goes first (BAD_CONTEXT if none). */
	status = run_setup_op(h, HMMGPU_OP_CTX_DESTROY, HOSTILE_CTX);
	if (status >= 0)
		status = run_setup_op(h, HMMGPU_OP_CTX_CREATE, HOSTILE_CTX);
	if (status == HMMGPU_STATUS_OK)
		status = run_setup(h, map, cmd_len(HMMGPU_MAX_RANGES));
	h->setup_us = ktime_us_delta(ktime_get(), t0);
	kfree(map);
	if (status != HMMGPU_STATUS_OK) {
		pr_err("hmmgpu-hostile: vread: setting up the aliased context failed (%d)\n",
		       status);
		return status < 0 ? status : -EIO;
	}

	c = add_kind(h, "vread", SHAPE_CMD_RESP, HMMGPU_STATUS_OK,
		     HMMGPU_MAX_RANGES);
	if (!c)
		return -ENOMEM;
	put_header(c, HMMGPU_OP_VREAD, HOSTILE_CTX, HMMGPU_MAX_RANGES);
	for (i = 0; i < HMMGPU_MAX_RANGES; i++)
		put_range(c, i, ALIAS_BASE + (u64)i * HMMGPU_HUGE_PAGE_SIZE,
			  dst, HMMGPU_HUGE_PAGE_SIZE, 0);
	pr_notice("hmmgpu-hostile: vread: one 2 MiB VRAM page mapped at %u device virtual addresses; VREADs of %u ranges: %llu GiB each\n",
		  HMMGPU_MAX_RANGES, HMMGPU_MAX_RANGES,
		  ((u64)HMMGPU_HUGE_PAGE_SIZE * HMMGPU_MAX_RANGES) >> 30);
	return 0;
}

/* Small, valid commands that keep the ring busy. */
static int build_ring(struct hostile *h)
{
	u32 mib = 1 << 20;
	u8 *c;

	c = add_kind(h, "ring-fill", SHAPE_CMD_RESP, HMMGPU_STATUS_OK, 1);
	if (!c)
		return -ENOMEM;
	put_header(c, HMMGPU_OP_FILL, 0, 1);
	put_range(c, 0, FILL_PATTERN, 0, mib, HMMGPU_RANGE_DST_VRAM);

	c = add_kind(h, "ring-copy", SHAPE_CMD_RESP, HMMGPU_STATUS_OK, 1);
	if (!c)
		return -ENOMEM;
	put_header(c, HMMGPU_OP_COPY, 0, 1);
	put_range(c, 0, 0, mib, mib,
		  HMMGPU_RANGE_SRC_VRAM | HMMGPU_RANGE_DST_VRAM);

	c = add_kind(h, "ring-nop", SHAPE_CMD_RESP, HMMGPU_STATUS_OK, 0);
	if (!c)
		return -ENOMEM;
	put_header(c, HMMGPU_OP_NOP, 0, 0);

	c = add_kind(h, "ring-counters", SHAPE_CMD_RESP, HMMGPU_STATUS_OK, 1);
	if (!c)
		return -ENOMEM;
	put_header(c, HMMGPU_OP_COUNTERS, 0, 1);
	put_range(c, 0, 0, virt_to_phys(h->counters), HMMGPU_COUNTERS_SIZE, 0);
	return 0;
}

/* Malformed chains and commands, each with the outcome the spec gives it. */
static int build_flood(struct hostile *h)
{
	u8 *c;

#define KIND(name, shape, status, ranges)				\
	do {								\
		c = add_kind(h, name, shape, status, ranges);		\
		if (!c)							\
			return -ENOMEM;					\
	} while (0)

	KIND("unknown-opcode", SHAPE_CMD_RESP, HMMGPU_STATUS_UNSUPPORTED, 0);
	put_header(c, 0x7fffffff, 0, 0);

	/* count above max_ranges, with no ranges after the header */
	KIND("too-many-ranges", SHAPE_CMD_RESP, HMMGPU_STATUS_BAD_REQUEST, 0);
	put_header(c, HMMGPU_OP_COPY, 0, HMMGPU_MAX_RANGES + 1);

	KIND("reserved-set", SHAPE_CMD_RESP, HMMGPU_STATUS_BAD_REQUEST, 0);
	put_header(c, HMMGPU_OP_NOP, 0, 0);
	put_unaligned_le32(1, c + HMMGPU_CMD_OFF_RESERVED);

	KIND("short-header", SHAPE_CMD_RESP, HMMGPU_STATUS_BAD_REQUEST, 0);
	put_header(c, HMMGPU_OP_NOP, 0, 0);
	h->kinds[h->nkinds - 1].len = HMMGPU_CMD_HEADER_SIZE / 2;

	KIND("nop-with-a-range", SHAPE_CMD_RESP, HMMGPU_STATUS_BAD_REQUEST, 1);
	put_header(c, HMMGPU_OP_NOP, 0, 1);

	KIND("vread-on-ctx-0", SHAPE_CMD_RESP, HMMGPU_STATUS_BAD_CONTEXT, 1);
	put_header(c, HMMGPU_OP_VREAD, 0, 1);
	put_range(c, 0, 0, 0, HMMGPU_PAGE_SIZE, 0);

	KIND("ctx-out-of-range", SHAPE_CMD_RESP, HMMGPU_STATUS_BAD_CONTEXT, 0);
	put_header(c, HMMGPU_OP_CTX_CREATE, HMMGPU_MAX_CONTEXTS + 1, 0);

	KIND("unknown-flags", SHAPE_CMD_RESP, HMMGPU_STATUS_BAD_REQUEST, 1);
	put_header(c, HMMGPU_OP_FILL, 0, 1);
	put_range(c, 0, FILL_PATTERN, 0, HMMGPU_PAGE_SIZE, 1U << 31);

	/* Two ranges announced, one present. */
	KIND("truncated-ranges", SHAPE_CMD_RESP, HMMGPU_STATUS_BAD_REQUEST, 1);
	put_header(c, HMMGPU_OP_COPY, 0, 2);
	put_range(c, 0, 0, HMMGPU_PAGE_SIZE, HMMGPU_PAGE_SIZE,
		  HMMGPU_RANGE_SRC_VRAM | HMMGPU_RANGE_DST_VRAM);

	KIND("fill-past-the-vram", SHAPE_CMD_RESP,
	     HMMGPU_STATUS_BAD_VRAM_RANGE, 1);
	put_header(c, HMMGPU_OP_FILL, 0, 1);
	put_range(c, 0, FILL_PATTERN, h->vram_size - HMMGPU_PAGE_SIZE,
		  2 * HMMGPU_PAGE_SIZE, HMMGPU_RANGE_DST_VRAM);

	KIND("copy-from-outside-ram", SHAPE_CMD_RESP,
	     HMMGPU_STATUS_BAD_GUEST_ADDR, 1);
	put_header(c, HMMGPU_OP_COPY, 0, 1);
	put_range(c, 0, NOWHERE, 0, HMMGPU_PAGE_SIZE, HMMGPU_RANGE_DST_VRAM);

	KIND("no-writable-part", SHAPE_CMD_ONLY, NO_STATUS, 0);
	put_header(c, HMMGPU_OP_NOP, 0, 0);

	KIND("short-writable-part", SHAPE_CMD_SHORT_RESP, NO_STATUS, 0);
	put_header(c, HMMGPU_OP_NOP, 0, 0);

	KIND("no-command", SHAPE_RESP_ONLY, HMMGPU_STATUS_BAD_REQUEST, 0);

	KIND("command-outside-ram", SHAPE_CMD_NOWHERE, NO_STATUS, 0);

	KIND("response-outside-ram", SHAPE_RESP_NOWHERE, NO_STATUS, 0);
#undef KIND
	return 0;
}

static int cmp_u32(const void *a, const void *b)
{
	u32 x = *(const u32 *)a, y = *(const u32 *)b;

	return x < y ? -1 : x > y;
}

/* Reads and times the config space until stopped. */
static int prober(void *data)
{
	struct hostile *h = data;

	while (!kthread_should_stop()) {
		ktime_t t0 = ktime_get();
		u32 magic = virtio_cread32(h->vdev, HMMGPU_CONFIG_OFF_MAGIC);
		s64 us = ktime_us_delta(ktime_get(), t0);
		u32 v = clamp_t(s64, us, 0, U32_MAX);

		h->reads++;
		if (magic != HMMGPU_CONFIG_MAGIC)
			h->bad_reads++;
		if (v > h->max_us)
			h->max_us = v;
		if (h->nlat < MAX_SAMPLES)
			h->lat_us[h->nlat++] = v;
		if (v > SLOW_READ_US) {
			h->slow_reads++;
			pr_notice("hmmgpu-hostile: %s: a config-space read took %u us\n",
				  phase_names[h->phase], v);
		}
		usleep_range(PROBE_INTERVAL_US, PROBE_INTERVAL_US + 500);
	}
	return 0;
}

static int hostile_probe(struct virtio_device *vdev)
{
	struct virtqueue_info info[HMMGPU_NUM_QUEUES] = {
		[HMMGPU_QUEUE_COMMAND] = { "command", hostile_done },
		[HMMGPU_QUEUE_EVENT] = { "event", NULL },
	};
	struct virtqueue *vqs[HMMGPU_NUM_QUEUES];
	struct hostile *h;
	unsigned int i;
	int p, ret;

	p = sysfs_match_string(phase_names, phase);
	if (p < 0)
		return -ENODEV; /* no attack named: bind nothing */
	if (virtio_cread32(vdev, HMMGPU_CONFIG_OFF_MAGIC) != HMMGPU_CONFIG_MAGIC ||
	    virtio_cread32(vdev, HMMGPU_CONFIG_OFF_VERSION) != HMMGPU_ABI_VERSION)
		return -ENODEV;

	h = kzalloc(sizeof(*h), GFP_KERNEL);
	if (!h)
		return -ENOMEM;
	h->vdev = vdev;
	h->phase = p;
	h->vram_size = virtio_cread64(vdev, HMMGPU_CONFIG_OFF_VRAM_SIZE);
	pr_notice("HOSTILE-PHASE %s\n", phase_names[p]);
	spin_lock_init(&h->lock);
	INIT_WORK(&h->drain, hostile_drain);
	init_completion(&h->setup_done);
	vdev->priv = h;

	ret = virtio_find_vqs(vdev, HMMGPU_NUM_QUEUES, vqs, info, NULL);
	if (ret)
		goto free;
	h->vq = vqs[HMMGPU_QUEUE_COMMAND];
	h->nslots = virtqueue_get_vring_size(h->vq);
	ret = -ENOMEM;
	h->slots = kcalloc(h->nslots, sizeof(*h->slots), GFP_KERNEL);
	h->resps = kcalloc(h->nslots + 1, HMMGPU_RESPONSE_SIZE, GFP_KERNEL);
	h->lat_us = kvmalloc_array(MAX_SAMPLES, sizeof(u32), GFP_KERNEL);
	h->counters = kzalloc(HMMGPU_COUNTERS_SIZE, GFP_KERNEL);
	h->buf = alloc_pages(GFP_KERNEL, get_order(HMMGPU_HUGE_PAGE_SIZE));
	if (!h->slots || !h->resps || !h->lat_us || !h->counters || !h->buf)
		goto del_vqs;
	for (i = 0; i < h->nslots; i++)
		h->slots[i].resp = h->resps + i * HMMGPU_RESPONSE_SIZE;
	h->setup_slot.setup = true;
	h->setup_slot.resp = h->resps + h->nslots * HMMGPU_RESPONSE_SIZE;

	virtio_device_ready(vdev);
	h->prober = kthread_run(prober, h, "hmmgpu-hostile-probe");
	if (IS_ERR(h->prober)) {
		ret = PTR_ERR(h->prober);
		h->prober = NULL;
		goto reset;
	}
	/* Timed reads, not delayed by the busy processes beside it. */
	sched_set_fifo(h->prober);

	switch (h->phase) {
	case PHASE_IDLE:
		ret = 0;
		break;
	case PHASE_FILL:
		ret = build_fill(h);
		break;
	case PHASE_VREAD:
		ret = build_vread(h);
		break;
	case PHASE_RING:
		ret = build_ring(h);
		break;
	default:
		ret = build_flood(h);
		break;
	}
	if (ret)
		goto stop;

	/* Every descriptor of the ring in use. */
	spin_lock_irq(&h->lock);
	for (i = 0; i < h->nslots && h->nkinds; i++)
		if (refill(h, &h->slots[i], GFP_ATOMIC))
			break;
	virtqueue_kick(h->vq);
	spin_unlock_irq(&h->lock);
	pr_notice("hmmgpu-hostile: %s: %llu chains on a ring of %u descriptors\n",
		  phase_names[h->phase], h->submitted, h->nslots);
	return 0;

stop:
	kthread_stop(h->prober);
reset:
	virtio_reset_device(vdev);
	cancel_work_sync(&h->drain);
del_vqs:
	vdev->config->del_vqs(vdev);
	free_kinds(h);
	if (h->buf)
		__free_pages(h->buf, get_order(HMMGPU_HUGE_PAGE_SIZE));
	kfree(h->counters);
	kvfree(h->lat_us);
	kfree(h->resps);
	kfree(h->slots);
free:
	kfree(h);
	return ret;
}

static void hostile_remove(struct virtio_device *vdev)
{
	struct hostile *h = vdev->priv;
	u32 p50 = 0, p99 = 0;
	ktime_t t0;

	spin_lock_irq(&h->lock);
	h->stopping = true;
	spin_unlock_irq(&h->lock);
	kthread_stop(h->prober);

	/* The reset abandons what is left; it must be prompt too. */
	t0 = ktime_get();
	virtio_reset_device(vdev);
	h->reset_us = ktime_us_delta(ktime_get(), t0);
	/* No interrupt after the reset: nothing queues the work again. */
	cancel_work_sync(&h->drain);
	while (virtqueue_detach_unused_buf(h->vq))
		h->abandoned++;
	vdev->config->del_vqs(vdev);

	if (h->nlat) {
		sort(h->lat_us, h->nlat, sizeof(u32), cmp_u32, NULL);
		p50 = h->lat_us[h->nlat / 2];
		p99 = h->lat_us[(h->nlat - 1) * 99 / 100];
	}
	pr_notice("HOSTILE-CONFIG phase=%s reads=%llu bad=%llu slow=%llu p50_us=%u p99_us=%u max_us=%u\n",
		  phase_names[h->phase], h->reads, h->bad_reads, h->slow_reads,
		  p50, p99, h->max_us);
	pr_notice("HOSTILE-CHAINS phase=%s ring=%u submitted=%llu completed=%llu unexpected=%llu dropped=%llu status=%llu/%llu/%llu/%llu/%llu/%llu/%llu/%llu abandoned=%llu setup_us=%lld reset_us=%lld\n",
		  phase_names[h->phase], h->nslots, h->submitted, h->completed,
		  h->unexpected, h->dropped, h->statuses[0], h->statuses[1],
		  h->statuses[2], h->statuses[3], h->statuses[4], h->statuses[5],
		  h->statuses[6], h->statuses[7], h->abandoned, h->setup_us,
		  h->reset_us);

	free_kinds(h);
	__free_pages(h->buf, get_order(HMMGPU_HUGE_PAGE_SIZE));
	kfree(h->counters);
	kvfree(h->lat_us);
	kfree(h->resps);
	kfree(h->slots);
	kfree(h);
}

static const struct virtio_device_id hostile_ids[] = {
	{ HMMGPU_VIRTIO_ID, VIRTIO_DEV_ANY_ID },
	{ 0 },
};
/* No MODULE_DEVICE_TABLE: nothing may load this module by the device id. */

static struct virtio_driver hostile_driver = {
	.driver.name = "hmmgpu-hostile",
	.id_table = hostile_ids,
	.probe = hostile_probe,
	.remove = hostile_remove,
};
module_virtio_driver(hostile_driver);

MODULE_DESCRIPTION("hmmgpu hostile guest: a test-only virtio driver that floods an hmmgpu device");
MODULE_LICENSE("GPL");
