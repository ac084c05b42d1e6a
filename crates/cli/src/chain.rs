//! Turns the command line's `OP key=value ... + OP ...` words into a validated pipeline.

use anyhow::{Result, bail};
use pixflow_imageops::Pipeline;

/// Splits words into `+`-separated groups of `op key=value...` and validates them.
pub fn parse(words: &[String]) -> Result<Pipeline> {
    let mut groups: Vec<(&str, Vec<(&str, &str)>)> = Vec::new();
    for group in words.split(|w| w == "+") {
        let Some((name, params)) = group.split_first() else {
            bail!("empty step: `+` must separate operations");
        };
        if name.contains('=') {
            bail!("`{name}` is a parameter, not an operation; steps start with an operation name");
        }
        let mut pairs = Vec::new();
        for p in params {
            let Some((k, v)) = p.split_once('=') else {
                bail!("`{p}` is not key=value (operation `{name}`); separate operations with `+`");
            };
            pairs.push((k, v));
        }
        groups.push((name.as_str(), pairs));
    }
    Ok(Pipeline::from_steps(groups)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn splits_on_plus() {
        let p = parse(&words("crop x=1 y=2 width=3 height=4 + rotate angle=90")).unwrap();
        assert_eq!(p.steps.len(), 2);
    }

    #[test]
    fn reports_malformed_words() {
        for bad in ["resize 800", "width=800", "resize width=800 +", "+ flip"] {
            assert!(parse(&words(bad)).is_err(), "{bad}");
        }
        let err = parse(&words("resize width=abc")).unwrap_err();
        assert!(err.to_string().contains("`width`"), "{err}");
    }
}
