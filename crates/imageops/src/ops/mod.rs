//! The operation catalogue: every transform a pipeline step can name, its documented schema,
//! and the typed value it parses into. Adding an operation means a module with a `SPEC`, a
//! variant here, a line in [`CATALOGUE`] and one arm in [`Op::parse`] and [`Op::apply`].

pub mod adjust;
pub mod border;
pub mod compose;
pub mod crop;
pub mod filter;
pub mod geometry;
pub mod qrcode;
pub mod resize;
pub mod rotate;
pub mod text;
pub mod watermark;

use std::collections::BTreeMap;

use image::DynamicImage;

use crate::Limits;
use crate::error::{Error, Result};
use crate::params::{Args, OpSpec};

/// What operations may read besides their own parameters.
pub struct Context<'a> {
    pub limits: Limits,
    /// Decoded extra image inputs by name (watermark logos).
    pub images: &'a BTreeMap<String, DynamicImage>,
    /// Extra inputs as bytes by name (fonts).
    pub raw: Option<&'a BTreeMap<String, Vec<u8>>>,
    /// When the caller stops waiting (see `RunOptions::deadline`).
    pub deadline: Option<std::time::Instant>,
}

/// What an extra input is read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    Image,
    Font,
    /// A `compose` template; the inputs it names are found with [`compose::referenced_inputs`].
    Template,
    /// Bytes used as they are (a fragmented-MP4 init segment).
    Segment,
}

impl Context<'_> {
    /// The decoded extra input `name` that `op`'s parameter `param` refers to.
    pub fn input(&self, op: &str, param: &str, name: &str) -> Result<&DynamicImage> {
        self.images.get(name).ok_or_else(|| Error::bad(op, param, format!("no input named `{name}` was supplied")))
    }

    /// The bytes of extra input `name` (a font file).
    pub fn bytes(&self, op: &str, param: &str, name: &str) -> Result<&[u8]> {
        self.raw
            .and_then(|m| m.get(name))
            .map(Vec::as_slice)
            .ok_or_else(|| Error::bad(op, param, format!("no input named `{name}` was supplied")))
    }
}

/// One parsed, validated transform.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Resize(resize::Resize),
    Crop(crop::Crop),
    Rotate(rotate::Rotate),
    Flip,
    Flop,
    Blur {
        sigma: f32,
    },
    Sharpen(filter::Sharpen),
    Pixelate(filter::Pixelate),
    Adjust(adjust::Adjust),
    Trim {
        threshold: u8,
    },
    Pad(border::Pad),
    Round {
        radius: u32,
        circle: bool,
    },
    Watermark(watermark::Watermark),
    Text(Box<text::Text>),
    /// A source: makes the first raster (see [`Op::is_source`]).
    Qrcode(qrcode::Qrcode),
    /// A source: a poster from a template.
    Compose(compose::Compose),
}

/// Every pixel operation with its schema (probe and convert live beside the pipeline).
pub static CATALOGUE: &[&OpSpec] = &[
    &resize::SPEC,
    &crop::SPEC,
    &rotate::SPEC,
    &rotate::FLIP,
    &rotate::FLOP,
    &filter::BLUR,
    &filter::SHARPEN,
    &filter::PIXELATE,
    &adjust::SPEC,
    &adjust::ENHANCE,
    &border::TRIM,
    &border::PAD,
    &border::ROUND,
    &watermark::SPEC,
    &text::SPEC,
    &qrcode::SPEC,
    &compose::SPEC,
];

/// Looks an operation up by name (`extend` is an alias of `pad`).
pub fn spec(name: &str) -> Option<&'static OpSpec> {
    let name = if name == "extend" { "pad" } else { name };
    CATALOGUE.iter().copied().find(|s| s.name == name)
}

impl Op {
    /// Parses `name` with `key=value` pairs, validating against the schema.
    pub fn parse<'a>(name: &str, pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Op> {
        let spec = spec(name).ok_or_else(|| Error::UnknownOperation(name.chars().take(40).collect()))?;
        let a = Args::parse(spec, pairs)?;
        Ok(match spec.name {
            "resize" => Op::Resize(resize::Resize::from_args(&a)?),
            "crop" => Op::Crop(crop::Crop::from_args(&a)?),
            "rotate" => Op::Rotate(rotate::Rotate::from_args(&a)?),
            "flip" => Op::Flip,
            "flop" => Op::Flop,
            "blur" => Op::Blur { sigma: a.float("sigma").ok_or_else(|| a.invalid("sigma", "required"))? as f32 },
            "sharpen" => Op::Sharpen(filter::Sharpen::from_args(&a)?),
            "pixelate" => Op::Pixelate(filter::Pixelate::from_args(&a)?),
            "adjust" => Op::Adjust(adjust::Adjust::from_args(&a)?),
            "enhance" => Op::Adjust(adjust::Adjust::ENHANCE),
            "trim" => Op::Trim { threshold: a.u32("threshold").unwrap_or(10) as u8 },
            "pad" => Op::Pad(border::Pad::from_args(&a)?),
            "round" => Op::Round { radius: a.u32("radius").unwrap_or(16), circle: a.boolean("circle") },
            "watermark" => Op::Watermark(watermark::Watermark::from_args(&a)?),
            "qrcode" => Op::Qrcode(qrcode::Qrcode::from_args(&a)?),
            "text" => Op::Text(Box::new(text::Text::from_args(&a)?)),
            "compose" => Op::Compose(compose::Compose {
                template: a.text("template").ok_or_else(|| a.invalid("template", "required"))?.to_owned(),
            }),
            other => return Err(Error::UnknownOperation(other.to_owned())),
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Op::Resize(_) => "resize",
            Op::Crop(_) => "crop",
            Op::Rotate(_) => "rotate",
            Op::Flip => "flip",
            Op::Flop => "flop",
            Op::Blur { .. } => "blur",
            Op::Sharpen(_) => "sharpen",
            Op::Pixelate(_) => "pixelate",
            Op::Adjust(_) => "adjust",
            Op::Trim { .. } => "trim",
            Op::Pad(_) => "pad",
            Op::Round { .. } => "round",
            Op::Watermark(_) => "watermark",
            Op::Qrcode(_) => "qrcode",
            Op::Text(_) => "text",
            Op::Compose(_) => "compose",
        }
    }

    /// The extra input this operation reads, if any, and what it is (a logo, a font).
    pub fn inputs(&self) -> Option<(&str, InputKind)> {
        match self {
            Op::Watermark(w) => Some((&w.image, InputKind::Image)),
            Op::Qrcode(q) => q.logo.as_deref().map(|n| (n, InputKind::Image)),
            Op::Text(t) => t.font.as_deref().map(|n| (n, InputKind::Font)),
            Op::Compose(c) => Some((&c.template, InputKind::Template)),
            _ => None,
        }
    }

    /// Whether this operation makes the first raster itself (it must be a pipeline's first
    /// step, and the pipeline then takes no input).
    pub fn is_source(&self) -> bool {
        matches!(self, Op::Qrcode(_) | Op::Compose(_))
    }

    /// Makes the first raster of a pipeline that starts with a source operation.
    pub fn generate(&self, cx: &Context<'_>) -> Result<DynamicImage> {
        match self {
            Op::Qrcode(q) => {
                q.render(q.logo.as_ref().map(|n| cx.input(self.name(), "logo", n)).transpose()?, &cx.limits)
            }
            Op::Compose(c) => c.render(cx.raw, &cx.limits),
            other => Err(Error::bad(
                other.name(),
                "input",
                "this operation transforms an image; it cannot start a pipeline without one",
            )),
        }
    }

    /// Runs the operation on a normalised (RGB8/RGBA8) raster.
    pub fn apply(&self, img: DynamicImage, cx: &Context<'_>) -> Result<DynamicImage> {
        let limits = &cx.limits;
        Ok(match self {
            Op::Resize(r) => r.apply(img, limits)?,
            Op::Crop(c) => c.apply(img)?,
            Op::Rotate(r) => r.apply(img, limits)?,
            Op::Flip => img.flipv(),
            Op::Flop => img.fliph(),
            Op::Blur { sigma } => {
                filter::check_blur_cost(img.width(), img.height(), *sigma, limits)?;
                filter::blur(&img, *sigma)
            }
            Op::Sharpen(s) => {
                filter::check_blur_cost(img.width(), img.height(), s.sigma, limits)?;
                s.apply(img)
            }
            Op::Pixelate(p) => p.apply(img)?,
            Op::Adjust(a) => a.apply(img),
            Op::Trim { threshold } => border::trim(img, *threshold),
            Op::Pad(p) => p.apply(img, limits)?,
            Op::Round { radius, circle } => border::round(img, *radius, *circle),
            Op::Watermark(w) => w.apply(img, cx.input("watermark", "image", &w.image)?, limits)?,
            Op::Text(t) => {
                let font = t.font.as_deref().map(|n| cx.bytes("text", "font", n)).transpose()?;
                t.apply(img, font, limits)?
            }
            Op::Qrcode(_) | Op::Compose(_) => {
                return Err(Error::bad(
                    self.name(),
                    "step",
                    format!("{} makes an image, so it can only be a pipeline's first step", self.name()),
                ));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_catalogue_entry_parses_or_names_its_required_parameter() {
        for spec in CATALOGUE {
            match Op::parse(spec.name, []) {
                Ok(op) => assert_eq!(spec.name, if op.name() == "adjust" { spec.name } else { op.name() }),
                Err(Error::BadParameter { op, .. }) => assert_eq!(op, spec.name),
                Err(other) => panic!("{}: {other}", spec.name),
            }
        }
        assert!(matches!(Op::parse("explode", []), Err(Error::UnknownOperation(_))));
        assert!(matches!(Op::parse("extend", [("all", "2")]), Ok(Op::Pad(_))));
    }

    #[test]
    fn every_parameter_is_documented() {
        for spec in CATALOGUE {
            assert!(!spec.doc.is_empty());
            for p in spec.params {
                assert!(!p.doc.is_empty(), "{}.{}", spec.name, p.name);
            }
        }
    }
}
