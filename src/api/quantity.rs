//! Byte quantities written the Kubernetes way ("512Mi", "2Gi", "10G").
//!
//! The CRD schema only admits integers with an optional binary or decimal suffix (no
//! fractions, no exponents), so every value the API server accepts parses here exactly.

use std::fmt;

/// The pattern the CRD schema enforces on every byte quantity.
pub const PATTERN: &str = r"^(0|[1-9][0-9]{0,15})(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid quantity {0:?}: expected an integer with an optional suffix Ki, Mi, Gi, Ti, Pi, k, M, G, T or P"
)]
pub struct ParseError(pub String);

/// Parses a quantity into bytes; `None` on overflow or a malformed value.
pub fn parse_bytes(s: &str) -> Result<u64, ParseError> {
    let err = || ParseError(s.to_string());
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(split);
    if digits.is_empty() || (digits.len() > 1 && digits.starts_with('0')) {
        return Err(err());
    }
    let n: u64 = digits.parse().map_err(|_| err())?;
    let mult: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        _ => return Err(err()),
    };
    n.checked_mul(mult).ok_or_else(err)
}

/// Bytes written with the largest binary suffix that divides them exactly.
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u32); 5] =
            [("Pi", 50), ("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)];
        for (suffix, shift) in UNITS {
            let unit = 1u64 << shift;
            if self.0 >= unit && self.0.is_multiple_of(unit) {
                return write!(f, "{}{}", self.0 / unit, suffix);
            }
        }
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!(parse_bytes("0"), Ok(0));
        assert_eq!(parse_bytes("512Mi"), Ok(512 << 20));
        assert_eq!(parse_bytes("2Gi"), Ok(2 << 30));
        assert_eq!(parse_bytes("10G"), Ok(10_000_000_000));
        assert_eq!(parse_bytes("1k"), Ok(1000));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "Gi",
            "-1Gi",
            "1.5Gi",
            "01Gi",
            "1gi",
            "1e3",
            "99999999999999999999",
            "16384Pi",
        ] {
            assert!(parse_bytes(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn formats_exact_units() {
        assert_eq!(Bytes(2 << 30).to_string(), "2Gi");
        assert_eq!(Bytes(1536 << 20).to_string(), "1536Mi");
        assert_eq!(Bytes(1000).to_string(), "1000");
    }

    #[test]
    fn schema_pattern_admits_only_parseable_values() {
        let re = regex_lite::Regex::new(PATTERN).unwrap();
        for s in ["0", "1", "512Mi", "9999999999999999", "1P"] {
            assert!(re.is_match(s));
            assert!(parse_bytes(s).is_ok(), "{s}");
        }
    }
}
