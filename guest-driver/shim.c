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
#include <linux/io.h>
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
#include <linux/completion.h>

#include "hmmgpu.h"

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

/* ---- sched ---- */

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

/* reinit_completion(): for the waits of queue.rs. */
void hmmgpu_reinit_completion(struct completion *x)
{
	reinit_completion(x);
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
