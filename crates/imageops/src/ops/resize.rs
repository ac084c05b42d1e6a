//! `resize`: scale to a width and/or height or by a factor, with the five fit modes users know
//! from sharp and CSS (`inside`, `cover`, `contain`, `fill`, `outside`), on fast_image_resize's
//! SIMD convolution. `cover` crops while resampling (no full-size intermediate).

use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer, images::Image};
use image::DynamicImage;

use super::geometry::{GRAVITY_VALUES, Gravity};
use crate::color::Color;
use crate::error::{Error, Result};
use crate::params::{Args, OpSpec, boolean, choice, color, float, int};
use crate::raster;

pub static SPEC: OpSpec = OpSpec {
    name: "resize",
    doc: "Scale to width and/or height (keeping aspect unless fit=fill) or by a factor.",
    params: &[
        int("width", 1, 65_535, None, "Target width in pixels."),
        int("height", 1, 65_535, None, "Target height in pixels."),
        float("scale", 0.0001, 100.0, None, "Scale factor (instead of width/height)."),
        choice(
            "fit",
            &["inside", "cover", "contain", "fill", "outside"],
            Some("inside"),
            "How to fit both width and height: inside (within the box), cover (fill the box, crop the rest), contain (within the box, pad to it), fill (stretch), outside (at least the box).",
        ),
        boolean("enlarge", "false", "Allow output larger than the input."),
        choice(
            "kernel",
            &["nearest", "bilinear", "catmull-rom", "mitchell", "lanczos3"],
            Some("lanczos3"),
            "Resampling kernel.",
        ),
        color(
            "background",
            None,
            "Padding colour for fit=contain (default white, or transparent for images with alpha).",
        ),
        choice("gravity", GRAVITY_VALUES, Some("center"), "Which part to keep for cover / where to place for contain."),
        float("fx", 0.0, 1.0, None, "Focal point x (fraction) for gravity=focal."),
        float("fy", 0.0, 1.0, None, "Focal point y (fraction) for gravity=focal."),
    ],
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    Inside,
    Cover,
    Contain,
    Fill,
    Outside,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Nearest,
    Bilinear,
    CatmullRom,
    Mitchell,
    Lanczos3,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Resize {
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub scale: Option<f64>,
    pub fit: Fit,
    pub enlarge: bool,
    pub kernel: Kernel,
    pub background: Option<Color>,
    pub gravity: Gravity,
}

/// Where the resampled image goes: `scaled` is the resampled size of the (cropped) source,
/// `canvas` the output size, `src_crop` the source rectangle used, `pad_at` the offset of the
/// scaled image on the canvas (contain).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    pub scaled: (u32, u32),
    pub canvas: (u32, u32),
    pub src_crop: (f64, f64, f64, f64),
    pub pad_at: (u32, u32),
}

fn dim(v: f64) -> u32 {
    (v.round() as u32).max(1)
}

impl Resize {
    pub fn from_args(a: &Args) -> Result<Self> {
        let r = Resize {
            width: a.u32("width"),
            height: a.u32("height"),
            scale: a.float("scale"),
            fit: match a.choice("fit") {
                Some("cover") => Fit::Cover,
                Some("contain") => Fit::Contain,
                Some("fill") => Fit::Fill,
                Some("outside") => Fit::Outside,
                _ => Fit::Inside,
            },
            enlarge: a.boolean("enlarge"),
            kernel: match a.choice("kernel") {
                Some("nearest") => Kernel::Nearest,
                Some("bilinear") => Kernel::Bilinear,
                Some("catmull-rom") => Kernel::CatmullRom,
                Some("mitchell") => Kernel::Mitchell,
                _ => Kernel::Lanczos3,
            },
            background: a.color("background"),
            gravity: Gravity::from_args(a)?,
        };
        if r.scale.is_some() && (r.width.is_some() || r.height.is_some()) {
            return Err(a.invalid("scale", "give either scale or width/height, not both"));
        }
        if r.scale.is_none() && r.width.is_none() && r.height.is_none() {
            return Err(a.invalid("width", "give width, height or scale"));
        }
        if r.gravity == Gravity::Smart {
            return Err(a.invalid("gravity", "smart placement is available on crop, not resize"));
        }
        Ok(r)
    }

    /// Works out the output geometry for a source of `src` pixels.
    pub fn plan(&self, src: (u32, u32)) -> Plan {
        let (sw, sh) = (f64::from(src.0), f64::from(src.1));
        let full = (0.0, 0.0, sw, sh);
        let simple = |w: f64, h: f64| {
            let s = (dim(w), dim(h));
            Plan { scaled: s, canvas: s, src_crop: full, pad_at: (0, 0) }
        };
        let cap = |r: f64| if self.enlarge { r } else { r.min(1.0) };
        if let Some(s) = self.scale {
            let s = cap(s);
            return simple(sw * s, sh * s);
        }
        let (tw, th) = match (self.width, self.height) {
            (Some(w), None) => {
                let r = cap(f64::from(w) / sw);
                return simple(sw * r, sh * r);
            }
            (None, Some(h)) => {
                let r = cap(f64::from(h) / sh);
                return simple(sw * r, sh * r);
            }
            (Some(w), Some(h)) => (f64::from(w), f64::from(h)),
            (None, None) => return simple(sw, sh),
        };
        let (rx, ry) = (tw / sw, th / sh);
        match self.fit {
            Fit::Fill => {
                let (w, h) = if self.enlarge { (tw, th) } else { (tw.min(sw), th.min(sh)) };
                simple(w, h)
            }
            Fit::Inside => {
                let r = cap(rx.min(ry));
                simple(sw * r, sh * r)
            }
            Fit::Outside => {
                let r = cap(rx.max(ry));
                simple(sw * r, sh * r)
            }
            Fit::Cover => {
                let r = cap(rx.max(ry));
                let canvas = (dim(tw.min(sw * r)), dim(th.min(sh * r)));
                // Source rectangle that maps onto the canvas at ratio r.
                let cw = (f64::from(canvas.0) / r).min(sw);
                let ch = (f64::from(canvas.1) / r).min(sh);
                let outer = (src.0, src.1);
                let inner = (cw.round() as u32, ch.round() as u32);
                let (ox, oy) = self.gravity.offset(outer, inner);
                Plan { scaled: canvas, canvas, src_crop: (f64::from(ox), f64::from(oy), cw, ch), pad_at: (0, 0) }
            }
            Fit::Contain => {
                let r = cap(rx.min(ry));
                let scaled = (dim(sw * r), dim(sh * r));
                let canvas = (dim(tw), dim(th));
                let pad_at = self.gravity.offset(canvas, scaled);
                Plan { scaled, canvas, src_crop: full, pad_at }
            }
        }
    }

    /// The smallest source size that still gives full quality: the size of the source region
    /// actually sampled, scaled to 1.5x the output (the headroom for shrink-on-load).
    pub fn min_source(&self, src: (u32, u32)) -> (u32, u32) {
        let p = self.plan(src);
        let rx = f64::from(p.scaled.0) / p.src_crop.2;
        let ry = f64::from(p.scaled.1) / p.src_crop.3;
        let headroom = 1.5;
        (dim(f64::from(src.0) * rx * headroom), dim(f64::from(src.1) * ry * headroom))
    }

    /// The same resize with scale factors turned into pixel sizes for a source of `src`.
    pub fn absolute(&self, src: (u32, u32)) -> Resize {
        if self.scale.is_none() {
            return self.clone();
        }
        let p = self.plan(src);
        Resize {
            width: Some(p.scaled.0),
            height: Some(p.scaled.1),
            scale: None,
            fit: Fit::Fill,
            enlarge: true,
            ..self.clone()
        }
    }

    pub fn apply(&self, img: DynamicImage, limits: &crate::Limits) -> Result<DynamicImage> {
        let src = (img.width(), img.height());
        let plan = self.plan(src);
        limits.check_output(plan.canvas.0, plan.canvas.1)?;
        let unchanged =
            plan.scaled == src && plan.canvas == src && plan.src_crop == (0.0, 0.0, f64::from(src.0), f64::from(src.1));
        let scaled = if unchanged { img } else { resample(&img, plan.src_crop, plan.scaled, self.kernel)? };
        if self.fit != Fit::Contain || plan.canvas == plan.scaled {
            return Ok(scaled);
        }
        let has_alpha = raster::channels(&scaled) == 4;
        let bg = self.background.unwrap_or(if has_alpha { Color::TRANSPARENT } else { Color::WHITE });
        let mut canvas = raster::canvas(plan.canvas.0, plan.canvas.1, bg, has_alpha);
        raster::paste(&mut canvas, &scaled, plan.pad_at.0, plan.pad_at.1);
        Ok(canvas)
    }
}

/// Resamples the `crop` rectangle of `img` to `size` with `kernel`.
pub fn resample(
    img: &DynamicImage,
    crop: (f64, f64, f64, f64),
    size: (u32, u32),
    kernel: Kernel,
) -> Result<DynamicImage> {
    let ch = raster::channels(img);
    let pt = if ch == 4 { PixelType::U8x4 } else { PixelType::U8x3 };
    let src = fast_image_resize::images::ImageRef::new(img.width(), img.height(), img.as_bytes(), pt)
        .map_err(|e| Error::Corrupt { format: "raster", detail: e.to_string() })?;
    let mut dst = Image::new(size.0, size.1, pt);
    let alg = match kernel {
        Kernel::Nearest => ResizeAlg::Nearest,
        Kernel::Bilinear => ResizeAlg::Convolution(FilterType::Bilinear),
        Kernel::CatmullRom => ResizeAlg::Convolution(FilterType::CatmullRom),
        Kernel::Mitchell => ResizeAlg::Convolution(FilterType::Mitchell),
        Kernel::Lanczos3 => ResizeAlg::Convolution(FilterType::Lanczos3),
    };
    let opts = ResizeOptions::new().resize_alg(alg).crop(crop.0, crop.1, crop.2, crop.3);
    Resizer::new()
        .resize(&src, &mut dst, &opts)
        .map_err(|e| Error::Corrupt { format: "raster", detail: e.to_string() })?;
    Ok(raster::from_raw(size.0, size.1, ch, dst.into_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Args;

    fn resize(pairs: &[(&str, &str)]) -> Result<Resize> {
        Resize::from_args(&Args::parse(&SPEC, pairs.iter().copied())?)
    }

    #[test]
    fn fit_modes_plan_expected_sizes() {
        let src = (4000, 2000);
        type Pairs = &'static [(&'static str, &'static str)];
        type Size = (u32, u32);
        let cases: &[(Pairs, Size, Size)] = &[
            (&[("width", "800"), ("height", "800")], (800, 400), (800, 400)),
            (&[("width", "800"), ("height", "800"), ("fit", "cover")], (800, 800), (800, 800)),
            (&[("width", "800"), ("height", "800"), ("fit", "contain")], (800, 400), (800, 800)),
            (&[("width", "800"), ("height", "800"), ("fit", "fill")], (800, 800), (800, 800)),
            (&[("width", "800"), ("height", "800"), ("fit", "outside")], (1600, 800), (1600, 800)),
            (&[("width", "1000")], (1000, 500), (1000, 500)),
            (&[("height", "100")], (200, 100), (200, 100)),
            (&[("scale", "0.5")], (2000, 1000), (2000, 1000)),
            (&[("scale", "2")], (4000, 2000), (4000, 2000)),
            (&[("scale", "2"), ("enlarge", "true")], (8000, 4000), (8000, 4000)),
            (&[("width", "8000")], (4000, 2000), (4000, 2000)),
        ];
        for (pairs, scaled, canvas) in cases {
            let p = resize(pairs).unwrap().plan(src);
            assert_eq!((p.scaled, p.canvas), (*scaled, *canvas), "{pairs:?}");
        }
    }

    #[test]
    fn cover_crops_source_by_gravity() {
        let p = resize(&[("width", "100"), ("height", "100"), ("fit", "cover"), ("gravity", "west")])
            .unwrap()
            .plan((400, 200));
        assert_eq!(p.src_crop, (0.0, 0.0, 200.0, 200.0));
        let p = resize(&[("width", "100"), ("height", "100"), ("fit", "cover")]).unwrap().plan((400, 200));
        assert_eq!(p.src_crop, (100.0, 0.0, 200.0, 200.0));
    }

    #[test]
    fn parameter_combinations_are_checked() {
        assert!(resize(&[]).is_err());
        assert!(resize(&[("scale", "0.5"), ("width", "10")]).is_err());
        assert!(resize(&[("width", "0")]).is_err());
        assert!(resize(&[("width", "10"), ("gravity", "smart")]).is_err());
    }

    #[test]
    fn resample_averages_and_contain_pads() {
        let img = raster::canvas(64, 32, Color([200, 100, 50, 255]), false);
        let r = resize(&[("width", "16"), ("height", "16"), ("fit", "contain"), ("background", "black")]).unwrap();
        let out = r.apply(img, &crate::Limits::default()).unwrap().to_rgb8();
        assert_eq!(out.dimensions(), (16, 16));
        assert_eq!(out.get_pixel(8, 8).0, [200, 100, 50]);
        assert_eq!(out.get_pixel(8, 0).0, [0, 0, 0]);
    }

    #[test]
    fn output_limit_is_enforced_before_allocation() {
        let img = raster::canvas(10, 10, Color::WHITE, false);
        let r = resize(&[("width", "60000"), ("height", "60000"), ("fit", "fill"), ("enlarge", "true")]).unwrap();
        let err = r.apply(img, &crate::Limits::default()).unwrap_err();
        assert_eq!(err.code(), "limit_exceeded");
    }

    #[test]
    fn min_source_leaves_headroom() {
        let r = resize(&[("width", "800"), ("height", "800")]).unwrap();
        assert_eq!(r.min_source((6028, 3391)), (1200, 675));
    }
}
