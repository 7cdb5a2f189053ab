//! Names, versions and references, validated once when parsed.

use crate::RegistryError;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// An artifact or function name: `[a-z0-9][a-z0-9-]{0,62}`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

impl Name {
    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Name {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut chars = s.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if first_ok && rest_ok && s.len() <= 63 {
            Ok(Name(s.to_string()))
        } else {
            Err(RegistryError::Invalid(format!(
                "invalid name {s:?}: use 1 to 63 lower-case letters, digits and '-', starting with a letter or digit"
            )))
        }
    }
}

impl TryFrom<String> for Name {
    type Error = RegistryError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A semantic version.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version(pub semver::Version);

impl FromStr for Version {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        semver::Version::parse(s).map(Version).map_err(|e| {
            RegistryError::Invalid(format!(
                "invalid version {s:?}: {e} (expected semver, e.g. 1.0.0)"
            ))
        })
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// `name@version`: one immutable artifact.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Reference {
    /// The artifact's name.
    pub name: Name,
    /// The artifact's version.
    pub version: Version,
}

impl Reference {
    /// A reference from its parts.
    pub fn new(name: Name, version: Version) -> Self {
        Reference { name, version }
    }
}

impl FromStr for Reference {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, version) = s.split_once('@').ok_or_else(|| {
            RegistryError::Invalid(format!("invalid reference {s:?}: expected name@version"))
        })?;
        Ok(Reference {
            name: name.parse()?,
            version: version.parse()?,
        })
    }
}

impl TryFrom<String> for Reference {
    type Error = RegistryError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Reference> for String {
    fn from(r: Reference) -> String {
        r.to_string()
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_pattern() {
        for good in ["a", "embed", "bert-tokenizer", "x9", &"a".repeat(63)] {
            assert!(good.parse::<Name>().is_ok(), "{good}");
        }
        for bad in ["", "-a", "A", "a_b", "a.b", "a b", &"a".repeat(64)] {
            assert!(bad.parse::<Name>().is_err(), "{bad}");
        }
    }

    #[test]
    fn references_parse_and_print() {
        let r: Reference = "mean-pool@0.1.0".parse().expect("valid");
        assert_eq!(r.to_string(), "mean-pool@0.1.0");
        let err = "mean-pool@1".parse::<Reference>().expect_err("not semver");
        assert!(err.to_string().contains("invalid version \"1\""), "{err}");
        assert!("mean-pool".parse::<Reference>().is_err());
    }
}
