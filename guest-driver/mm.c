// SPDX-License-Identifier: GPL-2.0
/*
 * Pages, folios, sched, completion and workqueue macros and inlines Rust
 * cannot call: one function each. Rust's view of pages is pages.rs.
 */
#include <linux/completion.h>
#include <linux/mm.h>
#include <linux/pagemap.h>
#include <linux/sched/mm.h>
#include <linux/workqueue.h>

#include "hmmgpu.h"

struct page *hmmgpu_pfn_to_page(unsigned long pfn)
{
	return pfn_to_page(pfn);
}

unsigned long hmmgpu_page_to_pfn(struct page *page)
{
	return page_to_pfn(page);
}

struct folio *hmmgpu_page_folio(struct page *page)
{
	return page_folio(page);
}

unsigned long hmmgpu_folio_nr_pages(struct folio *folio)
{
	return folio_nr_pages(folio);
}

int hmmgpu_folio_ref_count(struct folio *folio)
{
	return folio_ref_count(folio);
}

void hmmgpu_folio_lock(struct folio *folio)
{
	folio_lock(folio);
}

void hmmgpu_folio_put(struct folio *folio)
{
	folio_put(folio);
}

/* The pagemap of a ZONE_DEVICE page (of any driver), else NULL. */
struct dev_pagemap *hmmgpu_page_pgmap(struct page *page)
{
	return is_zone_device_page(page) ? page_pgmap(page) : NULL;
}

void *hmmgpu_zone_device_data(struct page *page)
{
	return page->zone_device_data;
}

void hmmgpu_set_zone_device_data(struct page *page, void *data)
{
	page->zone_device_data = data;
}

/* Cast, not page_folio(): a free page's compound head may be stale. */
void hmmgpu_zone_device_folio_init(struct page *page, unsigned int order)
{
	zone_device_folio_init((struct folio *)page, page_pgmap(page), order);
}

struct folio *hmmgpu_vma_alloc_folio(struct vm_area_struct *vma,
				     unsigned long addr, unsigned int order)
{
	return vma_alloc_folio(GFP_HIGHUSER_MOVABLE, order, vma, addr);
}

/* A single page may not fail: eviction must finish. */
struct folio *hmmgpu_folio_alloc(unsigned int order)
{
	return folio_alloc(GFP_HIGHUSER_MOVABLE |
			   (order ? __GFP_NOWARN : __GFP_NOFAIL), order);
}

unsigned int hmmgpu_memalloc_noreclaim_save(void)
{
	return memalloc_noreclaim_save();
}

void hmmgpu_memalloc_noreclaim_restore(unsigned int flags)
{
	memalloc_noreclaim_restore(flags);
}

struct workqueue_struct *hmmgpu_alloc_reset_wq(unsigned int index)
{
	return alloc_ordered_workqueue("hmmgpu%u-reset", WQ_MEM_RECLAIM, index);
}

void hmmgpu_reinit_completion(struct completion *x)
{
	reinit_completion(x);
}
