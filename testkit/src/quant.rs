//! Half-precision conversion and the two reference quantisers (ggml's
//! `quantize_row_q8_0_ref` / `quantize_row_q4_0_ref`), for building test weights.

/// Converts `f32` to IEEE-754 binary16 bits, rounding to nearest, ties to even
/// (the behaviour of ggml's `GGML_FP32_TO_FP16`). Overflow gives ±inf; NaN stays NaN.
pub fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let mant = bits & 0x007f_ffff;
    if exp == 0xff {
        let nan = if mant != 0 {
            0x0200 | (mant >> 13) as u16
        } else {
            0
        };
        return sign | 0x7c00 | nan;
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = mant | 0x0080_0000;
        let shift = (14 - e) as u32;
        let mut r = m >> shift;
        let rem = m & ((1u32 << shift) - 1);
        let halfway = 1u32 << (shift - 1);
        if rem > halfway || (rem == halfway && (r & 1) == 1) {
            r += 1;
        }
        return sign | r as u16;
    }
    let mut h = ((e as u32) << 10) | (mant >> 13);
    let rem = mant & 0x1fff;
    if rem > 0x1000 || (rem == 0x1000 && (h & 1) == 1) {
        h += 1;
    }
    sign | h as u16
}

/// Converts IEEE-754 binary16 bits to `f32` (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let mant = u32::from(h & 0x03ff);
    let bits = match (exp, mant) {
        (0, 0) => sign,
        (0, m) => {
            // subnormal: value = m * 2^-24
            let v = m as f32 * f32::from_bits(0x3380_0000); // 2^-24
            return if sign != 0 { -v } else { v };
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// Encodes values as little-endian f16.
pub fn to_f16_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter()
        .flat_map(|&x| f32_to_f16(x).to_le_bytes())
        .collect()
}

/// Encodes values as little-endian f32.
pub fn to_f32_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|&x| x.to_le_bytes()).collect()
}

/// Quantises to Q8_0 (blocks of 32: f16 scale + 32 × i8). `xs.len()` must be a multiple
/// of 32; a trailing partial block is ignored.
pub fn quantize_q8_0(xs: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(xs.len() / 32 * 34);
    for block in xs.chunks_exact(32) {
        let amax = block.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f32_to_f16(d).to_le_bytes());
        for &v in block {
            let q = (v * id).round() as i8;
            out.push(q as u8);
        }
    }
    out
}

/// Quantises to Q4_0 (blocks of 32: f16 scale + 16 bytes of packed nibbles; element `j`
/// in the low nibble of byte `j`, element `j + 16` in the high nibble).
pub fn quantize_q4_0(xs: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(xs.len() / 32 * 18);
    for block in xs.chunks_exact(32) {
        let mut amax = 0.0f32;
        let mut max = 0.0f32;
        for &v in block {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f32_to_f16(d).to_le_bytes());
        for j in 0..16 {
            let x0 = block[j] * id;
            let x1 = block[j + 16] * id;
            let q0 = ((x0 + 8.5) as i8).min(15) as u8;
            let q1 = ((x1 + 8.5) as i8).min(15) as u8;
            out.push(q0 | (q1 << 4));
        }
    }
    out
}

/// Inverse of [`quantize_q8_0`].
pub fn dequantize_q8_0(bytes: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(bytes.len() / 34 * 32);
    for b in bytes.chunks_exact(34) {
        let d = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
        out.extend(b[2..].iter().map(|&q| f32::from(q as i8) * d));
    }
    out
}

/// Inverse of [`quantize_q4_0`].
pub fn dequantize_q4_0(bytes: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(bytes.len() / 18 * 32);
    for b in bytes.chunks_exact(18) {
        let d = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
        let qs = &b[2..];
        let lo = qs.iter().map(|&q| (f32::from(q & 0x0f) - 8.0) * d);
        let hi = qs.iter().map(|&q| (f32::from(q >> 4) - 8.0) * d);
        out.extend(lo.collect::<Vec<_>>());
        out.extend(hi.collect::<Vec<_>>());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_known_values() {
        assert_eq!(f32_to_f16(0.0), 0x0000);
        assert_eq!(f32_to_f16(-0.0), 0x8000);
        assert_eq!(f32_to_f16(1.0), 0x3c00);
        assert_eq!(f32_to_f16(-2.0), 0xc000);
        assert_eq!(f32_to_f16(0.5), 0x3800);
        assert_eq!(f32_to_f16(65504.0), 0x7bff);
        assert_eq!(f32_to_f16(65520.0), 0x7c00); // rounds to inf
        assert_eq!(f32_to_f16(1e9), 0x7c00);
        assert_eq!(f32_to_f16(f32::INFINITY), 0x7c00);
        assert!(f16_to_f32(f32_to_f16(f32::NAN)).is_nan());
        assert_eq!(f32_to_f16(6.103_515_6e-5), 0x0400); // smallest normal
        assert_eq!(f32_to_f16(5.960_464_5e-8), 0x0001); // smallest subnormal
        assert_eq!(f32_to_f16(2.0e-8), 0x0000);
        assert_eq!(f32_to_f16(0.1), 0x2e66);
        assert_eq!(f32_to_f16(1.0 + 1.0 / 2048.0), 0x3c00); // tie -> even
        assert_eq!(f32_to_f16(1.0 + 3.0 / 2048.0), 0x3c02); // tie -> even (up)
    }

    #[test]
    fn f16_roundtrip_all() {
        for h in 0..=u16::MAX {
            let f = f16_to_f32(h);
            if f.is_nan() {
                continue;
            }
            assert_eq!(f32_to_f16(f), h, "h={h:#06x} f={f}");
        }
    }

    #[test]
    fn quantizers_roundtrip_approximately() {
        let xs: Vec<f32> = (0..64).map(|i| ((i as f32) * 0.37).sin() * 2.0).collect();
        let q8 = quantize_q8_0(&xs);
        assert_eq!(q8.len(), 68);
        for (a, b) in xs.iter().zip(dequantize_q8_0(&q8)) {
            assert!((a - b).abs() < 0.02, "{a} {b}");
        }
        let q4 = quantize_q4_0(&xs);
        assert_eq!(q4.len(), 36);
        for (a, b) in xs.iter().zip(dequantize_q4_0(&q4)) {
            assert!((a - b).abs() < 0.3, "{a} {b}");
        }
        // all-zero block
        assert!(dequantize_q4_0(&quantize_q4_0(&[0.0; 32]))
            .iter()
            .all(|&v| v == 0.0));
    }
}
