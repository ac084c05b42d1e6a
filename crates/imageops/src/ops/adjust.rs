//! `adjust` (brightness, contrast, saturation, gamma, auto-level) and `enhance` (auto-level with
//! a touch of saturation). Tone changes are folded into one 256-entry lookup table so the whole
//! adjustment is a single pass over the pixels.

use image::DynamicImage;

use crate::error::Result;
use crate::params::{Args, OpSpec, boolean, float};
use crate::raster;

pub static SPEC: OpSpec = OpSpec {
    name: "adjust",
    doc: "Tone and colour: brightness, contrast, saturation and gamma multipliers, optional auto-level.",
    params: &[
        float("brightness", 0.0, 10.0, Some("1.0"), "Multiplier on every channel (1 = unchanged)."),
        float("contrast", 0.0, 10.0, Some("1.0"), "Multiplier on the distance from mid-grey (1 = unchanged)."),
        float("saturation", 0.0, 10.0, Some("1.0"), "0 = greyscale, 1 = unchanged, >1 = more colourful."),
        float("gamma", 0.1, 10.0, Some("1.0"), "Gamma correction (>1 brightens mid-tones)."),
        boolean("auto_level", "false", "Stretch the 0.5%..99.5% luma range to full scale first."),
    ],
};

pub static ENHANCE: OpSpec =
    OpSpec { name: "enhance", doc: "One-click enhancement: auto-level plus saturation 1.1.", params: &[] };

#[derive(Debug, Clone, PartialEq)]
pub struct Adjust {
    pub brightness: f64,
    pub contrast: f64,
    pub saturation: f64,
    pub gamma: f64,
    pub auto_level: bool,
}

impl Adjust {
    pub const ENHANCE: Adjust =
        Adjust { brightness: 1.0, contrast: 1.0, saturation: 1.1, gamma: 1.0, auto_level: true };

    pub fn from_args(a: &Args) -> Result<Self> {
        Ok(Adjust {
            brightness: a.float("brightness").unwrap_or(1.0),
            contrast: a.float("contrast").unwrap_or(1.0),
            saturation: a.float("saturation").unwrap_or(1.0),
            gamma: a.float("gamma").unwrap_or(1.0),
            auto_level: a.boolean("auto_level"),
        })
    }

    fn lut(&self, low: f64, high: f64) -> [u8; 256] {
        let mut lut = [0u8; 256];
        let span = (high - low).max(1.0);
        for (i, v) in lut.iter_mut().enumerate() {
            let mut x = (i as f64 - low) / span * 255.0;
            x = x.clamp(0.0, 255.0) * self.brightness;
            x = (x - 128.0) * self.contrast + 128.0;
            x = 255.0 * (x.clamp(0.0, 255.0) / 255.0).powf(1.0 / self.gamma);
            *v = x.round().clamp(0.0, 255.0) as u8;
        }
        lut
    }

    pub fn apply(&self, img: DynamicImage) -> DynamicImage {
        let ch = raster::channels(&img);
        let (w, h) = (img.width(), img.height());
        let (low, high) = if self.auto_level { luma_percentiles(img.as_bytes(), ch) } else { (0.0, 255.0) };
        let lut = self.lut(low, high);
        let sat = self.saturation;
        let mut px = img.into_bytes();
        for p in px.chunks_exact_mut(ch) {
            let mut rgb = [lut[p[0] as usize], lut[p[1] as usize], lut[p[2] as usize]];
            if sat != 1.0 {
                let l = 0.299 * f64::from(rgb[0]) + 0.587 * f64::from(rgb[1]) + 0.114 * f64::from(rgb[2]);
                for c in &mut rgb {
                    *c = (l + sat * (f64::from(*c) - l)).round().clamp(0.0, 255.0) as u8;
                }
            }
            p[..3].copy_from_slice(&rgb);
        }
        raster::from_raw(w, h, ch, px)
    }
}

/// The 0.5th and 99.5th percentile of luma, the range auto-level stretches.
fn luma_percentiles(px: &[u8], ch: usize) -> (f64, f64) {
    let mut hist = [0u64; 256];
    for p in px.chunks_exact(ch) {
        let l = (u32::from(p[0]) * 299 + u32::from(p[1]) * 587 + u32::from(p[2]) * 114) / 1000;
        hist[l as usize] += 1;
    }
    let total: u64 = hist.iter().sum();
    let cut = total / 200;
    let mut acc = 0;
    let low = hist.iter().position(|&n| {
        acc += n;
        acc > cut
    });
    acc = 0;
    let high = hist.iter().rposition(|&n| {
        acc += n;
        acc > cut
    });
    match (low, high) {
        (Some(l), Some(h)) if h > l => (l as f64, h as f64),
        _ => (0.0, 255.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::color::Color;

    const IDENTITY: Adjust = Adjust { brightness: 1.0, contrast: 1.0, saturation: 1.0, gamma: 1.0, auto_level: false };

    #[test]
    fn identity_is_lossless() {
        let img = raster::canvas(4, 4, Color([10, 120, 250, 255]), false);
        assert_eq!(IDENTITY.apply(img.clone()).as_bytes(), img.as_bytes());
    }

    #[test]
    fn each_knob_moves_pixels_the_right_way() {
        let img = raster::canvas(2, 2, Color([100, 150, 200, 255]), false);
        let px = |a: Adjust| a.apply(img.clone()).to_rgb8().get_pixel(0, 0).0;
        assert_eq!(px(Adjust { brightness: 0.5, ..IDENTITY }), [50, 75, 100]);
        assert_eq!(px(Adjust { saturation: 0.0, ..IDENTITY }), [141, 141, 141]);
        let c = px(Adjust { contrast: 2.0, ..IDENTITY });
        assert!(c[0] < 100 && c[2] > 200);
        assert!(px(Adjust { gamma: 2.0, ..IDENTITY })[0] > 100);
    }

    #[test]
    fn auto_level_stretches_a_dull_range() {
        let mut im = image::RgbImage::new(100, 1);
        for (x, _, p) in im.enumerate_pixels_mut() {
            let v = 100 + (x as u8) / 2; // 100..149
            *p = image::Rgb([v, v, v]);
        }
        let out = Adjust { auto_level: true, ..IDENTITY }.apply(DynamicImage::ImageRgb8(im)).to_rgb8();
        assert!(out.get_pixel(0, 0)[0] < 10);
        assert!(out.get_pixel(99, 0)[0] > 245);
    }
}
