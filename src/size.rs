//! Human sizes: `10GiB`, `512M`, `4096`.

/// Parse a size. Binary (`KiB`, `MiB`, `GiB`, `TiB`, the short `K`, `M`,
/// `G`, `T`, and Kubernetes' `Ki`, `Mi`, `Gi`, `Ti`) and decimal (`KB`,
/// `MB`, `GB`, `TB`) suffixes; bytes otherwise.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("invalid size {s:?}: expected a number with an optional unit like 10GiB"));
    }
    let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}: number too large"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kib" => 1 << 10,
        "m" | "mi" | "mib" => 1 << 20,
        "g" | "gi" | "gib" => 1 << 30,
        "t" | "ti" | "tib" => 1 << 40,
        "p" | "pi" | "pib" => 1 << 50,
        "e" | "ei" | "eib" => 1 << 60,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "pb" => 1_000_000_000_000_000,
        "eb" => 1_000_000_000_000_000_000,
        other => {
            return Err(format!(
                "invalid size {s:?}: unknown unit {other:?} (use KiB, MiB, GiB, TiB, PiB, EiB, or KB, MB, GB, TB, PB, EB)"
            ));
        }
    };
    n.checked_mul(mult).ok_or_else(|| format!("invalid size {s:?}: too large"))
}

/// Round a volume size up to whole blocks; says so on stderr when it
/// changed anything (`1GB` is 1,000,000,000 bytes, not a block multiple).
pub fn round_to_blocks(size: u64, block: u64) -> u64 {
    let rounded = size.div_ceil(block).saturating_mul(block);
    if rounded != size {
        eprintln!("note: size {size} rounded up to {rounded} bytes ({}), a multiple of {block}", format_size(rounded));
    }
    rounded
}

/// `1073741824` → `1 GiB`.
pub fn format_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 || v.fract() == 0.0 { format!("{v:.0} {}", UNITS[u]) } else { format!("{v:.2} {}", UNITS[u]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("256Mi"), Ok(256 << 20), "Kubernetes quantities");
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("1XB").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("20000000T").is_err());
        assert_eq!(format_size(1 << 30), "1 GiB");
        assert_eq!(parse_size("1EiB"), Ok(1 << 60));
        assert_eq!(parse_size("2PB"), Ok(2_000_000_000_000_000));
        assert!(parse_size("1ZiB").is_err_and(|e| e.contains("EiB")));
    }
}
