//! Typed access to a stage's configuration (string pairs from the manifest).
//!
//! Configuration comes from the function's author, not from the caller, so
//! every problem here is a [`Failure::Internal`] that names the key.

use crate::Failure;
use std::collections::BTreeMap;
use std::str::FromStr;

/// A stage's configuration, checked against the keys the component knows.
#[derive(Debug, Clone, Default)]
pub struct Config {
    values: BTreeMap<String, String>,
}

impl Config {
    /// Builds a configuration from `wasi:config/store` pairs, refusing keys
    /// the component does not understand (a typo must not pass silently).
    pub fn new(pairs: Vec<(String, String)>, known: &[&str]) -> Result<Self, Failure> {
        let values: BTreeMap<String, String> = pairs.into_iter().collect();
        if let Some(unknown) = values.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(Failure::internal(format!(
                "unknown config key `{unknown}` (known keys: {})",
                known.join(", ")
            )));
        }
        Ok(Config { values })
    }

    /// The raw value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// The value of `key` as a string, or `default`.
    pub fn string(&self, key: &str, default: &str) -> String {
        self.get(key).unwrap_or(default).to_string()
    }

    /// The value of `key` parsed as `T`, or `default` when unset.
    pub fn parse<T: FromStr>(&self, key: &str, default: T) -> Result<T, Failure> {
        match self.get(key) {
            None => Ok(default),
            Some(raw) => raw.trim().parse().map_err(|_| {
                Failure::internal(format!(
                    "config `{key}`: cannot parse {raw:?} as {}",
                    std::any::type_name::<T>()
                ))
            }),
        }
    }

    /// The value of `key` as `true`/`false`, or `default` when unset.
    pub fn flag(&self, key: &str, default: bool) -> Result<bool, Failure> {
        match self.get(key).map(str::trim) {
            None => Ok(default),
            Some("true" | "1" | "yes") => Ok(true),
            Some("false" | "0" | "no") => Ok(false),
            Some(raw) => Err(Failure::internal(format!(
                "config `{key}`: expected true or false, got {raw:?}"
            ))),
        }
    }

    /// The value of `key` as exactly `len` comma-separated floats, or `default`.
    pub fn floats(&self, key: &str, len: usize, default: &[f32]) -> Result<Vec<f32>, Failure> {
        let Some(raw) = self.get(key) else {
            return Ok(default.to_vec());
        };
        let parsed: Result<Vec<f32>, _> = raw.split(',').map(|v| v.trim().parse::<f32>()).collect();
        match parsed {
            Ok(values) if values.len() == len => Ok(values),
            _ => Err(Failure::internal(format!(
                "config `{key}`: expected {len} comma-separated numbers, got {raw:?}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Result<Config, Failure> {
        let pairs = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::new(pairs, &["a", "b"])
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = config(&[("c", "1")]).unwrap_err();
        assert_eq!(
            err,
            Failure::internal("unknown config key `c` (known keys: a, b)")
        );
    }

    #[test]
    fn typed_values_and_defaults() {
        let c = config(&[("a", " 12 "), ("b", "0.5, 0.25,1")]).unwrap();
        assert_eq!(c.parse::<usize>("a", 3).unwrap(), 12);
        assert_eq!(c.floats("b", 3, &[]).unwrap(), vec![0.5, 0.25, 1.0]);
        assert!(c.floats("b", 2, &[]).is_err());
        assert!(c.flag("a", false).is_err());
        assert_eq!(c.parse::<u8>("missing", 7).unwrap(), 7);
    }
}
