// SPDX-License-Identifier: GPL-2.0
/*
 * hmmgpu C shim: thin wrappers for the kernel APIs that have no Rust
 * abstraction yet (virtio, memremap, migrate, hmm, mmu_interval_notifier).
 * Each function is one API call plus the struct marshalling it needs; the
 * decisions (what to migrate, where, how to copy, locking) live in Rust.
 * Declarations for Rust are in shim.rs; keep the two in sync.
 */
#include <linux/debugfs.h>
#include <linux/highmem.h>
#include <linux/hmm.h>
#include <linux/memremap.h>
#include <linux/migrate.h>
#include <linux/mm.h>
#include <linux/mmu_notifier.h>
#include <linux/module.h>
#include <linux/pagemap.h>
#include <linux/rmap.h>
#include <linux/sched/mm.h>
#include <linux/seq_file.h>
#include <linux/slab.h>
#include <linux/vmalloc.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>

#include "shim.h"

/* ---- constants Rust needs (macros or enums on the C side) ---- */

const unsigned long hmmgpu_MIGRATE_PFN_VALID = MIGRATE_PFN_VALID;
const unsigned long hmmgpu_MIGRATE_PFN_MIGRATE = MIGRATE_PFN_MIGRATE;
const unsigned long hmmgpu_MIGRATE_PFN_WRITE = MIGRATE_PFN_WRITE;
const unsigned long hmmgpu_MIGRATE_PFN_COMPOUND = MIGRATE_PFN_COMPOUND;
/*
 * One migrate_vma step covers at most one 2 MiB range: a PMD (one THP) on
 * x86_64 and on ppc64 radix with 4 KiB pages, and one device huge page. Not
 * PTRS_PER_PTE itself: on book3s64 that is chosen at boot (hash or radix)
 * and cannot size an array; hmmgpu_shim_pmd_is_2m() checks it at probe.
 */
#define HMMGPU_MIGRATE_MAX_PAGES (SZ_2M >> PAGE_SHIFT)
const unsigned long hmmgpu_MIGRATE_MAX_PAGES = HMMGPU_MIGRATE_MAX_PAGES;

/* ---- virtio ---- */

static const struct virtio_device_id hmmgpu_id_table[] = {
	{ 63 /* VIRTIO_ID_HMMGPU, see device/abi */, VIRTIO_DEV_ANY_ID },
	{ 0 },
};
MODULE_DEVICE_TABLE(virtio, hmmgpu_id_table);

static int hmmgpu_virtio_probe(struct virtio_device *vdev)
{
	/* Commands carry guest-physical addresses: no IOMMU in between. */
	if (virtio_has_feature(vdev, VIRTIO_F_ACCESS_PLATFORM)) {
		dev_err(&vdev->dev, "VIRTIO_F_ACCESS_PLATFORM is not supported\n");
		return -EINVAL;
	}
	return hmmgpu_rust_probe(vdev);
}

static void hmmgpu_virtio_remove(struct virtio_device *vdev)
{
	hmmgpu_rust_remove(vdev);
}

/* A transport reset (PCI function or bus reset) is coming: quiesce. */
static int hmmgpu_virtio_reset_prepare(struct virtio_device *vdev)
{
	hmmgpu_rust_reset_prepare(vdev);
	return 0;
}

/* The virtio core reset and renegotiated the device: bring it back. */
static int hmmgpu_virtio_reset_done(struct virtio_device *vdev)
{
	return hmmgpu_rust_reset_done(vdev);
}

static struct virtio_driver hmmgpu_virtio_driver = {
	.driver.name = KBUILD_MODNAME,
	.id_table = hmmgpu_id_table,
	.probe = hmmgpu_virtio_probe,
	.remove = hmmgpu_virtio_remove,
	.reset_prepare = hmmgpu_virtio_reset_prepare,
	.reset_done = hmmgpu_virtio_reset_done,
};

int hmmgpu_shim_register_driver(void)
{
	return register_virtio_driver(&hmmgpu_virtio_driver);
}

void hmmgpu_shim_unregister_driver(void)
{
	unregister_virtio_driver(&hmmgpu_virtio_driver);
}

struct device *hmmgpu_shim_vdev_dev(struct virtio_device *vdev)
{
	return &vdev->dev;
}

void hmmgpu_shim_read_config(struct virtio_device *vdev, unsigned int offset,
			     void *buf, size_t len)
{
	virtio_cread_bytes(vdev, offset, buf, len);
}

bool hmmgpu_shim_get_shm(struct virtio_device *vdev, u8 id, u64 *addr,
			 u64 *len)
{
	struct virtio_shm_region region;

	if (!virtio_get_shm_region(vdev, &region, id))
		return false;
	*addr = region.addr;
	*len = region.len;
	return true;
}

/*
 * The queues. Commands may be in flight concurrently and complete out of
 * order (a command parked on a device fault completes after later ones);
 * each carries a struct hmmgpu_cmd as its token, completed by the interrupt.
 * Event buffers are handed to Rust from the interrupt and reposted.
 */
#define HMMGPU_EVENT_SIZE	32	/* abi::Event::SIZE */
#define HMMGPU_EVENT_BUFS	64

/*
 * A waiter that sees no completion for this long polls the used ring
 * itself: the device may have completed the command without an interrupt
 * (a lost interrupt; with VIRTIO_RING_F_EVENT_IDX none comes until the
 * driver moves used_event on).
 */
#define HMMGPU_POLL_MS		250

struct hmmgpu_cmd {
	struct completion done;
	unsigned int len;
	bool completed;
	bool aborted;		/* given back by a device reset, not executed */
};

/* Whether commands may be submitted (see hmmgpu_shim_queues_stop()). */
enum hmmgpu_queue_state {
	HMMGPU_QUEUES_RUNNING,
	HMMGPU_QUEUES_STOPPED,		/* no virtqueues: being reset */
	HMMGPU_QUEUES_RESTARTING,	/* new virtqueues, for the resetter only */
	HMMGPU_QUEUES_DEAD,		/* the reset failed */
};

struct hmmgpu_queues {
	struct virtio_device *vdev;
	struct virtqueue *cmd_vq;
	spinlock_t cmd_lock;		/* serializes cmd_vq operations, state */
	enum hmmgpu_queue_state state;
	wait_queue_head_t state_wq;	/* woken when state leaves STOPPED/RESTARTING */
	unsigned long polled;		/* completions found by polling */
	struct virtqueue *event_vq;
	spinlock_t event_lock;		/* serializes event_vq operations */
	void *gpu;			/* Rust cookie for events; NULL until started */
	void *rust_priv;		/* hmmgpu_shim_set_priv() */
	u8 event_bufs[HMMGPU_EVENT_BUFS][HMMGPU_EVENT_SIZE];
};

/*
 * vdev->priv is the shim's struct hmmgpu_queues (the interrupt handlers
 * need it; vq->priv belongs to the transport); Rust's per-device data hangs
 * off it.
 */
void hmmgpu_shim_set_priv(struct virtio_device *vdev, void *priv)
{
	struct hmmgpu_queues *q = vdev->priv;

	q->rust_priv = priv;
}

void *hmmgpu_shim_get_priv(struct virtio_device *vdev)
{
	struct hmmgpu_queues *q = vdev->priv;

	return q->rust_priv;
}

static void hmmgpu_cmd_finish(struct hmmgpu_cmd *cmd, unsigned int len,
			      bool aborted)
{
	cmd->len = len;
	cmd->aborted = aborted;
	smp_store_release(&cmd->completed, true);
	complete(&cmd->done);
}

/* Completes every used command; returns how many. Under cmd_lock. */
static unsigned int hmmgpu_cmd_harvest(struct virtqueue *vq)
{
	struct hmmgpu_cmd *cmd;
	unsigned int len, n = 0;

	do {
		virtqueue_disable_cb(vq);
		while ((cmd = virtqueue_get_buf(vq, &len))) {
			hmmgpu_cmd_finish(cmd, len, false);
			n++;
		}
	} while (!virtqueue_enable_cb(vq));
	return n;
}

static void hmmgpu_cmd_interrupt(struct virtqueue *vq)
{
	struct hmmgpu_queues *q = vq->vdev->priv;
	unsigned long flags;

	spin_lock_irqsave(&q->cmd_lock, flags);
	hmmgpu_cmd_harvest(vq);
	spin_unlock_irqrestore(&q->cmd_lock, flags);
}

/* What an interrupt would have done, for a waiter that got none. */
static void hmmgpu_cmd_poll(struct hmmgpu_queues *q)
{
	unsigned long flags;

	spin_lock_irqsave(&q->cmd_lock, flags);
	if (q->cmd_vq)
		q->polled += hmmgpu_cmd_harvest(q->cmd_vq);
	spin_unlock_irqrestore(&q->cmd_lock, flags);
}

unsigned long hmmgpu_shim_polled_completions(struct hmmgpu_queues *q)
{
	return READ_ONCE(q->polled);
}

static int hmmgpu_event_post(struct hmmgpu_queues *q, u8 *buf)
{
	struct scatterlist sg;

	sg_init_one(&sg, buf, HMMGPU_EVENT_SIZE);
	return virtqueue_add_inbuf(q->event_vq, &sg, 1, buf, GFP_ATOMIC);
}

static void hmmgpu_event_interrupt(struct virtqueue *vq)
{
	struct hmmgpu_queues *q = vq->vdev->priv;
	unsigned long flags;
	unsigned int len;
	u8 *buf;

	spin_lock_irqsave(&q->event_lock, flags);
	do {
		virtqueue_disable_cb(vq);
		while ((buf = virtqueue_get_buf(vq, &len))) {
			if (q->gpu)
				hmmgpu_rust_event(q->gpu, buf, len);
			/* The buffer came from the ring, so there is room. */
			WARN_ON_ONCE(hmmgpu_event_post(q, buf));
		}
	} while (!virtqueue_enable_cb(vq));
	virtqueue_kick(vq);
	spin_unlock_irqrestore(&q->event_lock, flags);
}

static int hmmgpu_find_vqs(struct hmmgpu_queues *q)
{
	struct virtqueue_info infos[] = {
		{ "command", hmmgpu_cmd_interrupt },
		{ "event", hmmgpu_event_interrupt },
	};
	struct virtqueue *vqs[ARRAY_SIZE(infos)];
	unsigned long flags;
	int ret;

	ret = virtio_find_vqs(q->vdev, ARRAY_SIZE(infos), vqs, infos, NULL);
	if (ret)
		return ret;
	spin_lock_irqsave(&q->cmd_lock, flags);
	q->cmd_vq = vqs[0];
	spin_unlock_irqrestore(&q->cmd_lock, flags);
	spin_lock_irqsave(&q->event_lock, flags);
	q->event_vq = vqs[1];
	spin_unlock_irqrestore(&q->event_lock, flags);
	return 0;
}

struct hmmgpu_queues *hmmgpu_shim_queues_create(struct virtio_device *vdev)
{
	struct hmmgpu_queues *q;
	int ret;

	q = devm_kzalloc(&vdev->dev, sizeof(*q), GFP_KERNEL);
	if (!q)
		return ERR_PTR(-ENOMEM);
	q->vdev = vdev;
	spin_lock_init(&q->cmd_lock);
	spin_lock_init(&q->event_lock);
	init_waitqueue_head(&q->state_wq);
	vdev->priv = q;
	ret = hmmgpu_find_vqs(q);
	if (ret)
		return ERR_PTR(ret);
	return q;
}

/* Posts the event buffers; events are handed to hmmgpu_rust_event(@gpu). */
int hmmgpu_shim_events_start(struct hmmgpu_queues *q, void *gpu)
{
	unsigned long flags;
	int i, ret = 0;

	spin_lock_irqsave(&q->event_lock, flags);
	q->gpu = gpu;
	for (i = 0; i < HMMGPU_EVENT_BUFS && !ret; i++)
		ret = hmmgpu_event_post(q, q->event_bufs[i]);
	virtqueue_kick(q->event_vq);
	spin_unlock_irqrestore(&q->event_lock, flags);
	return ret;
}

void hmmgpu_shim_device_ready(struct virtio_device *vdev)
{
	virtio_device_ready(vdev);
}

/*
 * Resets the device and deletes the virtqueues. Every command still in the
 * command queue is finished: completed if the device got to it, aborted
 * (hmmgpu_shim_cmd_wait() returns -ECANCELED) otherwise, and the device no
 * longer owns its buffers. Submissions fail with -EAGAIN until
 * hmmgpu_shim_queues_restart(). Idempotent: nothing to do without queues.
 */
void hmmgpu_shim_queues_stop(struct virtio_device *vdev)
{
	struct hmmgpu_queues *q = vdev->priv;
	struct hmmgpu_cmd *cmd;
	unsigned long flags;
	unsigned int len;

	spin_lock_irqsave(&q->cmd_lock, flags);
	if (q->state != HMMGPU_QUEUES_DEAD)
		q->state = HMMGPU_QUEUES_STOPPED;
	spin_unlock_irqrestore(&q->cmd_lock, flags);
	if (!q->cmd_vq)
		return;
	virtio_reset_device(vdev);
	spin_lock_irqsave(&q->cmd_lock, flags);
	while ((cmd = virtqueue_get_buf(q->cmd_vq, &len)))
		hmmgpu_cmd_finish(cmd, len, false);
	while ((cmd = virtqueue_detach_unused_buf(q->cmd_vq)))
		hmmgpu_cmd_finish(cmd, 0, true);
	q->cmd_vq = NULL;
	spin_unlock_irqrestore(&q->cmd_lock, flags);
	spin_lock_irqsave(&q->event_lock, flags);
	while (virtqueue_detach_unused_buf(q->event_vq))
		; /* our static event buffers */
	q->event_vq = NULL;
	spin_unlock_irqrestore(&q->event_lock, flags);
	vdev->config->del_vqs(vdev);
}

/* Removal: the device stops for good. */
void hmmgpu_shim_device_reset(struct virtio_device *vdev)
{
	struct hmmgpu_queues *q = vdev->priv;

	hmmgpu_shim_queues_stop(vdev);
	hmmgpu_shim_queues_set_running(q, false);
}

/*
 * After hmmgpu_shim_queues_stop(): renegotiates the features if
 * @negotiate (the virtio core did it already after a transport reset),
 * creates the virtqueues, posts the event buffers and sets DRIVER_OK. Only
 * privileged submissions (the resetter's) are accepted until
 * hmmgpu_shim_queues_set_running().
 */
int hmmgpu_shim_queues_restart(struct virtio_device *vdev, bool negotiate)
{
	struct hmmgpu_queues *q = vdev->priv;
	unsigned long flags;
	int ret;

	if (negotiate) {
		virtio_add_status(vdev, VIRTIO_CONFIG_S_ACKNOWLEDGE);
		virtio_add_status(vdev, VIRTIO_CONFIG_S_DRIVER);
		ret = vdev->config->finalize_features(vdev);
		if (ret)
			return ret;
		virtio_add_status(vdev, VIRTIO_CONFIG_S_FEATURES_OK);
		if (!(vdev->config->get_status(vdev) & VIRTIO_CONFIG_S_FEATURES_OK))
			return -ENODEV;
	}
	ret = hmmgpu_find_vqs(q);
	if (ret)
		return ret;
	ret = hmmgpu_shim_events_start(q, q->gpu);
	if (ret)
		return ret;
	spin_lock_irqsave(&q->cmd_lock, flags);
	q->state = HMMGPU_QUEUES_RESTARTING;
	spin_unlock_irqrestore(&q->cmd_lock, flags);
	virtio_device_ready(vdev);
	return 0;
}

/* Ends a reset: submissions resume, or fail with -ENODEV for good. */
void hmmgpu_shim_queues_set_running(struct hmmgpu_queues *q, bool running)
{
	unsigned long flags;

	spin_lock_irqsave(&q->cmd_lock, flags);
	q->state = running ? HMMGPU_QUEUES_RUNNING : HMMGPU_QUEUES_DEAD;
	spin_unlock_irqrestore(&q->cmd_lock, flags);
	wake_up_all(&q->state_wq);
}

static bool hmmgpu_queues_settled(struct hmmgpu_queues *q)
{
	enum hmmgpu_queue_state state = READ_ONCE(q->state);

	return state == HMMGPU_QUEUES_RUNNING || state == HMMGPU_QUEUES_DEAD;
}

/* Waits up to @timeout_ms for a reset to end; whether the queues run. */
bool hmmgpu_shim_queues_wait_running(struct hmmgpu_queues *q,
				     unsigned int timeout_ms)
{
	wait_event_timeout(q->state_wq, hmmgpu_queues_settled(q),
			   msecs_to_jiffies(timeout_ms));
	return READ_ONCE(q->state) == HMMGPU_QUEUES_RUNNING;
}

/*
 * A reset allocates (virtqueues, commands) while submitters wait for it,
 * some under locks that reclaim's MMU notifiers take: it must not enter
 * reclaim itself.
 */
unsigned int hmmgpu_shim_noreclaim_save(void)
{
	return memalloc_noreclaim_save();
}

void hmmgpu_shim_noreclaim_restore(unsigned int flags)
{
	memalloc_noreclaim_restore(flags);
}

struct hmmgpu_cmd *hmmgpu_shim_cmd_alloc(void)
{
	return kzalloc(sizeof(struct hmmgpu_cmd), GFP_KERNEL);
}

void hmmgpu_shim_cmd_free(struct hmmgpu_cmd *cmd)
{
	kfree(cmd);
}

/*
 * Queues one command: @out (device-readable) and @in (device-writable) are
 * kmalloc'd buffers that must stay allocated until it completes.
 */
int hmmgpu_shim_cmd_submit(struct hmmgpu_queues *q, struct hmmgpu_cmd *cmd,
			   void *out, unsigned int out_len, void *in,
			   unsigned int in_len, bool privileged)
{
	struct scatterlist sg_out, sg_in, *sgs[2] = { &sg_out, &sg_in };
	struct virtqueue *vq;
	unsigned long flags;
	int ret;

	init_completion(&cmd->done);
	cmd->completed = false;
	cmd->aborted = false;
	cmd->len = 0;
	sg_init_one(&sg_out, out, out_len);
	sg_init_one(&sg_in, in, in_len);
	spin_lock_irqsave(&q->cmd_lock, flags);
	vq = q->cmd_vq;
	if (q->state == HMMGPU_QUEUES_DEAD)
		ret = -ENODEV;
	else if (q->state == HMMGPU_QUEUES_RUNNING ||
		 (q->state == HMMGPU_QUEUES_RESTARTING && privileged))
		ret = virtqueue_add_sgs(vq, sgs, 1, 1, cmd, GFP_ATOMIC);
	else
		ret = -EAGAIN;	/* a reset is under way */
	/* Notified under the lock: a reset may delete @vq once it is dropped. */
	if (!ret && virtqueue_kick_prepare(vq) && !virtqueue_notify(vq))
		ret = -EIO;
	spin_unlock_irqrestore(&q->cmd_lock, flags);
	return ret;
}

/*
 * Waits for @cmd. Returns its used length once it completed; -EAGAIN if
 * woken by hmmgpu_shim_cmd_wake() before completing; -ECANCELED if a reset
 * gave it back unexecuted; -ETIMEDOUT after @timeout_ms (the command may
 * still complete later: keep its buffers). Polls the ring every
 * HMMGPU_POLL_MS without an answer, so a lost interrupt costs that much.
 */
long hmmgpu_shim_cmd_wait(struct hmmgpu_queues *q, struct hmmgpu_cmd *cmd,
			  unsigned int timeout_ms)
{
	unsigned long deadline = jiffies + msecs_to_jiffies(timeout_ms);
	unsigned long slice = msecs_to_jiffies(HMMGPU_POLL_MS);

	while (!wait_for_completion_timeout(&cmd->done, slice)) {
		hmmgpu_cmd_poll(q);
		if (smp_load_acquire(&cmd->completed))
			break;
		if (time_after_eq(jiffies, deadline))
			return -ETIMEDOUT;
	}
	if (!smp_load_acquire(&cmd->completed))
		return -EAGAIN;
	if (cmd->aborted)
		return -ECANCELED;
	return cmd->len;
}

/* Whether the device has completed @cmd (its buffers are free again). */
bool hmmgpu_shim_cmd_completed(struct hmmgpu_cmd *cmd)
{
	return smp_load_acquire(&cmd->completed);
}

/* Wakes the waiter of @cmd without completing it (a fault to resolve). */
void hmmgpu_shim_cmd_wake(struct hmmgpu_cmd *cmd)
{
	complete(&cmd->done);
}

/* ---- device memory (ZONE_DEVICE) ---- */

struct hmmgpu_pagemap {
	struct dev_pagemap pgmap;
	void *gpu;
};

static void hmmgpu_folio_free(struct folio *folio)
{
	struct hmmgpu_pagemap *pm =
		container_of(folio->pgmap, struct hmmgpu_pagemap, pgmap);

	hmmgpu_rust_folio_free(pm->gpu, folio->pgmap->owner, &folio->page);
}

static vm_fault_t hmmgpu_migrate_to_ram(struct vm_fault *vmf)
{
	struct dev_pagemap *pgmap = page_pgmap(vmf->page);
	struct hmmgpu_pagemap *pm =
		container_of(pgmap, struct hmmgpu_pagemap, pgmap);

	return hmmgpu_rust_migrate_to_ram(pm->gpu, pgmap->owner, vmf);
}

/*
 * A device-private THP is being split: each new folio shares the VRAM
 * allocation of the original (Rust counts its pages back in folio_free).
 * With this op set, the core leaves pgmap and mapping to us.
 */
static void hmmgpu_folio_split(struct folio *head, struct folio *tail)
{
	if (!tail)
		return;
	tail->pgmap = head->pgmap;
	tail->page.mapping = head->page.mapping;
	tail->page.zone_device_data = head->page.zone_device_data;
}

static const struct dev_pagemap_ops hmmgpu_private_ops = {
	.folio_free = hmmgpu_folio_free,
	.migrate_to_ram = hmmgpu_migrate_to_ram,
	.folio_split = hmmgpu_folio_split,
};

/*
 * memory_failure() on a device-coherent page (a machine check in the BAR):
 * the kernel's generic handler does nothing for MEMORY_DEVICE_COHERENT
 * (mf_generic_kill_procs: -ENXIO), so the driver moves the page's owners
 * onto a poisoned system page; see hmmgpu_rust_memory_failure.
 */
static int hmmgpu_memory_failure(struct dev_pagemap *pgmap, unsigned long pfn,
				 unsigned long nr_pages, int mf_flags)
{
	struct hmmgpu_pagemap *pm =
		container_of(pgmap, struct hmmgpu_pagemap, pgmap);

	return hmmgpu_rust_memory_failure(pm->gpu, pgmap->owner, pfn, nr_pages);
}

static const struct dev_pagemap_ops hmmgpu_coherent_ops = {
	.folio_free = hmmgpu_folio_free,
	.memory_failure = hmmgpu_memory_failure,
};

/*
 * Creates struct pages for @size bytes of VRAM, managed by @dev (devm:
 * unmapped after remove): HMMGPU_MEM_PRIVATE in a free physical range, or
 * HMMGPU_MEM_COHERENT over the BAR at @phys. @owner is the pgmap owner,
 * @gpu handed to migrate_to_ram. Returns the first pfn, or 0.
 */
unsigned long hmmgpu_shim_memremap(struct device *dev, int kind, u64 phys,
				   u64 size, void *gpu, void *owner)
{
	struct hmmgpu_pagemap *pm;
	struct resource *res;
	void *addr;

	pm = devm_kzalloc(dev, sizeof(*pm), GFP_KERNEL);
	if (!pm)
		return 0;
	switch (kind) {
	case HMMGPU_MEM_PRIVATE:
		res = devm_request_free_mem_region(dev, &iomem_resource, size);
		if (IS_ERR(res)) {
			dev_err(dev, "no free physical range for %llu bytes of VRAM: %ld\n",
				size, PTR_ERR(res));
			return 0;
		}
		pm->pgmap.type = MEMORY_DEVICE_PRIVATE;
		pm->pgmap.range.start = res->start;
		pm->pgmap.range.end = res->end;
		pm->pgmap.ops = &hmmgpu_private_ops;
		break;
	case HMMGPU_MEM_COHERENT:
		pm->pgmap.type = MEMORY_DEVICE_COHERENT;
		pm->pgmap.range.start = phys;
		pm->pgmap.range.end = phys + size - 1;
		pm->pgmap.ops = &hmmgpu_coherent_ops;
		break;
	default:
		return 0;
	}
	pm->gpu = gpu;
	pm->pgmap.nr_range = 1;
	pm->pgmap.owner = owner;
	addr = devm_memremap_pages(dev, &pm->pgmap);
	if (IS_ERR(addr)) {
		dev_err(dev, "devm_memremap_pages (%s) failed: %ld\n",
			kind == HMMGPU_MEM_PRIVATE ? "private" : "coherent",
			PTR_ERR(addr));
		return 0;
	}
	return PHYS_PFN(pm->pgmap.range.start);
}

struct page *hmmgpu_shim_pfn_to_page(unsigned long pfn)
{
	return pfn_to_page(pfn);
}

unsigned long hmmgpu_shim_page_to_pfn(struct page *page)
{
	return page_to_pfn(page);
}

u64 hmmgpu_shim_virt_to_phys(void *addr)
{
	return virt_to_phys(addr);
}

void *hmmgpu_shim_page_get_data(struct page *page)
{
	return page->zone_device_data;
}

void hmmgpu_shim_page_set_data(struct page *page, void *data)
{
	page->zone_device_data = data;
}

/*
 * Prepares a free device page (@order 0) or folio (@order > 0, a THP) to be
 * handed to migrate_vma_pages(): referenced and locked.
 */
void hmmgpu_shim_device_page_init(struct page *page, unsigned int order)
{
	zone_device_folio_init((struct folio *)page, page_pgmap(page), order);
}

/* Number of pages of the folio @page heads (folio_free and split). */
unsigned long hmmgpu_shim_folio_nr_pages(struct page *page)
{
	return folio_nr_pages(page_folio(page));
}

/*
 * The head page of the folio @page belongs to. For a free device page it
 * may be stale (a folio freed since): check the result covers @page.
 */
struct page *hmmgpu_shim_folio_head(struct page *page)
{
	return &page_folio(page)->page;
}

/* References to @page's folio: 0 while a device page is free. */
int hmmgpu_shim_folio_ref_count(struct page *page)
{
	return folio_ref_count(page_folio(page));
}

/*
 * A locked system page (@order 0) or THP (@order > 0) for data coming back
 * from VRAM; placed for @vma at @addr, or anywhere (eviction) if @vma is
 * NULL. Order-0 allocations without a VMA do not fail.
 */
struct page *hmmgpu_shim_alloc_sys_page(struct vm_area_struct *vma,
					unsigned long addr, unsigned int order)
{
	struct folio *folio;

	if (vma)
		folio = vma_alloc_folio(GFP_HIGHUSER_MOVABLE, order, vma, addr);
	else if (order)
		folio = folio_alloc(GFP_HIGHUSER_MOVABLE | __GFP_NOWARN, order);
	else
		folio = folio_alloc(GFP_HIGHUSER_MOVABLE | __GFP_NOFAIL, 0);
	if (!folio)
		return NULL;
	folio_lock(folio);
	return &folio->page;
}

void hmmgpu_shim_free_sys_page(struct page *page)
{
	struct folio *folio = page_folio(page);

	folio_unlock(folio);
	folio_put(folio);
}

unsigned long hmmgpu_shim_migrate_pfn(unsigned long pfn)
{
	return migrate_pfn(pfn);
}

struct page *hmmgpu_shim_migrate_pfn_to_page(unsigned long mpfn)
{
	return migrate_pfn_to_page(mpfn);
}

bool hmmgpu_shim_is_zone_device_page(struct page *page)
{
	return is_zone_device_page(page);
}

/* The faulting VMA, address and device page of a migrate_to_ram() call. */
void hmmgpu_shim_vmf_info(struct vm_fault *vmf, struct vm_area_struct **vma,
			  unsigned long *addr, struct page **page,
			  unsigned int *order)
{
	*vma = vmf->vma;
	*addr = vmf->address & PAGE_MASK;
	*page = vmf->page;
	/* A THP mapped by a PMD comes back whole; one mapped by PTEs per page. */
	*order = vmf->pte ? 0 : folio_order(page_folio(vmf->page));
}

/* ---- migration ---- */

bool hmmgpu_shim_pmd_is_2m(void)
{
	return PTRS_PER_PTE == HMMGPU_MIGRATE_MAX_PAGES;
}

/* A migrate_vma with src/dst arrays for up to HMMGPU_MIGRATE_MAX_PAGES pages. */
struct hmmgpu_migrate {
	struct migrate_vma args;
	unsigned long src[HMMGPU_MIGRATE_MAX_PAGES];
	unsigned long dst[HMMGPU_MIGRATE_MAX_PAGES];
};

struct hmmgpu_migrate *hmmgpu_shim_migrate_alloc(void)
{
	return kvzalloc(sizeof(struct hmmgpu_migrate), GFP_KERNEL);
}

void hmmgpu_shim_migrate_free(struct hmmgpu_migrate *m)
{
	kvfree(m);
}

unsigned long *hmmgpu_shim_migrate_src(struct hmmgpu_migrate *m)
{
	return m->src;
}

unsigned long *hmmgpu_shim_migrate_dst(struct hmmgpu_migrate *m)
{
	return m->dst;
}

/*
 * migrate_vma_setup() for [start, end) of @vma (at most
 * HMMGPU_MIGRATE_MAX_PAGES pages),
 * selecting @select pages (HMMGPU_MEM_*): system pages, or the device pages
 * of pgmap owner @owner.
 * @fault_page is vmf->page in migrate_to_ram, else NULL.
 */
int hmmgpu_shim_migrate_setup(struct hmmgpu_migrate *m,
			      struct vm_area_struct *vma, unsigned long start,
			      unsigned long end, void *owner, int select,
			      bool compound, struct page *fault_page)
{
	if (WARN_ON((end - start) >> PAGE_SHIFT > HMMGPU_MIGRATE_MAX_PAGES))
		return -EINVAL;
	memset(&m->args, 0, sizeof(m->args));
	memset(m->dst, 0, sizeof(m->dst));
	m->args.vma = vma;
	m->args.src = m->src;
	m->args.dst = m->dst;
	m->args.start = start;
	m->args.end = end;
	m->args.pgmap_owner = owner;
	switch (select) {
	case HMMGPU_MEM_SYSTEM:
		m->args.flags = MIGRATE_VMA_SELECT_SYSTEM;
		break;
	case HMMGPU_MEM_PRIVATE:
		m->args.flags = MIGRATE_VMA_SELECT_DEVICE_PRIVATE;
		break;
	case HMMGPU_MEM_COHERENT:
		m->args.flags = MIGRATE_VMA_SELECT_DEVICE_COHERENT;
		break;
	default:
		return -EINVAL;
	}
	if (compound)
		m->args.flags |= MIGRATE_VMA_SELECT_COMPOUND;
	m->args.fault_page = fault_page;
	return migrate_vma_setup(&m->args);
}

void hmmgpu_shim_migrate_pages(struct hmmgpu_migrate *m)
{
	migrate_vma_pages(&m->args);
}

void hmmgpu_shim_migrate_finalize(struct hmmgpu_migrate *m)
{
	migrate_vma_finalize(&m->args);
}

/* Eviction of device pages by pfn, independent of any process. */
int hmmgpu_shim_evict_range(unsigned long *src, unsigned long start_pfn,
			    unsigned long npages)
{
	return migrate_device_range(src, start_pfn, npages);
}

void hmmgpu_shim_evict_finish(unsigned long *src, unsigned long *dst,
			      unsigned long npages)
{
	migrate_device_pages(src, dst, npages);
	migrate_device_finalize(src, dst, npages);
}

/*
 * CPU copy of a device-coherent page (in the direct map, like RAM) to a
 * system page: how eviction saves coherent VRAM once the device is lost.
 */
void hmmgpu_shim_copy_page(struct page *dst, struct page *src)
{
	copy_highpage(dst, src);
}

/*
 * Poisons the system page at @pfn that took the place of VRAM whose data
 * was lost (with the device, or to an ECC error): memory_failure() unmaps
 * it from its owners with hwpoison entries (splitting a THP first, so only
 * that page goes), so a later touch gets SIGBUS (BUS_MCEERR_AR) instead of
 * reading made-up data. The page is retired. On a device-coherent pfn it
 * calls the pgmap's memory_failure op (hmmgpu_memory_failure).
 */
int hmmgpu_shim_poison_pfn(unsigned long pfn)
{
	return memory_failure(pfn, 0);
}

/* The same from inside memory_failure() (its mutex is held): queued. */
void hmmgpu_shim_poison_pfn_later(unsigned long pfn)
{
	memory_failure_queue(pfn, 0);
}

/*
 * Fills the 1 << @order pages at @page with @c: a page standing in for lost
 * VRAM must not be all zeroes, or splitting its THP (memory_failure does)
 * would map the shared zero page in its place and the loss would read as
 * zeroes instead of raising SIGBUS.
 */
void hmmgpu_shim_fill_pages(struct page *page, unsigned int order, int c)
{
	unsigned long i;

	for (i = 0; i < (1UL << order); i++) {
		void *p = kmap_local_page(folio_page(page_folio(page), i));

		memset(p, c, PAGE_SIZE);
		kunmap_local(p);
	}
}

/* The kernel address of a device-coherent page (in the direct map). */
void *hmmgpu_shim_page_address(struct page *page)
{
	return page_address(page);
}

/* ---- address spaces ---- */

/* ---- mirroring (hmm_range_fault under an mmu_interval_notifier) ---- */

struct hmmgpu_notifier {
	struct mmu_interval_notifier notifier;
	void *mirror;
	void *owner;
};

static bool hmmgpu_notifier_invalidate(struct mmu_interval_notifier *mni,
				       const struct mmu_notifier_range *range,
				       unsigned long cur_seq)
{
	struct hmmgpu_notifier *n =
		container_of(mni, struct hmmgpu_notifier, notifier);

	/* Rust decides what our own migrations need (see mirror.rs). */
	return hmmgpu_rust_invalidate(n->mirror, range->start, range->end,
				      mmu_notifier_range_blockable(range),
				      range->event == MMU_NOTIFY_MIGRATE &&
				      range->owner == n->owner,
				      cur_seq);
}

static const struct mmu_interval_notifier_ops hmmgpu_notifier_ops = {
	.invalidate = hmmgpu_notifier_invalidate,
};

/* Mirrors the whole address space of current->mm. */
struct hmmgpu_notifier *hmmgpu_shim_notifier_create(void *mirror, void *owner)
{
	struct hmmgpu_notifier *n;
	int ret;

	n = kzalloc(sizeof(*n), GFP_KERNEL);
	if (!n)
		return ERR_PTR(-ENOMEM);
	n->mirror = mirror;
	n->owner = owner;
	ret = mmu_interval_notifier_insert(&n->notifier, current->mm, 0,
					   ULONG_MAX & PAGE_MASK,
					   &hmmgpu_notifier_ops);
	if (ret) {
		kfree(n);
		return ERR_PTR(ret);
	}
	return n;
}

void hmmgpu_shim_notifier_destroy(struct hmmgpu_notifier *n)
{
	mmu_interval_notifier_remove(&n->notifier);
	kfree(n);
}

struct mm_struct *hmmgpu_shim_notifier_get_mm(struct hmmgpu_notifier *n)
{
	return n->notifier.mm;
}

void hmmgpu_shim_notifier_set_seq(struct hmmgpu_notifier *n,
				  unsigned long seq)
{
	mmu_interval_set_seq(&n->notifier, seq);
}

bool hmmgpu_shim_notifier_retry(struct hmmgpu_notifier *n, unsigned long seq)
{
	return mmu_interval_read_retry(&n->notifier, seq);
}

/*
 * hmm_range_fault() over [start, end) into @pfns, retrying while the
 * range is being invalidated. @fault: fault pages in (for @write, writable);
 * otherwise only snapshot. Device-private pages of @owner are reported, not
 * faulted. @unlocked: use hmm_range_fault_unlocked_timeout(), which may drop
 * the mmap lock while faulting (needed for userfaultfd-backed ranges). On success *@seq is the notifier sequence to check with
 * hmmgpu_shim_notifier_retry() under the mirror's lock.
 */
int hmmgpu_shim_range_fault(struct hmmgpu_notifier *n, unsigned long start,
			    unsigned long end, unsigned long *pfns, bool fault,
			    bool write, bool unlocked, unsigned long *seq)
{
	struct mm_struct *mm = n->notifier.mm;
	unsigned long timeout =
		jiffies + msecs_to_jiffies(HMM_RANGE_DEFAULT_TIMEOUT);
	struct hmm_range range = {
		.notifier = &n->notifier,
		.start = start,
		.end = end,
		.hmm_pfns = pfns,
		.default_flags = fault ? (HMM_PFN_REQ_FAULT |
					  (write ? HMM_PFN_REQ_WRITE : 0)) : 0,
		.dev_private_owner = n->owner,
	};
	int ret;

	if (unlocked) {
		/* Lets the fault handler drop the mmap lock (userfaultfd). */
		ret = hmm_range_fault_unlocked_timeout(&range,
				msecs_to_jiffies(HMM_RANGE_DEFAULT_TIMEOUT));
		*seq = range.notifier_seq;
		return ret;
	}
	for (;;) {
		if (time_after(jiffies, timeout))
			return -EBUSY;
		range.notifier_seq = mmu_interval_read_begin(&n->notifier);
		mmap_read_lock(mm);
		ret = hmm_range_fault(&range);
		mmap_read_unlock(mm);
		if (ret == -EBUSY)
			continue;
		if (ret)
			return ret;
		*seq = range.notifier_seq;
		return 0;
	}
}


unsigned int hmmgpu_shim_hmm_pfn_info(unsigned long entry, void *owner,
				      unsigned long *pfn)
{
	unsigned int info = 0;
	struct page *page;

	if (entry & HMM_PFN_ERROR)
		return HMMGPU_PFN_ERROR;
	if (!(entry & HMM_PFN_VALID))
		return 0;
	info |= HMMGPU_PFN_VALID;
	if (entry & HMM_PFN_WRITE)
		info |= HMMGPU_PFN_WRITE;
	page = hmm_pfn_to_page(entry);
	*pfn = page_to_pfn(page);
	if (is_device_private_page(page))
		info |= HMMGPU_PFN_DEVICE_PRIVATE;
	else if (is_device_coherent_page(page))
		info |= HMMGPU_PFN_DEVICE_COHERENT;
	else if (is_zero_pfn(page_to_pfn(page)))
		info |= HMMGPU_PFN_ZERO;
	if (is_zone_device_page(page) && page_pgmap(page)->owner == owner)
		info |= HMMGPU_PFN_OWNED;
	info |= hmm_pfn_to_map_order(entry) << HMMGPU_PFN_ORDER_SHIFT;
	return info;
}

/*
 * make_device_exclusive() of the page at @addr (mmap lock held): the CPU
 * mapping is replaced by a device-exclusive entry. Returns the page's pfn in
 * *@pfn and, taken while the folio is still locked, the notifier sequence
 * to validate the device mapping against in *@seq.
 */
int hmmgpu_shim_make_exclusive(struct hmmgpu_notifier *n, unsigned long addr,
			       unsigned long *pfn, unsigned long *seq)
{
	struct folio *folio;
	struct page *page;

	page = make_device_exclusive(n->notifier.mm, addr, n->owner, &folio);
	if (IS_ERR(page))
		return PTR_ERR(page);
	*seq = mmu_interval_read_begin(&n->notifier);
	*pfn = page_to_pfn(page);
	folio_unlock(folio);
	folio_put(folio);
	return 0;
}

/* ---- debugfs: /sys/kernel/debug/hmmgpu<N>/{counters,vram} ---- */

static int hmmgpu_counters_show(struct seq_file *m, void *v)
{
	char *buf;
	long len;

	buf = kmalloc(PAGE_SIZE, GFP_KERNEL);
	if (!buf)
		return -ENOMEM;
	len = hmmgpu_rust_format_counters(m->private, buf, PAGE_SIZE);
	if (len > 0)
		seq_write(m, buf, len);
	kfree(buf);
	return len < 0 ? len : 0;
}
DEFINE_SHOW_ATTRIBUTE(hmmgpu_counters);

/* ---- debugfs: /sys/kernel/debug/hmmgpu<N>/vram ---- */

static int hmmgpu_vram_show(struct seq_file *m, void *v)
{
	char *buf;
	long len;

	buf = kmalloc(PAGE_SIZE, GFP_KERNEL);
	if (!buf)
		return -ENOMEM;
	len = hmmgpu_rust_format_vram(m->private, buf, PAGE_SIZE);
	if (len > 0)
		seq_write(m, buf, len);
	kfree(buf);
	return len < 0 ? len : 0;
}
DEFINE_SHOW_ATTRIBUTE(hmmgpu_vram);

/* Creates the GPU's debugfs directory; the files read through @gpu. */
struct dentry *hmmgpu_shim_debugfs_create(unsigned int index, void *gpu)
{
	char name[32];
	struct dentry *dir;

	snprintf(name, sizeof(name), "hmmgpu%u", index);
	dir = debugfs_create_dir(name, NULL);
	debugfs_create_file("counters", 0444, dir, gpu, &hmmgpu_counters_fops);
	debugfs_create_file("vram", 0444, dir, gpu, &hmmgpu_vram_fops);
	return dir;
}

void hmmgpu_shim_debugfs_remove(struct dentry *dir)
{
	debugfs_remove_recursive(dir);
}
