//! GGML tensor types: block sizes and the dequantization of each to f32.
//! Layouts follow GGUF's specification (ggml-common.h); every type is tested against gguf-py.

use half::{bf16, f16};

/// The tensor types kiln reads from GGUF files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q8_0,
    Q4K,
    Q6K,
}

impl GgmlType {
    /// Maps GGUF's numeric type id; `Err` carries a printable name for unsupported ids.
    pub fn from_id(id: u32) -> Result<Self, String> {
        Ok(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            14 => Self::Q6K,
            30 => Self::BF16,
            other => {
                let known = [
                    (7, "Q5_1"),
                    (9, "Q8_1"),
                    (10, "Q2_K"),
                    (11, "Q3_K"),
                    (13, "Q5_K"),
                    (15, "Q8_K"),
                    (16, "IQ2_XXS"),
                    (17, "IQ2_XS"),
                    (18, "IQ3_XXS"),
                    (19, "IQ1_S"),
                    (20, "IQ4_NL"),
                    (21, "IQ3_S"),
                    (22, "IQ2_S"),
                    (23, "IQ4_XS"),
                    (29, "IQ1_M"),
                ];
                return Err(known
                    .iter()
                    .find(|(k, _)| *k == other)
                    .map_or_else(|| format!("type id {other}"), |(_, n)| n.to_string()));
            }
        })
    }

    /// (elements per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q8_0 => (32, 34),
            Self::Q4K => (256, 144),
            Self::Q6K => (256, 210),
        }
    }

    /// Bytes that `n` elements occupy; `None` when `n` is not a whole number of blocks.
    pub fn byte_len(self, n: usize) -> Option<usize> {
        let (elems, bytes) = self.block();
        n.is_multiple_of(elems).then(|| n / elems * bytes)
    }

    /// Dequantizes whole blocks of `raw` into `out` (which holds exactly their elements).
    pub fn dequantize(self, raw: &[u8], out: &mut [f32]) {
        let (elems, bytes) = self.block();
        debug_assert_eq!(raw.len() / bytes * elems, out.len());
        let blocks = raw.chunks_exact(bytes).zip(out.chunks_exact_mut(elems));
        match self {
            Self::F32 => {
                blocks.for_each(|(b, o)| o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            Self::F16 => blocks.for_each(|(b, o)| o[0] = f16::from_le_bytes([b[0], b[1]]).to_f32()),
            Self::BF16 => {
                blocks.for_each(|(b, o)| o[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32())
            }
            Self::Q4_0 => blocks.for_each(|(b, o)| q4_0(b, o)),
            Self::Q4_1 => blocks.for_each(|(b, o)| q4_1(b, o)),
            Self::Q5_0 => blocks.for_each(|(b, o)| q5_0(b, o)),
            Self::Q8_0 => blocks.for_each(|(b, o)| q8_0(b, o)),
            Self::Q4K => blocks.for_each(|(b, o)| q4_k(b, o)),
            Self::Q6K => blocks.for_each(|(b, o)| q6_k(b, o)),
        }
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// d, then 16 bytes of nibbles: low nibbles are elements 0..16, high nibbles 16..32.
fn q4_0(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        o[j] = ((q & 0xF) as f32 - 8.0) * d;
        o[j + 16] = ((q >> 4) as f32 - 8.0) * d;
    }
}

/// d, m, then nibbles as in Q4_0: x = q·d + m.
fn q4_1(b: &[u8], o: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (j, &q) in b[4..20].iter().enumerate() {
        o[j] = (q & 0xF) as f32 * d + m;
        o[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// d, 32 high bits, then nibbles: the fifth bit of element j is bit j of the high word.
fn q5_0(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for (j, &q) in b[6..22].iter().enumerate() {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        o[j] = (((q & 0xF) as u32 | h0) as f32 - 16.0) * d;
        o[j + 16] = (((q >> 4) as u32 | h1) as f32 - 16.0) * d;
    }
}

/// d, then 32 signed bytes.
fn q8_0(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..34].iter().enumerate() {
        o[j] = q as i8 as f32 * d;
    }
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K block, packed into 12 bytes.
fn scale_min_k4(j: usize, s: &[u8]) -> (f32, f32) {
    if j < 4 {
        ((s[j] & 63) as f32, (s[j + 4] & 63) as f32)
    } else {
        let sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        let m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        (sc as f32, m as f32)
    }
}

/// d, dmin, 12 bytes of packed scales/mins, 128 bytes of nibbles; 8 sub-blocks of 32.
fn q4_k(b: &[u8], o: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for chunk in 0..4 {
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let out = &mut o[chunk * 64..chunk * 64 + 64];
        for l in 0..32 {
            out[l] = d * sc1 * (q[l] & 0xF) as f32 - dmin * m1;
            out[l + 32] = d * sc2 * (q[l] >> 4) as f32 - dmin * m2;
        }
    }
}

/// 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 signed scales, then d.
fn q6_k(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[half * 64..half * 64 + 64];
        let qh = &b[128 + half * 32..128 + half * 32 + 32];
        let sc = &b[192 + half * 8..192 + half * 8 + 8];
        let out = &mut o[half * 128..half * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            out[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            out[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            out[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            out[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}
