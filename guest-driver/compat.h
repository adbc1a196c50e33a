/* SPDX-License-Identifier: GPL-2.0 */
/*
 * What differs between the kernels the driver builds on (Debian's 7.2 and
 * 7.3). Each HMMGPU_HAVE_* (and its --cfg hmmgpu_have_* for Rust) is set by
 * Kbuild from what the tree's own headers and kernel crate provide, never
 * from its version:
 * - HMM_RANGE_FAULT_UNLOCKED_TIMEOUT: hmm_range_fault_unlocked_timeout()
 *   (7.3), below;
 * - RUST_SPINLOCK_IRQ: the kernel crate's SpinLockIrq (7.3); compat.rs
 *   builds one on compat.c without it.
 * compat.rs is the Rust side.
 */
#ifndef HMMGPU_COMPAT_H
#define HMMGPU_COMPAT_H

#include <linux/hmm.h>
#include <linux/jiffies.h>

/*
 * hmm_range_fault_unlocked_timeout() (new in 7.3; HMM_DMIRROR_READ_UNLOCKED
 * uses it). Without it the ioctl is not supported: mirror.rs reports that
 * (EOPNOTSUPP and a warning) and never calls this.
 */
static inline int hmmgpu_hmm_range_fault_unlocked(struct hmm_range *range)
{
#ifdef HMMGPU_HAVE_HMM_RANGE_FAULT_UNLOCKED_TIMEOUT
	return hmm_range_fault_unlocked_timeout(range,
			msecs_to_jiffies(HMM_RANGE_DEFAULT_TIMEOUT));
#else
	return -EOPNOTSUPP;
#endif
}

#endif /* HMMGPU_COMPAT_H */
