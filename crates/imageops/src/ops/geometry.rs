//! Placement maths shared by resize, crop and pad: gravity (nine compass positions or a focal
//! point) and where a box of one size sits inside another.

use crate::error::Result;
use crate::params::{Args, Param, choice, int};

/// Where to anchor a box inside a larger one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Gravity {
    /// Fractions (0..=1) of the free space to the left and above.
    Fraction(f64, f64),
    /// A point (fractions of the outer box) the inner box is centred on, as far as edges allow.
    Focal(f64, f64),
    /// Saliency/entropy-driven placement (crop only).
    Smart,
}

pub const GRAVITY_VALUES: &[&str] =
    &["center", "north", "south", "east", "west", "northeast", "northwest", "southeast", "southwest", "focal", "smart"];

/// The placement parameters of overlays (watermark, text): a compass position and an offset
/// pushing inward from the anchored edges.
pub const OVERLAY_GRAVITY: Param = choice(
    "gravity",
    &["center", "north", "south", "east", "west", "northeast", "northwest", "southeast", "southwest"],
    Some("southeast"),
    "Where it sits on the image.",
);
pub const OVERLAY_X: Param =
    int("x", -65_535, 65_535, Some("0"), "Horizontal offset in pixels, inward from the gravity edge.");
pub const OVERLAY_Y: Param =
    int("y", -65_535, 65_535, Some("0"), "Vertical offset in pixels, inward from the gravity edge.");

impl Gravity {
    pub const CENTER: Gravity = Gravity::Fraction(0.5, 0.5);

    /// Reads `gravity` (+ `fx`, `fy` for `focal`) from validated args.
    pub fn from_args(args: &Args) -> Result<Gravity> {
        Ok(match args.choice("gravity").unwrap_or("center") {
            "north" => Gravity::Fraction(0.5, 0.0),
            "south" => Gravity::Fraction(0.5, 1.0),
            "east" => Gravity::Fraction(1.0, 0.5),
            "west" => Gravity::Fraction(0.0, 0.5),
            "northeast" => Gravity::Fraction(1.0, 0.0),
            "northwest" => Gravity::Fraction(0.0, 0.0),
            "southeast" => Gravity::Fraction(1.0, 1.0),
            "southwest" => Gravity::Fraction(0.0, 1.0),
            "focal" => {
                let (Some(fx), Some(fy)) = (args.float("fx"), args.float("fy")) else {
                    return Err(args.invalid("gravity", "`focal` needs fx and fy (0..1)"));
                };
                Gravity::Focal(fx, fy)
            }
            "smart" => Gravity::Smart,
            _ => Gravity::CENTER,
        })
    }

    /// Top-left offset of an `inner` box placed inside `outer` (inner <= outer per axis).
    pub fn offset(self, outer: (u32, u32), inner: (u32, u32)) -> (u32, u32) {
        let (fx, fy) = match self {
            Gravity::Fraction(fx, fy) => (fx, fy),
            Gravity::Focal(fx, fy) => return focal_offset(outer, inner, fx, fy),
            Gravity::Smart => (0.5, 0.5),
        };
        let free_x = outer.0.saturating_sub(inner.0);
        let free_y = outer.1.saturating_sub(inner.1);
        ((f64::from(free_x) * fx).round() as u32, (f64::from(free_y) * fy).round() as u32)
    }
}

/// Offset of a box of `inner` size centred on the focal point (fractions of `outer`), clamped.
pub fn focal_offset(outer: (u32, u32), inner: (u32, u32), fx: f64, fy: f64) -> (u32, u32) {
    let cx = f64::from(outer.0) * fx - f64::from(inner.0) / 2.0;
    let cy = f64::from(outer.1) * fy - f64::from(inner.1) / 2.0;
    let max_x = f64::from(outer.0.saturating_sub(inner.0));
    let max_y = f64::from(outer.1.saturating_sub(inner.1));
    (cx.clamp(0.0, max_x).round() as u32, cy.clamp(0.0, max_y).round() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compass_offsets() {
        assert_eq!(Gravity::CENTER.offset((100, 50), (20, 10)), (40, 20));
        assert_eq!(Gravity::Fraction(1.0, 1.0).offset((100, 50), (20, 10)), (80, 40));
        assert_eq!(Gravity::Fraction(0.0, 0.0).offset((100, 50), (20, 10)), (0, 0));
        assert_eq!(Gravity::CENTER.offset((10, 10), (20, 20)), (0, 0));
    }

    #[test]
    fn focal_offsets_clamp_to_edges() {
        assert_eq!(focal_offset((100, 100), (20, 20), 0.5, 0.5), (40, 40));
        assert_eq!(focal_offset((100, 100), (20, 20), 0.0, 1.0), (0, 80));
        assert_eq!(focal_offset((100, 100), (20, 20), 0.75, 0.25), (65, 15));
    }
}
