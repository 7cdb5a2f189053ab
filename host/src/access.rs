//! Who may do what: bearer tokens with scopes, stored as sha256 hashes, and
//! the scopes anyone has without a token.
//!
//! Every route declares the [`Need`] it has (see [`crate::routes`]); this
//! module only answers whether a request's token meets it.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::path::Path;
use subtle::ConstantTimeEq;

/// What a token may be allowed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Registry writes: publish, delete, roll back.
    Publish,
    /// Registry reads and function status.
    Read,
    /// Invocations (optionally only of listed functions).
    Invoke,
    /// `GET /metrics`.
    Metrics,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 4] = [Scope::Publish, Scope::Read, Scope::Invoke, Scope::Metrics];

    fn name(self) -> &'static str {
        match self {
            Scope::Publish => "publish",
            Scope::Read => "read",
            Scope::Invoke => "invoke",
            Scope::Metrics => "metrics",
        }
    }
}

/// What a route needs of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing: liveness and readiness probes.
    Nothing,
    /// A token (or anonymous access) with this scope.
    Scope(Scope),
    /// The invoke scope, for the function the route names.
    InvokeFunction,
}

/// One token: a name for logs, the sha256 of its secret, what it may do.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Token {
    /// Who holds it (for logs; never the secret).
    pub name: String,
    /// Hex sha256 of the secret.
    pub sha256: String,
    /// What it may do.
    pub scopes: BTreeSet<Scope>,
    /// With the invoke scope: the only functions it may invoke (all if absent).
    #[serde(default)]
    pub functions: Option<BTreeSet<String>>,
}

/// The tokens file (`--tokens FILE`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    anonymous: BTreeSet<Scope>,
    #[serde(default, rename = "token")]
    tokens: Vec<Token>,
}

/// A token ready to compare: its hash as bytes.
#[derive(Debug, Clone)]
struct Holder {
    name: String,
    hash: [u8; 32],
    scopes: BTreeSet<Scope>,
    functions: Option<BTreeSet<String>>,
}

/// The access policy of one host.
#[derive(Debug, Clone)]
pub struct Access {
    holders: Vec<Holder>,
    anonymous: BTreeSet<Scope>,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No token was presented where one is needed (401).
    #[error("this request needs `Authorization: Bearer <token>` with the {0} scope")]
    Missing(&'static str),
    /// The token matches none (401).
    #[error("wrong token")]
    Wrong,
    /// The token is valid but lacks the scope (403).
    #[error("token {token:?} lacks the {scope} scope")]
    Scope {
        /// The token's name.
        token: String,
        /// The scope it lacks.
        scope: &'static str,
    },
    /// The token may not invoke this function (403).
    #[error("token {token:?} may not invoke function {function:?}")]
    Function {
        /// The token's name.
        token: String,
        /// The function asked for.
        function: String,
    },
}

impl Denied {
    /// 401 when the caller is unknown, 403 when known but not allowed.
    pub fn status(&self) -> u16 {
        match self {
            Denied::Missing(_) | Denied::Wrong => 401,
            Denied::Scope { .. } | Denied::Function { .. } => 403,
        }
    }
}

/// Why a token policy (flags or tokens file) is unusable: the host refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// `--token` was given but empty.
    #[error("--token is empty")]
    EmptyToken,
    /// The tokens file cannot be read.
    #[error("reading tokens file {}: {source}", path.display())]
    Unreadable {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The tokens file is not valid.
    #[error("tokens file {}: {error}", path.display())]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong in it.
        #[source]
        error: Box<PolicyError>,
    },
    /// The text is not the tokens file's TOML.
    #[error("{0}")]
    Toml(#[from] toml::de::Error),
    /// Two tokens share a name.
    #[error("token name {0:?} appears twice")]
    DuplicateName(String),
    /// One token's entry is wrong.
    #[error("token {name:?}: {why}")]
    Token {
        /// The token's name.
        name: String,
        /// What is wrong.
        why: String,
    },
}

impl Access {
    /// No tokens: everyone may do everything.
    pub fn open() -> Self {
        Access {
            holders: Vec::new(),
            anonymous: Scope::ALL.into_iter().collect(),
        }
    }

    /// The policy of `--token`, `--token-read` and `--tokens FILE`.
    ///
    /// `--token T` is one token with every scope; without `--token-read`
    /// reads, invocations and metrics stay open to all (only registry
    /// writes need it), with it nothing does. A tokens file sets the open
    /// scopes itself (`anonymous`, none by default).
    pub fn from_flags(
        token: Option<&str>,
        protect_reads: bool,
        tokens_file: Option<&Path>,
    ) -> Result<Self, PolicyError> {
        let mut access = match tokens_file {
            Some(path) => Access::from_file(path)?,
            None if token.is_none() => return Ok(Access::open()),
            None if protect_reads => Access {
                holders: Vec::new(),
                anonymous: BTreeSet::new(),
            },
            None => Access {
                holders: Vec::new(),
                anonymous: [Scope::Read, Scope::Invoke, Scope::Metrics].into(),
            },
        };
        if let Some(secret) = token {
            if secret.is_empty() {
                return Err(PolicyError::EmptyToken);
            }
            access.holders.push(Holder {
                name: "--token".into(),
                hash: Sha256::digest(secret.as_bytes()).into(),
                scopes: Scope::ALL.into_iter().collect(),
                functions: None,
            });
        }
        Ok(access)
    }

    /// Reads a tokens file.
    pub fn from_file(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Unreadable {
            path: path.to_path_buf(),
            source,
        })?;
        Access::from_toml(&text).map_err(|error| PolicyError::File {
            path: path.to_path_buf(),
            error: Box::new(error),
        })
    }

    /// Parses the tokens file's text.
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        let file: TokensFile = toml::from_str(text)?;
        let mut names = BTreeSet::new();
        let holders = file
            .tokens
            .into_iter()
            .map(|token| {
                if !names.insert(token.name.clone()) {
                    return Err(PolicyError::DuplicateName(token.name));
                }
                let hash = decode_hash(&token.sha256).ok_or_else(|| PolicyError::Token {
                    name: token.name.clone(),
                    why: "sha256 must be 64 hex digits".into(),
                })?;
                if token.functions.is_some() && !token.scopes.contains(&Scope::Invoke) {
                    return Err(PolicyError::Token {
                        name: token.name,
                        why: "`functions` limits invocations, but the token lacks the invoke scope"
                            .into(),
                    });
                }
                Ok(Holder {
                    name: token.name,
                    hash,
                    scopes: token.scopes,
                    functions: token.functions,
                })
            })
            .collect::<Result<Vec<_>, PolicyError>>()?;
        Ok(Access {
            holders,
            anonymous: file.anonymous,
        })
    }

    /// Whether a request presenting `bearer` (the text after `Bearer `)
    /// may do what `need` says, for `function` when it names one.
    pub fn check(&self, need: Need, bearer: Option<&str>, function: &str) -> Result<(), Denied> {
        let scope = match need {
            Need::Nothing => return Ok(()),
            Need::Scope(scope) => scope,
            Need::InvokeFunction => Scope::Invoke,
        };
        let Some(secret) = bearer else {
            return if self.anonymous.contains(&scope) {
                Ok(())
            } else {
                Err(Denied::Missing(scope.name()))
            };
        };
        let holder = self.holder(secret).ok_or(Denied::Wrong)?;
        if !holder.scopes.contains(&scope) {
            return Err(Denied::Scope {
                token: holder.name.clone(),
                scope: scope.name(),
            });
        }
        match (&need, &holder.functions) {
            (Need::InvokeFunction, Some(allowed)) if !allowed.contains(function) => {
                Err(Denied::Function {
                    token: holder.name.clone(),
                    function: function.to_string(),
                })
            }
            _ => Ok(()),
        }
    }

    /// The token whose hash matches `secret`'s. Every token is compared,
    /// each in constant time over the fixed-length hash, so neither the
    /// secret's length nor which token matched shows in the timing.
    fn holder(&self, secret: &str) -> Option<&Holder> {
        let presented: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let mut found = None;
        for holder in &self.holders {
            if bool::from(holder.hash.ct_eq(&presented)) {
                found = Some(holder);
            }
        }
        found
    }
}

fn decode_hash(text: &str) -> Option<[u8; 32]> {
    let bytes = hex::decode(text.trim()).ok()?;
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(secret: &str) -> String {
        hex::encode(Sha256::digest(secret.as_bytes()))
    }

    fn file_policy() -> Access {
        let text = format!(
            r#"
anonymous = ["metrics"]
[[token]]
name = "ci"
sha256 = "{}"
scopes = ["publish", "read"]
[[token]]
name = "app"
sha256 = "{}"
scopes = ["invoke"]
functions = ["embed"]
"#,
            sha("ci-secret"),
            sha("app-secret")
        );
        Access::from_toml(&text).expect("valid tokens file")
    }

    #[test]
    fn scopes_and_functions_decide() {
        let access = file_policy();
        let publish = Need::Scope(Scope::Publish);
        assert_eq!(access.check(publish, Some("ci-secret"), ""), Ok(()));
        assert_eq!(
            access.check(publish, Some("app-secret"), ""),
            Err(Denied::Scope {
                token: "app".into(),
                scope: "publish"
            })
        );
        assert_eq!(
            access.check(publish, None, ""),
            Err(Denied::Missing("publish"))
        );
        assert_eq!(
            access.check(publish, Some("ci-secre"), ""),
            Err(Denied::Wrong)
        );
        assert_eq!(
            access.check(Need::InvokeFunction, Some("app-secret"), "embed"),
            Ok(())
        );
        assert_eq!(
            access
                .check(Need::InvokeFunction, Some("app-secret"), "orientation")
                .map_err(|e| e.status()),
            Err(403)
        );
        assert_eq!(access.check(Need::Scope(Scope::Metrics), None, ""), Ok(()));
        assert_eq!(access.check(Need::Nothing, Some("nonsense"), ""), Ok(()));
    }

    #[test]
    fn the_single_token_flag_keeps_its_meaning() {
        let open_reads = Access::from_flags(Some("t"), false, None).expect("policy");
        assert_eq!(open_reads.check(Need::Scope(Scope::Read), None, ""), Ok(()));
        assert_eq!(open_reads.check(Need::InvokeFunction, None, "x"), Ok(()));
        assert!(
            open_reads
                .check(Need::Scope(Scope::Publish), None, "")
                .is_err()
        );
        assert_eq!(
            open_reads.check(Need::Scope(Scope::Publish), Some("t"), ""),
            Ok(())
        );
        let closed = Access::from_flags(Some("t"), true, None).expect("policy");
        for scope in Scope::ALL {
            assert!(
                closed.check(Need::Scope(scope), None, "").is_err(),
                "{scope:?}"
            );
            assert_eq!(closed.check(Need::Scope(scope), Some("t"), ""), Ok(()));
        }
        assert!(Access::from_flags(Some(""), false, None).is_err());
    }

    #[test]
    fn bad_tokens_files_say_what_is_wrong() {
        let short = r#"[[token]]
name = "x"
sha256 = "abcd"
scopes = ["read"]"#;
        assert!(
            Access::from_toml(short)
                .expect_err("refused")
                .to_string()
                .contains("64 hex digits")
        );
        let unknown_scope = format!(
            "[[token]]\nname = \"x\"\nsha256 = \"{}\"\nscopes = [\"admin\"]",
            sha("s")
        );
        assert!(
            Access::from_toml(&unknown_scope)
                .expect_err("refused")
                .to_string()
                .contains("admin")
        );
        let functions_without_invoke = format!(
            "[[token]]\nname = \"x\"\nsha256 = \"{}\"\nscopes = [\"read\"]\nfunctions = [\"a\"]",
            sha("s")
        );
        assert!(
            Access::from_toml(&functions_without_invoke)
                .expect_err("refused")
                .to_string()
                .contains("lacks the invoke scope")
        );
    }
}
