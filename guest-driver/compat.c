// SPDX-License-Identifier: GPL-2.0
/*
 * What compat.rs needs from C (compat.h): without the kernel crate's
 * SpinLockIrq (7.2), its stand-in turns interrupts off with these macros.
 */
#include <linux/irqflags.h>

#include "hmmgpu.h"

#ifndef HMMGPU_HAVE_RUST_SPINLOCK_IRQ
unsigned long hmmgpu_local_irq_save(void)
{
	unsigned long flags;

	local_irq_save(flags);
	return flags;
}

void hmmgpu_local_irq_restore(unsigned long flags)
{
	local_irq_restore(flags);
}
#endif
