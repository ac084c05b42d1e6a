//! Where a function's results are stored: a bucket and a key template such as
//! `thumbs/{source_key_stem}-800.{ext}`, named by a manifest's `output` or by a request. The
//! template is parsed once (unknown placeholders are refused at deploy); expanding it is pure,
//! and the keys it gives are checked by the object store like any other.
//!
//! Placeholders: `{source_key}`, `{source_key_stem}` (the input object's key without its
//! extension), `{source_name}` (its last segment without extension), `{name}` (the rendition's
//! name without extension, `out` when it has none), `{ext}` (the rendition's format: `jpg`,
//! `webp`, ...), `{width}`, `{height}`, `{index}` (the rendition's position), `{hash}` (16 hex
//! digits of the bytes' SHA-256: content-addressed keys that CDNs may cache forever) and `{id}`
//! (the invocation's id).

use serde::Deserialize;

/// An output as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    pub bucket: String,
    /// Key template.
    pub key: String,
}

/// A validated output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputTarget {
    pub bucket: String,
    pub key: KeyTemplate,
}

impl OutputTarget {
    pub fn parse(spec: &OutputSpec) -> Result<OutputTarget, String> {
        if !(3..=63).contains(&spec.bucket.len()) {
            return Err("bucket: 3 to 63 characters".into());
        }
        Ok(OutputTarget { bucket: spec.bucket.clone(), key: KeyTemplate::parse(&spec.key)? })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Var {
    SourceKey,
    SourceKeyStem,
    SourceName,
    Name,
    Ext,
    Width,
    Height,
    Index,
    Hash,
    Id,
}

impl Var {
    const ALL: [(&'static str, Var); 10] = [
        ("source_key", Var::SourceKey),
        ("source_key_stem", Var::SourceKeyStem),
        ("source_name", Var::SourceName),
        ("name", Var::Name),
        ("ext", Var::Ext),
        ("width", Var::Width),
        ("height", Var::Height),
        ("index", Var::Index),
        ("hash", Var::Hash),
        ("id", Var::Id),
    ];
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Var(Var),
}

/// A parsed key template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    text: String,
    parts: Vec<Part>,
}

/// What one stored rendition's key is made from.
#[derive(Debug, Clone, Copy)]
pub struct KeyVars<'a> {
    /// The input object's key, when the input came by reference.
    pub source_key: Option<&'a str>,
    pub name: Option<&'a str>,
    pub ext: &'a str,
    pub width: u32,
    pub height: u32,
    pub index: usize,
    /// Hex SHA-256 of the rendition's bytes.
    pub hash: &'a str,
    pub id: &'a str,
}

fn stem(s: &str) -> &str {
    match s.rfind('.') {
        // A dot inside the last segment only, and not a leading one (`.hidden`).
        Some(i) if i > 0 && !s[i..].contains('/') && !s[..i].ends_with('/') => &s[..i],
        _ => s,
    }
}

impl KeyTemplate {
    pub fn parse(text: &str) -> Result<KeyTemplate, String> {
        if text.is_empty() || text.len() > 1024 {
            return Err("key: 1 to 1024 bytes".into());
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find(['{', '}']) {
            if rest.as_bytes()[open] == b'}' {
                return Err(format!("key `{text}`: `}}` without `{{`"));
            }
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let close = rest[open..].find('}').ok_or_else(|| format!("key `{text}`: `{{` without `}}`"))? + open;
            let name = &rest[open + 1..close];
            let var = Var::ALL.iter().find(|(n, _)| *n == name).map(|(_, v)| *v).ok_or_else(|| {
                let known: Vec<_> = Var::ALL.iter().map(|(n, _)| format!("{{{n}}}")).collect();
                format!("key `{text}`: unknown placeholder `{{{name}}}`; known: {}", known.join(", "))
            })?;
            parts.push(Part::Var(var));
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(KeyTemplate { text: text.to_owned(), parts })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the template uses the input object's key (and so needs an input by reference).
    pub fn needs_source(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Var(Var::SourceKey | Var::SourceKeyStem | Var::SourceName)))
    }

    /// The key for one rendition.
    pub fn expand(&self, v: &KeyVars<'_>) -> Result<String, String> {
        let mut key = String::new();
        for part in &self.parts {
            let source = || {
                v.source_key.ok_or_else(|| {
                    format!("key `{}` names the source key, but the input did not come from object storage", self.text)
                })
            };
            match part {
                Part::Text(t) => key.push_str(t),
                Part::Var(Var::SourceKey) => key.push_str(source()?),
                Part::Var(Var::SourceKeyStem) => key.push_str(stem(source()?)),
                Part::Var(Var::SourceName) => {
                    let s = source()?;
                    key.push_str(stem(s.rsplit('/').next().unwrap_or(s)));
                }
                Part::Var(Var::Name) => key.push_str(v.name.map_or("out", stem)),
                Part::Var(Var::Ext) => key.push_str(v.ext),
                Part::Var(Var::Width) => key.push_str(&v.width.to_string()),
                Part::Var(Var::Height) => key.push_str(&v.height.to_string()),
                Part::Var(Var::Index) => key.push_str(&v.index.to_string()),
                Part::Var(Var::Hash) => key.push_str(v.hash.get(..16).unwrap_or(v.hash)),
                Part::Var(Var::Id) => key.push_str(v.id),
            }
        }
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>() -> KeyVars<'a> {
        KeyVars {
            source_key: Some("uploads/2026/cat.photo.jpg"),
            name: Some("large.webp"),
            ext: "webp",
            width: 800,
            height: 600,
            index: 1,
            hash: "0123456789abcdef0123456789abcdef",
            id: "abc",
        }
    }

    #[test]
    fn templates_expand_every_placeholder() {
        let t = KeyTemplate::parse("thumbs/{source_key_stem}-{width}x{height}.{ext}").unwrap();
        assert_eq!(t.expand(&vars()).unwrap(), "thumbs/uploads/2026/cat.photo-800x600.webp");
        let t = KeyTemplate::parse("{source_name}/{name}-{index}-{hash}-{id}").unwrap();
        assert_eq!(t.expand(&vars()).unwrap(), "cat.photo/large-1-0123456789abcdef-abc");
        let t = KeyTemplate::parse("{source_key}").unwrap();
        assert!(t.needs_source());
        assert_eq!(t.expand(&vars()).unwrap(), "uploads/2026/cat.photo.jpg");
        let plain = KeyTemplate::parse("fixed/key.png").unwrap();
        assert!(!plain.needs_source());
        assert_eq!(plain.expand(&vars()).unwrap(), "fixed/key.png");
        let unnamed = KeyVars { name: None, source_key: None, ..vars() };
        assert_eq!(KeyTemplate::parse("{name}.{ext}").unwrap().expand(&unnamed).unwrap(), "out.webp");
        let err = t.expand(&unnamed).unwrap_err();
        assert!(err.contains("did not come from object storage"), "{err}");
    }

    #[test]
    fn stems_drop_only_the_last_extension() {
        assert_eq!(stem("a/b.c/d"), "a/b.c/d");
        assert_eq!(stem("a/.hidden"), "a/.hidden");
        assert_eq!(stem("x.tar.gz"), "x.tar");
        assert_eq!(stem("noext"), "noext");
    }

    #[test]
    fn bad_templates_are_refused_with_the_reason() {
        for (t, want) in [
            ("a/{nope}.png", "unknown placeholder `{nope}`"),
            ("a/{name", "without `}`"),
            ("a}b", "without `{`"),
            ("", "1 to 1024"),
        ] {
            let e = KeyTemplate::parse(t).unwrap_err();
            assert!(e.contains(want), "{t}: {e}");
        }
    }
}
