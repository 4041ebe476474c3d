//! Decoding a hostile datagram must error without allocating beyond the datagram's own size.
//!
//! This binary installs a counting global allocator. Per thread (so that tests running side by
//! side do not see each other), it records the peak of bytes held above the level at which a
//! measurement started. Every hostile input below (huge declared lengths, deep nesting,
//! truncation, garbage) must be refused with peak allocation under [`bound`]: a small multiple
//! of the datagram plus a fixed allowance for the error message.
//!
//! [`the_meter_sees_an_unguarded_decoder_allocate`] runs the same decoder without the length
//! guard, to show that the bound is tight enough to catch one that trusts declared lengths.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use stormdht::cbor_guard;
use stormdht::record::RecordKey;
use stormdht::wire::{Body, ClientRequest, Envelope, FindEvent, PackedRow, StoreBatch, WireRow};

/// The tests' one seeded generator (rand's `SmallRng`), and garbage drawn from it.
mod testing {
    use rand::{Rng, SeedableRng};

    pub fn rng(seed: u64) -> rand::rngs::SmallRng {
        rand::rngs::SmallRng::seed_from_u64(seed)
    }

    pub fn bytes(rng: &mut rand::rngs::SmallRng, len: usize) -> Vec<u8> {
        (0..len).map(|_| rng.random()).collect()
    }
}

/// Bytes of heap per byte of datagram a decode may hold at its peak. An honest datagram needs
/// up to about 36: an empty CBOR string, one byte, becomes a 24-byte `String` in a `Vec`, and a
/// `Vec` longer than serde's cautious reservation (1 MiB) grows by doubling.
const PER_BYTE: usize = 48;
/// Fixed allowance, for the error message and the decoder's small buffers.
const SLACK: usize = 1024;

/// The most a decode of a `len`-byte datagram may hold at once.
fn bound(len: usize) -> usize {
    PER_BYTE * len + SLACK
}

struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    static CALLS: Cell<usize> = const { Cell::new(0) };
}

/// Records `delta` bytes allocated (or freed, when negative) on this thread, if it is measuring.
fn track(delta: isize, call: bool) {
    // try_with: the allocator also runs while thread-locals are being torn down.
    let _ = ARMED.try_with(|armed| {
        if armed.get() {
            let live = LIVE.get() + delta;
            LIVE.set(live);
            PEAK.set(PEAK.get().max(live));
            if call {
                CALLS.set(CALLS.get() + 1);
            }
        }
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            track(layout.size() as isize, true);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            track(layout.size() as isize, true);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        track(-(layout.size() as isize), false);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            track(new_size as isize - layout.size() as isize, true);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// What one measured call allocated on this thread.
#[derive(Debug, Clone, Copy)]
struct Usage {
    /// Most bytes held at once, above the level at the start.
    peak: usize,
    /// Allocation calls (alloc, alloc_zeroed, realloc).
    calls: usize,
}

/// Runs `f` and measures it; what `f` returns is dropped inside the measurement.
fn measure<T>(f: impl FnOnce() -> T) -> Usage {
    LIVE.set(0);
    PEAK.set(0);
    CALLS.set(0);
    ARMED.set(true);
    drop(std::hint::black_box(f()));
    ARMED.set(false);
    Usage {
        peak: PEAK.get().max(0) as usize,
        calls: CALLS.get(),
    }
}

fn encode(body: Body) -> Vec<u8> {
    Envelope::new(7, 9, None, body)
        .encode()
        .expect("a sample envelope encodes")
}

/// `bytes` with the first occurrence of `find` replaced by `with`.
fn patch(bytes: &[u8], find: &[u8], with: &[u8]) -> Vec<u8> {
    let at = bytes
        .windows(find.len())
        .position(|w| w == find)
        .unwrap_or_else(|| panic!("{find:02x?} not found in {bytes:02x?}"));
    [&bytes[..at], with, &bytes[at + find.len()..]].concat()
}

fn store_batch() -> Vec<u8> {
    encode(Body::Store(StoreBatch {
        epoch: 1,
        columns: vec!["event_id".into(), "state".into()],
        rows: vec![WireRow(
            RecordKey::Event(5570068),
            PackedRow::pack(&["5570068", "OHIO"]),
        )],
    }))
}

/// Hostile datagrams, each named.
fn hostile() -> Vec<(String, Vec<u8>)> {
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        (
            "map then a text string declaring 2^32 bytes".into(),
            vec![0xa1, 0x7b, 0, 0, 0, 1, 0, 0, 0, 0, 0x61, 0x41],
        ),
        (
            "array declaring 2^63 elements".into(),
            vec![0x9b, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ),
        (
            "array declaring 2^32-1 elements".into(),
            vec![0x9a, 0xff, 0xff, 0xff, 0xff, 0x01, 0x02, 0x03, 0x04],
        ),
        (
            "map declaring 2^32-1 pairs".into(),
            vec![0xba, 0xff, 0xff, 0xff, 0xff, 0x01, 0x02],
        ),
        (
            "byte string declaring 2^64-1 bytes".into(),
            vec![0x5b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00],
        ),
        (
            "indefinite text string with a chunk declaring 2^32-1 bytes".into(),
            vec![0x7f, 0x7a, 0xff, 0xff, 0xff, 0xff, 0x41, 0xff],
        ),
        ("10,000 nested arrays".into(), vec![0x81; 10_000]),
        ("10,000 nested indefinite arrays".into(), vec![0x9f; 10_000]),
        ("10,000 nested maps".into(), [0xa1, 0x00].repeat(5_000)),
        ("10,000 nested tags".into(), vec![0xc6; 10_000]),
        (
            "60,000 bytes under an array declaring 2^32-1 elements".into(),
            [&[0x9a, 0xff, 0xff, 0xff, 0xff][..], &[0x00; 60_000]].concat(),
        ),
    ];
    // Real envelopes whose lengths lie: the rows of a store batch, its column names, a
    // peer's name, the path of a find.
    let batch = store_batch();
    cases.push((
        "store batch whose rows declare 2^32-1 entries".into(),
        patch(&batch, b"rows\x81", b"rows\x9a\xff\xff\xff\xff"),
    ));
    cases.push((
        "store batch whose columns declare 2^32-1 entries".into(),
        patch(&batch, b"columns\x82", b"columns\x9a\xff\xff\xff\xff"),
    ));
    cases.push((
        "store batch whose packed row declares 2^32-1 bytes".into(),
        patch(
            &batch,
            b"\x4d\x075570068",
            b"\x5a\xff\xff\xff\xff\x075570068",
        ),
    ));
    cases.push((
        "store batch whose packed row's first field declares 2^63 bytes".into(),
        patch(
            &batch,
            b"\x4d\x075570068",
            b"\x56\xff\xff\xff\xff\xff\xff\xff\xff\x7f\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
        ),
    ));
    let register = encode(Body::Register {
        name: "peer-a".into(),
        rejoin: None,
    });
    cases.push((
        "register whose name declares 2^32-1 bytes".into(),
        patch(&register, b"\x66peer-a", b"\x7a\xff\xff\xff\xffpeer-a"),
    ));
    let find = encode(Body::Find(FindEvent {
        query: 9,
        key: RecordKey::Event(1),
        path: vec![1, 2],
        hops: Vec::new(),
        routing: stormdht::wire::Routing::Fingers,
        reply_to: None,
    }));
    cases.push((
        "find whose path declares 2^63 hops".into(),
        patch(
            &find,
            b"path\x82",
            b"path\x9b\x7f\xff\xff\xff\xff\xff\xff\xff",
        ),
    ));
    let lookups = encode(Body::Lookups(vec![
        FindEvent {
            query: 9,
            key: RecordKey::Event(1),
            path: Vec::new(),
            hops: Vec::new(),
            routing: stormdht::wire::Routing::Fingers,
            reply_to: None,
        };
        2
    ]));
    cases.push((
        "multi-get that declares 2^63 lookups".into(),
        patch(
            &lookups,
            b"Lookups\x82",
            b"Lookups\x9b\x7f\xff\xff\xff\xff\xff\xff\xff",
        ),
    ));
    // Every truncation of real envelopes.
    for (name, bytes) in [
        ("store batch", batch),
        ("register", register),
        ("find", find),
        ("multi-get", lookups),
        (
            "query",
            encode(Body::Request(ClientRequest::Query {
                key: RecordKey::Event(5570068),
                via: Some("peer-1".into()),
                routing: None,
            })),
        ),
    ] {
        for cut in 0..bytes.len() {
            cases.push((
                format!("{name} cut to {cut} of {} bytes", bytes.len()),
                bytes[..cut].to_vec(),
            ));
        }
    }
    // Seeded garbage (the seed is in each case's name, so a failure replays).
    let seed = 0x9e37_79b9_7f4a_7c15;
    let mut rng = testing::rng(seed);
    for i in 0..500 {
        let len = rand::Rng::random_range(&mut rng, 0..2_000);
        let bytes = testing::bytes(&mut rng, len);
        cases.push((format!("garbage #{i} of seed {seed:#x}"), bytes));
    }
    cases
}

#[test]
fn hostile_datagrams_error_without_allocating_beyond_a_small_multiple_of_their_size() {
    let mut most = (0, String::new(), 0);
    for (name, bytes) in hostile() {
        let mut result = None;
        let usage = measure(|| result = Some(Envelope::decode(&bytes)));
        // A named hostile input must be refused, not just survived; garbage may decode.
        if !name.starts_with("garbage") {
            assert!(
                matches!(result, Some(Err(_))),
                "{name}: decoded to {result:?}"
            );
        }
        let limit = bound(bytes.len());
        assert!(
            usage.peak <= limit,
            "{name}: decoding {} bytes held {} bytes of heap at its peak ({} calls), over the bound of {limit}",
            bytes.len(),
            usage.peak,
            usage.calls
        );
        if !name.starts_with("garbage") && !name.contains(" cut to ") {
            println!(
                "{name}: {} bytes, peak {} bytes in {} calls (bound {limit})",
                bytes.len(),
                usage.peak,
                usage.calls
            );
        }
        if usage.peak > most.0 {
            most = (usage.peak, name, bytes.len());
        }
    }
    let (peak, name, len) = most;
    println!("largest peak of all: {peak} bytes, {name} ({len} bytes)");
}

#[test]
fn the_length_guard_itself_allocates_nothing() {
    for (name, bytes) in hostile() {
        let mut result = None;
        let usage = measure(|| result = Some(cbor_guard::check(&bytes)));
        assert_eq!(usage.calls, 0, "{name}: the guard allocated {usage:?}");
        if !name.starts_with("garbage") && !name.contains(" cut to ") {
            assert!(matches!(result, Some(Err(_))), "{name}: passed the guard");
        }
    }
}

#[test]
fn honest_datagrams_stay_under_the_same_bound() {
    // The worst honest case for the ratio: many empty values, each one CBOR byte.
    let body = Body::Store(StoreBatch {
        epoch: 1,
        columns: vec!["v".into()],
        rows: vec![WireRow(
            RecordKey::Event(1),
            PackedRow::pack(&vec![String::new(); 59_000]),
        )],
    });
    let bytes = encode(body.clone());
    let mut decoded = None;
    let usage = measure(|| decoded = Some(Envelope::decode(&bytes)));
    assert_eq!(
        decoded.map(|r| r.map(|e| e.body)),
        Some(Ok(body)),
        "the honest datagram must decode"
    );
    assert!(
        usage.peak <= bound(bytes.len()),
        "honest {} bytes held {} bytes at the peak, over {}",
        bytes.len(),
        usage.peak,
        bound(bytes.len())
    );
    println!(
        "honest store batch of {} bytes: peak {} bytes ({:.1} per datagram byte)",
        bytes.len(),
        usage.peak,
        usage.peak as f64 / bytes.len() as f64
    );
}

/// The meter must be able to see the failure it guards against: serde's collections reserve
/// what a length declares (capped near 1 MiB), so the same bytes decoded without the guard go
/// far past the bound.
#[test]
fn the_meter_sees_an_unguarded_decoder_allocate() {
    let bytes = patch(&store_batch(), b"rows\x81", b"rows\x9a\xff\xff\xff\xff");
    let mut result = None;
    let usage = measure(|| result = Some(ciborium::de::from_reader::<Envelope, _>(&bytes[..])));
    assert!(matches!(result, Some(Err(_))), "{result:?}");
    assert!(
        usage.peak > bound(bytes.len()),
        "without the guard, {} bytes held only {} bytes: the meter or the hostile input is broken",
        bytes.len(),
        usage.peak
    );
    println!(
        "unguarded decode of {} hostile bytes: peak {} bytes (bound {})",
        bytes.len(),
        usage.peak,
        bound(bytes.len())
    );
}
