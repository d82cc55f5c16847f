//! Transparent huge pages for the big tables.
//!
//! Tier-1 and the memory store are tens of MB of randomly probed buckets:
//! with 4 KiB pages nearly every novel claim also misses the TLB, and under a
//! hypervisor a TLB miss is a two-level page walk. [`HugePageAlloc`] asks the
//! kernel for 2 MiB pages (`madvise(MADV_HUGEPAGE)`) on every allocation of
//! at least [`HUGE_ALLOC_MIN`] bytes; the binary installs it as the global
//! allocator. Effective when `/sys/kernel/mm/transparent_hugepage/enabled`
//! is `madvise` or `always`; a no-op with `never`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr::NonNull;

use allocator_api2::alloc::{AllocError, Allocator, Global};

const HUGE_PAGE: usize = 2 << 20;
/// The smallest page: touching one byte in each faults the whole block in.
const PAGE: usize = 4096;
/// Smaller allocations stay on ordinary pages: they are few, and the advice
/// costs a syscall.
pub const HUGE_ALLOC_MIN: usize = 4 << 20;

/// The system allocator, advising huge pages for large blocks.
pub struct HugePageAlloc;

/// Advises huge pages for the whole 2 MiB pages inside `[ptr, ptr + len)`.
fn advise(ptr: *mut u8, len: usize) {
    let start = (ptr as usize).next_multiple_of(HUGE_PAGE);
    let end = (ptr as usize + len) & !(HUGE_PAGE - 1);
    if end > start {
        // SAFETY: the range lies inside an allocation we own; MADV_HUGEPAGE
        // changes how future faults are served, never the contents. An
        // error (THP off, old kernel) only means ordinary pages.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

// SAFETY: every block comes from and returns to `System` with the caller's
// layout; `advise` does not touch the memory.
unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc(layout) };
        if layout.size() >= HUGE_ALLOC_MIN && !p.is_null() {
            advise(p, layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc_zeroed(layout) };
        if layout.size() >= HUGE_ALLOC_MIN && !p.is_null() {
            advise(p, layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's arguments.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if new_size >= HUGE_ALLOC_MIN && !p.is_null() {
            advise(p, new_size);
        }
        p
    }
}

/// An allocator for tables sized once at start-up and probed at random
/// (the memory store's): huge pages, and every page touched when the block
/// is allocated. Faulted lazily, random inserts would touch every page
/// within the first few thousand claims — 4 KiB faults, or a whole 2 MiB
/// page zeroed per fault — stalling the claim path for tens of ms right
/// when traffic starts. Memory is committed up front instead.
#[derive(Debug, Clone, Copy, Default)]
pub struct Prefaulted;

/// Faults in every page of `[ptr, ptr + len)` by writing a zero to each.
///
/// # Safety
/// The range must be writable memory owned by the caller, and zeros there
/// must be acceptable (fresh or zeroed memory).
pub(crate) unsafe fn fault_in(ptr: *mut u8, len: usize) {
    if len == 0 {
        return;
    }
    let mut at = 0;
    while at < len {
        // SAFETY: `at < len`, inside the caller's range; volatile so the
        // touch is not elided.
        unsafe { ptr.add(at).write_volatile(0) };
        at += PAGE;
    }
    // SAFETY: as above; the last page may start after the last step.
    unsafe { ptr.add(len - 1).write_volatile(0) };
}

// SAFETY: blocks come from and return to `Global` with the caller's layout;
// the only writes are zeros into the block just allocated, before the
// caller sees it.
unsafe impl Allocator for Prefaulted {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        let block = Global.allocate(layout)?;
        let (ptr, len) = (block.as_ptr().cast::<u8>(), block.len());
        if len >= HUGE_ALLOC_MIN {
            advise(ptr, len);
        }
        // SAFETY: the block is ours, `len` bytes, not yet seen by the caller.
        unsafe { fault_in(ptr, len) };
        Ok(block)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        // SAFETY: `ptr` came from `Global` with this layout.
        unsafe { Global.deallocate(ptr, layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `VmFlags` line of the mapping holding `addr`, from /proc/self/smaps.
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("read smaps");
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((lo, hi)) = range.split_once('-')
                && let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                inside = (lo..hi).contains(&addr);
            } else if inside && let Some(flags) = line.strip_prefix("VmFlags:") {
                return flags.to_owned();
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[test]
    fn large_blocks_are_advised_and_every_block_round_trips() {
        let big = Layout::from_size_align(HUGE_ALLOC_MIN + 3 * HUGE_PAGE, 64).unwrap();
        let small = Layout::from_size_align(64 << 10, 8).unwrap();
        // SAFETY: non-zero layouts; each block is written within its size,
        // then freed once with the layout it was allocated with.
        unsafe {
            let p = HugePageAlloc.alloc_zeroed(big);
            assert!(!p.is_null());
            assert!(
                std::slice::from_raw_parts(p, big.size())
                    .iter()
                    .all(|&b| b == 0)
            );
            p.write_bytes(7, big.size());
            let inner = (p as usize).next_multiple_of(HUGE_PAGE);
            let flags = vm_flags(inner);
            assert!(flags.split_whitespace().any(|f| f == "hg"), "flags {flags}");
            let q = HugePageAlloc.realloc(p, big, big.size() * 2);
            assert!(!q.is_null());
            assert_eq!(*q.add(big.size() - 1), 7);
            HugePageAlloc.dealloc(q, Layout::from_size_align(big.size() * 2, 64).unwrap());

            let s = HugePageAlloc.alloc(small);
            assert!(!s.is_null());
            s.write_bytes(1, small.size());
            HugePageAlloc.dealloc(s, small);
        }
    }

    /// Pages of `[ptr, ptr + len)` resident in memory, by `mincore`.
    fn resident_pages(ptr: *const u8, len: usize) -> (usize, usize) {
        let start = (ptr as usize) & !(PAGE - 1);
        let end = (ptr as usize + len).next_multiple_of(PAGE);
        let pages = (end - start) / PAGE;
        let mut vec = vec![0u8; pages];
        // SAFETY: the range is page-aligned and lies in mappings we own;
        // `vec` has one byte per page.
        let rc =
            unsafe { libc::mincore(start as *mut libc::c_void, end - start, vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        (vec.iter().filter(|&&b| b & 1 == 1).count(), pages)
    }

    #[test]
    fn prefaulted_blocks_are_resident_before_first_use() {
        let layout = Layout::from_size_align(6 << 20, 64).unwrap();
        let block = Prefaulted.allocate(layout).expect("allocates");
        let p = block.as_ptr().cast::<u8>();
        let (resident, pages) = resident_pages(p, layout.size());
        assert_eq!(resident, pages, "every page faulted in");
        // SAFETY: allocated above with this layout, freed once.
        unsafe { Prefaulted.deallocate(block.cast(), layout) };

        // The control: a fresh anonymous mapping is absent until touched
        // (so the check above can fail). Taken from mmap itself: after large
        // frees, malloc may serve a block this size from pages already
        // touched.
        // SAFETY: an anonymous private mapping of a non-zero length, unmapped
        // once with the same length.
        unsafe {
            let q = libc::mmap(
                std::ptr::null_mut(),
                layout.size(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(q, libc::MAP_FAILED);
            let (resident, pages) = resident_pages(q.cast(), layout.size());
            assert!(
                resident < pages / 2,
                "{resident} of {pages} resident untouched"
            );
            libc::munmap(q, layout.size());
        }
    }
}
