//! GGUF parsing: writer round trips, every metadata type, and malformed files (truncated at every
//! length, bad magic/version, absurd counts, bad offsets, unknown types, duplicates, random
//! corruption) — always an error naming the file, never a panic.

use freekv_model::GgmlType;
use freekv_model::ModelError;
use freekv_model::gguf::{GgufFile, GgufWriter, MetaValue, TensorInfo};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const NAME: &str = "test.gguf";

fn parse(bytes: Vec<u8>) -> Result<GgufFile, ModelError> {
    GgufFile::from_bytes(NAME, bytes)
}

/// The message of a `Gguf` error for `NAME`; fails on any other outcome.
#[track_caller]
fn gguf_err(r: Result<GgufFile, ModelError>) -> String {
    match r {
        Err(ModelError::Gguf { path, msg }) => {
            assert_eq!(path, NAME);
            msg
        }
        Err(other) => panic!("expected a Gguf error, got {other:?}"),
        Ok(g) => panic!("expected an error, parsed {g:?}"),
    }
}

fn every_value_type() -> Vec<(&'static str, MetaValue)> {
    vec![
        ("t.u8", MetaValue::U8(200)),
        ("t.i8", MetaValue::I8(-100)),
        ("t.u16", MetaValue::U16(60000)),
        ("t.i16", MetaValue::I16(-30000)),
        ("t.u32", MetaValue::U32(4_000_000_000)),
        ("t.i32", MetaValue::I32(-2_000_000_000)),
        ("t.f32", MetaValue::F32(1.5e-5)),
        ("t.bool", MetaValue::Bool(true)),
        ("t.bool2", MetaValue::Bool(false)),
        ("t.string", MetaValue::String("héllo, wörld ✓".into())),
        ("t.empty_string", MetaValue::String(String::new())),
        ("t.u64", MetaValue::U64(u64::MAX)),
        ("t.i64", MetaValue::I64(i64::MIN)),
        ("t.f64", MetaValue::F64(-2.5e300)),
        (
            "t.arr_u32",
            MetaValue::Array((0..100).map(MetaValue::U32).collect()),
        ),
        (
            "t.arr_str",
            MetaValue::Array(vec![
                MetaValue::String("a".into()),
                MetaValue::String("Ġ t".into()),
            ]),
        ),
        ("t.arr_empty", MetaValue::Array(vec![])),
        (
            "t.arr_nested",
            MetaValue::Array(vec![
                MetaValue::Array(vec![MetaValue::I16(-1), MetaValue::I16(2)]),
                MetaValue::Array(vec![]),
                MetaValue::Array(vec![MetaValue::I16(3)]),
            ]),
        ),
        (
            "t.arr_bool",
            MetaValue::Array(vec![MetaValue::Bool(true), MetaValue::Bool(false)]),
        ),
        (
            "t.arr_f64",
            MetaValue::Array(vec![MetaValue::F64(0.25), MetaValue::F64(-1.0)]),
        ),
    ]
}

/// A small valid file: all metadata types and one tensor of each storable type.
fn sample_writer() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.add_meta("general.architecture", MetaValue::String("llama".into()));
    for (k, v) in every_value_type() {
        w.add_meta(k, v);
    }
    let vals: Vec<f32> = (0..64).map(|i| (i as f32 - 30.0) / 7.0).collect();
    w.add_tensor_f32("a.f32", &[3], GgmlType::F32, &vals[..3])
        .unwrap();
    w.add_tensor_f32("b.q8_0", &[32, 2], GgmlType::Q8_0, &vals)
        .unwrap();
    w.add_tensor_f32("c.f16", &[4, 2, 1, 2], GgmlType::F16, &vals[..16])
        .unwrap();
    w.add_tensor_f32("d.q4_1", &[64], GgmlType::Q4_1, &vals)
        .unwrap();
    w
}

fn sample_bytes() -> Vec<u8> {
    sample_writer().to_bytes().unwrap()
}

/// Byte position just after the name string of tensor info `name`.
fn after_tensor_name(bytes: &[u8], name: &str) -> usize {
    let mut needle = (name.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(name.as_bytes());
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("tensor name in file");
    at + needle.len()
}

/// (position of the type id, position of the offset) of the tensor info `name`.
fn type_and_offset_pos(bytes: &[u8], name: &str) -> (usize, usize) {
    let p = after_tensor_name(bytes, name);
    let n_dims = u32::from_le_bytes(bytes[p..p + 4].try_into().unwrap()) as usize;
    let ty = p + 4 + 8 * n_dims;
    (ty, ty + 4)
}

#[test]
fn writer_round_trip_every_value_type() {
    let g = parse(sample_bytes()).unwrap();
    assert_eq!(g.version(), 3);
    assert_eq!(g.path().to_str(), Some(NAME));
    let meta = g.metadata();
    assert_eq!(meta[0].0, "general.architecture");
    for ((k, v), (gk, gv)) in every_value_type().iter().zip(&meta[1..]) {
        assert_eq!(k, gk, "file order");
        assert_eq!(v, gv, "{k}");
        assert_eq!(g.get(k), Some(v));
        assert_eq!(gv.type_name(), v.type_name());
    }
    assert_eq!(g.get("t.u64").and_then(MetaValue::as_u64), Some(u64::MAX));
    assert_eq!(g.get("t.i8").and_then(MetaValue::as_i64), Some(-100));
    assert_eq!(g.get("missing"), None);
}

#[test]
fn writer_round_trip_tensors() {
    let w = sample_writer();
    let g = parse(w.to_bytes().unwrap()).unwrap();
    let names: Vec<&str> = g.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a.f32", "b.q8_0", "c.f16", "d.q4_1"]);
    let c = g.tensor("c.f16").unwrap();
    assert_eq!(
        (c.dims.clone(), c.ty, c.n_elements(), c.n_bytes),
        (vec![4, 2, 1, 2], GgmlType::F16, 16, 32)
    );
    for t in g.tensors() {
        assert_eq!(t.offset % 32, 0);
        assert_eq!((g.data_offset() + t.offset) % 32, 0);
        assert_eq!(g.tensor_data(t).unwrap().len() as u64, t.n_bytes);
    }
    let vals: Vec<f32> = (0..64).map(|i| (i as f32 - 30.0) / 7.0).collect();
    assert_eq!(g.tensor_f32("a.f32").unwrap(), &vals[..3]);
    let q8 = g.tensor_f32("b.q8_0").unwrap();
    let step = vals.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
    assert!(q8.iter().zip(&vals).all(|(a, b)| (a - b).abs() <= step));
    assert_eq!(
        g.tensor_data(g.tensor("d.q4_1").unwrap()).unwrap(),
        &freekv_model::quant::quantize(GgmlType::Q4_1, &vals).unwrap()[..]
    );
    assert!(matches!(g.tensor_f32("nope"), Err(ModelError::MissingTensor(n)) if n == "nope"));
}

#[test]
fn version_2_and_custom_alignment() {
    let mut w = sample_writer();
    w.set_version(2).set_alignment(256).unwrap();
    let g = parse(w.to_bytes().unwrap()).unwrap();
    assert_eq!(g.version(), 2);
    assert_eq!(g.alignment(), 256);
    assert_eq!(g.get("general.alignment"), Some(&MetaValue::U32(256)));
    assert_eq!(g.data_offset() % 256, 0);
    assert!(g.tensors().iter().all(|t| t.offset % 256 == 0));
    assert_eq!(g.tensor_f32("a.f32").unwrap().len(), 3);
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = sample_bytes();
    assert!(parse(bytes.clone()).is_ok());
    for len in 0..bytes.len() {
        let msg = gguf_err(parse(bytes[..len].to_vec()));
        assert!(
            msg.contains("truncated")
                || msg.contains("outside")
                || msg.contains("exceeds")
                || msg.contains("cannot fit")
                || msg.contains("remaining bytes"),
            "prefix {len}: {msg}"
        );
    }
}

#[test]
fn bad_magic_and_versions() {
    let mut b = sample_bytes();
    b[..4].copy_from_slice(b"GGML");
    assert!(gguf_err(parse(b)).contains("not a GGUF file"));
    for (v, needle) in [
        (1u32, "version 1"),
        (0, "version 0"),
        (4, "version 4"),
        (3u32.swap_bytes(), "big-endian"),
    ] {
        let mut b = sample_bytes();
        b[4..8].copy_from_slice(&v.to_le_bytes());
        let m = gguf_err(parse(b));
        assert!(m.contains(needle), "{v}: {m}");
    }
}

#[test]
fn absurd_counts_and_lengths() {
    let base = sample_bytes();
    // Tensor count, then metadata count.
    for (at, v) in [(8, u64::MAX), (8, 1 << 40), (16, u64::MAX), (16, 1 << 33)] {
        let mut b = base.clone();
        b[at..at + 8].copy_from_slice(&u64::to_le_bytes(v));
        let m = gguf_err(parse(b));
        assert!(m.contains("remaining bytes"), "{m}");
    }
    // The first key's length.
    let mut b = base.clone();
    b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(gguf_err(parse(b)).contains("string length"));
    // The element count of the 100-item u32 array.
    let mut b = base.clone();
    let key = b"t.arr_u32";
    let at = b.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4 + 4;
    assert_eq!(u64::from_le_bytes(b[at..at + 8].try_into().unwrap()), 100);
    b[at..at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let m = gguf_err(parse(b));
    assert!(m.contains("array of") && m.contains("t.arr_u32"), "{m}");
}

#[test]
fn deep_nesting_is_capped() {
    let mut v = MetaValue::U8(1);
    for _ in 0..20 {
        v = MetaValue::Array(vec![v]);
    }
    let mut w = GgufWriter::new();
    w.add_meta("deep", v);
    let m = gguf_err(parse(w.to_bytes().unwrap()));
    assert!(m.contains("nested") && m.contains("deep"), "{m}");
    // Eight levels are fine.
    let mut v = MetaValue::U8(1);
    for _ in 0..8 {
        v = MetaValue::Array(vec![v]);
    }
    let mut w = GgufWriter::new();
    w.add_meta("ok", v.clone());
    assert_eq!(parse(w.to_bytes().unwrap()).unwrap().get("ok"), Some(&v));
}

#[test]
fn misaligned_and_out_of_range_offsets() {
    let base = sample_bytes();
    let (_, off) = type_and_offset_pos(&base, "b.q8_0");
    let cases: [(u64, &str); 4] = [
        (1, "not a multiple"),
        (1 << 30, "outside"),
        (u64::MAX - 31, "outside"),
        (u64::MAX, "not a multiple"),
    ];
    for (v, needle) in cases {
        let mut b = base.clone();
        b[off..off + 8].copy_from_slice(&v.to_le_bytes());
        let m = gguf_err(parse(b));
        assert!(m.contains(needle) && m.contains("b.q8_0"), "{v}: {m}");
    }
}

#[test]
fn overlapping_tensors() {
    let base = sample_bytes();
    let g = parse(base.clone()).unwrap();
    // Point d.q4_1 at b.q8_0's data: both fit in the file but share bytes.
    let b_off = g.tensor("b.q8_0").unwrap().offset;
    let (_, off) = type_and_offset_pos(&base, "d.q4_1");
    let mut b = base.clone();
    b[off..off + 8].copy_from_slice(&b_off.to_le_bytes());
    let m = gguf_err(parse(b));
    assert!(
        m.contains("overlap") && m.contains("b.q8_0") && m.contains("d.q4_1"),
        "{m}"
    );
}

#[test]
fn unknown_type_ids() {
    let base = sample_bytes();
    let (ty, _) = type_and_offset_pos(&base, "d.q4_1");
    for id in [4u32, 5, 31, 99, u32::MAX] {
        let mut b = base.clone();
        b[ty..ty + 4].copy_from_slice(&id.to_le_bytes());
        let m = gguf_err(parse(b));
        assert!(
            m.contains("d.q4_1") && m.contains(&format!("type id {id}")),
            "{m}"
        );
    }
    // A known type whose size disagrees with the data that follows is caught by the bounds check.
    let mut b = base.clone();
    b[ty..ty + 4].copy_from_slice(&GgmlType::F32.id().to_le_bytes());
    assert!(gguf_err(parse(b)).contains("outside"));
    // A metadata value type that does not exist.
    let mut b = base.clone();
    let key = b"t.u8";
    let at = b.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    b[at..at + 4].copy_from_slice(&13u32.to_le_bytes());
    assert!(gguf_err(parse(b)).contains("unknown value type 13"));
    // An array element type that does not exist.
    let mut b = base.clone();
    let key = b"t.arr_u32";
    let at = b.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4;
    b[at..at + 4].copy_from_slice(&77u32.to_le_bytes());
    assert!(gguf_err(parse(b)).contains("unknown array element type 77"));
}

#[test]
fn bad_dims() {
    let base = sample_bytes();
    let p = after_tensor_name(&base, "a.f32");
    for n_dims in [0u32, 5, u32::MAX] {
        let mut b = base.clone();
        b[p..p + 4].copy_from_slice(&n_dims.to_le_bytes());
        let m = gguf_err(parse(b));
        assert!(m.contains("dimensions") && m.contains("a.f32"), "{m}");
    }
    // ne = [2^40, 2^40, 1, 2^40]: the element count overflows.
    let p = after_tensor_name(&base, "c.f16");
    let mut b = base.clone();
    for (i, d) in [1u64 << 40, 1 << 40, 1, 1 << 40].iter().enumerate() {
        b[p + 4 + 8 * i..p + 12 + 8 * i].copy_from_slice(&d.to_le_bytes());
    }
    assert!(gguf_err(parse(b)).contains("overflows"));
    // A Q8_0 row of 33 elements is not whole blocks.
    let p = after_tensor_name(&base, "b.q8_0");
    let mut b = base.clone();
    b[p + 4..p + 12].copy_from_slice(&33u64.to_le_bytes());
    assert!(gguf_err(parse(b)).contains("block size"));
}

#[test]
fn duplicates_are_errors() {
    let mut w = GgufWriter::new();
    w.add_meta("k.one", MetaValue::U8(1))
        .add_meta("k.two", MetaValue::U8(2));
    w.add_tensor_f32("x.aaa", &[1], GgmlType::F32, &[1.0])
        .unwrap();
    w.add_tensor_f32("x.bbb", &[1], GgmlType::F32, &[2.0])
        .unwrap();
    assert!(
        w.add_tensor_f32("x.aaa", &[1], GgmlType::F32, &[1.0])
            .is_err()
    );
    let base = w.to_bytes().unwrap();
    let rename = |from: &[u8], to: &[u8]| {
        let mut b = base.clone();
        let at = b.windows(from.len()).position(|w| w == from).unwrap();
        b[at..at + from.len()].copy_from_slice(to);
        b
    };
    assert!(gguf_err(parse(rename(b"k.two", b"k.one"))).contains("duplicate metadata key `k.one`"));
    assert!(gguf_err(parse(rename(b"x.bbb", b"x.aaa"))).contains("duplicate tensor name `x.aaa`"));
}

#[test]
fn bad_values() {
    let base = sample_bytes();
    // bool must be 0 or 1.
    let mut b = base.clone();
    let key = b"t.bool";
    let at = b.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4;
    b[at] = 2;
    assert!(gguf_err(parse(b)).contains("bool"));
    // Keys must be UTF-8.
    let mut b = base.clone();
    let at = b.windows(4).position(|w| w == b"t.u8").unwrap();
    b[at] = 0xFF;
    assert!(gguf_err(parse(b)).contains("UTF-8"));
    // general.alignment: power of two, integer.
    for v in [
        MetaValue::U32(24),
        MetaValue::U32(0),
        MetaValue::String("32".into()),
        MetaValue::U64(1 << 40),
    ] {
        let mut w = GgufWriter::new();
        w.add_meta("general.alignment", v.clone());
        let m = gguf_err(parse(w.to_bytes().unwrap()));
        assert!(m.contains("general.alignment"), "{v:?}: {m}");
    }
    // The writer refuses mixed arrays and bad alignments.
    let mut w = GgufWriter::new();
    w.add_meta(
        "mixed",
        MetaValue::Array(vec![MetaValue::U8(1), MetaValue::I8(1)]),
    );
    assert!(w.to_bytes().is_err());
    assert!(GgufWriter::new().set_alignment(48).is_err());
    assert!(
        GgufWriter::new()
            .add_tensor_bytes("t", &[32], GgmlType::Q8_0, vec![0; 33])
            .is_err()
    );
    assert!(
        GgufWriter::new()
            .add_tensor_bytes("t", &[1, 1, 1, 1, 1], GgmlType::F32, vec![0; 4])
            .is_err()
    );
}

#[test]
fn foreign_tensor_info_and_unsupported_types() {
    let g = parse(sample_bytes()).unwrap();
    let foreign = TensorInfo {
        name: "x".into(),
        dims: vec![8],
        ty: GgmlType::F32,
        offset: u64::MAX - 7,
        n_bytes: 32,
    };
    assert!(matches!(
        g.tensor_data(&foreign),
        Err(ModelError::Gguf { .. })
    ));
    let foreign = TensorInfo {
        offset: 1 << 20,
        ..foreign
    };
    assert!(matches!(
        g.tensor_data(&foreign),
        Err(ModelError::Gguf { .. })
    ));
    // A Q5_0 tensor parses (its size is known) but cannot be dequantized.
    let mut w = GgufWriter::new();
    w.add_tensor_bytes("q5", &[32], GgmlType::Q5_0, vec![0; 22])
        .unwrap();
    let g = parse(w.to_bytes().unwrap()).unwrap();
    assert_eq!(g.tensor_data(g.tensor("q5").unwrap()).unwrap().len(), 22);
    let e = g.tensor_f32("q5").unwrap_err().to_string();
    assert!(e.contains("q5") && e.contains("q5_0"), "{e}");
}

#[test]
fn open_from_disk() {
    let dir = std::env::temp_dir().join(format!("freekv-gguf-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sample.gguf");
    sample_writer().write_to(&path).unwrap();
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.path(), path.as_path());
    assert_eq!(g.tensors().len(), 4);
    assert_eq!(g.file_size(), std::fs::metadata(&path).unwrap().len());
    let empty = dir.join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    match GgufFile::open(&empty) {
        Err(ModelError::Gguf { path, msg }) => {
            assert!(path.ends_with("empty.gguf") && msg.contains("truncated"))
        }
        other => panic!("{other:?}"),
    }
    match GgufFile::open(dir.join("missing.gguf")) {
        Err(ModelError::Io { path, .. }) => assert!(path.ends_with("missing.gguf")),
        other => panic!("{other:?}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn summary_lists_metadata_and_tensors() {
    let g = parse(sample_bytes()).unwrap();
    let s = g.summary();
    assert!(s.contains("GGUF v3"), "{s}");
    assert!(s.contains("general.architecture = \"llama\""), "{s}");
    assert!(s.contains("t.arr_u32 = [100 items of u32]"), "{s}");
    assert!(s.contains("t.arr_bool = [true, false]"), "{s}");
    assert!(s.contains("tensors: 4"), "{s}");
    assert!(s.contains("q8_0"), "{s}");
    // Every metadata key gets a line.
    assert_eq!(
        s.lines().filter(|l| l.starts_with("  t.")).count(),
        every_value_type().len()
    );
}

#[test]
fn random_corruption_never_panics() {
    let base = sample_bytes();
    let mut rng = StdRng::seed_from_u64(11);
    let (mut ok, mut err) = (0, 0);
    for _ in 0..3000 {
        let mut b = base.clone();
        for _ in 0..rng.random_range(1..4) {
            let i = rng.random_range(0..b.len());
            b[i] = match rng.random_range(0..3) {
                0 => rng.random(),
                1 => b[i] ^ (1 << rng.random_range(0..8)),
                _ => 0xFF,
            };
        }
        match parse(b) {
            Ok(g) => {
                ok += 1;
                for t in g.tensors() {
                    let _ = g.tensor_f32(&t.name);
                }
                let _ = g.summary();
            }
            Err(ModelError::Gguf { .. }) => err += 1,
            Err(other) => panic!("unexpected error kind {other:?}"),
        }
    }
    // Both outcomes occur (corrupting tensor data or string bytes keeps the file valid).
    assert!(ok > 0 && err > 0, "ok {ok}, err {err}");
}
