//! Decoding hostile datagrams allocates no more than a small multiple of the datagram: every
//! declared length is checked against the datagram before serde sees it. A counting allocator
//! (this test binary's only test, so nothing else allocates meanwhile) measures the peak.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use stormdht::wire::Envelope;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
        PEAK.fetch_max(live, Ordering::SeqCst);
        // SAFETY: forwards the caller's layout to the system allocator unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
        // SAFETY: `ptr` was allocated by `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The most bytes live at once while decoding `bytes`, above what was live before.
fn peak_while_decoding(bytes: &[u8]) -> usize {
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let result = Envelope::decode(bytes);
    assert!(result.is_err(), "hostile input decoded: {result:?}");
    drop(result);
    PEAK.load(Ordering::SeqCst) - base
}

#[test]
fn hostile_declared_lengths_and_nesting_allocate_little() {
    // The counter itself works: a MiB allocated in the window is seen.
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let control: Vec<u8> = Vec::with_capacity(1 << 20);
    assert!(PEAK.load(Ordering::SeqCst) - base >= 1 << 20);
    drop(control);

    let mut hostile: Vec<(&str, Vec<u8>)> = Vec::new();
    // A one-entry map whose key is a text string claiming 2^32 bytes.
    hostile.push((
        "text of 2^32",
        vec![0xa1, 0x7b, 0, 0, 0, 1, 0, 0, 0, 0, 0x61, 0x41],
    ));
    // Byte strings, arrays and maps claiming 2^63 items, as the body of an envelope.
    for major in [0x5bu8, 0x9b, 0xbb] {
        let mut v = vec![0xa5, 0x61, b'v', 0x01, 0x64, b'b', b'o', b'd', b'y', major];
        v.extend_from_slice(&(1u64 << 63).to_be_bytes());
        hostile.push(("2^63 items", v));
    }
    // An array claiming a million elements, each one byte short of there.
    let mut v = vec![0x9a, 0x00, 0x0f, 0x42, 0x40];
    v.extend(std::iter::repeat_n(0x01, 1000));
    hostile.push(("1e6 elements, 1000 present", v));
    // Deep nesting.
    hostile.push(("deep nesting", vec![0x81; 60_000]));
    // A 60 KB datagram of a map claiming 2^32 entries.
    let mut v = vec![0xba, 0xff, 0xff, 0xff, 0xff];
    v.extend(std::iter::repeat_n(0x00, 60_000));
    hostile.push(("map of 2^32 entries", v));

    for (what, bytes) in &hostile {
        let peak = peak_while_decoding(bytes);
        println!(
            "decode_alloc: FIGURE {what}: {} bytes in, peak {peak} bytes allocated",
            bytes.len()
        );
        // A few KiB of decoder state, plus at most a small multiple of the datagram.
        assert!(
            peak <= 16 * 1024 + 4 * bytes.len(),
            "{what}: decoding {} bytes allocated {peak} bytes at once",
            bytes.len()
        );
    }
}
