//! The binary's global allocator: the system allocator, plus a transparent-huge-page hint on
//! large blocks. A decoded 4 MP photo is a fresh 12 MB buffer per process; with 4 KiB pages
//! that is ~3 000 page faults (about a fifth of a watermark run's CPU time). Where the kernel
//! offers THP on request (`madvise` mode), 2 MiB pages cut those to a handful. Elsewhere the
//! hint is ignored and nothing changes.
#![allow(unsafe_code, reason = "GlobalAlloc is an unsafe trait; every block comes from System")]

use std::alloc::{GlobalAlloc, Layout, System};

pub struct HugePageHint;

const HUGE_PAGE: usize = 2 << 20;
/// Blocks smaller than one huge page cannot contain an aligned 2 MiB extent.
const THRESHOLD: usize = HUGE_PAGE;

/// The 2 MiB-aligned extents inside the block at `addr` of `size` bytes, if any.
fn aligned_extent(addr: usize, size: usize) -> Option<(usize, usize)> {
    if addr == 0 || size < THRESHOLD {
        return None;
    }
    let start = addr.checked_next_multiple_of(HUGE_PAGE)?;
    let end = addr.checked_add(size)? & !(HUGE_PAGE - 1);
    (end > start).then_some((start, end))
}

fn advise(ptr: *mut u8, size: usize) {
    if let Some((start, end)) = aligned_extent(ptr as usize, size) {
        // SAFETY: [start, end) lies inside the block the system allocator just returned to us;
        // MADV_HUGEPAGE only changes how the kernel backs those pages, never their contents,
        // and a failure (e.g. THP disabled) is harmless, so the result is ignored.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the only
// addition is an advisory madvise on memory inside the returned block.
unsafe impl GlobalAlloc for HugePageHint {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.alloc(layout) };
        advise(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.alloc_zeroed(layout) };
        advise(p, layout.size());
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        advise(p, new_size);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_stay_inside_the_block() {
        const MIB: usize = 1 << 20;
        assert_eq!(aligned_extent(0, 8 * MIB), None);
        assert_eq!(aligned_extent(2 * MIB, MIB), None, "smaller than a huge page");
        assert_eq!(aligned_extent(2 * MIB, 4 * MIB), Some((2 * MIB, 6 * MIB)));
        assert_eq!(aligned_extent(2 * MIB + 4096, 4 * MIB), Some((4 * MIB, 6 * MIB)));
        assert_eq!(aligned_extent(2 * MIB + 4096, 3 * MIB), None, "no whole aligned extent inside");
        assert_eq!(aligned_extent(usize::MAX - MIB, 4 * MIB), None, "no overflow");
    }

    #[test]
    fn large_blocks_are_usable_and_zeroed() {
        let mut v = vec![0u8; 9 << 20];
        assert!(v.iter().step_by(4096).all(|&b| b == 0));
        v[5 << 20] = 7;
        v.resize(20 << 20, 1);
        assert_eq!((v[5 << 20], v[19 << 20]), (7, 1));
    }
}
