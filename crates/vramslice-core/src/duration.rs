//! Durations as configuration writes them: `500ms`, `2s`, `1m30s`, `1h`.

use std::time::Duration;

/// A duration string that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a duration: expected a number with a unit, such as 500ms, 2s, 1m30s or 1h")]
pub struct DurationError(pub String);

/// Parse `500ms`, `2s`, `1.5s`, `1m30s`, `1h`; a sequence of number+unit pairs, units `ms`, `s`,
/// `m`, `h`.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let err = || DurationError(text.to_string());
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(err());
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        let (num, tail) = rest.split_at(num_end);
        let value: f64 = num.parse().map_err(|_| err())?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let seconds = match unit {
            "ms" => value / 1000.0,
            "s" => value,
            "m" => value * 60.0,
            "h" => value * 3600.0,
            _ => return Err(err()),
        };
        let part = Duration::try_from_secs_f64(seconds).map_err(|_| err())?;
        total = total.checked_add(part).ok_or_else(err)?;
        rest = tail;
    }
    Ok(total)
}

/// Render a duration the way [`parse_duration`] reads it (`1500ms` → `1.5s`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        if ms < 1000 {
            format!("{ms}ms")
        } else {
            format!("{}s", d.as_secs_f64())
        }
    } else {
        format!("{}s", d.as_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_config_durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        let overflowing = "10000000000000000000s10000000000000000000s";
        for bad in ["", "5", "s", "5x", "-1s", "1..2s", overflowing] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_duration(Duration::from_millis(200)), "200ms");
        assert_eq!(format_duration(Duration::from_secs(30)), "30s");
    }
}
