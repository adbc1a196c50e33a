// SPDX-License-Identifier: GPL-2.0
/*
 * Migration. Exists because migrate.h is not in kernel::bindings: its flags
 * are exported as constants, migrate_vma_setup() gets its struct filled
 * here, the migrate_pfn inlines and vm_fault's anonymous struct are one
 * function each. Its exported functions Rust declares (shim.rs); their
 * prototypes are checked below. The logic is in migrate.rs.
 */
#include <linux/migrate.h>
#include <linux/mm.h>
#include <linux/slab.h>

#include "hmmgpu.h"

/* One step: a PMD of 4 KiB pages (book3s64 picks PTRS_PER_PTE at boot). */
const unsigned long hmmgpu_MIGRATE_MAX_PAGES = SZ_2M >> PAGE_SHIFT;
const unsigned long hmmgpu_MIGRATE_PFN_VALID = MIGRATE_PFN_VALID;
const unsigned long hmmgpu_MIGRATE_PFN_MIGRATE = MIGRATE_PFN_MIGRATE;
const unsigned long hmmgpu_MIGRATE_PFN_WRITE = MIGRATE_PFN_WRITE;
const unsigned long hmmgpu_MIGRATE_PFN_COMPOUND = MIGRATE_PFN_COMPOUND;
const unsigned long hmmgpu_MIGRATE_VMA_SELECT_SYSTEM = MIGRATE_VMA_SELECT_SYSTEM;
const unsigned long hmmgpu_MIGRATE_VMA_SELECT_DEVICE_PRIVATE = MIGRATE_VMA_SELECT_DEVICE_PRIVATE;
const unsigned long hmmgpu_MIGRATE_VMA_SELECT_DEVICE_COHERENT = MIGRATE_VMA_SELECT_DEVICE_COHERENT;
const unsigned long hmmgpu_MIGRATE_VMA_SELECT_COMPOUND = MIGRATE_VMA_SELECT_COMPOUND;

bool hmmgpu_pmd_is_2m(void)
{
	return PTRS_PER_PTE == SZ_2M >> PAGE_SHIFT;
}

/* Freed with kfree(). */
struct migrate_vma *hmmgpu_migrate_vma_alloc(void)
{
	return kzalloc(sizeof(struct migrate_vma), GFP_KERNEL);
}

/* @fault_page: vmf->page in migrate_to_ram, else NULL. */
int hmmgpu_migrate_vma_setup(struct migrate_vma *args,
			     struct vm_area_struct *vma, unsigned long start,
			     unsigned long end, unsigned long *src,
			     unsigned long *dst, void *owner,
			     unsigned long flags, struct page *fault_page)
{
	*args = (struct migrate_vma) {
		.vma = vma, .start = start, .end = end, .src = src, .dst = dst,
		.pgmap_owner = owner, .flags = flags, .fault_page = fault_page,
	};
	return migrate_vma_setup(args);
}

unsigned long hmmgpu_migrate_pfn(unsigned long pfn)
{
	return migrate_pfn(pfn);
}

struct page *hmmgpu_migrate_pfn_to_page(unsigned long mpfn)
{
	return migrate_pfn_to_page(mpfn);
}

/* The VMA and address of @vmf (in an anonymous struct). */
struct vm_area_struct *hmmgpu_vm_fault_vma(struct vm_fault *vmf,
					   unsigned long *addr)
{
	*addr = vmf->address;
	return vmf->vma;
}

/* The prototypes shim.rs declares. */
static_assert(__same_type(&migrate_vma_pages, void (*)(struct migrate_vma *)) &&
	      __same_type(&migrate_vma_finalize, void (*)(struct migrate_vma *)));
static_assert(__same_type(&migrate_device_range,
			  int (*)(unsigned long *, unsigned long, unsigned long)));
static_assert(__same_type(&migrate_device_pages,
			  void (*)(unsigned long *, unsigned long *, unsigned long)) &&
	      __same_type(&migrate_device_finalize,
			  void (*)(unsigned long *, unsigned long *, unsigned long)));
