// SPDX-License-Identifier: GPL-2.0
/*
 * ZONE_DEVICE pagemaps. Exists because dev_pagemap_ops is an ops table the
 * kernel wants in C and dev_pagemap's range is in an anonymous union. Each
 * op hands its call to Rust (ffi.rs) with the GPU's pointer.
 */
#include <linux/device.h>
#include <linux/memremap.h>
#include <linux/mm.h>

#include "hmmgpu.h"

struct hmmgpu_pagemap {
	struct dev_pagemap pgmap;
	void *gpu;
};

#define hmmgpu_pagemap_gpu(p) container_of(p, struct hmmgpu_pagemap, pgmap)->gpu

static void hmmgpu_folio_free(struct folio *folio)
{
	hmmgpu_rust_folio_free(hmmgpu_pagemap_gpu(folio->pgmap),
			       folio->pgmap->owner, &folio->page);
}

static vm_fault_t hmmgpu_migrate_to_ram(struct vm_fault *vmf)
{
	struct dev_pagemap *pgmap = page_pgmap(vmf->page);

	return hmmgpu_rust_migrate_to_ram(hmmgpu_pagemap_gpu(pgmap),
					  pgmap->owner, vmf);
}

/* The new folios share the THP's VRAM (Rust counts it back in folio_free). */
static void hmmgpu_folio_split(struct folio *head, struct folio *tail)
{
	if (!tail)
		return;
	tail->pgmap = head->pgmap;
	tail->page.mapping = head->page.mapping;
	tail->page.zone_device_data = head->page.zone_device_data;
}

/* The generic handler does nothing for MEMORY_DEVICE_COHERENT. */
static int hmmgpu_memory_failure(struct dev_pagemap *pgmap, unsigned long pfn,
				 unsigned long nr_pages, int mf_flags)
{
	return hmmgpu_rust_memory_failure(hmmgpu_pagemap_gpu(pgmap),
					  pgmap->owner, pfn, nr_pages);
}

static const struct dev_pagemap_ops hmmgpu_private_ops = {
	.folio_free = hmmgpu_folio_free,
	.migrate_to_ram = hmmgpu_migrate_to_ram,
	.folio_split = hmmgpu_folio_split,
};

static const struct dev_pagemap_ops hmmgpu_coherent_ops = {
	.folio_free = hmmgpu_folio_free,
	.memory_failure = hmmgpu_memory_failure,
};

/*
 * devm_memremap_pages() of @type over [@start, @end] for @dev (unmapped
 * after remove), pgmap owner @owner: the first pfn, or a negative errno.
 */
long hmmgpu_memremap_pages(struct device *dev, enum memory_type type,
			   u64 start, u64 end, void *gpu, void *owner)
{
	struct hmmgpu_pagemap *pm;
	void *addr;

	pm = devm_kzalloc(dev, sizeof(*pm), GFP_KERNEL);
	if (!pm)
		return -ENOMEM;
	pm->gpu = gpu;
	pm->pgmap.type = type;
	pm->pgmap.range.start = start;
	pm->pgmap.range.end = end;
	pm->pgmap.nr_range = 1;
	pm->pgmap.owner = owner;
	pm->pgmap.ops = type == MEMORY_DEVICE_PRIVATE ? &hmmgpu_private_ops :
							&hmmgpu_coherent_ops;
	addr = devm_memremap_pages(dev, &pm->pgmap);
	if (IS_ERR(addr))
		return PTR_ERR(addr);
	return PHYS_PFN(start);
}
