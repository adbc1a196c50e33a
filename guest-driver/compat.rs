// SPDX-License-Identifier: GPL-2.0

//! What differs between the kernels the driver builds on (Debian's 7.2 and
//! 7.3), in one place. Each `hmmgpu_have_*` cfg is set by Kbuild from what
//! the tree's own headers and kernel crate provide, never from its version
//! (compat.h lists them and is the C side):
//! - `hmmgpu_have_hmm_range_fault_unlocked_timeout`: the mm has
//!   hmm_range_fault_unlocked_timeout() (7.3). Without it
//!   HMM_DMIRROR_READ_UNLOCKED is not supported: [`unlocked_range_fault`]
//!   says so, once, and the ioctl fails with EOPNOTSUPP;
//! - `hmmgpu_have_rust_spinlock_irq`: the kernel crate has `SpinLockIrq`
//!   (7.3). Without it, an equivalent lock on compat.c ([`SpinLockIrq`]).
//! - `hmmgpu_have_param_value_ref`: a module parameter's `value()` returns
//!   it by value, `value_ref()` by reference (7.3); before, `value()`
//!   returned a reference ([`param`]).

use core::sync::atomic::{AtomicBool, Ordering};
use kernel::bindings;
use kernel::prelude::*;

/// The value of a module parameter.
pub(crate) fn param<T: Copy>(p: &kernel::module_param::ModuleParamAccess<T>) -> T {
    #[cfg(hmmgpu_have_param_value_ref)]
    let value = p.value();
    #[cfg(not(hmmgpu_have_param_value_ref))]
    let value = *p.value();
    value
}

/// Whether the kernel has hmm_range_fault_unlocked_timeout().
pub(crate) const HAS_HMM_RANGE_FAULT_UNLOCKED: bool =
    cfg!(hmmgpu_have_hmm_range_fault_unlocked_timeout);

/// EOPNOTSUPP (`kernel::error::code` has it from 7.3 on).
pub(crate) fn eopnotsupp() -> Error {
    Error::from_errno(-(bindings::EOPNOTSUPP as i32))
}

/// Checks that the kernel can resolve faults without holding the mmap lock
/// (HMM_DMIRROR_READ_UNLOCKED): EOPNOTSUPP if not, and `warn` says so the
/// first time.
pub(crate) fn unlocked_range_fault(warn: impl FnOnce()) -> Result {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if HAS_HMM_RANGE_FAULT_UNLOCKED {
        return Ok(());
    }
    if !WARNED.swap(true, Ordering::Relaxed) {
        warn();
    }
    Err(eopnotsupp())
}

#[cfg(hmmgpu_have_rust_spinlock_irq)]
pub(crate) use kernel::sync::{new_spinlock_irq, SpinLockIrq};

#[cfg(not(hmmgpu_have_rust_spinlock_irq))]
pub(crate) use spinlock_irq::{new_spinlock_irq, SpinLockIrq};

/// A spinlock taken with local interrupts off (`spin_lock_irqsave`), as the
/// kernel crate's `SpinLockIrq` of 7.3 is: the interrupt handlers take the
/// driver's spinlocks.
#[cfg(not(hmmgpu_have_rust_spinlock_irq))]
mod spinlock_irq {
    use kernel::bindings;
    use kernel::ffi::{c_char, c_ulong};
    use kernel::sync::lock::{Backend, Lock};

    extern "C" {
        // compat.c
        fn hmmgpu_local_irq_save() -> c_ulong;
        fn hmmgpu_local_irq_restore(flags: c_ulong);
    }

    /// A spinlock taken with interrupts off.
    pub(crate) type SpinLockIrq<T> = Lock<T, IrqSaveBackend>;

    /// The `spin_lock_irqsave` backend of [`SpinLockIrq`].
    pub(crate) struct IrqSaveBackend;

    // SAFETY: the kernel's `spinlock_t` ensures mutual exclusion; interrupts
    // stay off from lock to unlock, on the owner's CPU.
    unsafe impl Backend for IrqSaveBackend {
        type State = bindings::spinlock_t;
        /// The interrupt flags to restore.
        type GuardState = c_ulong;

        unsafe fn init(
            ptr: *mut Self::State,
            name: *const c_char,
            key: *mut bindings::lock_class_key,
        ) {
            // SAFETY: per the trait's contract.
            unsafe { bindings::__spin_lock_init(ptr, name, key) }
        }

        unsafe fn lock(ptr: *mut Self::State) -> Self::GuardState {
            // SAFETY: plain interrupt state save; restored in `unlock`.
            let flags = unsafe { hmmgpu_local_irq_save() };
            // SAFETY: per the trait's contract, initialized.
            unsafe { bindings::spin_lock(ptr) };
            flags
        }

        unsafe fn try_lock(ptr: *mut Self::State) -> Option<Self::GuardState> {
            // SAFETY: plain interrupt state save.
            let flags = unsafe { hmmgpu_local_irq_save() };
            // SAFETY: per the trait's contract, initialized.
            if unsafe { bindings::spin_trylock(ptr) } != 0 {
                return Some(flags);
            }
            // SAFETY: saved above.
            unsafe { hmmgpu_local_irq_restore(flags) };
            None
        }

        unsafe fn unlock(ptr: *mut Self::State, flags: &Self::GuardState) {
            // SAFETY: per the trait's contract, the caller owns the lock.
            unsafe { bindings::spin_unlock(ptr) };
            // SAFETY: the flags `lock` saved.
            unsafe { hmmgpu_local_irq_restore(*flags) };
        }

        unsafe fn assert_is_held(ptr: *mut Self::State) {
            // SAFETY: per the trait's contract, initialized.
            unsafe { bindings::spin_assert_is_held(ptr) }
        }
    }

    /// Creates a [`SpinLockIrq`] initialiser with a new lock class, as the
    /// kernel crate's `new_spinlock_irq!` does.
    macro_rules! new_spinlock_irq {
        ($inner:expr $(, $name:literal)? $(,)?) => {
            $crate::compat::SpinLockIrq::new(
                $inner,
                ::kernel::optional_name!($($name)?),
                ::kernel::static_lock_class!(),
            )
        };
    }
    pub(crate) use new_spinlock_irq;
}
