//! A global allocator for the unit tests that counts, per thread, the allocations made: what
//! a test of a hot path asserts (a count is exact and does not depend on the machine's load,
//! where a time would).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    // A const initialiser and no destructor: reading it never allocates.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

pub struct Counting;

fn count() {
    // `try_with`: a thread's last frees may come after its locals are gone.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

// SAFETY: every call is passed on to the system allocator unchanged; counting touches only a
// thread-local cell.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// The allocations (and reallocations) this thread made while running `f`, and its result.
pub fn allocations_in<R>(f: impl FnOnce() -> R) -> (u64, R) {
    let before = ALLOCATIONS.with(Cell::get);
    let out = f();
    (ALLOCATIONS.with(Cell::get) - before, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_are_counted_on_this_thread_only() {
        let (n, v) = allocations_in(|| vec![1u8; 100]);
        assert_eq!(n, 1);
        // A first spawn sets up what later ones reuse.
        let _ = std::thread::spawn(|| ()).join();
        // A spawn allocates here; what the other thread allocates is not counted here.
        let (bare, _) = allocations_in(|| std::thread::spawn(|| ()).join());
        let (busy, _) = allocations_in(|| {
            std::thread::spawn(|| vec![0u8; 10].len() + vec![0u8; 20].len()).join()
        });
        assert_eq!(busy, bare, "the other thread's allocations counted here");
        let (n, _) = allocations_in(|| v.len());
        assert_eq!(n, 0);
    }
}
