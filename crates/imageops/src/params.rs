//! Operation parameters: one declarative schema per operation (names, types, ranges, defaults,
//! docs) that both validates untrusted `key=value` input and documents itself (`pixflow ops`).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::color::Color;
use crate::error::{Error, Result};

/// The type and accepted range of one parameter.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Kind {
    Int { min: i64, max: i64 },
    Float { min: f64, max: f64 },
    Bool,
    Enum { values: &'static [&'static str] },
    Color,
    Text { max_len: usize },
}

/// One documented parameter.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Param {
    pub name: &'static str,
    #[serde(flatten)]
    pub kind: Kind,
    /// Default as text; `None` means optional with no default (or required, see `doc`).
    pub default: Option<&'static str>,
    pub doc: &'static str,
}

/// One documented operation.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct OpSpec {
    pub name: &'static str,
    pub doc: &'static str,
    pub params: &'static [Param],
}

pub const fn int(name: &'static str, min: i64, max: i64, default: Option<&'static str>, doc: &'static str) -> Param {
    Param { name, kind: Kind::Int { min, max }, default, doc }
}
pub const fn float(name: &'static str, min: f64, max: f64, default: Option<&'static str>, doc: &'static str) -> Param {
    Param { name, kind: Kind::Float { min, max }, default, doc }
}
pub const fn boolean(name: &'static str, default: &'static str, doc: &'static str) -> Param {
    Param { name, kind: Kind::Bool, default: Some(default), doc }
}
pub const fn choice(
    name: &'static str,
    values: &'static [&'static str],
    default: Option<&'static str>,
    doc: &'static str,
) -> Param {
    Param { name, kind: Kind::Enum { values }, default, doc }
}
pub const fn color(name: &'static str, default: Option<&'static str>, doc: &'static str) -> Param {
    Param { name, kind: Kind::Color, default, doc }
}
pub const fn text(name: &'static str, max_len: usize, default: Option<&'static str>, doc: &'static str) -> Param {
    Param { name, kind: Kind::Text { max_len }, default, doc }
}

/// Validated arguments of one operation: every key is known and every value parses.
#[derive(Debug)]
pub struct Args {
    spec: &'static OpSpec,
    values: BTreeMap<&'static str, String>,
}

impl Args {
    /// Validates raw pairs against the schema: unknown keys, duplicates, types and ranges.
    pub fn parse<'a>(spec: &'static OpSpec, pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self> {
        let mut values = BTreeMap::new();
        for (key, value) in pairs {
            let Some(param) = spec.params.iter().find(|p| p.name == key) else {
                let known: Vec<_> = spec.params.iter().map(|p| p.name).collect();
                return Err(Error::bad(spec.name, key, format!("unknown parameter; known: {}", known.join(", "))));
            };
            if values.contains_key(param.name) {
                return Err(Error::bad(spec.name, key, "given twice"));
            }
            check_value(spec.name, param, value)?;
            values.insert(param.name, value.to_owned());
        }
        Ok(Args { spec, values })
    }

    fn raw(&self, name: &str) -> Option<&str> {
        if let Some(v) = self.values.get(name) {
            return Some(v);
        }
        self.param(name).default
    }

    fn param(&self, name: &str) -> &'static Param {
        // Schema and accessor names are both compile-time constants of this crate.
        self.spec
            .params
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("{}: no param {name}", self.spec.name))
    }

    pub fn given(&self, name: &str) -> bool {
        self.values.contains_key(name)
    }

    pub fn int(&self, name: &str) -> Option<i64> {
        self.raw(name).and_then(|v| v.parse().ok())
    }

    pub fn u32(&self, name: &str) -> Option<u32> {
        self.int(name).and_then(|v| u32::try_from(v).ok())
    }

    pub fn float(&self, name: &str) -> Option<f64> {
        self.raw(name).and_then(|v| v.parse().ok())
    }

    pub fn boolean(&self, name: &str) -> bool {
        self.raw(name).is_some_and(|v| parse_bool(v) == Some(true))
    }

    pub fn choice(&self, name: &str) -> Option<&str> {
        self.raw(name)
    }

    pub fn color(&self, name: &str) -> Option<Color> {
        self.raw(name).and_then(|v| Color::parse(v).ok())
    }

    pub fn text(&self, name: &str) -> Option<&str> {
        self.raw(name)
    }

    /// Error for a combination of values the schema alone cannot express.
    pub fn invalid(&self, name: &str, reason: impl Into<String>) -> Error {
        Error::bad(self.spec.name, name, reason)
    }

    pub fn require_u32(&self, name: &str) -> Result<u32> {
        self.u32(name).ok_or_else(|| self.invalid(name, "required"))
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn check_value(op: &str, p: &Param, v: &str) -> Result<()> {
    let bad = |reason: String| Err(Error::bad(op, p.name, reason));
    match p.kind {
        Kind::Int { min, max } => match v.parse::<i64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(()),
            Ok(n) => bad(format!("{n} is out of range {min}..={max}")),
            Err(_) => bad(format!("`{}` is not an integer", truncate(v))),
        },
        Kind::Float { min, max } => match v.parse::<f64>() {
            Ok(n) if n.is_finite() && n >= min && n <= max => Ok(()),
            Ok(n) => bad(format!("{n} is out of range {min}..={max}")),
            Err(_) => bad(format!("`{}` is not a number", truncate(v))),
        },
        Kind::Bool => match parse_bool(v) {
            Some(_) => Ok(()),
            None => bad(format!("`{}` is not a boolean (true/false)", truncate(v))),
        },
        Kind::Enum { values } => {
            if values.contains(&v) {
                Ok(())
            } else {
                bad(format!("`{}` is not one of {}", truncate(v), values.join(", ")))
            }
        }
        Kind::Color => Color::parse(v).map(|_| ()).map_err(|reason| Error::bad(op, p.name, reason)),
        Kind::Text { max_len } => {
            if v.len() <= max_len {
                Ok(())
            } else {
                bad(format!("longer than {max_len} bytes"))
            }
        }
    }
}

fn truncate(v: &str) -> &str {
    let mut end = v.len().min(40);
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    &v[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    static SPEC: OpSpec = OpSpec {
        name: "demo",
        doc: "test op",
        params: &[
            int("width", 1, 100, None, "w"),
            float("sigma", 0.1, 10.0, Some("1.0"), "s"),
            boolean("flag", "false", "f"),
            choice("fit", &["inside", "cover"], Some("inside"), "fit"),
            color("bg", Some("white"), "background"),
        ],
    };

    fn parse(pairs: &[(&str, &str)]) -> Result<Args> {
        Args::parse(&SPEC, pairs.iter().copied())
    }

    #[test]
    fn defaults_and_values() {
        let a = parse(&[("width", "100"), ("flag", "true")]).unwrap();
        assert_eq!(a.u32("width"), Some(100));
        assert_eq!(a.float("sigma"), Some(1.0));
        assert!(a.boolean("flag"));
        assert_eq!(a.choice("fit"), Some("inside"));
        assert!(a.given("width") && !a.given("sigma"));
    }

    #[test]
    fn rejections_name_the_parameter() {
        type Pairs = &'static [(&'static str, &'static str)];
        let cases: &[(Pairs, &str, &str)] = &[
            (&[("width", "0")], "width", "out of range 1..=100"),
            (&[("width", "101")], "width", "out of range"),
            (&[("width", "abc")], "width", "not an integer"),
            (&[("sigma", "NaN")], "sigma", "out of range"),
            (&[("sigma", "inf")], "sigma", "out of range"),
            (&[("fit", "squash")], "fit", "not one of inside, cover"),
            (&[("flag", "maybe")], "flag", "not a boolean"),
            (&[("bg", "#12")], "bg", "colour"),
            (&[("bogus", "1")], "bogus", "unknown parameter"),
            (&[("width", "1"), ("width", "2")], "width", "given twice"),
        ];
        for (pairs, param, text) in cases {
            let err = parse(pairs).unwrap_err();
            match &err {
                Error::BadParameter { op, param: p, reason } => {
                    assert_eq!(op, "demo");
                    assert_eq!(p, param);
                    assert!(reason.contains(text), "{reason} should contain {text}");
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}
