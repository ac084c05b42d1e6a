//! Edges of the picture: `trim` (cut away a uniform border), `pad` (extend with a colour) and
//! `round` (rounded corners or a circle, as an alpha mask with anti-aliased edges).

use image::DynamicImage;

use crate::Limits;
use crate::color::Color;
use crate::error::Result;
use crate::params::{Args, OpSpec, boolean, color, int};
use crate::raster;

pub static TRIM: OpSpec = OpSpec {
    name: "trim",
    doc: "Remove borders that match the top-left pixel's colour.",
    params: &[int("threshold", 0, 255, Some("10"), "Largest per-channel difference still counted as border.")],
};

pub static PAD: OpSpec = OpSpec {
    name: "pad",
    doc: "Extend the canvas on each side with a colour (alias: extend).",
    params: &[
        int("all", 0, 10_000, None, "Same padding on every side."),
        int("top", 0, 10_000, None, "Pixels above."),
        int("right", 0, 10_000, None, "Pixels to the right."),
        int("bottom", 0, 10_000, None, "Pixels below."),
        int("left", 0, 10_000, None, "Pixels to the left."),
        color("color", None, "Fill (default white, or transparent with alpha)."),
    ],
};

pub static ROUND: OpSpec = OpSpec {
    name: "round",
    doc: "Round the corners (radius) or cut a circle/ellipse (circle=true); outside becomes transparent.",
    params: &[
        int("radius", 0, 65_535, Some("16"), "Corner radius in pixels."),
        boolean("circle", "false", "Cut the largest ellipse that fits instead."),
    ],
};

pub fn trim(img: DynamicImage, threshold: u8) -> DynamicImage {
    let ch = raster::channels(&img);
    let (w, h) = (img.width() as usize, img.height() as usize);
    let px = img.as_bytes();
    let bg: Vec<u8> = px[..ch].to_vec();
    let differs = |i: usize| px[i * ch..i * ch + ch].iter().zip(&bg).any(|(a, b)| a.abs_diff(*b) > threshold);
    let row_has = |y: usize| (0..w).any(|x| differs(y * w + x));
    let col_has = |x: usize, y0: usize, y1: usize| (y0..y1).any(|y| differs(y * w + x));
    let Some(top) = (0..h).find(|&y| row_has(y)) else {
        return img; // uniform image: nothing to keep apart from everything
    };
    let bottom = (0..h).rev().find(|&y| row_has(y)).unwrap_or(top) + 1;
    let left = (0..w).find(|&x| col_has(x, top, bottom)).unwrap_or(0);
    let right = (0..w).rev().find(|&x| col_has(x, top, bottom)).unwrap_or(w - 1) + 1;
    if (left, top, right, bottom) == (0, 0, w, h) {
        return img;
    }
    raster::crop(&img, left as u32, top as u32, (right - left) as u32, (bottom - top) as u32)
}

#[derive(Debug, Clone, PartialEq)]
pub struct Pad {
    pub top: u32,
    pub right: u32,
    pub bottom: u32,
    pub left: u32,
    pub color: Option<Color>,
}

impl Pad {
    pub fn from_args(a: &Args) -> Result<Self> {
        let all = a.u32("all").unwrap_or(0);
        let side = |n: &str| a.u32(n).unwrap_or(all);
        let p = Pad {
            top: side("top"),
            right: side("right"),
            bottom: side("bottom"),
            left: side("left"),
            color: a.color("color"),
        };
        if p.top + p.right + p.bottom + p.left == 0 {
            return Err(a.invalid("all", "give at least one non-zero side (all, top, right, bottom, left)"));
        }
        Ok(p)
    }

    pub fn apply(&self, img: DynamicImage, limits: &Limits) -> Result<DynamicImage> {
        let w = img.width() + self.left + self.right;
        let h = img.height() + self.top + self.bottom;
        limits.check_output(w, h)?;
        let has_alpha = img.color().has_alpha();
        let bg = self.color.unwrap_or(if has_alpha { Color::TRANSPARENT } else { Color::WHITE });
        let mut canvas = raster::canvas(w, h, bg, has_alpha);
        if raster::channels(&canvas) == 4 && !has_alpha {
            image::imageops::replace(
                &mut canvas,
                &DynamicImage::ImageRgba8(img.to_rgba8()),
                i64::from(self.left),
                i64::from(self.top),
            );
        } else {
            image::imageops::replace(&mut canvas, &img, i64::from(self.left), i64::from(self.top));
        }
        Ok(canvas)
    }
}

/// Applies a rounded-rectangle (or ellipse) alpha mask with 4x4 supersampled edges.
pub fn round(img: DynamicImage, radius: u32, circle: bool) -> DynamicImage {
    let mut rgba = img.to_rgba8();
    let (w, h) = rgba.dimensions();
    let (fw, fh) = (f64::from(w), f64::from(h));
    let (rx, ry) = if circle {
        (fw / 2.0, fh / 2.0)
    } else {
        let r = f64::from(radius).min(fw / 2.0).min(fh / 2.0);
        (r, r)
    };
    if rx <= 0.0 || ry <= 0.0 {
        return DynamicImage::ImageRgba8(rgba);
    }
    // Coverage of one sample point: inside unless in a corner square and outside its ellipse.
    let inside = |x: f64, y: f64| {
        let cx = if x < rx {
            rx
        } else if x > fw - rx {
            fw - rx
        } else {
            return true;
        };
        let cy = if y < ry {
            ry
        } else if y > fh - ry {
            fh - ry
        } else {
            return true;
        };
        let (dx, dy) = ((x - cx) / rx, (y - cy) / ry);
        dx * dx + dy * dy <= 1.0
    };
    let corner_w = rx.ceil() as u32;
    let corner_h = ry.ceil() as u32;
    for y in 0..h {
        let in_band_y = y < corner_h || y >= h.saturating_sub(corner_h);
        for x in 0..w {
            if !(in_band_y && (x < corner_w || x >= w.saturating_sub(corner_w))) {
                continue;
            }
            let mut hits = 0u32;
            for sy in 0..4 {
                for sx in 0..4 {
                    let px = f64::from(x) + (f64::from(sx) + 0.5) / 4.0;
                    let py = f64::from(y) + (f64::from(sy) + 0.5) / 4.0;
                    hits += u32::from(inside(px, py));
                }
            }
            let p = rgba.get_pixel_mut(x, y);
            p[3] = (u32::from(p[3]) * hits / 16) as u8;
        }
    }
    DynamicImage::ImageRgba8(rgba)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trim_removes_uniform_border() {
        let mut im = raster::canvas(50, 40, Color::WHITE, false).to_rgb8();
        for y in 10..20 {
            for x in 5..30 {
                im.put_pixel(x, y, image::Rgb([0, 0, 0]));
            }
        }
        let t = trim(DynamicImage::ImageRgb8(im), 10);
        assert_eq!((t.width(), t.height()), (25, 10));
        let flat = raster::canvas(8, 8, Color::WHITE, false);
        assert_eq!(trim(flat, 0).width(), 8);
    }

    #[test]
    fn pad_extends_each_side() {
        let img = raster::canvas(10, 10, Color::BLACK, false);
        let p = Pad { top: 1, right: 2, bottom: 3, left: 4, color: Some(Color::WHITE) }
            .apply(img, &Limits::default())
            .unwrap()
            .to_rgb8();
        assert_eq!(p.dimensions(), (16, 14));
        assert_eq!(p.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(p.get_pixel(4, 1).0, [0, 0, 0]);
        let img = raster::canvas(10, 10, Color::BLACK, false);
        let p = Pad { top: 2, right: 0, bottom: 0, left: 0, color: Some(Color::TRANSPARENT) }
            .apply(img, &Limits::default())
            .unwrap();
        assert_eq!(p.to_rgba8().get_pixel(0, 0)[3], 0);
        assert_eq!(p.to_rgba8().get_pixel(5, 5).0, [0, 0, 0, 255]);
    }

    #[test]
    fn round_masks_corners_only() {
        let r = round(raster::canvas(40, 40, Color::BLACK, false), 10, false).to_rgba8();
        assert_eq!(r.get_pixel(0, 0)[3], 0);
        assert_eq!(r.get_pixel(20, 0)[3], 255);
        assert_eq!(r.get_pixel(20, 20)[3], 255);
        let c = round(raster::canvas(40, 20, Color::BLACK, false), 0, true).to_rgba8();
        assert_eq!(c.get_pixel(1, 1)[3], 0);
        assert_eq!(c.get_pixel(20, 10)[3], 255);
        let partial = c.pixels().filter(|p| p[3] > 0 && p[3] < 255).count();
        assert!(partial > 20, "anti-aliased edge, {partial} partial pixels");
    }
}
