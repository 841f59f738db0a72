//! GGUF dequantization of every supported type against gguf-py's reference dequantizer.

mod common;

use kiln::loader::ggml_type::GgmlType;

fn type_by_name(name: &str) -> GgmlType {
    match name {
        "F32" => GgmlType::F32,
        "F16" => GgmlType::F16,
        "BF16" => GgmlType::BF16,
        "Q8_0" => GgmlType::Q8_0,
        "Q4_0" => GgmlType::Q4_0,
        "Q4_1" => GgmlType::Q4_1,
        "Q5_0" => GgmlType::Q5_0,
        "Q4_K" => GgmlType::Q4K,
        "Q6_K" => GgmlType::Q6K,
        other => panic!("fixture names unknown type {other}"),
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn every_type_matches_gguf_py() {
    let fixture = common::read_json("dequant.json");
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 9);
    for case in cases {
        let name = case["type"].as_str().unwrap();
        let ty = type_by_name(name);
        let raw = hex(case["bytes"].as_str().unwrap());
        let expected: Vec<f32> = case["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(ty.byte_len(expected.len()), Some(raw.len()), "{name}: size");
        let mut out = vec![f32::NAN; expected.len()];
        ty.dequantize(&raw, &mut out);
        for (i, (a, e)) in out.iter().zip(&expected).enumerate() {
            let tol = 1e-6 * e.abs().max(1.0);
            assert!((a - e).abs() <= tol, "{name}[{i}]: kiln {a}, gguf-py {e}");
        }
    }
}

#[test]
fn unsupported_type_ids_are_named() {
    assert_eq!(GgmlType::from_id(13), Err("Q5_K".to_string()));
    assert_eq!(GgmlType::from_id(99), Err("type id 99".to_string()));
}
