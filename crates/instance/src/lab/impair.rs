//! A link's impairment — delay, jitter, loss, rate — as a lab file or `cela lab impair`
//! gives it, parsed and checked once here. netem's vocabulary: `delay: 20ms`, `jitter: 5ms`,
//! `loss: 1%`, `rate: 10mbit`; bare numbers are milliseconds, percent and Mbit/s.

use serde::{Deserialize, Serialize};

/// What a link does to the frames crossing it, in each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Impairment {
    /// Added to every frame's crossing, in microseconds.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub delay_us: u64,
    /// The delay varies uniformly by up to this much either way (microseconds).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub jitter_us: u64,
    /// Frames dropped, in parts per million.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub loss_ppm: u64,
    /// The link's bandwidth in bits per second (0: unlimited).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rate_bps: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The longest delay or jitter a link takes: a minute (frames wait in memory meanwhile).
const MAX_DELAY_US: u64 = 60_000_000;
/// The slowest link: 8 kbit/s (slower links hold a frame for seconds).
const MIN_RATE_BPS: u64 = 8_000;

impl Impairment {
    /// Nothing to do: the frames cross in the kernel.
    pub fn is_none(&self) -> bool {
        *self == Impairment::default()
    }

    /// Checks the combination (each value is checked as it is parsed).
    pub fn check(&self) -> Result<(), String> {
        if self.jitter_us > 0 && self.delay_us == 0 {
            return Err("jitter needs a delay to vary".into());
        }
        if self.jitter_us > self.delay_us {
            return Err("jitter may not exceed the delay".into());
        }
        Ok(())
    }

    /// A one-line summary, as `lab inspect` and `lab ls` show it.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.delay_us > 0 {
            parts.push(format!("delay {}", ms(self.delay_us)));
        }
        if self.jitter_us > 0 {
            parts.push(format!("jitter {}", ms(self.jitter_us)));
        }
        if self.loss_ppm > 0 {
            parts.push(format!("loss {}%", self.loss_ppm as f64 / 10_000.0));
        }
        if self.rate_bps > 0 {
            parts.push(format!("rate {}kbit", self.rate_bps / 1000));
        }
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }
}

fn ms(us: u64) -> String {
    format!("{}ms", us as f64 / 1000.0)
}

/// A number with an optional unit suffix, split; the number must be finite and not negative.
fn split_unit(s: &str) -> Result<(f64, String), String> {
    let s = s.trim();
    let at = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (n, unit) = s.split_at(at);
    let n: f64 = n
        .parse()
        .map_err(|_| format!("{s:?} does not start with a number"))?;
    if !n.is_finite() || n < 0.0 {
        return Err(format!("{s:?} is not a usable number"));
    }
    Ok((n, unit.trim().to_ascii_lowercase()))
}

/// `20ms`, `1.5s`, `500us`, or a bare number of milliseconds: microseconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let (n, unit) = split_unit(s)?;
    let us = match unit.as_str() {
        "" | "ms" => n * 1e3,
        "s" => n * 1e6,
        "us" | "µs" => n,
        other => return Err(format!("{s:?}: unknown unit {other:?} (ms, s or us)")),
    };
    if us > MAX_DELAY_US as f64 {
        return Err(format!("{s:?} is over a minute"));
    }
    Ok(us.round() as u64)
}

/// `1%`, `0.5`, `100%`: parts per million.
pub fn parse_loss(s: &str) -> Result<u64, String> {
    let (n, unit) = split_unit(s)?;
    if !unit.is_empty() && unit != "%" {
        return Err(format!("{s:?}: loss is a percentage (for example 1%)"));
    }
    if n > 100.0 {
        return Err(format!("{s:?} is over 100%"));
    }
    Ok((n * 10_000.0).round() as u64)
}

/// `10mbit`, `1gbit`, `512kbit`, `100bit`, or a bare number of Mbit/s: bits per second.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let (n, unit) = split_unit(s)?;
    let bps = match unit.as_str() {
        "" | "mbit" => n * 1e6,
        "gbit" => n * 1e9,
        "kbit" => n * 1e3,
        "bit" => n,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (bit, kbit, mbit or gbit)"
            ));
        }
    };
    if bps > 1e12 {
        return Err(format!("{s:?} is over a terabit"));
    }
    let bps = bps.round() as u64;
    if bps != 0 && bps < MIN_RATE_BPS {
        return Err(format!("{s:?} is under 8kbit"));
    }
    Ok(bps)
}

/// A value as YAML writes it: a string with its unit, or a bare number.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Quantity {
    Number(f64),
    Text(String),
}

impl Quantity {
    fn text(&self) -> String {
        match self {
            Quantity::Number(n) => n.to_string(),
            Quantity::Text(t) => t.clone(),
        }
    }
}

/// A lab file's `impair:` map.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImpairSpec {
    pub delay: Option<Quantity>,
    pub jitter: Option<Quantity>,
    pub loss: Option<Quantity>,
    pub rate: Option<Quantity>,
}

impl ImpairSpec {
    pub fn resolve(&self) -> Result<Impairment, String> {
        let get = |q: &Option<Quantity>, parse: fn(&str) -> Result<u64, String>| {
            q.as_ref().map(|q| parse(&q.text())).transpose()
        };
        let i = Impairment {
            delay_us: get(&self.delay, parse_duration)?.unwrap_or(0),
            jitter_us: get(&self.jitter, parse_duration)?.unwrap_or(0),
            loss_ppm: get(&self.loss, parse_loss)?.unwrap_or(0),
            rate_bps: get(&self.rate, parse_rate)?.unwrap_or(0),
        };
        i.check()?;
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_as_netem_writes_them() {
        assert_eq!(parse_duration("20ms").unwrap(), 20_000);
        assert_eq!(parse_duration("1.5s").unwrap(), 1_500_000);
        assert_eq!(parse_duration("50").unwrap(), 50_000);
        assert_eq!(parse_duration("250us").unwrap(), 250);
        assert_eq!(parse_loss("1%").unwrap(), 10_000);
        assert_eq!(parse_loss("0.5").unwrap(), 5_000);
        assert_eq!(parse_loss("100%").unwrap(), 1_000_000);
        assert_eq!(parse_rate("10mbit").unwrap(), 10_000_000);
        assert_eq!(parse_rate("1gbit").unwrap(), 1_000_000_000);
        assert_eq!(parse_rate("2").unwrap(), 2_000_000);
    }

    #[test]
    fn nonsense_is_refused_with_the_value() {
        for bad in ["-5ms", "5 parsecs", "ms", "61s", "NaN", "1e400"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains(bad.trim()), "{e}");
        }
        assert!(parse_loss("101%").is_err());
        assert!(parse_loss("5ms").is_err());
        assert!(parse_rate("1bit").is_err());
        assert!(parse_rate("2tbit").is_err());
        let jitter_alone = Impairment {
            jitter_us: 5,
            ..Default::default()
        };
        assert!(jitter_alone.check().is_err());
    }

    #[test]
    fn a_spec_of_numbers_and_strings() {
        let spec: ImpairSpec =
            serde_json::from_str(r#"{"delay": 20, "jitter": "5ms", "loss": "1%"}"#).unwrap();
        let i = spec.resolve().unwrap();
        assert_eq!(
            (i.delay_us, i.jitter_us, i.loss_ppm),
            (20_000, 5_000, 10_000)
        );
        assert_eq!(i.describe(), "delay 20ms, jitter 5ms, loss 1%");
        assert!(Impairment::default().is_none());
    }
}
