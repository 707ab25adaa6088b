//! Parsing of human sizes (`512M`, `2G`, `1.5GiB`) and durations (`10m`, `1h30m`, `90`).
//!
//! Sizes use binary multiples (`M` = MiB), as `docker run --memory` does.

use kiln_protocol::api::{DurationArg, SizeArg};

/// Parses a size; the error says what was wrong in one line.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        format!("`{s}` is not a size: use a number with an optional unit, like 512M or 2G")
    })?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        u => return Err(format!("`{s}` has an unknown unit `{u}`: use K, M, G or T")),
    };
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(bytes as u64)
}

/// A [`SizeArg`] in bytes.
pub fn size_arg(a: &SizeArg) -> Result<u64, String> {
    match a {
        SizeArg::Bytes(b) => Ok(*b),
        SizeArg::Text(t) => parse_size(t),
    }
}

/// Parses a duration: plain seconds (`90`, `1.5`) or humantime (`10m`, `1h30m`).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    if let Ok(secs) = t.parse::<f64>() {
        return secs_duration(secs).ok_or_else(|| format!("`{s}` is not a valid duration"));
    }
    humantime::parse_duration(t)
        .map_err(|_| format!("`{s}` is not a duration: use seconds or a form like 90s, 10m, 1h30m"))
}

fn secs_duration(secs: f64) -> Option<std::time::Duration> {
    (secs.is_finite() && (0.0..1e12).contains(&secs))
        .then(|| std::time::Duration::from_secs_f64(secs))
}

/// A [`DurationArg`] as a duration.
pub fn duration_arg(a: &DurationArg) -> Result<std::time::Duration, String> {
    match a {
        DurationArg::Secs(s) => {
            secs_duration(*s).ok_or_else(|| format!("`{s}` is not a valid number of seconds"))
        }
        DurationArg::Text(t) => parse_duration(t),
    }
}

/// Formats bytes the way [`parse_size`] reads them back (`512M`, `2G`).
pub fn format_size(b: u64) -> String {
    for (unit, m) in [
        ("T", 1u64 << 40),
        ("G", 1 << 30),
        ("M", 1 << 20),
        ("K", 1 << 10),
    ] {
        if b >= m && b.is_multiple_of(m) {
            return format!("{}{unit}", b / m);
        }
    }
    if b >= 1 << 20 {
        return format!("{:.1}M", b as f64 / (1u64 << 20) as f64);
    }
    format!("{b}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::expect;

    #[test]
    fn sizes() {
        let cases = [
            "512M", "2G", "1.5GiB", "100k", "42", " 1 g", "12X", "abc", "-1M", "",
        ];
        let out: Vec<String> = cases
            .iter()
            .map(|c| format!("{c:?} -> {:?}", parse_size(c)))
            .collect();
        expect![[r#"
            "512M" -> Ok(536870912)
            "2G" -> Ok(2147483648)
            "1.5GiB" -> Ok(1610612736)
            "100k" -> Ok(102400)
            "42" -> Ok(42)
            " 1 g" -> Ok(1073741824)
            "12X" -> Err("`12X` has an unknown unit `x`: use K, M, G or T")
            "abc" -> Err("`abc` is not a size: use a number with an optional unit, like 512M or 2G")
            "-1M" -> Err("`-1M` is not a size: use a number with an optional unit, like 512M or 2G")
            "" -> Err("`` is not a size: use a number with an optional unit, like 512M or 2G")"#]]
        .assert_eq(&out.join("\n"));
        assert_eq!(format_size(512 << 20), "512M");
        assert_eq!(format_size(2 << 30), "2G");
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("10m"),
            Ok(std::time::Duration::from_secs(600))
        );
        assert_eq!(parse_duration("90"), Ok(std::time::Duration::from_secs(90)));
        assert_eq!(
            parse_duration("1h30m"),
            Ok(std::time::Duration::from_secs(5400))
        );
        assert!(parse_duration("soon").is_err());
        assert!(duration_arg(&DurationArg::Secs(-1.0)).is_err());
    }
}
