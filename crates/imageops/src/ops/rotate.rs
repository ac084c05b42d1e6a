//! `rotate` (exact quarter turns by pixel transposition; any other angle by bilinear resampling
//! onto an enlarged canvas with a background colour), `flip` (top-bottom) and `flop`
//! (left-right).

use image::{DynamicImage, Rgb, Rgba};
use imageproc::geometric_transformations::{Border, Interpolation, rotate_about_center_no_crop};

use crate::Limits;
use crate::color::Color;
use crate::error::Result;
use crate::params::{Args, OpSpec, color, float};

pub static SPEC: OpSpec = OpSpec {
    name: "rotate",
    doc: "Rotate clockwise by an angle in degrees; quarter turns are lossless, other angles enlarge the canvas.",
    params: &[
        float("angle", -360.0, 360.0, None, "Clockwise angle in degrees (required)."),
        color("background", None, "Fill for uncovered corners (default white, or transparent with alpha)."),
    ],
};

pub static FLIP: OpSpec = OpSpec { name: "flip", doc: "Mirror top to bottom.", params: &[] };
pub static FLOP: OpSpec = OpSpec { name: "flop", doc: "Mirror left to right.", params: &[] };

#[derive(Debug, Clone, PartialEq)]
pub struct Rotate {
    pub degrees: f64,
    pub background: Option<Color>,
}

impl Rotate {
    pub fn from_args(a: &Args) -> Result<Self> {
        let degrees = a.float("angle").ok_or_else(|| a.invalid("angle", "required"))?;
        Ok(Rotate { degrees: degrees.rem_euclid(360.0), background: a.color("background") })
    }

    /// Output size without allocating anything.
    pub fn output_size(&self, w: u32, h: u32) -> (u32, u32) {
        match self.quarter_turns() {
            Some(0 | 2) => (w, h),
            Some(_) => (h, w),
            None => {
                let t = self.degrees.to_radians();
                let (s, c) = (t.sin().abs(), t.cos().abs());
                let nw = (f64::from(h) * s + f64::from(w) * c).ceil() as u32;
                let nh = (f64::from(h) * c + f64::from(w) * s).ceil() as u32;
                (nw.max(1), nh.max(1))
            }
        }
    }

    fn quarter_turns(&self) -> Option<u32> {
        let q = self.degrees / 90.0;
        ((q - q.round()).abs() < 1e-9).then(|| (q.round() as u32) % 4)
    }

    pub fn apply(&self, img: DynamicImage, limits: &Limits) -> Result<DynamicImage> {
        let (nw, nh) = self.output_size(img.width(), img.height());
        limits.check_output(nw, nh)?;
        Ok(match self.quarter_turns() {
            Some(0) => img,
            Some(1) => crate::raster::rotate_quarter(&img, true),
            Some(2) => img.rotate180(),
            Some(3) => crate::raster::rotate_quarter(&img, false),
            _ => self.free_rotate(img),
        })
    }

    fn free_rotate(&self, img: DynamicImage) -> DynamicImage {
        let theta = self.degrees.to_radians() as f32;
        let has_alpha = img.color().has_alpha();
        let bg = self.background.unwrap_or(if has_alpha { Color::TRANSPARENT } else { Color::WHITE });
        if has_alpha || !bg.is_opaque() {
            let rgba = img.to_rgba8();
            DynamicImage::ImageRgba8(rotate_about_center_no_crop(
                &rgba,
                theta,
                Interpolation::Bilinear,
                Border::Constant(Rgba(bg.0)),
            ))
        } else {
            let rgb = img.to_rgb8();
            let [r, g, b, _] = bg.0;
            DynamicImage::ImageRgb8(rotate_about_center_no_crop(
                &rgb,
                theta,
                Interpolation::Bilinear,
                Border::Constant(Rgb([r, g, b])),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Args;

    fn rotate(angle: &str) -> Rotate {
        Rotate::from_args(&Args::parse(&SPEC, [("angle", angle)]).unwrap()).unwrap()
    }

    fn marked() -> DynamicImage {
        let mut im = image::RgbImage::from_pixel(40, 20, Rgb([0, 0, 0]));
        im.put_pixel(0, 0, Rgb([255, 0, 0]));
        DynamicImage::ImageRgb8(im)
    }

    #[test]
    fn quarter_turns_are_exact() {
        let l = Limits::default();
        let out = rotate("90").apply(marked(), &l).unwrap().to_rgb8();
        assert_eq!(out.dimensions(), (20, 40));
        assert_eq!(out.get_pixel(19, 0).0, [255, 0, 0], "top-left goes to top-right on a clockwise turn");
        let out = rotate("-90").apply(marked(), &l).unwrap().to_rgb8();
        assert_eq!(out.get_pixel(0, 39).0, [255, 0, 0]);
        let out = rotate("180").apply(marked(), &l).unwrap().to_rgb8();
        assert_eq!(out.get_pixel(39, 19).0, [255, 0, 0]);
        assert_eq!(rotate("360").apply(marked(), &l).unwrap().to_rgb8().get_pixel(0, 0).0, [255, 0, 0]);
    }

    #[test]
    fn free_angles_enlarge_the_canvas_and_fill_corners() {
        let r = rotate("45");
        let out = r.apply(marked(), &Limits::default()).unwrap().to_rgb8();
        assert_eq!(out.dimensions(), r.output_size(40, 20));
        assert_eq!(out.dimensions(), (43, 43));
        assert_eq!(out.get_pixel(0, 0).0, [255, 255, 255], "corner is background");
        assert_eq!(out.get_pixel(21, 21).0, [0, 0, 0], "centre is image");
    }
}
