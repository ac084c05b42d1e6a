//! `crop`: an explicit rectangle, a target size placed by gravity (compass or focal point), or
//! `gravity=smart`, which keeps the window with the most detail (edge energy plus colourfulness,
//! measured on a small luma copy so it costs little on large images).

use image::DynamicImage;

use super::geometry::{GRAVITY_VALUES, Gravity};
use crate::error::Result;
use crate::params::{Args, OpSpec, choice, float, int};
use crate::raster;

pub static SPEC: OpSpec = OpSpec {
    name: "crop",
    doc: "Cut out a rectangle (x, y, width, height), or a width x height box placed by gravity (compass, focal point or smart).",
    params: &[
        int("x", 0, 65_535, None, "Left edge of the rectangle; with y, selects rectangle mode."),
        int("y", 0, 65_535, None, "Top edge of the rectangle."),
        int("width", 1, 65_535, None, "Width of the box (required)."),
        int("height", 1, 65_535, None, "Height of the box (required)."),
        choice(
            "gravity",
            GRAVITY_VALUES,
            Some("center"),
            "Where the box sits when x/y are not given; smart = most detailed region.",
        ),
        float("fx", 0.0, 1.0, None, "Focal point x (fraction of width) for gravity=focal."),
        float("fy", 0.0, 1.0, None, "Focal point y (fraction of height) for gravity=focal."),
    ],
};

#[derive(Debug, Clone, PartialEq)]
pub struct Crop {
    pub at: Option<(u32, u32)>,
    pub size: (u32, u32),
    pub gravity: Gravity,
}

impl Crop {
    pub fn from_args(a: &Args) -> Result<Self> {
        let size = (a.require_u32("width")?, a.require_u32("height")?);
        let at = match (a.u32("x"), a.u32("y")) {
            (Some(x), Some(y)) => Some((x, y)),
            (None, None) => None,
            _ => return Err(a.invalid("x", "give both x and y, or neither")),
        };
        if at.is_some() && a.given("gravity") {
            return Err(a.invalid("gravity", "a rectangle (x, y) has no gravity"));
        }
        Ok(Crop { at, size, gravity: Gravity::from_args(a)? })
    }

    /// The rectangle to keep, clipped to the image. `None` when it lies entirely outside.
    pub fn rect(&self, img: &DynamicImage) -> Option<(u32, u32, u32, u32)> {
        if self.at.is_none() && self.gravity == Gravity::Smart {
            let (cw, ch) = (self.size.0.min(img.width()), self.size.1.min(img.height()));
            let (x, y) = smart_offset(img, (cw, ch));
            return Some((x, y, cw, ch));
        }
        self.rect_in(img.width(), img.height())
    }

    /// The rectangle for an image of `w x h`, known without pixels (`None` for smart crops,
    /// which need them, and for rectangles entirely outside).
    pub fn rect_in(&self, w: u32, h: u32) -> Option<(u32, u32, u32, u32)> {
        let (cw, ch) = (self.size.0.min(w), self.size.1.min(h));
        match (self.at, self.gravity) {
            (Some((x, y)), _) if x >= w || y >= h => None,
            (Some((x, y)), _) => Some((x, y, self.size.0.min(w - x), self.size.1.min(h - y))),
            (None, Gravity::Smart) => None,
            (None, g) => {
                let (x, y) = g.offset((w, h), (cw, ch));
                Some((x, y, cw, ch))
            }
        }
    }

    pub fn apply(&self, img: DynamicImage) -> Result<DynamicImage> {
        let Some((x, y, w, h)) = self.rect(&img) else {
            return Err(crate::Error::bad(
                "crop",
                "x",
                format!("rectangle starts outside the {}x{} image", img.width(), img.height()),
            ));
        };
        if (x, y, w, h) == (0, 0, img.width(), img.height()) {
            return Ok(img);
        }
        Ok(raster::crop(&img, x, y, w, h))
    }
}

/// Finds the `win`-sized window with the most detail. Works on a luma copy at most 256 px wide,
/// with a summed-area table so every candidate window costs O(1).
fn smart_offset(img: &DynamicImage, win: (u32, u32)) -> (u32, u32) {
    let (w, h) = (img.width(), img.height());
    if win.0 >= w && win.1 >= h {
        return (0, 0);
    }
    let factor = (f64::from(w.max(h)) / 256.0).max(1.0);
    let (sw, sh) = (((f64::from(w) / factor) as u32).max(1), ((f64::from(h) / factor) as u32).max(1));
    let small = if factor > 1.0 {
        super::resize::resample(img, (0.0, 0.0, f64::from(w), f64::from(h)), (sw, sh), super::resize::Kernel::Bilinear)
            .unwrap_or_else(|_| img.clone())
    } else {
        img.clone()
    };
    let (sw, sh) = (small.width() as usize, small.height() as usize);
    let rgb = small.to_rgb8();
    let luma: Vec<i32> =
        rgb.pixels().map(|p| (i32::from(p[0]) * 299 + i32::from(p[1]) * 587 + i32::from(p[2]) * 114) / 1000).collect();
    // Score: gradient magnitude + saturation (skin and subjects are usually more colourful).
    let mut score = vec![0u64; sw * sh];
    for y in 0..sh {
        for x in 0..sw {
            let i = y * sw + x;
            let gx = if x + 1 < sw { (luma[i + 1] - luma[i]).abs() } else { 0 };
            let gy = if y + 1 < sh { (luma[i + sw] - luma[i]).abs() } else { 0 };
            let p = rgb.as_raw()[i * 3..i * 3 + 3].iter().map(|&v| i32::from(v));
            let (mx, mn) = p.fold((0, 255), |(mx, mn), v| (mx.max(v), mn.min(v)));
            score[i] = (gx + gy) as u64 * 2 + (mx - mn) as u64 / 2;
        }
    }
    // Summed-area table with a zero border.
    let mut sat = vec![0u64; (sw + 1) * (sh + 1)];
    for y in 0..sh {
        let mut row = 0u64;
        for x in 0..sw {
            row += score[y * sw + x];
            sat[(y + 1) * (sw + 1) + x + 1] = sat[y * (sw + 1) + x + 1] + row;
        }
    }
    let ww = ((f64::from(win.0) / factor).round() as usize).clamp(1, sw);
    let wh = ((f64::from(win.1) / factor).round() as usize).clamp(1, sh);
    let sum = |x: usize, y: usize| {
        let (x2, y2) = (x + ww, y + wh);
        sat[y2 * (sw + 1) + x2] + sat[y * (sw + 1) + x] - sat[y * (sw + 1) + x2] - sat[y2 * (sw + 1) + x]
    };
    let mut best = (i128::MIN, 0, 0);
    for y in 0..=(sh - wh) {
        for x in 0..=(sw - ww) {
            // Slight pull to the centre breaks ties on flat images.
            let dx = (x as i128 * 2 + ww as i128 - sw as i128).abs();
            let dy = (y as i128 * 2 + wh as i128 - sh as i128).abs();
            let s = i128::from(sum(x, y)) * 16 - dx - dy;
            if s > best.0 {
                best = (s, x, y);
            }
        }
    }
    let x = ((best.1 as f64 * factor).round() as u32).min(w - win.0);
    let y = ((best.2 as f64 * factor).round() as u32).min(h - win.1);
    (x, y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::color::Color;
    use crate::params::Args;

    fn crop(pairs: &[(&str, &str)]) -> Result<Crop> {
        Crop::from_args(&Args::parse(&SPEC, pairs.iter().copied())?)
    }

    #[test]
    fn rectangle_is_clipped_and_outside_is_an_error() {
        let img = raster::canvas(100, 50, Color::WHITE, false);
        let c = crop(&[("x", "90"), ("y", "40"), ("width", "20"), ("height", "20")]).unwrap();
        assert_eq!(c.rect(&img), Some((90, 40, 10, 10)));
        let c = crop(&[("x", "100"), ("y", "0"), ("width", "20"), ("height", "20")]).unwrap();
        assert_eq!(c.apply(img).unwrap_err().code(), "bad_parameter");
    }

    #[test]
    fn gravity_and_focal_placement() {
        let img = raster::canvas(100, 50, Color::WHITE, false);
        let c = crop(&[("width", "20"), ("height", "10"), ("gravity", "southeast")]).unwrap();
        assert_eq!(c.rect(&img), Some((80, 40, 20, 10)));
        let c = crop(&[("width", "20"), ("height", "10"), ("gravity", "focal"), ("fx", "0.1"), ("fy", "0.5")]).unwrap();
        assert_eq!(c.rect(&img), Some((0, 20, 20, 10)));
        assert!(crop(&[("width", "20"), ("height", "10"), ("gravity", "focal")]).is_err());
        assert!(crop(&[("x", "1"), ("width", "20"), ("height", "10")]).is_err());
    }

    #[test]
    fn smart_crop_finds_the_detailed_region() {
        // Flat grey image with a checkerboard patch in the bottom-right corner.
        let mut img = raster::canvas(400, 300, Color([128, 128, 128, 255]), false).to_rgb8();
        for y in 220..300 {
            for x in 300..400 {
                let v = if (x / 4 + y / 4) % 2 == 0 { 0 } else { 255 };
                img.put_pixel(x, y, image::Rgb([v, v / 2, 255 - v]));
            }
        }
        let c = crop(&[("width", "120"), ("height", "100"), ("gravity", "smart")]).unwrap();
        let (x, y, w, h) = c.rect(&DynamicImage::ImageRgb8(img)).unwrap();
        assert_eq!((w, h), (120, 100));
        assert!(x >= 260 && y >= 180, "smart crop at {x},{y} missed the detailed corner");
    }
}
