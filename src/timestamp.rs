//! RFC 3339 timestamps as the API accepts them (`expires_at`), parsed strictly and without a
//! date-time library: `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`.
//!
//! Strict on purpose: PostgreSQL's own `timestamptz` input also takes `tomorrow`, `epoch`, or a
//! time without a zone (read in the session's time zone), none of which a client should rely
//! on. The offset is required, so the instant is never ambiguous.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Parses an RFC 3339 `date-time` (section 5.6): `T` or `t` (or a space, which the RFC allows
/// by agreement) between date and time, `Z`/`z` or a numeric offset, any number of fractional
/// digits (kept to the nanosecond), a leap second `:60` read as the next second, as PostgreSQL
/// does. Returns a description of the problem otherwise.
pub fn parse_rfc3339(text: &str) -> Result<SystemTime, String> {
    const EXPECTED: &str = "expected an RFC 3339 date-time such as 2026-11-25T14:30:00Z or \
                            2026-11-25T17:30:00.5+03:00";
    let b = text.as_bytes();
    let digits = |from: usize, n: usize| -> Result<u32, String> {
        let part = b.get(from..from + n).ok_or(EXPECTED)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return Err(EXPECTED.into());
        }
        Ok(part.iter().fold(0, |v, d| v * 10 + u32::from(d - b'0')))
    };
    let expect = |at: usize, allowed: &[u8]| -> Result<(), String> {
        match b.get(at) {
            Some(c) if allowed.contains(c) => Ok(()),
            _ => Err(EXPECTED.into()),
        }
    };
    let year = digits(0, 4)?;
    expect(4, b"-")?;
    let month = digits(5, 2)?;
    expect(7, b"-")?;
    let day = digits(8, 2)?;
    expect(10, b"Tt ")?;
    let hour = digits(11, 2)?;
    expect(13, b":")?;
    let minute = digits(14, 2)?;
    expect(16, b":")?;
    let second = digits(17, 2)?;
    let mut at = 19;
    let mut nanos: u64 = 0;
    if b.get(at) == Some(&b'.') {
        at += 1;
        let start = at;
        while b.get(at).is_some_and(u8::is_ascii_digit) {
            if at - start < 9 {
                nanos = nanos * 10 + u64::from(b[at] - b'0');
            }
            at += 1;
        }
        if at == start {
            return Err(EXPECTED.into());
        }
        for _ in (at - start)..9 {
            nanos *= 10;
        }
    }
    let offset_secs: i64 = match b.get(at) {
        Some(b'Z' | b'z') => {
            at += 1;
            0
        }
        Some(sign @ (b'+' | b'-')) => {
            let sign = if *sign == b'+' { 1 } else { -1 };
            let oh = digits(at + 1, 2)?;
            expect(at + 3, b":")?;
            let om = digits(at + 4, 2)?;
            if oh > 23 || om > 59 {
                return Err(format!("offset out of range; {EXPECTED}"));
            }
            at += 6;
            sign * i64::from(oh * 3600 + om * 60)
        }
        _ => {
            return Err(format!(
                "a time zone offset (Z or ±HH:MM) is required; {EXPECTED}"
            ))
        }
    };
    if at != b.len() {
        return Err(EXPECTED.into());
    }
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err(format!("no such date; {EXPECTED}"));
    }
    if hour > 23 || minute > 59 || second > 60 {
        return Err(format!("no such time of day; {EXPECTED}"));
    }
    let secs = days_from_civil(year, month, day) * 86_400
        + i64::from(hour * 3600 + minute * 60 + second)
        - offset_secs;
    let since_epoch = |secs: i64| Duration::new(secs.unsigned_abs(), 0);
    let whole = if secs >= 0 {
        UNIX_EPOCH + since_epoch(secs)
    } else {
        UNIX_EPOCH - since_epoch(secs)
    };
    Ok(whole + Duration::from_nanos(nanos))
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar (H. Hinnant's algorithm).
fn days_from_civil(year: u32, month: u32, day: u32) -> i64 {
    let y = i64::from(year) - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(text: &str) -> f64 {
        match parse_rfc3339(text).unwrap().duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        }
    }

    #[test]
    fn instants() {
        assert_eq!(secs("1970-01-01T00:00:00Z"), 0.0);
        assert_eq!(secs("2026-11-25T14:30:00Z"), 1_795_617_000.0);
        assert_eq!(secs("2026-11-25T17:30:00+03:00"), 1_795_617_000.0);
        assert_eq!(secs("2026-11-25t09:00:00-05:30"), 1_795_617_000.0);
        assert_eq!(secs("2026-11-25 14:30:00z"), 1_795_617_000.0);
        assert_eq!(secs("2026-11-25T14:30:00.25Z"), 1_795_617_000.25);
        assert_eq!(secs("2000-02-29T00:00:00Z"), 951_782_400.0);
        assert_eq!(secs("1969-12-31T23:59:59Z"), -1.0);
        assert_eq!(secs("0001-01-01T00:00:00Z"), -62_135_596_800.0);
        // A leap second is the next second, as PostgreSQL reads it.
        assert_eq!(secs("2016-12-31T23:59:60Z"), 1_483_228_800.0);
        let nanos = parse_rfc3339("2026-01-01T00:00:00.123456789123Z")
            .unwrap()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        assert_eq!(nanos, 123_456_789);
    }

    #[test]
    fn refused() {
        for bad in [
            "",
            "tomorrow",
            "2026-11-25",
            "2026-11-25T14:30:00",
            "2026-11-25T14:30Z",
            "2026-11-25T14:30:00.Z",
            "2026-11-25T14:30:00+0300",
            "2026-11-25T14:30:00+24:00",
            "2026-11-25T14:30:00 Z",
            "2026-11-25T14:30:00Z ",
            " 2026-11-25T14:30:00Z",
            "2026-13-01T00:00:00Z",
            "2026-00-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "1900-02-29T00:00:00Z",
            "2026-04-31T00:00:00Z",
            "2026-11-25T24:00:00Z",
            "2026-11-25T14:60:00Z",
            "2026-11-25T14:30:61Z",
            "+2026-11-25T14:30:00Z",
            "2026-11-25T14:30:00ZZ",
            "２026-11-25T14:30:00Z",
            "2026-11-25T14:30:00\u{0}Z",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
