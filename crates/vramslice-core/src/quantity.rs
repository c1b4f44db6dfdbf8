//! Byte quantities as Kubernetes writes them (`6Gi`, `512Mi`, `1.5Gi`, `8G`, `1e9`, `1073741824`)
//! and as people read them (`6 GiB`, `1.5 GiB`).

/// A quantity string that does not denote a whole, non-negative number of bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    /// Nothing to parse.
    #[error("empty quantity: expected a byte amount such as 6Gi or 512Mi")]
    Empty,
    /// The text is not a Kubernetes quantity.
    #[error(
        "{0:?} is not a quantity: expected a number with an optional suffix (Ki, Mi, Gi, Ti, Pi, Ei, k, M, G, T, P, E)"
    )]
    Malformed(String),
    /// Negative amounts of memory do not exist.
    #[error("{0:?} is negative: a byte amount must be zero or more")]
    Negative(String),
    /// The amount does not fit in 64 bits of bytes.
    #[error("{0:?} is too large: more than 16 EiB")]
    TooLarge(String),
    /// Millis of a byte are not a byte amount.
    #[error("{0:?} uses the milli suffix 'm', which is not a byte amount")]
    Milli(String),
    /// A count (an extended resource's units) with a fractional part.
    #[error("{0:?} is not a whole number")]
    Fraction(String),
}

const BINARY_SUFFIXES: [(&str, u32); 6] = [
    ("Ki", 10),
    ("Mi", 20),
    ("Gi", 30),
    ("Ti", 40),
    ("Pi", 50),
    ("Ei", 60),
];
const DECIMAL_SUFFIXES: [(&str, u32); 6] = [
    ("k", 3),
    ("M", 6),
    ("G", 9),
    ("T", 12),
    ("P", 15),
    ("E", 18),
];

/// Parse a Kubernetes quantity into bytes. Fractions of a byte round up, as Kubernetes'
/// `Quantity.Value()` does.
pub fn parse_bytes(text: &str) -> Result<u64, QuantityError> {
    parse_quantity(text, false).map(|q| q.rounded_up)
}

/// Parse a Kubernetes quantity that counts whole things (an extended resource's units, as the
/// API server requires them): `6`, `2k`, `2000m`; a fractional value (`1.5`, `500m`) is
/// [`QuantityError::Fraction`] rather than rounded.
pub fn parse_whole(text: &str) -> Result<u64, QuantityError> {
    let q = parse_quantity(text, true)?;
    if q.exact {
        Ok(q.rounded_up)
    } else {
        Err(QuantityError::Fraction(text.to_string()))
    }
}

/// A quantity's value, rounded up to a whole number, and whether it was one already.
struct Parsed {
    rounded_up: u64,
    exact: bool,
}

fn parse_quantity(text: &str, milli: bool) -> Result<Parsed, QuantityError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(QuantityError::Empty);
    }
    let malformed = || QuantityError::Malformed(text.to_string());
    let (s, negative) = match s.as_bytes()[0] {
        b'+' => (&s[1..], false),
        b'-' => (&s[1..], true),
        _ => (s, false),
    };
    let number_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(number_end);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return Err(malformed());
    }
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    let digits: String = format!("{int_part}{frac_part}");
    let mantissa: u128 = if digits.is_empty() {
        0
    } else {
        digits
            .parse()
            .map_err(|_| QuantityError::TooLarge(text.to_string()))?
    };
    if negative && mantissa != 0 {
        return Err(QuantityError::Negative(text.to_string()));
    }
    // value = mantissa * 2^bin_shift * 10^dec_exp / 10^frac_len
    let (bin_shift, dec_exp): (u32, i64) = if suffix.is_empty() {
        (0, 0)
    } else if suffix == "m" {
        if !milli {
            return Err(QuantityError::Milli(text.to_string()));
        }
        (0, -3)
    } else if let Some((_, shift)) = BINARY_SUFFIXES.iter().find(|(n, _)| *n == suffix) {
        (*shift, 0)
    } else if let Some((_, exp)) = DECIMAL_SUFFIXES.iter().find(|(n, _)| *n == suffix) {
        (0, i64::from(*exp))
    } else if let Some(exp) = suffix
        .strip_prefix('e')
        .or_else(|| suffix.strip_prefix('E'))
    {
        let exp: i64 = exp.parse().map_err(|_| malformed())?;
        (0, exp)
    } else {
        return Err(malformed());
    };
    let frac_len = i64::try_from(frac_part.len()).map_err(|_| malformed())?;
    let exponent = dec_exp.checked_sub(frac_len).ok_or_else(malformed)?;
    let too_large = || QuantityError::TooLarge(text.to_string());
    let mut value = mantissa.checked_shl(bin_shift).ok_or_else(too_large)?;
    let mut exact = true;
    if bin_shift > 0 && value >> bin_shift != mantissa {
        return Err(too_large());
    }
    if exponent >= 0 {
        let scale = 10u128
            .checked_pow(u32::try_from(exponent).map_err(|_| too_large())?)
            .ok_or_else(too_large)?;
        value = value.checked_mul(scale).ok_or_else(too_large)?;
    } else {
        let scale = u32::try_from(exponent.unsigned_abs())
            .ok()
            .and_then(|e| 10u128.checked_pow(e));
        (value, exact) = match scale {
            Some(scale) => (value.div_ceil(scale), value.is_multiple_of(scale)),
            // Dividing by more than 10^38 leaves at most one byte.
            None => (u128::from(value != 0), value == 0),
        };
    }
    let rounded_up = u64::try_from(value).map_err(|_| too_large())?;
    Ok(Parsed { rounded_up, exact })
}

/// Render bytes for people: `6 GiB`, `1.5 GiB`, `512 MiB`, `0 B`. Exact multiples print with no
/// decimals; others with one.
pub fn format_bytes(bytes: u64) -> String {
    ByteSize(bytes).to_string()
}

/// Bytes for people, written straight into a formatter (no intermediate `String`), the one
/// place the binary units are chosen. `{}` prints like [`format_bytes`]; a precision prints every
/// amount of a KiB or more with that many decimals (`format!("{:.1}", ByteSize(6 << 30))` is
/// `6.0 GiB`), for messages whose wording is fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const NAMES: [(&str, u32); 6] = [
            ("EiB", 60),
            ("PiB", 50),
            ("TiB", 40),
            ("GiB", 30),
            ("MiB", 20),
            ("KiB", 10),
        ];
        let bytes = self.0;
        for (name, shift) in NAMES {
            let scale = 1u64 << shift;
            if bytes >= scale {
                let value = bytes as f64 / scale as f64;
                return match f.precision() {
                    Some(p) => write!(f, "{value:.p$} {name}"),
                    None if bytes.is_multiple_of(scale) => write!(f, "{} {name}", bytes >> shift),
                    None => write!(f, "{value:.1} {name}"),
                };
            }
        }
        write!(f, "{bytes} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_kubernetes_writes() {
        let cases: [(&str, u64); 13] = [
            ("0", 0),
            ("1073741824", 1 << 30),
            ("6Gi", 6 << 30),
            ("512Mi", 512 << 20),
            ("1.5Gi", 3 << 29),
            ("8G", 8_000_000_000),
            ("1e9", 1_000_000_000),
            ("1E3", 1000),
            ("100k", 100_000),
            (" 2Ki ", 2048),
            ("+4Mi", 4 << 20),
            ("0.5", 1),
            ("-0", 0),
        ];
        for (text, bytes) in cases {
            assert_eq!(parse_bytes(text), Ok(bytes), "{text}");
        }
    }

    #[test]
    fn rejects_with_a_reason() {
        assert_eq!(parse_bytes(""), Err(QuantityError::Empty));
        assert!(matches!(
            parse_bytes("6GB"),
            Err(QuantityError::Malformed(_))
        ));
        assert!(matches!(
            parse_bytes("Gi"),
            Err(QuantityError::Malformed(_))
        ));
        assert!(matches!(
            parse_bytes("1.2.3"),
            Err(QuantityError::Malformed(_))
        ));
        assert!(matches!(
            parse_bytes("-1Gi"),
            Err(QuantityError::Negative(_))
        ));
        assert!(matches!(parse_bytes("500m"), Err(QuantityError::Milli(_))));
        assert!(matches!(
            parse_bytes("17Ei"),
            Err(QuantityError::TooLarge(_))
        ));
        assert!(matches!(
            parse_bytes("1e40"),
            Err(QuantityError::TooLarge(_))
        ));
        let msg = parse_bytes("six gigs").unwrap_err().to_string();
        assert!(msg.contains("six gigs"), "{msg}");
    }

    #[test]
    fn extreme_exponents_are_answered_not_overflowed() {
        // The smallest exponent minus a fraction's length, and its negation.
        assert!(matches!(
            parse_bytes("1.5e-9223372036854775808"),
            Err(QuantityError::Malformed(_))
        ));
        assert_eq!(parse_bytes("1e-9223372036854775808"), Ok(1));
        assert_eq!(parse_bytes("0e-9223372036854775808"), Ok(0));
        assert!(matches!(
            parse_bytes("1e9223372036854775807"),
            Err(QuantityError::TooLarge(_))
        ));
        assert!(matches!(
            parse_bytes("1e99999999999999999999"),
            Err(QuantityError::Malformed(_))
        ));
    }

    #[test]
    fn whole_counts_refuse_fractions_instead_of_rounding() {
        for (text, want) in [
            ("6", 6),
            ("+6", 6),
            ("2k", 2000),
            ("2000m", 2),
            ("1.0", 1),
            ("0.5k", 500),
            ("1e3", 1000),
            ("0", 0),
            ("0.000m", 0),
        ] {
            assert_eq!(parse_whole(text), Ok(want), "{text}");
        }
        for text in ["1.5", "500m", "5e-99999999999", "0.001", "1Ki5"] {
            let err = parse_whole(text).expect_err(text);
            assert!(
                matches!(
                    err,
                    QuantityError::Fraction(_) | QuantityError::Malformed(_)
                ),
                "{text}: {err}"
            );
        }
        assert_eq!(
            parse_whole("1.5").unwrap_err().to_string(),
            "\"1.5\" is not a whole number"
        );
        assert!(matches!(
            parse_whole("999999999999999Ei"),
            Err(QuantityError::TooLarge(_))
        ));
        assert!(matches!(parse_whole("-1"), Err(QuantityError::Negative(_))));
    }

    proptest::proptest! {
        #[test]
        fn any_text_is_answered(text in "[-+]?[0-9.]{0,24}([eE][-+]?[0-9]{0,22})?(Ki|Mi|Gi|k|M|G|m)?") {
            let _ = parse_bytes(&text);
            let _ = parse_whole(&text);
        }

        /// A whole count is what parse_bytes reads; anything else is refused, never rounded.
        #[test]
        fn whole_counts_agree_with_bytes_when_exact(n in 0u64..1_000_000, frac in 0u32..1000) {
            let text = format!("{n}.{frac:03}");
            match parse_whole(&text) {
                Ok(v) => {
                    proptest::prop_assert_eq!(frac, 0);
                    proptest::prop_assert_eq!(v, n);
                }
                Err(e) => {
                    proptest::prop_assert!(frac != 0, "{}: {}", text, e);
                    proptest::prop_assert_eq!(parse_bytes(&text), Ok(n + 1));
                }
            }
        }
    }

    #[test]
    fn formats_for_people() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(6 << 30), "6 GiB");
        assert_eq!(format_bytes(3 << 29), "1.5 GiB");
        assert_eq!(format_bytes(512 << 20), "512 MiB");
        assert_eq!(format_bytes(80 << 30), "80 GiB");
        assert_eq!(format!("{:.1}", ByteSize(6 << 30)), "6.0 GiB");
        assert_eq!(format!("{:.1}", ByteSize(512 << 20)), "512.0 MiB");
        assert_eq!(format!("{:.2}", ByteSize(3 << 29)), "1.50 GiB");
        assert_eq!(format!("{:.1}", ByteSize(12)), "12 B");
    }
}
