//! Hostile GGUF files: SmolLM2's real header, parsed here independently of lethe, truncated and
//! corrupted at every field. Every variant must be an `Err` (the expected variant where it is
//! deterministic), never a panic, and never an allocation the file's size cannot justify.
//!
//! Loading the 98 MB file thousands of times would be slow, so the variants are cut from a
//! compact copy: the real header byte for byte, except that every tensor's dimensions shrink to
//! one block (n_dims kept) and the offsets are re-packed, followed by a few KB of data. All field
//! positions stay those of the real file. The ~15,000 tensor-info variants use a light copy of
//! that (written by lethe's writer): the same tensor infos, with the three 49,152-entry tokenizer
//! arrays cut to three entries, so that each parse doesn't first re-read 1.7 MB of vocabulary.

use lethe::gguf::{GgufError, GgufFile, GgufWriter, Value};
use lethe_kernels::GgmlType;
use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::cell::Cell;
use std::sync::Mutex;

// ---------------------------------------------------------------------------------------------
// Allocation tracking: per thread, the largest single request and the peak of live bytes.

struct Tracking;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

/// Requests above this are refused outright (the test then fails loudly) rather than being
/// granted by an overcommitting OS.
const REFUSE_ABOVE: usize = 1 << 32;

fn on_alloc(size: usize) {
    let _ = LIVE.try_with(|l| {
        let live = l.get() + size;
        l.set(live);
        let _ = PEAK.try_with(|p| p.set(p.get().max(live)));
    });
    let _ = LARGEST.try_with(|m| m.set(m.get().max(size)));
}

fn on_dealloc(size: usize) {
    let _ = LIVE.try_with(|l| l.set(l.get().saturating_sub(size)));
}

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        on_alloc(layout.size());
        if layout.size() > REFUSE_ABOVE {
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: AllocLayout) -> *mut u8 {
        on_alloc(layout.size());
        if layout.size() > REFUSE_ABOVE {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        on_dealloc(layout.size());
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: AllocLayout, new_size: usize) -> *mut u8 {
        on_alloc(new_size);
        if new_size > REFUSE_ABOVE {
            return std::ptr::null_mut();
        }
        on_dealloc(layout.size());
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Tracking = Tracking;

/// Peak live bytes above the starting level, and the largest single request, during `f`.
fn measure<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    LARGEST.with(|m| m.set(0));
    let r = f();
    (r, PEAK.with(Cell::get) - start, LARGEST.with(Cell::get))
}

// ---------------------------------------------------------------------------------------------
// An independent reading of the header: where every field is.

const STRING: u32 = 8;
const ARRAY: u32 = 9;

fn scalar_size(ty: u32) -> Option<usize> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        _ => return None,
    })
}

struct Str {
    len_at: usize,
    at: usize,
    len: usize,
}

struct Arr {
    ty_at: usize,
    ty: u32,
    len_at: usize,
    /// Position of the first and last element (for strings: of their length field).
    first_at: Option<usize>,
    last_at: Option<usize>,
    /// The last element when it is a string.
    last_str: Option<Str>,
}

struct Kv {
    key: Str,
    key_text: String,
    ty_at: usize,
    ty: u32,
    value_at: usize,
    string: Option<Str>,
    arr: Option<Arr>,
}

struct Ti {
    name: Str,
    name_text: String,
    n_dims_at: usize,
    dims: Vec<u64>,
    dims_at: usize,
    ty_at: usize,
    ty: GgmlType,
    offset_at: usize,
}

struct Header {
    kvs: Vec<Kv>,
    tis: Vec<Ti>,
    /// End of the tensor infos (before the padding).
    end: usize,
}

struct Rd<'a> {
    b: &'a [u8],
    p: usize,
}

impl Rd<'_> {
    fn u32(&mut self) -> u32 {
        self.p += 4;
        u32::from_le_bytes(self.b[self.p - 4..self.p].try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        self.p += 8;
        u64::from_le_bytes(self.b[self.p - 8..self.p].try_into().unwrap())
    }
    fn str(&mut self) -> Str {
        let len_at = self.p;
        let len = self.u64() as usize;
        let at = self.p;
        self.p += len;
        Str { len_at, at, len }
    }
    fn text(&self, s: &Str) -> String {
        String::from_utf8(self.b[s.at..s.at + s.len].to_vec()).unwrap()
    }
}

/// Parses the header in `b`, or returns None when `b` does not hold all of it yet.
fn parse_header(b: &[u8]) -> Option<Header> {
    std::panic::catch_unwind(|| {
        let mut r = Rd { b, p: 0 };
        assert_eq!(&b[..4], b"GGUF");
        r.p = 4;
        assert_eq!(r.u32(), 3);
        let n_tensors = r.u64();
        let n_kv = r.u64();
        let mut kvs = Vec::new();
        for _ in 0..n_kv {
            let key = r.str();
            let key_text = r.text(&key);
            let ty_at = r.p;
            let ty = r.u32();
            let value_at = r.p;
            let (mut string, mut arr) = (None, None);
            match ty {
                STRING => string = Some(r.str()),
                ARRAY => {
                    let ty_at = r.p;
                    let ety = r.u32();
                    let len_at = r.p;
                    let len = r.u64();
                    let (mut first_at, mut last_at, mut last_str) = (None, None, None);
                    for i in 0..len {
                        if i == 0 {
                            first_at = Some(r.p);
                        }
                        if i + 1 == len {
                            last_at = Some(r.p);
                        }
                        if ety == STRING {
                            let s = r.str();
                            if i + 1 == len {
                                last_str = Some(s);
                            }
                        } else {
                            r.p += scalar_size(ety).unwrap();
                        }
                    }
                    arr = Some(Arr {
                        ty_at,
                        ty: ety,
                        len_at,
                        first_at,
                        last_at,
                        last_str,
                    });
                }
                t => r.p += scalar_size(t).unwrap(),
            }
            kvs.push(Kv {
                key,
                key_text,
                ty_at,
                ty,
                value_at,
                string,
                arr,
            });
        }
        let mut tis = Vec::new();
        for _ in 0..n_tensors {
            let name = r.str();
            let name_text = r.text(&name);
            let n_dims_at = r.p;
            let n_dims = r.u32();
            let dims_at = r.p;
            let dims = (0..n_dims).map(|_| r.u64()).collect();
            let ty_at = r.p;
            let ty = GgmlType::from_u32(r.u32()).unwrap();
            let offset_at = r.p;
            r.u64();
            tis.push(Ti {
                name,
                name_text,
                n_dims_at,
                dims,
                dims_at,
                ty_at,
                ty,
                offset_at,
            });
        }
        Header { kvs, tis, end: r.p }
    })
    .ok()
}

fn smollm2_prefix() -> (Vec<u8>, Header) {
    use std::io::Read;
    let path = lethe::hub::resolve_model("smollm2").expect("SmolLM2 (lethe::hub::resolve_model)");
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = Vec::new();
    let mut want = 1 << 21;
    loop {
        let have = buf.len();
        f.by_ref()
            .take((want - have) as u64)
            .read_to_end(&mut buf)
            .unwrap();
        // The parse below panics (caught) while the header is incomplete: keep the output quiet.
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let h = parse_header(&buf);
        std::panic::set_hook(hook);
        if let Some(h) = h {
            buf.truncate(h.end);
            return (buf, h);
        }
        assert!(buf.len() == want, "file ended inside the header");
        want *= 2;
    }
}

// ---------------------------------------------------------------------------------------------
// The compact valid base file.

const ALIGN: usize = 32;

fn pad(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// The real header with every tensor shrunk to one block and re-packed, then the data section.
fn compact_base(prefix: &[u8], h: &Header) -> Vec<u8> {
    let mut b = prefix.to_vec();
    let mut offset = 0usize;
    for t in &h.tis {
        for d in 0..t.dims.len() {
            let v = if d == 0 { t.ty.block_size() as u64 } else { 1 };
            put_u64(&mut b, t.dims_at + 8 * d, v);
        }
        put_u64(&mut b, t.offset_at, offset as u64);
        offset += pad(t.ty.type_size());
    }
    let data_start = pad(b.len());
    b.resize(data_start + offset, 0);
    // Recognisable data: each tensor's first byte is its index.
    let mut o = data_start;
    for (i, t) in h.tis.iter().enumerate() {
        b[o] = i as u8;
        o += pad(t.ty.type_size());
    }
    b
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

// ---------------------------------------------------------------------------------------------
// Variants.

type Check = fn(&GgufError) -> bool;

struct Variant {
    label: String,
    truncate: Option<usize>,
    patches: Vec<(usize, Vec<u8>)>,
    check: Check,
    expect: &'static str,
}

macro_rules! is {
    ($($p:pat_param)|+) => {
        (|e: &GgufError| matches!(e, $($p)|+)) as Check
    };
}

#[derive(Default)]
struct Variants(Vec<Variant>);

impl Variants {
    fn truncate(&mut self, label: String, at: usize, check: Check, expect: &'static str) {
        self.0.push(Variant {
            label,
            truncate: Some(at),
            patches: vec![],
            check,
            expect,
        });
    }
    fn patch(
        &mut self,
        label: String,
        at: usize,
        bytes: Vec<u8>,
        check: Check,
        expect: &'static str,
    ) {
        self.0.push(Variant {
            label,
            truncate: None,
            patches: vec![(at, bytes)],
            check,
            expect,
        });
    }
    fn patches(
        &mut self,
        label: String,
        patches: Vec<(usize, Vec<u8>)>,
        check: Check,
        expect: &'static str,
    ) {
        self.0.push(Variant {
            label,
            truncate: None,
            patches,
            check,
            expect,
        });
    }
    fn u32(&mut self, label: String, at: usize, v: u32, check: Check, expect: &'static str) {
        self.patch(label, at, v.to_le_bytes().to_vec(), check, expect);
    }
    fn u64(&mut self, label: String, at: usize, v: u64, check: Check, expect: &'static str) {
        self.patch(label, at, v.to_le_bytes().to_vec(), check, expect);
    }
}

/// A file cut short: either an item runs past the end, or the counts cannot fit in what is left.
const TRUNCATED: Check = is!(GgufError::Truncated { .. } | GgufError::CountTooLarge { .. });
const ANY: Check = |_| true;
const HUGE: [u64; 4] = [u64::MAX, 1 << 40, 1 << 63, i64::MAX as u64];

/// The fixed header, the metadata, general.alignment, and the data section.
fn header_and_metadata_variants(base: &[u8], h: &Header) -> Variants {
    let mut v = Variants::default();
    let n = base.len();

    // The fixed header.
    for at in [0, 1, 3, 4, 6, 8, 12, 16, 20, 23] {
        v.truncate(
            format!("truncated at {at} (fixed header)"),
            at,
            TRUNCATED,
            "Truncated",
        );
    }
    v.patch(
        "magic GGUG".into(),
        0,
        b"GGUG".to_vec(),
        is!(GgufError::BadMagic(_)),
        "BadMagic",
    );
    v.patch(
        "magic FUGG".into(),
        0,
        b"FUGG".to_vec(),
        is!(GgufError::BadMagic(_)),
        "BadMagic",
    );
    for ver in [0, 1, 4, 99, u32::MAX, 3 << 24] {
        v.u32(
            format!("version {ver}"),
            4,
            ver,
            is!(GgufError::UnsupportedVersion(_)),
            "UnsupportedVersion",
        );
    }
    for c in HUGE.into_iter().chain([n as u64 / 24 + 1]) {
        v.u64(
            format!("tensor count {c}"),
            8,
            c,
            is!(GgufError::CountTooLarge { what: "tensor", .. }),
            "CountTooLarge",
        );
    }
    for c in HUGE.into_iter().chain([n as u64 / 14 + 1]) {
        v.u64(
            format!("metadata count {c}"),
            16,
            c,
            is!(GgufError::CountTooLarge { .. }),
            "CountTooLarge",
        );
    }
    v.u64(
        "tensor count + 1".into(),
        8,
        h.tis.len() as u64 + 1,
        ANY,
        "Err",
    );
    v.u64(
        "metadata count + 1".into(),
        16,
        h.kvs.len() as u64 + 1,
        ANY,
        "Err",
    );
    v.u64("metadata count 0".into(), 16, 0, ANY, "Err");

    // Metadata.
    for (i, kv) in h.kvs.iter().enumerate() {
        let k = &kv.key_text;
        let rest_after = |at: usize| (n - at) as u64;
        let mut cut = vec![
            kv.key.len_at,
            kv.key.len_at + 5,
            kv.key.at,
            kv.key.at + kv.key.len / 2,
            kv.ty_at,
            kv.ty_at + 2,
        ];
        cut.push(kv.value_at);
        if let Some(s) = &kv.string {
            cut.extend([
                s.len_at + 7,
                s.at,
                s.at + s.len / 2,
                s.at + s.len.saturating_sub(1),
            ]);
        } else if kv.arr.is_none() {
            cut.push(kv.value_at + 1);
        }
        if let Some(a) = &kv.arr {
            cut.extend([a.ty_at, a.ty_at + 1, a.len_at, a.len_at + 4]);
            cut.extend(
                a.first_at
                    .into_iter()
                    .chain(a.last_at)
                    .flat_map(|p| [p, p + 1]),
            );
            if let Some(s) = &a.last_str {
                cut.extend([s.at, s.at + s.len.saturating_sub(1)]);
            }
        }
        for at in cut {
            v.truncate(
                format!("truncated at {at} in {k:?}"),
                at,
                TRUNCATED,
                "Truncated",
            );
        }

        // Key length.
        for len in HUGE.into_iter().chain([rest_after(kv.key.at) + 1]) {
            v.u64(
                format!("{k:?}: key length {len}"),
                kv.key.len_at,
                len,
                TRUNCATED,
                "Truncated",
            );
        }
        v.u64(
            format!("{k:?}: key length 0"),
            kv.key.len_at,
            0,
            is!(GgufError::EmptyKey(_)),
            "EmptyKey",
        );
        v.u64(
            format!("{k:?}: key length - 1"),
            kv.key.len_at,
            kv.key.len as u64 - 1,
            ANY,
            "Err",
        );
        v.patch(
            format!("{k:?}: key not UTF-8"),
            kv.key.at,
            vec![0xff],
            is!(GgufError::BadUtf8 { .. }),
            "BadUtf8",
        );
        // Duplicate: an earlier key of the same length copied over this one.
        if let Some(prev) = h.kvs[..i].iter().find(|p| p.key.len == kv.key.len) {
            let bytes = base[prev.key.at..prev.key.at + prev.key.len].to_vec();
            v.patch(
                format!("{k:?} renamed to {:?}", prev.key_text),
                kv.key.at,
                bytes,
                is!(GgufError::DuplicateKey(_)),
                "DuplicateKey",
            );
        }

        // Value type.
        for ty in [13, 14, 255, 0x0100_0004, u32::MAX] {
            v.u32(
                format!("{k:?}: value type {ty}"),
                kv.ty_at,
                ty,
                is!(GgufError::BadValueType { .. }),
                "BadValueType",
            );
        }

        // String value.
        if let Some(s) = &kv.string {
            for len in HUGE.into_iter().chain([rest_after(s.at) + 1]) {
                v.u64(
                    format!("{k:?}: string length {len}"),
                    s.len_at,
                    len,
                    TRUNCATED,
                    "Truncated",
                );
            }
            if s.len > 0 {
                v.patch(
                    format!("{k:?}: string not UTF-8"),
                    s.at,
                    vec![0xc3],
                    is!(GgufError::BadUtf8 { .. }),
                    "BadUtf8",
                );
                let last = s.at + s.len - 1;
                v.patch(
                    format!("{k:?}: string ends mid-character"),
                    last,
                    vec![0xe2],
                    is!(GgufError::BadUtf8 { .. }),
                    "BadUtf8",
                );
            }
        }

        // Arrays.
        if let Some(a) = &kv.arr {
            for ty in [13, 99, u32::MAX] {
                v.u32(
                    format!("{k:?}: array type {ty}"),
                    a.ty_at,
                    ty,
                    is!(GgufError::BadValueType { .. }),
                    "BadValueType",
                );
            }
            v.u32(
                format!("{k:?}: array of arrays"),
                a.ty_at,
                ARRAY,
                is!(GgufError::NestedArray { .. }),
                "NestedArray",
            );
            let min = if a.ty == STRING {
                8
            } else {
                scalar_size(a.ty).unwrap() as u64
            };
            let after_len = a.len_at + 8;
            for len in HUGE.into_iter().chain([rest_after(after_len) / min + 1]) {
                v.u64(
                    format!("{k:?}: array length {len}"),
                    a.len_at,
                    len,
                    TRUNCATED,
                    "Truncated",
                );
            }
            if a.ty == STRING {
                for (which, at) in [("first", a.first_at), ("last", a.last_at)] {
                    let at = at.unwrap();
                    for len in HUGE.into_iter().chain([rest_after(at + 8) + 1]) {
                        v.u64(
                            format!("{k:?}: {which} element length {len}"),
                            at,
                            len,
                            TRUNCATED,
                            "Truncated",
                        );
                    }
                    let len = u64::from_le_bytes(base[at..at + 8].try_into().unwrap());
                    if len > 0 {
                        v.patch(
                            format!("{k:?}: {which} element not UTF-8"),
                            at + 8,
                            vec![0x80],
                            is!(GgufError::BadUtf8 { .. }),
                            "BadUtf8",
                        );
                    }
                }
            }
        }
    }

    // general.alignment: a 17-byte u32 key renamed to it, with good and bad values.
    let al = h
        .kvs
        .iter()
        .find(|kv| kv.key.len == 17 && kv.ty == 4)
        .expect("a 17-byte u32 key");
    let rename = (al.key.at, b"general.alignment".to_vec());
    let with = |value: u32, ty: u32| {
        vec![
            rename.clone(),
            (al.ty_at, ty.to_le_bytes().to_vec()),
            (al.value_at, value.to_le_bytes().to_vec()),
        ]
    };
    for a in [0u32, 3, 33, 48, u32::MAX, 1 << 31 | 1] {
        v.patches(
            format!("alignment {a}"),
            with(a, 4),
            is!(GgufError::BadAlignment(_)),
            "BadAlignment",
        );
    }
    v.patches(
        "alignment 32 as i32".into(),
        with(32, 5),
        is!(GgufError::BadAlignment(_)),
        "BadAlignment",
    );
    v.patches(
        "alignment 32.0 as f32".into(),
        with(32f32.to_bits(), 6),
        is!(GgufError::BadAlignment(_)),
        "BadAlignment",
    );
    let odd32 = h
        .tis
        .iter()
        .any(|t| !pad(t.ty.type_size()).is_multiple_of(64));
    assert!(odd32, "some tensor is padded to an odd multiple of 32");
    v.patches(
        "alignment 64".into(),
        with(64, 4),
        is!(GgufError::MisalignedOffset { align: 64, .. }),
        "MisalignedOffset",
    );
    v.patches("alignment 16".into(), with(16, 4), ANY, "Err");
    v.patches(
        "alignment 1 << 30".into(),
        with(1 << 30, 4),
        is!(GgufError::MisalignedOffset { .. } | GgufError::DataOutOfBounds { .. }),
        "MisalignedOffset or DataOutOfBounds",
    );

    data_variants(&mut v, base, h);
    v
}

/// Out-of-bounds tensor data: the file cut inside the data section.
fn data_variants(v: &mut Variants, base: &[u8], h: &Header) {
    let (header_end, data_start, n) = (h.end, pad(h.end), base.len());
    let last = h.tis.len() - 1;
    // The last tensor's data must be there; the padding after it need not be (as in llama.cpp).
    let last_ts = h.tis[last].ty.type_size();
    let last_end = n - pad(last_ts) + last_ts;
    for at in [
        header_end,
        header_end + 1,
        data_start,
        data_start + 1,
        last_end - 1,
    ] {
        v.truncate(
            format!("truncated at {at} (data)"),
            at,
            is!(GgufError::DataOutOfBounds { .. }),
            "DataOutOfBounds",
        );
    }
}

/// Every field of every tensor info.
fn tensor_variants(base: &[u8], h: &Header) -> Variants {
    let mut v = Variants::default();
    let n = base.len();
    let last = h.tis.len() - 1;
    for (i, t) in h.tis.iter().enumerate() {
        let name = &t.name_text;
        let mut cut = vec![
            t.name.len_at,
            t.name.len_at + 3,
            t.name.at,
            t.name.at + t.name.len - 1,
            t.n_dims_at,
            t.n_dims_at + 1,
        ];
        cut.extend((0..t.dims.len()).flat_map(|d| [t.dims_at + 8 * d, t.dims_at + 8 * d + 7]));
        cut.extend([t.ty_at, t.ty_at + 3, t.offset_at, t.offset_at + 4]);
        for at in cut {
            v.truncate(
                format!("truncated at {at} in tensor {name:?}"),
                at,
                TRUNCATED,
                "Truncated",
            );
        }
        for len in HUGE.into_iter().chain([(n - t.name.at) as u64 + 1]) {
            v.u64(
                format!("{name:?}: name length {len}"),
                t.name.len_at,
                len,
                TRUNCATED,
                "Truncated",
            );
        }
        v.u64(
            format!("{name:?}: name length 64"),
            t.name.len_at,
            64,
            is!(GgufError::NameTooLong { .. } | GgufError::BadUtf8 { .. }),
            "NameTooLong",
        );
        v.patch(
            format!("{name:?}: name not UTF-8"),
            t.name.at,
            vec![0xfe],
            is!(GgufError::BadUtf8 { .. }),
            "BadUtf8",
        );
        if let Some(prev) = h.tis[..i].iter().find(|p| p.name.len == t.name.len) {
            let bytes = base[prev.name.at..prev.name.at + prev.name.len].to_vec();
            v.patch(
                format!("{name:?} renamed to {:?}", prev.name_text),
                t.name.at,
                bytes,
                is!(GgufError::DuplicateTensor(_)),
                "DuplicateTensor",
            );
        }
        for nd in [5, 6, 64, u32::MAX] {
            v.u32(
                format!("{name:?}: n_dims {nd}"),
                t.n_dims_at,
                nd,
                is!(GgufError::TooManyDims { .. }),
                "TooManyDims",
            );
        }
        // Dimensions.
        let dim = |d: usize| t.dims_at + 8 * d;
        for d in 0..t.dims.len() {
            for x in [u64::MAX, 1 << 63] {
                v.u64(
                    format!("{name:?}: ne[{d}] = {x}"),
                    dim(d),
                    x,
                    is!(GgufError::BadShape { .. }),
                    "BadShape",
                );
            }
            if i != last {
                v.u64(
                    format!("{name:?}: ne[{d}] = 0"),
                    dim(d),
                    0,
                    is!(GgufError::UnpackedOffset { .. }),
                    "UnpackedOffset",
                );
            }
        }
        let block = t.ty.block_size() as u64;
        if block > 1 {
            for ne0 in [block + 1, block - 1, 1, block * 3 / 2] {
                v.u64(
                    format!("{name:?}: ne[0] = {ne0}"),
                    dim(0),
                    ne0,
                    is!(GgufError::BadBlockMultiple { .. }),
                    "BadBlockMultiple",
                );
            }
        }
        let huge_ne0 = (1u64 << 40) * block;
        v.u64(
            format!("{name:?}: ne[0] = 2^40 blocks"),
            dim(0),
            huge_ne0,
            is!(GgufError::DataOutOfBounds { .. }),
            "DataOutOfBounds",
        );
        if t.dims.len() >= 2 {
            let ps = vec![
                (dim(0), (1u64 << 32).to_le_bytes().to_vec()),
                (dim(1), (1u64 << 32).to_le_bytes().to_vec()),
            ];
            v.patches(
                format!("{name:?}: ne = [2^32, 2^32] (element count overflows)"),
                ps,
                is!(GgufError::BadShape { .. }),
                "BadShape",
            );
        }
        // Type.
        for ty in [4, 5, 16, 29, 31, 39, 1000, u32::MAX] {
            v.u32(
                format!("{name:?}: type {ty}"),
                t.ty_at,
                ty,
                is!(GgufError::BadTensorType { .. }),
                "BadTensorType",
            );
        }
        if t.ty != GgmlType::Q4_K {
            v.u32(
                format!("{name:?}: type Q4_K"),
                t.ty_at,
                GgmlType::Q4_K as u32,
                is!(GgufError::BadBlockMultiple { .. }),
                "BadBlockMultiple",
            );
        }
        // Offset.
        let off = u64::from_le_bytes(base[t.offset_at..t.offset_at + 8].try_into().unwrap());
        for (what, x) in [("+ 1", off + 1), ("+ 31", off + 31), ("u64::MAX", u64::MAX)] {
            v.u64(
                format!("{name:?}: offset {what}"),
                t.offset_at,
                x,
                is!(GgufError::MisalignedOffset { .. }),
                "MisalignedOffset",
            );
        }
        for (what, x) in [
            ("+ 32", off + 32),
            ("+ 2^40", off + (1 << 40)),
            ("u64::MAX - 31", u64::MAX - 31),
        ] {
            v.u64(
                format!("{name:?}: offset {what}"),
                t.offset_at,
                x,
                is!(GgufError::UnpackedOffset { .. }),
                "UnpackedOffset",
            );
        }
        if off > 0 {
            v.u64(
                format!("{name:?}: offset - 32"),
                t.offset_at,
                off - 32,
                is!(GgufError::UnpackedOffset { .. }),
                "UnpackedOffset",
            );
        }
        if i < last {
            // Two tensors' offsets swapped.
            let next = &h.tis[i + 1];
            let ps = vec![
                (
                    t.offset_at,
                    base[next.offset_at..next.offset_at + 8].to_vec(),
                ),
                (next.offset_at, off.to_le_bytes().to_vec()),
            ];
            v.patches(
                format!("{name:?}: offset swapped with the next tensor's"),
                ps,
                is!(GgufError::UnpackedOffset { .. }),
                "UnpackedOffset",
            );
        }
    }

    data_variants(&mut v, base, h);
    v
}

fn apply(base: &[u8], v: &Variant) -> Vec<u8> {
    let mut b = base[..v.truncate.unwrap_or(base.len())].to_vec();
    for (at, bytes) in &v.patches {
        b[*at..*at + bytes.len()].copy_from_slice(bytes);
    }
    b
}

#[test]
fn every_corruption_of_smollm2_header_is_an_error() {
    let t0 = std::time::Instant::now();
    let (prefix, h) = smollm2_prefix();
    assert!(
        h.kvs.len() > 30 && h.tis.len() > 200,
        "SmolLM2: {} kvs, {} tensors",
        h.kvs.len(),
        h.tis.len()
    );
    assert!(
        h.kvs.iter().all(|kv| kv.key_text != "general.alignment"),
        "SmolLM2 uses the default alignment"
    );
    let base = compact_base(&prefix, &h);

    // The compact base is valid, and read as this test reads it.
    let f = GgufFile::from_bytes(base.clone()).expect("the compact base is a valid file");
    assert_eq!(f.metadata().len(), h.kvs.len());
    assert_eq!(f.tensors().len(), h.tis.len());
    for (t, ti) in f.tensors().iter().zip(&h.tis) {
        assert_eq!(
            t.offset,
            u64::from_le_bytes(base[ti.offset_at..ti.offset_at + 8].try_into().unwrap())
        );
        assert_eq!(
            (t.name.as_str(), t.ty, t.shape.len()),
            (ti.name_text.as_str(), ti.ty, ti.dims.len())
        );
    }
    for (i, t) in f.tensors().iter().enumerate() {
        assert_eq!(f.tensor_data(t)[0], i as u8, "{}", t.name);
    }
    // Renaming a 17-byte u32 key to general.alignment = 32 keeps the file valid: the rename
    // trick used below is sound.
    let al = h
        .kvs
        .iter()
        .find(|kv| kv.key.len == 17 && kv.ty == 4)
        .unwrap();
    let mut ok = base.clone();
    ok[al.key.at..al.key.at + 17].copy_from_slice(b"general.alignment");
    ok[al.value_at..al.value_at + 4].copy_from_slice(&32u32.to_le_bytes());
    assert_eq!(GgufFile::from_bytes(ok).unwrap().alignment, 32);

    let light = light_base(&f);
    drop(f);
    let light_h = parse_header(&light).expect("the light base parses");
    assert_eq!(light_h.tis.len(), h.tis.len());

    let mut report = Vec::new();
    let mut failures = run(&base, header_and_metadata_variants(&base, &h), &mut report);
    failures.extend(run(&light, tensor_variants(&light, &light_h), &mut report));
    eprintln!("{} in {:.1?}", report.join("; "), t0.elapsed());
    assert!(
        failures.is_empty(),
        "{} variants failed:\n{}",
        failures.len(),
        failures
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The compact base with every array longer than 3 cut to its first two and last elements.
fn light_base(f: &GgufFile) -> Vec<u8> {
    let mut w = GgufWriter::new();
    for (k, v) in f.metadata() {
        match v {
            Value::Array(a) if a.len() > 3 => {
                let keep = [0, 1, a.len() - 1].map(|i| a.get(i).unwrap());
                w.set_array(k.clone(), a.elem_type(), keep).unwrap();
            }
            v => {
                w.set(k.clone(), v.clone()).unwrap();
            }
        }
    }
    for t in f.tensors() {
        w.copy_tensor(f, &t.name).unwrap();
    }
    w.to_bytes().unwrap()
}

/// Parses every variant of `base` on a few threads; returns the failures.
fn run(base: &[u8], variants: Variants, report: &mut Vec<String>) -> Vec<String> {
    let t0 = std::time::Instant::now();
    // Allocation bounds: a corrupted file never needs much more than the valid one.
    let copy = base.to_vec();
    let (r, base_peak, base_largest) = measure(|| GgufFile::from_bytes(copy).map(|_| ()));
    r.expect("the base is valid");
    let peak_limit = 2 * base_peak + (1 << 20);
    let largest_limit = 2 * base_largest + (1 << 20);

    let failures = Mutex::new(Vec::new());
    let stats = Mutex::new((0usize, 0usize));
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(4);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(v) = variants.0.get(i) else { break };
                let bytes = apply(base, v);
                let (r, peak, largest) = measure(|| std::panic::catch_unwind(|| GgufFile::from_bytes(bytes).map(|_| ())));
                let problem = match r {
                    Err(_) => Some("panicked".to_string()),
                    Ok(Ok(())) => Some(format!("parsed without error (expected {})", v.expect)),
                    Ok(Err(e)) if !(v.check)(&e) => Some(format!("expected {}, got {e:?}", v.expect)),
                    Ok(Err(_)) => None,
                };
                let problem = problem.or_else(|| {
                    (peak > peak_limit || largest > largest_limit).then(|| {
                        format!("allocated {peak} bytes at peak, {largest} at once (limits {peak_limit}, {largest_limit})")
                    })
                });
                if let Some(p) = problem {
                    failures.lock().unwrap().push(format!("{}: {p}", v.label));
                }
                let mut st = stats.lock().unwrap();
                st.0 = st.0.max(peak);
                st.1 = st.1.max(largest);
            });
        }
    });
    std::panic::set_hook(hook);
    let (peak, largest) = stats.into_inner().unwrap();
    report.push(format!(
        "{} variants of a {}-byte file in {:.1?} (worst peak {peak} B, largest allocation {largest} B; valid file {base_peak} B, {base_largest} B)",
        variants.0.len(),
        base.len(),
        t0.elapsed()
    ));
    failures.into_inner().unwrap()
}

/// Huge counts are rejected before anything is reserved for them, even when the file is
/// large enough that a count bounded only by the file size would still be large.
#[test]
fn counts_are_bounded_before_allocating() {
    // A valid 1 MB file with one tensor of 256 K floats.
    let mut w = GgufWriter::new();
    w.set("general.architecture", "llama").unwrap();
    w.add_tensor("t", &[1 << 18], GgmlType::F32, vec![0u8; 1 << 20])
        .unwrap();
    let good = w.to_bytes().unwrap();
    let n = good.len();
    let (r, _, base_largest) = measure(|| GgufFile::from_bytes(good.clone()).map(|_| ()));
    r.unwrap();
    // Counts the file size allows, but the file does not hold.
    for (at, count) in [
        (8usize, n as u64 / 24),
        (8, n as u64 / 25),
        (16, n as u64 / 14),
        (16, n as u64 / 15),
    ] {
        let mut b = good.clone();
        b[at..at + 8].copy_from_slice(&count.to_le_bytes());
        let (r, peak, largest) = measure(|| GgufFile::from_bytes(b).map(|_| ()));
        assert!(r.is_err(), "count {count} at {at}");
        assert!(
            largest <= base_largest.max(1 << 16) * 8,
            "count {count} at {at}: {largest} bytes at once"
        );
        assert!(
            peak < 16 << 20,
            "count {count} at {at}: {peak} bytes at peak"
        );
    }
    // An array whose length the remaining bytes can hold only as u8 but which claims strings.
    let mut w = GgufWriter::new();
    w.set("big", vec![0u8; 1 << 20]).unwrap();
    let good = w.to_bytes().unwrap();
    let len_at = 8 + 8 + 8 + 8 + 3 + 4 + 4;
    for (ty, len) in [(8u32, (1u64 << 20) / 8), (0, 1 << 20), (10, (1 << 20) / 8)] {
        let mut b = good.clone();
        b[len_at - 4..len_at].copy_from_slice(&ty.to_le_bytes());
        b[len_at..len_at + 8].copy_from_slice(&len.to_le_bytes());
        let (r, peak, largest) = measure(|| GgufFile::from_bytes(b).map(|_| ()));
        let _ = r;
        // Each parsed element costs a Value; nothing is reserved beyond what was parsed plus a cap.
        assert!(
            largest <= 64 << 20,
            "type {ty} len {len}: {largest} bytes at once"
        );
        assert!(
            peak <= 128 << 20,
            "type {ty} len {len}: {peak} bytes at peak"
        );
    }
}

/// The memory-mapped path rejects hostile files too, including an empty one.
#[test]
fn open_rejects_hostile_files() {
    let dir = std::env::temp_dir().join(format!("lethe-gguf-corrupt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut w = GgufWriter::new();
    w.set("general.architecture", "llama").unwrap();
    w.set("general.alignmenX", 64u32).unwrap();
    w.add_tensor("t", &[32, 2], GgmlType::Q8_0, vec![7u8; 68])
        .unwrap();
    let good = w.to_bytes().unwrap();
    let data_end = GgufFile::from_bytes(good.clone()).unwrap().data_offset + 68;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("magic only", b"GGUF".to_vec()),
        ("header only", good[..24].to_vec()),
        ("missing data", good[..data_end - 1].to_vec()),
        ("bad magic", [b"GGML".as_slice(), &good[4..]].concat()),
    ];
    for (what, bytes) in cases {
        let p = dir.join("bad.gguf");
        std::fs::write(&p, &bytes).unwrap();
        let e = GgufFile::open(&p)
            .err()
            .unwrap_or_else(|| panic!("{what}: opened"));
        let ok = matches!(
            e,
            GgufError::Truncated { .. }
                | GgufError::CountTooLarge { .. }
                | GgufError::BadMagic(_)
                | GgufError::DataOutOfBounds { .. }
                | GgufError::Io { .. }
        );
        assert!(ok, "{what}: {e:?}");
    }
    assert!(matches!(
        GgufFile::open(dir.join("missing.gguf")),
        Err(GgufError::Io { .. })
    ));
    let p = dir.join("good.gguf");
    std::fs::write(&p, &good).unwrap();
    assert_eq!(GgufFile::open(&p).unwrap().tensors().len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// general.alignment of every non-u32 type is rejected (the key is written under another name,
/// then renamed, since the writer refuses bad alignments).
#[test]
fn alignment_must_be_a_power_of_two_u32() {
    let values: Vec<Value> = vec![
        Value::U32(0),
        Value::U32(3),
        Value::U32(96),
        Value::U64(32),
        Value::I32(32),
        Value::U16(32),
        Value::U8(32),
        Value::F32(32.0),
        Value::F64(32.0),
        Value::Bool(true),
        Value::String("32".into()),
        Value::from(vec![32u32]),
    ];
    for value in values {
        let mut w = GgufWriter::new();
        w.set("general.alignmenX", value.clone()).unwrap();
        w.add_tensor("t", &[8], GgmlType::F32, vec![0u8; 32])
            .unwrap();
        let mut b = w.to_bytes().unwrap();
        let at = b
            .windows(17)
            .position(|x| x == b"general.alignmenX")
            .unwrap();
        b[at + 16] = b't';
        let e = GgufFile::from_bytes(b).err();
        assert!(
            matches!(e, Some(GgufError::BadAlignment(_))),
            "{value:?}: {e:?}"
        );
    }
}
