/* SPDX-License-Identifier: GPL-2.0 */
/*
 * What the driver's C and Rust halves call of each other: the Rust entry
 * points (ffi.rs) and the C functions (declared for Rust in shim.rs and
 * virtio.rs; keep them in sync).
 */
#ifndef HMMGPU_H
#define HMMGPU_H

#include <linux/mm_types.h>
#include <linux/types.h>

struct dentry;
struct device;
struct hmmgpu_migrate;
struct hmmgpu_notifier;
struct completion;
struct virtio_device;
struct virtqueue;
struct vm_area_struct;
struct vm_fault;

/* Kinds of memory (MemKind::code() in vram.rs). */
#define HMMGPU_MEM_SYSTEM	0
#define HMMGPU_MEM_PRIVATE	1
#define HMMGPU_MEM_COHERENT	2

/* Implemented in Rust (ffi.rs). */
int hmmgpu_rust_probe(struct virtio_device *vdev);
void hmmgpu_rust_remove(struct virtio_device *vdev);
int hmmgpu_rust_reset_prepare(struct virtio_device *vdev);
int hmmgpu_rust_reset_done(struct virtio_device *vdev);
void hmmgpu_rust_cmd_interrupt(void *gpu);
void hmmgpu_rust_event_interrupt(void *gpu);
long hmmgpu_rust_format_counters(void *gpu, char *buf, size_t len);
long hmmgpu_rust_format_vram(void *gpu, char *buf, size_t len);
vm_fault_t hmmgpu_rust_migrate_to_ram(void *gpu, void *vram,
				      struct vm_fault *vmf);
void hmmgpu_rust_folio_free(void *gpu, void *vram, struct page *page);
int hmmgpu_rust_memory_failure(void *gpu, void *vram, unsigned long pfn,
			       unsigned long nr_pages);
bool hmmgpu_rust_invalidate(void *mirror, unsigned long start,
			    unsigned long end, bool blockable, bool own_migrate,
			    unsigned long cur_seq);

extern const unsigned long hmmgpu_MIGRATE_PFN_VALID;
extern const unsigned long hmmgpu_MIGRATE_PFN_MIGRATE;
extern const unsigned long hmmgpu_MIGRATE_PFN_WRITE;
extern const unsigned long hmmgpu_MIGRATE_PFN_COMPOUND;
extern const unsigned long hmmgpu_MIGRATE_MAX_PAGES;

/* What an hmm_pfns entry describes, for Rust (mirrored in shim.rs). */
#define HMMGPU_PFN_VALID		(1u << 0)
#define HMMGPU_PFN_WRITE		(1u << 1)
#define HMMGPU_PFN_ERROR		(1u << 2)
#define HMMGPU_PFN_DEVICE_PRIVATE	(1u << 3)
#define HMMGPU_PFN_DEVICE_COHERENT	(1u << 4)
#define HMMGPU_PFN_OWNED		(1u << 5)
#define HMMGPU_PFN_ZERO			(1u << 6)
#define HMMGPU_PFN_ORDER_SHIFT		8

/* virtio.c */
int hmmgpu_register_driver(void);
void hmmgpu_unregister_driver(void);
int hmmgpu_virtio_find_vqs(struct virtio_device *vdev, struct virtqueue **vqs);
struct device *hmmgpu_virtio_dev(struct virtio_device *vdev);
void hmmgpu_virtio_set_priv(struct virtio_device *vdev, void *priv);
void *hmmgpu_virtio_priv(struct virtio_device *vdev);
bool hmmgpu_virtio_has_feature(struct virtio_device *vdev, unsigned int fbit);
void hmmgpu_virtio_read_config(struct virtio_device *vdev, unsigned int offset,
			       void *buf, size_t len);
bool hmmgpu_virtio_shm_region(struct virtio_device *vdev, u8 id, u64 *addr,
			      u64 *len);
void hmmgpu_virtio_ready(struct virtio_device *vdev);
int hmmgpu_virtio_finalize_features(struct virtio_device *vdev);
u8 hmmgpu_virtio_status(struct virtio_device *vdev);
void hmmgpu_virtio_del_vqs(struct virtio_device *vdev);
extern const unsigned int hmmgpu_VIRTIO_F_ACCESS_PLATFORM;
extern const u8 hmmgpu_VIRTIO_S_ACKNOWLEDGE;
extern const u8 hmmgpu_VIRTIO_S_DRIVER;
extern const u8 hmmgpu_VIRTIO_S_FEATURES_OK;

/* shim.c */
void hmmgpu_reinit_completion(struct completion *x);
bool hmmgpu_shim_pmd_is_2m(void);
void hmmgpu_shim_copy_page(struct page *dst, struct page *src);
int hmmgpu_shim_poison_pfn(unsigned long pfn);
void hmmgpu_shim_poison_pfn_later(unsigned long pfn);
void *hmmgpu_shim_page_address(struct page *page);
void hmmgpu_shim_fill_pages(struct page *page, unsigned int order, int c);
unsigned int hmmgpu_shim_noreclaim_save(void);
void hmmgpu_shim_noreclaim_restore(unsigned int flags);
unsigned long hmmgpu_shim_memremap(struct device *dev, int kind, u64 phys,
				   u64 size, void *gpu, void *owner);
struct page *hmmgpu_shim_pfn_to_page(unsigned long pfn);
unsigned long hmmgpu_shim_page_to_pfn(struct page *page);
u64 hmmgpu_shim_virt_to_phys(void *addr);
void *hmmgpu_shim_page_get_data(struct page *page);
void hmmgpu_shim_page_set_data(struct page *page, void *data);
void hmmgpu_shim_device_page_init(struct page *page, unsigned int order);
unsigned long hmmgpu_shim_folio_nr_pages(struct page *page);
struct page *hmmgpu_shim_folio_head(struct page *page);
int hmmgpu_shim_folio_ref_count(struct page *page);
struct page *hmmgpu_shim_alloc_sys_page(struct vm_area_struct *vma,
					unsigned long addr, unsigned int order);
void hmmgpu_shim_free_sys_page(struct page *page);
unsigned long hmmgpu_shim_migrate_pfn(unsigned long pfn);
struct page *hmmgpu_shim_migrate_pfn_to_page(unsigned long mpfn);
bool hmmgpu_shim_is_zone_device_page(struct page *page);
void hmmgpu_shim_vmf_info(struct vm_fault *vmf, struct vm_area_struct **vma,
			  unsigned long *addr, struct page **page,
			  unsigned int *order);
struct hmmgpu_migrate *hmmgpu_shim_migrate_alloc(void);
void hmmgpu_shim_migrate_free(struct hmmgpu_migrate *m);
unsigned long *hmmgpu_shim_migrate_src(struct hmmgpu_migrate *m);
unsigned long *hmmgpu_shim_migrate_dst(struct hmmgpu_migrate *m);
int hmmgpu_shim_migrate_setup(struct hmmgpu_migrate *m,
			      struct vm_area_struct *vma, unsigned long start,
			      unsigned long end, void *owner, int select,
			      bool compound, struct page *fault_page);
void hmmgpu_shim_migrate_pages(struct hmmgpu_migrate *m);
void hmmgpu_shim_migrate_finalize(struct hmmgpu_migrate *m);
int hmmgpu_shim_evict_range(unsigned long *src, unsigned long start_pfn,
			    unsigned long npages);
void hmmgpu_shim_evict_finish(unsigned long *src, unsigned long *dst,
			      unsigned long npages);
struct hmmgpu_notifier *hmmgpu_shim_notifier_create(void *mirror, void *owner);
void hmmgpu_shim_notifier_destroy(struct hmmgpu_notifier *n);
struct mm_struct *hmmgpu_shim_notifier_get_mm(struct hmmgpu_notifier *n);
void hmmgpu_shim_notifier_set_seq(struct hmmgpu_notifier *n,
				  unsigned long seq);
bool hmmgpu_shim_notifier_retry(struct hmmgpu_notifier *n, unsigned long seq);
int hmmgpu_shim_range_fault(struct hmmgpu_notifier *n, unsigned long start,
			    unsigned long end, unsigned long *pfns, bool fault,
			    bool write, bool unlocked, unsigned long *seq);
unsigned int hmmgpu_shim_hmm_pfn_info(unsigned long entry, void *owner,
				      unsigned long *pfn);

int hmmgpu_shim_make_exclusive(struct hmmgpu_notifier *n, unsigned long addr,
			       unsigned long *pfn, unsigned long *seq);

struct dentry *hmmgpu_shim_debugfs_create(unsigned int index, void *gpu);
void hmmgpu_shim_debugfs_remove(struct dentry *dir);

#endif /* HMMGPU_H */
