/* SPDX-License-Identifier: GPL-2.0 */
/*
 * What the driver's C and Rust halves call of each other: the Rust entry
 * points (ffi.rs) and the C functions, which shim.rs declares for Rust
 * (keep the two in sync).
 */
#ifndef HMMGPU_H
#define HMMGPU_H

#include <linux/memremap.h>
#include <linux/mm_types.h>
#include <linux/types.h>

struct completion;
struct device;
struct migrate_vma;
struct mmu_interval_notifier;
struct virtio_device;
struct virtio_driver;
struct virtqueue;
struct vm_area_struct;
struct vm_fault;

/* ffi.rs */
int hmmgpu_rust_probe(struct virtio_device *vdev);
void hmmgpu_rust_remove(struct virtio_device *vdev);
int hmmgpu_rust_reset_prepare(struct virtio_device *vdev);
int hmmgpu_rust_reset_done(struct virtio_device *vdev);
void hmmgpu_rust_vq_interrupt(void *gpu, unsigned int index);
void hmmgpu_rust_folio_free(void *gpu, void *owner, struct page *page);
vm_fault_t hmmgpu_rust_migrate_to_ram(void *gpu, void *owner,
				      struct vm_fault *vmf);
int hmmgpu_rust_memory_failure(void *gpu, void *owner, unsigned long pfn,
			       unsigned long nr_pages);
bool hmmgpu_rust_invalidate(struct mmu_interval_notifier *mni,
			    unsigned long start, unsigned long end,
			    bool blockable, void *migrate_owner,
			    unsigned long cur_seq);

/* virtio.c */
extern struct virtio_driver hmmgpu_virtio_driver;
extern const u8 hmmgpu_VIRTIO_S_ACKNOWLEDGE;
extern const u8 hmmgpu_VIRTIO_S_DRIVER;
extern const u8 hmmgpu_VIRTIO_S_FEATURES_OK;
int hmmgpu_virtio_find_vqs(struct virtio_device *vdev, struct virtqueue **vqs);
struct device *hmmgpu_virtio_dev(struct virtio_device *vdev);
bool hmmgpu_virtio_has_access_platform(struct virtio_device *vdev);
void hmmgpu_virtio_read_config(struct virtio_device *vdev, unsigned int offset,
			       void *buf, size_t len);
bool hmmgpu_virtio_shm_region(struct virtio_device *vdev, u8 id, u64 *addr,
			      u64 *len);
void hmmgpu_virtio_ready(struct virtio_device *vdev);
int hmmgpu_virtio_finalize_features(struct virtio_device *vdev);
u8 hmmgpu_virtio_status(struct virtio_device *vdev);
void hmmgpu_virtio_del_vqs(struct virtio_device *vdev);

/* mm.c */
struct page *hmmgpu_pfn_to_page(unsigned long pfn);
unsigned long hmmgpu_page_to_pfn(struct page *page);
struct folio *hmmgpu_page_folio(struct page *page);
unsigned long hmmgpu_folio_nr_pages(struct folio *folio);
int hmmgpu_folio_ref_count(struct folio *folio);
void hmmgpu_folio_lock(struct folio *folio);
void hmmgpu_folio_put(struct folio *folio);
struct dev_pagemap *hmmgpu_page_pgmap(struct page *page);
void *hmmgpu_zone_device_data(struct page *page);
void hmmgpu_set_zone_device_data(struct page *page, void *data);
void hmmgpu_zone_device_folio_init(struct page *page, unsigned int order);
struct folio *hmmgpu_vma_alloc_folio(struct vm_area_struct *vma,
				     unsigned long addr, unsigned int order);
struct folio *hmmgpu_folio_alloc(unsigned int order);
unsigned int hmmgpu_memalloc_noreclaim_save(void);
void hmmgpu_memalloc_noreclaim_restore(unsigned int flags);
struct workqueue_struct *hmmgpu_alloc_reset_wq(unsigned int index);
void hmmgpu_reinit_completion(struct completion *x);

/* pagemap.c */
long hmmgpu_memremap_pages(struct device *dev, enum memory_type type,
			   u64 start, u64 end, void *gpu, void *owner);

/* migrate.c */
extern const unsigned long hmmgpu_MIGRATE_MAX_PAGES;
extern const unsigned long hmmgpu_MIGRATE_PFN_VALID;
extern const unsigned long hmmgpu_MIGRATE_PFN_MIGRATE;
extern const unsigned long hmmgpu_MIGRATE_PFN_WRITE;
extern const unsigned long hmmgpu_MIGRATE_PFN_COMPOUND;
extern const unsigned long hmmgpu_MIGRATE_VMA_SELECT_SYSTEM;
extern const unsigned long hmmgpu_MIGRATE_VMA_SELECT_DEVICE_PRIVATE;
extern const unsigned long hmmgpu_MIGRATE_VMA_SELECT_DEVICE_COHERENT;
extern const unsigned long hmmgpu_MIGRATE_VMA_SELECT_COMPOUND;
bool hmmgpu_pmd_is_2m(void);
struct migrate_vma *hmmgpu_migrate_vma_alloc(void);
int hmmgpu_migrate_vma_setup(struct migrate_vma *args,
			     struct vm_area_struct *vma, unsigned long start,
			     unsigned long end, unsigned long *src,
			     unsigned long *dst, void *owner,
			     unsigned long flags, struct page *fault_page);
unsigned long hmmgpu_migrate_pfn(unsigned long pfn);
struct page *hmmgpu_migrate_pfn_to_page(unsigned long mpfn);
struct vm_area_struct *hmmgpu_vm_fault_vma(struct vm_fault *vmf,
					   unsigned long *addr);

/* hmm.c */
extern const unsigned long hmmgpu_HMM_PFN_VALID;
extern const unsigned long hmmgpu_HMM_PFN_WRITE;
extern const unsigned long hmmgpu_HMM_PFN_ERROR;
extern const unsigned long hmmgpu_HMM_PFN_REQ_FAULT;
extern const unsigned long hmmgpu_HMM_PFN_REQ_WRITE;
extern const unsigned int hmmgpu_HMM_RANGE_DEFAULT_TIMEOUT;
extern const struct mmu_interval_notifier_ops hmmgpu_notifier_ops;
void hmmgpu_mmu_interval_set_seq(struct mmu_interval_notifier *mni,
				 unsigned long seq);
bool hmmgpu_mmu_interval_read_retry(struct mmu_interval_notifier *mni,
				    unsigned long seq);
int hmmgpu_hmm_range_fault(struct mmu_interval_notifier *mni,
			   unsigned long start, unsigned long end,
			   unsigned long *pfns, unsigned long default_flags,
			   void *owner, unsigned long *seq, bool unlocked);
struct page *hmmgpu_hmm_pfn_to_page(unsigned long entry);
unsigned int hmmgpu_hmm_pfn_to_map_order(unsigned long entry);
bool hmmgpu_is_zero_pfn(unsigned long pfn);

/* compat.c (kernels without the kernel crate's SpinLockIrq) */
unsigned long hmmgpu_local_irq_save(void);
void hmmgpu_local_irq_restore(unsigned long flags);

#endif /* HMMGPU_H */
