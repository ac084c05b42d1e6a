//! The node's secret store: values that process functions reference by name
//! (`process.secrets: {ENV_NAME: secret-name}`). A value is read when an instance starts, from a
//! folder of files (one file per secret, the way Kubernetes and Docker mount secrets) or from
//! the node's environment (`PIXFLOW_SECRET_<NAME>`, the name upper-cased with `-` and `.` as
//! `_`). Values never enter a manifest, the state file, an API answer or a log line; only the
//! child's environment.

use std::path::PathBuf;

/// Largest secret value read from a file.
const MAX_SECRET_BYTES: u64 = 64 << 10;
/// Prefix of secrets taken from the node's environment.
pub const ENV_PREFIX: &str = "PIXFLOW_SECRET_";

/// Where secret values come from.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    /// A folder with one file per secret (its name), tried first.
    pub dir: Option<PathBuf>,
    /// Also read `PIXFLOW_SECRET_<NAME>` from the node's environment.
    pub from_env: bool,
}

/// A secret's value; its `Debug` shows nothing of it.
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("no secret named `{0}` in the node's secret store")]
    Missing(String),
    #[error("secret `{name}` could not be read: {reason}")]
    Unreadable { name: String, reason: String },
}

/// Whether `name` can name a secret: 1 to 128 of `A-Z a-z 0-9 . _ -`, starting with a letter or
/// digit (a file name in the secrets folder, never a path).
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.len() <= 128
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl Secrets {
    /// The value of secret `name`: its file in the folder, else the environment.
    pub fn get(&self, name: &str) -> Result<Secret, SecretError> {
        if !valid_name(name) {
            return Err(SecretError::Missing(name.to_owned()));
        }
        if let Some(dir) = &self.dir {
            let path = dir.join(name);
            match std::fs::metadata(&path) {
                Ok(m) if m.len() > MAX_SECRET_BYTES => {
                    return Err(SecretError::Unreadable {
                        name: name.to_owned(),
                        reason: format!("larger than {MAX_SECRET_BYTES} bytes"),
                    });
                }
                Ok(_) => {
                    let text = std::fs::read_to_string(&path)
                        .map_err(|e| SecretError::Unreadable { name: name.to_owned(), reason: e.kind().to_string() })?;
                    // Files written by editors and `echo` end with one newline that is not part of the value.
                    let value = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text);
                    return Ok(Secret(value.to_owned()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(SecretError::Unreadable { name: name.to_owned(), reason: e.kind().to_string() });
                }
            }
        }
        if self.from_env
            && let Ok(v) = std::env::var(env_name(name))
        {
            return Ok(Secret(v));
        }
        Err(SecretError::Missing(name.to_owned()))
    }
}

/// The environment variable a secret is read from.
pub fn env_name(name: &str) -> String {
    let upper: String = name.chars().map(|c| if c == '-' || c == '.' { '_' } else { c.to_ascii_uppercase() }).collect();
    format!("{ENV_PREFIX}{upper}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_come_from_files_then_the_environment_and_never_show_in_debug() {
        let dir = std::env::temp_dir().join(format!("pixflow-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("db-password"), "s3cr3t\n").unwrap();
        let s = Secrets { dir: Some(dir.clone()), from_env: false };
        let v = s.get("db-password").unwrap();
        assert_eq!(v.expose(), "s3cr3t");
        assert!(!format!("{v:?}").contains("s3cr3t"));
        assert!(matches!(s.get("other"), Err(SecretError::Missing(_))));
        // Names are file names, never paths.
        assert!(matches!(s.get("../etc/passwd"), Err(SecretError::Missing(_))));
        assert!(!valid_name(".hidden") && !valid_name("a/b") && !valid_name("") && valid_name("api.key_2-x"));
        assert_eq!(env_name("api.key-2"), "PIXFLOW_SECRET_API_KEY_2");
        std::fs::write(dir.join("big"), vec![b'x'; (MAX_SECRET_BYTES + 1) as usize]).unwrap();
        assert!(matches!(s.get("big"), Err(SecretError::Unreadable { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
