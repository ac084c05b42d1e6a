//! `watermark`: overlay a logo (any decodable image, usually PNG/WebP with alpha) at a gravity
//! position with an inward offset, optionally scaled relative to the base width, with an
//! opacity, or tiled over the whole image with spacing and an angle. Only the pixels under the
//! logo are touched.

use image::{DynamicImage, RgbaImage};

use super::geometry::{Gravity, OVERLAY_GRAVITY, OVERLAY_X, OVERLAY_Y};
use super::resize::{Kernel, resample};
use super::rotate::Rotate;
use crate::Limits;
use crate::color::Color;
use crate::error::Result;
use crate::params::{Args, OpSpec, boolean, float, int, text};
use crate::raster;

pub static SPEC: OpSpec = OpSpec {
    name: "watermark",
    doc: "Overlay a logo image at a position, or tiled, with opacity.",
    params: &[
        text("image", 1024, None, "Name of the logo input (the CLI reads it as a file path). Required."),
        OVERLAY_GRAVITY,
        OVERLAY_X,
        OVERLAY_Y,
        float("scale", 0.001, 1.0, None, "Logo width as a fraction of the base width (default: logo's own size)."),
        float("opacity", 0.0, 1.0, Some("1.0"), "Multiplies the logo's alpha."),
        boolean("tile", "false", "Repeat the logo over the whole image."),
        int("spacing", 0, 10_000, Some("0"), "Gap between tiles in pixels."),
        float("angle", -360.0, 360.0, Some("0"), "Rotation of each tile in degrees (tile=true)."),
    ],
};

#[derive(Debug, Clone, PartialEq)]
pub struct Watermark {
    pub image: String,
    pub gravity: Gravity,
    pub offset: (i64, i64),
    pub scale: Option<f64>,
    pub opacity: f64,
    pub tile: bool,
    pub spacing: u32,
    pub angle: f64,
}

impl Watermark {
    pub fn from_args(a: &Args) -> Result<Self> {
        let image = a.text("image").ok_or_else(|| a.invalid("image", "required"))?.to_owned();
        if a.given("angle") && !a.boolean("tile") {
            return Err(a.invalid("angle", "only tiles are rotated; add tile=true or rotate the logo file"));
        }
        Ok(Watermark {
            image,
            gravity: Gravity::from_args(a)?,
            offset: (a.int("x").unwrap_or(0), a.int("y").unwrap_or(0)),
            scale: a.float("scale"),
            opacity: a.float("opacity").unwrap_or(1.0),
            tile: a.boolean("tile"),
            spacing: a.u32("spacing").unwrap_or(0),
            angle: a.float("angle").unwrap_or(0.0),
        })
    }

    /// Prepares the logo for a base of `base_w` pixels: scale, then rotation for tiles.
    fn prepare_logo(&self, logo: &DynamicImage, base_w: u32, limits: &Limits) -> Result<RgbaImage> {
        let mut logo = DynamicImage::ImageRgba8(logo.to_rgba8());
        if let Some(s) = self.scale {
            let w = ((f64::from(base_w) * s).round() as u32).max(1);
            let h = ((f64::from(logo.height()) * f64::from(w) / f64::from(logo.width())).round() as u32).max(1);
            limits.check_output(w, h)?;
            let full = (0.0, 0.0, f64::from(logo.width()), f64::from(logo.height()));
            logo = resample(&logo, full, (w, h), Kernel::Lanczos3)?;
        }
        if self.tile && self.angle.rem_euclid(360.0) != 0.0 {
            logo = Rotate { degrees: self.angle.rem_euclid(360.0), background: Some(Color::TRANSPARENT) }
                .apply(logo, limits)?;
        }
        Ok(logo.to_rgba8())
    }

    pub fn apply(&self, base: DynamicImage, logo: &DynamicImage, limits: &Limits) -> Result<DynamicImage> {
        let (bw, bh) = (base.width(), base.height());
        let logo = self.prepare_logo(logo, bw, limits)?;
        let (lw, lh) = logo.dimensions();
        let alpha = (self.opacity * 256.0).round() as u32;
        let ch = raster::channels(&base);
        let mut px = base.into_bytes();
        let mut place = |x: i64, y: i64| blend(&mut px, (bw, bh), ch, &logo, x, y, alpha);
        if self.tile {
            let step_x = i64::from(lw + self.spacing);
            let step_y = i64::from(lh + self.spacing);
            let mut y = i64::from(self.spacing / 2);
            while y < i64::from(bh) {
                let mut x = i64::from(self.spacing / 2);
                while x < i64::from(bw) {
                    place(x, y);
                    x += step_x;
                }
                y += step_y;
            }
        } else {
            let (ox, oy) = self.gravity.offset((bw, bh), (lw, lh));
            let (fx, fy) = match self.gravity {
                Gravity::Fraction(fx, fy) => (fx, fy),
                _ => (0.5, 0.5),
            };
            // Offsets push away from the anchored edge: right/bottom anchors move left/up.
            let dir = |f: f64| if f > 0.75 { -1 } else { 1 };
            place(i64::from(ox) + dir(fx) * self.offset.0, i64::from(oy) + dir(fy) * self.offset.1);
        }
        Ok(raster::from_raw(bw, bh, ch, px))
    }
}

/// Source-over blend of `logo` (alpha scaled by `alpha`/256) at (`x`, `y`), clipped to the base.
fn blend(base: &mut [u8], (bw, bh): (u32, u32), ch: usize, logo: &RgbaImage, x: i64, y: i64, alpha: u32) {
    let (lw, lh) = (i64::from(logo.width()), i64::from(logo.height()));
    let x0 = x.max(0);
    let y0 = y.max(0);
    let x1 = (x + lw).min(i64::from(bw));
    let y1 = (y + lh).min(i64::from(bh));
    if x0 >= x1 || y0 >= y1 {
        return;
    }
    let lraw = logo.as_raw();
    for by in y0..y1 {
        let ly = (by - y) as usize;
        let brow = by as usize * bw as usize * ch;
        let lrow = ly * lw as usize * 4;
        for bx in x0..x1 {
            let lx = (bx - x) as usize;
            let l = &lraw[lrow + lx * 4..lrow + lx * 4 + 4];
            let a = u32::from(l[3]) * alpha / 256; // 0..=255
            if a == 0 {
                continue;
            }
            let o = brow + bx as usize * ch;
            let b = &mut base[o..o + ch];
            if ch == 3 {
                for c in 0..3 {
                    b[c] = ((u32::from(l[c]) * a + u32::from(b[c]) * (255 - a) + 127) / 255) as u8;
                }
            } else {
                // Straight-alpha source-over onto a straight-alpha base.
                let ba = u32::from(b[3]);
                let out_a = a * 255 + ba * (255 - a); // scaled by 255
                if out_a == 0 {
                    continue;
                }
                for c in 0..3 {
                    let v = (u32::from(l[c]) * a * 255 + u32::from(b[c]) * ba * (255 - a)) / out_a;
                    b[c] = v.min(255) as u8;
                }
                b[3] = ((out_a + 127) / 255) as u8;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wm(pairs: &[(&str, &str)]) -> Watermark {
        Watermark::from_args(&Args::parse(&SPEC, pairs.iter().copied()).unwrap()).unwrap()
    }

    fn logo() -> DynamicImage {
        raster::canvas(10, 4, Color([255, 0, 0, 255]), true)
    }

    #[test]
    fn placed_at_gravity_with_inward_offset_and_opacity() {
        let base = raster::canvas(100, 50, Color::WHITE, false);
        let out = wm(&[("image", "l"), ("x", "5"), ("y", "2"), ("opacity", "0.5")])
            .apply(base, &logo(), &Limits::default())
            .unwrap()
            .to_rgb8();
        // southeast, 5 px in from the right and 2 from the bottom: x 85..95, y 44..48.
        let p = out.get_pixel(90, 46).0;
        assert!(p[0] == 255 && (125..=130).contains(&p[1]), "half-opaque red over white: {p:?}");
        assert_eq!(out.get_pixel(96, 46).0, [255, 255, 255]);
        assert_eq!(out.get_pixel(90, 49).0, [255, 255, 255]);
        assert_eq!(out.get_pixel(84, 46).0, [255, 255, 255]);
    }

    #[test]
    fn scale_is_relative_to_the_base_width_and_tiles_cover() {
        let base = raster::canvas(200, 100, Color::WHITE, false);
        let out = wm(&[("image", "l"), ("scale", "0.25"), ("gravity", "northwest")])
            .apply(base.clone(), &logo(), &Limits::default())
            .unwrap()
            .to_rgb8();
        assert_eq!(out.get_pixel(49, 0).0, [255, 0, 0]);
        assert_eq!(out.get_pixel(51, 0).0, [255, 255, 255]);
        let tiled = wm(&[("image", "l"), ("tile", "true"), ("spacing", "10")])
            .apply(base, &logo(), &Limits::default())
            .unwrap()
            .to_rgb8();
        let red = tiled.pixels().filter(|p| p.0 == [255, 0, 0]).count();
        assert!(red > 200 * 100 / 8, "tiles cover the image: {red} red pixels");
    }

    #[test]
    fn transparent_base_keeps_alpha_right() {
        let base = raster::canvas(20, 20, Color::TRANSPARENT, true);
        let out =
            wm(&[("image", "l"), ("gravity", "center")]).apply(base, &logo(), &Limits::default()).unwrap().to_rgba8();
        assert_eq!(out.get_pixel(10, 10).0, [255, 0, 0, 255]);
        assert_eq!(out.get_pixel(0, 0).0[3], 0);
    }

    #[test]
    fn angle_without_tile_is_rejected() {
        let a = Args::parse(&SPEC, [("image", "l"), ("angle", "30")]).unwrap();
        assert!(Watermark::from_args(&a).is_err());
    }
}
