// SPDX-License-Identifier: GPL-2.0
/*
 * Mirroring. Exists because hmm.h is not in kernel::bindings (struct
 * hmm_range is filled here, HMM_PFN_* exported), the notifier's ops table is
 * wanted in C, its sequence helpers and the hmm_pfns decoders are inlines.
 * The logic is in mirror.rs.
 */
#include <linux/hmm.h>
#include <linux/mm.h>
#include <linux/mmu_notifier.h>
#include <linux/rmap.h>

#include "compat.h"
#include "hmmgpu.h"

const unsigned long hmmgpu_HMM_PFN_VALID = HMM_PFN_VALID;
const unsigned long hmmgpu_HMM_PFN_WRITE = HMM_PFN_WRITE;
const unsigned long hmmgpu_HMM_PFN_ERROR = HMM_PFN_ERROR;
const unsigned long hmmgpu_HMM_PFN_REQ_FAULT = HMM_PFN_REQ_FAULT;
const unsigned long hmmgpu_HMM_PFN_REQ_WRITE = HMM_PFN_REQ_WRITE;
const unsigned int hmmgpu_HMM_RANGE_DEFAULT_TIMEOUT = HMM_RANGE_DEFAULT_TIMEOUT;

/* Hands Rust the owner of a migration's invalidation, else NULL. */
static bool hmmgpu_invalidate(struct mmu_interval_notifier *mni,
			      const struct mmu_notifier_range *range,
			      unsigned long cur_seq)
{
	return hmmgpu_rust_invalidate(mni, range->start, range->end,
				      mmu_notifier_range_blockable(range),
				      range->event == MMU_NOTIFY_MIGRATE ?
				      range->owner : NULL, cur_seq);
}

const struct mmu_interval_notifier_ops hmmgpu_notifier_ops = {
	.invalidate = hmmgpu_invalidate,
};

void hmmgpu_mmu_interval_set_seq(struct mmu_interval_notifier *mni,
				 unsigned long seq)
{
	mmu_interval_set_seq(mni, seq);
}

bool hmmgpu_mmu_interval_read_retry(struct mmu_interval_notifier *mni,
				    unsigned long seq)
{
	return mmu_interval_read_retry(mni, seq);
}

/*
 * @unlocked: hmm_range_fault_unlocked_timeout() (compat.h) takes the mmap
 * lock, else the caller holds it. *@seq: the notifier sequence used.
 */
int hmmgpu_hmm_range_fault(struct mmu_interval_notifier *mni,
			   unsigned long start, unsigned long end,
			   unsigned long *pfns, unsigned long default_flags,
			   void *owner, unsigned long *seq, bool unlocked)
{
	struct hmm_range range = {
		.notifier = mni, .notifier_seq = *seq, .start = start,
		.end = end, .hmm_pfns = pfns, .default_flags = default_flags,
		.dev_private_owner = owner,
	};
	int ret = unlocked ? hmmgpu_hmm_range_fault_unlocked(&range) :
			     hmm_range_fault(&range);

	*seq = range.notifier_seq;
	return ret;
}

struct page *hmmgpu_hmm_pfn_to_page(unsigned long entry)
{
	return hmm_pfn_to_page(entry);
}

unsigned int hmmgpu_hmm_pfn_to_map_order(unsigned long entry)
{
	return hmm_pfn_to_map_order(entry);
}

bool hmmgpu_is_zero_pfn(unsigned long pfn)
{
	return is_zero_pfn(pfn);
}

/* The prototype shim.rs declares. */
static_assert(__same_type(&make_device_exclusive,
	struct page *(*)(struct mm_struct *, unsigned long, void *,
			 struct folio **)));
