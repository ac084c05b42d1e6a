//! Neighbourhood filters: `blur` (Gaussian), `sharpen` (unsharp mask) and `pixelate` (block
//! averaging, optionally inside a rectangle, for redaction).

use image::DynamicImage;

use super::resize::{Kernel, resample};
use crate::error::Result;
use crate::params::{Args, OpSpec, float, int};
use crate::raster;

pub static BLUR: OpSpec = OpSpec {
    name: "blur",
    doc: "Gaussian blur.",
    params: &[float("sigma", 0.3, 250.0, None, "Standard deviation in pixels (required).")],
};

pub static SHARPEN: OpSpec = OpSpec {
    name: "sharpen",
    doc: "Unsharp mask: adds back the difference between the image and a blurred copy.",
    params: &[
        float("sigma", 0.3, 50.0, Some("1.0"), "Radius of the blur used as the mask."),
        float("amount", 0.0, 10.0, Some("1.0"), "Strength: 1 adds the full difference."),
        int("threshold", 0, 255, Some("0"), "Ignore differences at or below this (protects flat areas)."),
    ],
};

pub static PIXELATE: OpSpec = OpSpec {
    name: "pixelate",
    doc: "Replace pixels by block averages (whole image, or the x/y/width/height rectangle).",
    params: &[
        int("size", 2, 4096, Some("10"), "Block size in pixels."),
        int("x", 0, 65_535, None, "Left of the region (with y, width, height)."),
        int("y", 0, 65_535, None, "Top of the region."),
        int("width", 1, 65_535, None, "Width of the region."),
        int("height", 1, 65_535, None, "Height of the region."),
    ],
};

/// Gaussian blur with libblur's fixed-point separable SIMD convolution, single-threaded,
/// edges clamped. Colour is premultiplied by alpha around the blur so transparent pixels do
/// not bleed their (invisible) colour into visible ones.
/// Kernel taps one blur may take, per output pixel the limits allow: 1000 x the default 50 MP
/// is 5e10 taps, about 5 s of libblur's fixed-point kernel on one core. A 12 MP photo takes
/// any sigma up to 250; a 100 MP one up to about 40. Blur a smaller copy for stronger blurs.
const BLUR_TAPS_PER_OUTPUT_PIXEL: u64 = 1000;

/// Refuses a blur of `sigma` over a `w` x `h` image whose cost (pixels x kernel width x two
/// passes) exceeds the budget, before any work: libblur's time grows with the kernel.
pub fn check_blur_cost(w: u32, h: u32, sigma: f32, limits: &crate::Limits) -> crate::Result<()> {
    // libblur's kernel spans about three deviations each way.
    let taps = 2 * (3.0 * f64::from(sigma)).ceil().max(1.0) as u64 + 1;
    let work = u64::from(w).saturating_mul(u64::from(h)).saturating_mul(taps).saturating_mul(2);
    let max = limits.max_output_pixels.saturating_mul(BLUR_TAPS_PER_OUTPUT_PIXEL);
    if work > max {
        return Err(crate::Error::LimitExceeded { limit: crate::LimitKind::BlurWork, max, actual: work });
    }
    Ok(())
}

pub fn blur(img: &DynamicImage, sigma: f32) -> DynamicImage {
    use libblur::{BlurImage, BlurImageMut, ConvolutionMode, EdgeMode, FastBlurChannels, GaussianBlurParams};
    let ch = raster::channels(img);
    let (w, h) = (img.width(), img.height());
    let premultiply = ch == 4 && !raster::is_opaque(img);
    let mut premultiplied = Vec::new();
    if premultiply {
        premultiplied = img.as_bytes().to_vec();
        for p in premultiplied.chunks_exact_mut(4) {
            let a = u32::from(p[3]);
            for c in &mut p[..3] {
                *c = ((u32::from(*c) * a + 127) / 255) as u8;
            }
        }
    }
    let px: &[u8] = if premultiply { &premultiplied } else { img.as_bytes() };
    let channels = if ch == 4 { FastBlurChannels::Channels4 } else { FastBlurChannels::Channels3 };
    let mut out = vec![0u8; px.len()];
    let src = BlurImage::borrow(px, w, h, channels);
    let mut dst = BlurImageMut::borrow(&mut out, w, h, channels);
    let params = GaussianBlurParams::new_from_sigma(f64::from(sigma));
    let blurred = libblur::gaussian_blur(
        &src,
        &mut dst,
        params,
        EdgeMode::Clamp.as_2d(),
        libblur::ThreadingPolicy::Single,
        ConvolutionMode::FixedPoint,
    );
    drop(dst);
    if blurred.is_err() {
        // Only reachable for geometry libblur refuses (e.g. a kernel wider than a 1-px image):
        // an image too small to blur is returned as it is.
        out = px.to_vec();
    }
    if premultiply {
        for p in out.chunks_exact_mut(4) {
            let a = u32::from(p[3]);
            for c in &mut p[..3] {
                if let Some(v) = (u32::from(*c) * 255 + a / 2).checked_div(a) {
                    *c = v.min(255) as u8;
                }
            }
        }
    }
    raster::from_raw(w, h, ch, out)
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sharpen {
    pub sigma: f32,
    pub amount: f32,
    pub threshold: u8,
}

impl Sharpen {
    pub fn from_args(a: &Args) -> Result<Self> {
        Ok(Sharpen {
            sigma: a.float("sigma").unwrap_or(1.0) as f32,
            amount: a.float("amount").unwrap_or(1.0) as f32,
            threshold: a.u32("threshold").unwrap_or(0) as u8,
        })
    }

    pub fn apply(&self, img: DynamicImage) -> DynamicImage {
        let blurred = blur(&img, self.sigma);
        let ch = raster::channels(&img);
        let (w, h) = (img.width(), img.height());
        let mut out = img.into_bytes();
        for (i, (o, b)) in out.iter_mut().zip(blurred.as_bytes()).enumerate() {
            if ch == 4 && i % 4 == 3 {
                continue; // alpha is not sharpened
            }
            let diff = f32::from(*o) - f32::from(*b);
            if diff.abs() > f32::from(self.threshold) {
                *o = (f32::from(*o) + self.amount * diff).round().clamp(0.0, 255.0) as u8;
            }
        }
        raster::from_raw(w, h, ch, out)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Pixelate {
    pub size: u32,
    pub region: Option<(u32, u32, u32, u32)>,
}

impl Pixelate {
    pub fn from_args(a: &Args) -> Result<Self> {
        let region = match (a.u32("x"), a.u32("y"), a.u32("width"), a.u32("height")) {
            (Some(x), Some(y), Some(w), Some(h)) => Some((x, y, w, h)),
            (None, None, None, None) => None,
            _ => return Err(a.invalid("x", "a region needs all of x, y, width and height")),
        };
        Ok(Pixelate { size: a.u32("size").unwrap_or(10), region })
    }

    pub fn apply(&self, mut img: DynamicImage) -> Result<DynamicImage> {
        let (w, h) = (img.width(), img.height());
        let (x, y, rw, rh) = self.region.unwrap_or((0, 0, w, h));
        if x >= w || y >= h {
            return Err(crate::Error::bad("pixelate", "x", format!("region starts outside the {w}x{h} image")));
        }
        let (rw, rh) = (rw.min(w - x), rh.min(h - y));
        let small = (rw.div_ceil(self.size), rh.div_ceil(self.size));
        let area = (f64::from(x), f64::from(y), f64::from(rw), f64::from(rh));
        let averaged = resample(&img, area, small, Kernel::Bilinear)?;
        let blocks =
            resample(&averaged, (0.0, 0.0, f64::from(small.0), f64::from(small.1)), (rw, rh), Kernel::Nearest)?;
        if (x, y, rw, rh) == (0, 0, w, h) {
            return Ok(blocks);
        }
        image::imageops::replace(&mut img, &blocks, i64::from(x), i64::from(y));
        Ok(img)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::color::Color;

    fn stripes() -> DynamicImage {
        let mut im = image::RgbImage::new(64, 64);
        for (x, _, p) in im.enumerate_pixels_mut() {
            *p = image::Rgb(if x % 2 == 0 { [0, 0, 0] } else { [255, 255, 255] });
        }
        DynamicImage::ImageRgb8(im)
    }

    /// Max - min luma away from the borders (edges are clamped, not wrapped).
    fn spread(img: &DynamicImage) -> u8 {
        let b = img.to_luma8();
        let inner = b.enumerate_pixels().filter(|(x, y, _)| (8..56).contains(x) && (8..56).contains(y));
        let (mn, mx) = inner.fold((255u8, 0u8), |(mn, mx), (_, _, p)| (mn.min(p[0]), mx.max(p[0])));
        mx - mn
    }

    #[test]
    fn blur_smooths_stripes_at_both_sigma_paths() {
        assert!(spread(&blur(&stripes(), 1.0)) < 120);
        assert!(spread(&blur(&stripes(), 5.0)) < 30);
    }

    #[test]
    fn blurs_whose_kernel_work_is_past_the_budget_are_refused_before_running() {
        let limits = crate::Limits::default();
        // A 12 MP photo takes the strongest blur; 100 MP only a moderate one.
        assert!(check_blur_cost(4000, 3000, 250.0, &limits).is_ok());
        assert!(check_blur_cost(10_000, 10_000, 40.0, &limits).is_ok());
        let e = check_blur_cost(10_000, 10_000, 250.0, &limits).unwrap_err();
        assert_eq!(e.code(), "limit_exceeded");
        assert!(e.to_string().contains("blur_work"), "{e}");
        // The check runs in the operation, before the image is touched.
        let small = crate::Limits { max_output_pixels: 1000, ..crate::Limits::default() };
        let img = DynamicImage::ImageRgb8(image::RgbImage::new(100, 100));
        let none = std::collections::BTreeMap::new();
        let cx = crate::ops::Context { limits: small, images: &none, raw: None, deadline: None };
        assert!(crate::ops::Op::Blur { sigma: 10.0 }.apply(img.clone(), &cx).is_err());
        let sharpen = crate::ops::Op::Sharpen(Sharpen { sigma: 10.0, amount: 1.0, threshold: 0 });
        assert!(sharpen.apply(img, &cx).is_err());
    }

    #[test]
    fn blur_handles_tiny_and_transparent_images() {
        let one = raster::canvas(1, 1, Color([9, 8, 7, 255]), false);
        assert_eq!(blur(&one, 5.0).as_bytes(), &[9, 8, 7]);
        // Half transparent red, half opaque blue: the blurred edge must not turn black.
        let mut im = image::RgbaImage::new(32, 8);
        for (x, _, p) in im.enumerate_pixels_mut() {
            *p = if x < 16 { image::Rgba([255, 0, 0, 0]) } else { image::Rgba([0, 0, 255, 255]) };
        }
        let out = blur(&DynamicImage::ImageRgba8(im), 2.0).to_rgba8();
        let edge = out.get_pixel(15, 4);
        assert!(edge[3] > 0 && edge[3] < 255 && edge[2] > 200 && edge[0] < 60, "{edge:?}");
    }

    #[test]
    fn sharpen_increases_edge_contrast() {
        let mut im = raster::canvas(32, 8, Color([100, 100, 100, 255]), false).to_rgb8();
        for y in 0..8 {
            for x in 16..32 {
                im.put_pixel(x, y, image::Rgb([150, 150, 150]));
            }
        }
        let s = Sharpen { sigma: 1.0, amount: 1.0, threshold: 0 }.apply(DynamicImage::ImageRgb8(im)).to_rgb8();
        assert!(s.get_pixel(15, 4)[0] < 100 && s.get_pixel(16, 4)[0] > 150);
        assert_eq!(s.get_pixel(2, 4)[0], 100, "flat areas stay put");
    }

    #[test]
    fn pixelate_region_only() {
        let p = Pixelate { size: 8, region: Some((0, 0, 32, 32)) }.apply(stripes()).unwrap();
        let rgb = p.to_rgb8();
        let v = rgb.get_pixel(3, 3)[0];
        assert!((100..=155).contains(&v), "block average, got {v}");
        assert_eq!(rgb.get_pixel(40, 40)[0], 0, "outside the region untouched");
        assert!(Pixelate { size: 8, region: Some((99, 0, 5, 5)) }.apply(stripes()).is_err());
    }
}
