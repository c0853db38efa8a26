//! Rotary inverse frequencies `fl32(1 / fl32(theta ^ fl32(fl32(2j) / dim)))`, bit-exact with torch.
//!
//! torch evaluates the power with its own vectorised `powf`, which is not correctly rounded: for the decoder
//! (theta 15.3e6, dim 128) glibc's `powf` differs from it in entry 4 by one ulp. For AF-Next's two tables the
//! exact torch values are built in (`tables/rope_inv_freq_tables.json`, from the model spec); any other
//! (theta, dim) is computed with `powf`, which matched torch on every table the fixtures exercise.

use std::sync::OnceLock;

const TABLES: &str = include_str!("../tables/rope_inv_freq_tables.json");

/// (theta, dim, values) of the built-in tables.
fn known() -> &'static [(f64, usize, Vec<f32>)] {
    static KNOWN: OnceLock<Vec<(f64, usize, Vec<f32>)>> = OnceLock::new();
    KNOWN.get_or_init(|| {
        let v: serde_json::Value =
            serde_json::from_str(TABLES).expect("built-in table is valid JSON; this is a bug");
        v.as_object()
            .into_iter()
            .flatten()
            .filter_map(|(_, t)| {
                let theta = t.get("theta")?.as_f64()?;
                let dim = t.get("dim")?.as_u64()? as usize;
                let bits = t.get("inv_freq_f32_bits_hex")?.as_array()?;
                let vals = bits
                    .iter()
                    .map(|b| {
                        b.as_str()
                            .and_then(|s| u32::from_str_radix(s, 16).ok())
                            .map(f32::from_bits)
                    })
                    .collect::<Option<Vec<f32>>>()?;
                Some((theta, dim, vals))
            })
            .collect()
    })
}

/// The `ceil(dim / 2)` inverse frequencies (`arange(0, dim, 2)`).
pub fn inv_freq(theta: f64, dim: usize) -> Vec<f32> {
    if let Some((_, _, v)) = known().iter().find(|(t, d, _)| *t == theta && *d == dim) {
        return v.clone();
    }
    let th = theta as f32;
    (0..dim.div_ceil(2))
        .map(|j| 1.0f32 / th.powf((2 * j) as f32 / dim as f32))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_afnext_tables_are_built_in() {
        assert_eq!(known().len(), 2);
        assert_eq!(inv_freq(1200.0, 256).len(), 128);
        assert_eq!(inv_freq(15_300_000.0, 128).len(), 64);
        // The one entry where glibc's powf and torch disagree.
        assert_eq!(inv_freq(15_300_000.0, 128)[4].to_bits(), 0x3eb6_10ac);
        assert_eq!(inv_freq(1200.0, 9).len(), 5);
    }
}
