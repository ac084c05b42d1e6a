//! `qrcode`: a QR code made from text, as the first step of a pipeline (it makes the raster
//! instead of decoding one). Modules are whole pixels, so the code stays sharp at any size: the
//! module size is the largest that fits, and the rest of the requested size is background. A
//! centre logo raises error correction to H, sits on a background plate, and covers at most
//! 30 % of the code's width (H restores up to 30 % damaged codewords; the plate keeps finder
//! and timing patterns clear). Without a logo the code is also available as SVG.

use image::DynamicImage;

use super::geometry::Gravity;
use super::watermark::Watermark;
use crate::Limits;
use crate::color::Color;
use crate::error::{Error, Result};
use crate::params::{Args, OpSpec, choice, color, float, int, text};
use crate::raster;

pub static SPEC: OpSpec = OpSpec {
    name: "qrcode",
    doc: "Make a QR code (starts a pipeline; no input image). PNG/WebP/JPEG like any raster, or SVG when nothing follows it.",
    params: &[
        text(
            "content",
            4296,
            None,
            "Text or URL to encode (up to 2953 bytes at level L, fewer at higher levels). Required.",
        ),
        int("size", 21, 8192, Some("512"), "Width and height of the image in pixels."),
        int("margin", 0, 16, Some("4"), "Quiet zone around the code, in modules (the standard asks for 4)."),
        choice("ecc", &["L", "M", "Q", "H"], Some("M"), "Error correction: recovers about 7, 15, 25 or 30 % damage."),
        color("color", Some("black"), "Colour of the dark modules."),
        color("background", Some("white"), "Background colour (may be transparent)."),
        text(
            "logo",
            1024,
            None,
            "Name of an image input drawn in the centre (the CLI reads it as a file path); forces ecc=H.",
        ),
        float("logo_scale", 0.05, 0.3, Some("0.2"), "Logo width as a fraction of the code's width."),
    ],
};

#[derive(Debug, Clone, PartialEq)]
pub struct Qrcode {
    pub content: String,
    pub size: u32,
    pub margin: u32,
    pub ecc: qrcode::EcLevel,
    pub color: Color,
    pub background: Color,
    pub logo: Option<String>,
    pub logo_scale: f64,
}

/// The module grid of an encoded code: `width` x `width`, `true` = dark.
struct Modules {
    width: usize,
    dark: Vec<bool>,
}

impl Qrcode {
    pub fn from_args(a: &Args) -> Result<Self> {
        let content = a.text("content").ok_or_else(|| a.invalid("content", "required"))?.to_owned();
        if content.is_empty() {
            return Err(a.invalid("content", "must not be empty"));
        }
        let logo = a.text("logo").map(str::to_owned);
        let ecc = match (logo.is_some(), a.choice("ecc").unwrap_or("M")) {
            (true, _) | (false, "H") => qrcode::EcLevel::H,
            (false, "L") => qrcode::EcLevel::L,
            (false, "Q") => qrcode::EcLevel::Q,
            _ => qrcode::EcLevel::M,
        };
        let q = Qrcode {
            content,
            size: a.require_u32("size")?,
            margin: a.require_u32("margin")?,
            ecc,
            color: a.color("color").unwrap_or(Color::BLACK),
            background: a.color("background").unwrap_or(Color::WHITE),
            logo,
            logo_scale: a.float("logo_scale").unwrap_or(0.2),
        };
        // Encode once now so a too-long content or a too-small size fails at validation time.
        let m = q.modules()?;
        q.module_px(&m)?;
        Ok(q)
    }

    fn modules(&self) -> Result<Modules> {
        let code = qrcode::QrCode::with_error_correction_level(self.content.as_bytes(), self.ecc).map_err(|e| {
            let level = format!("{:?}", self.ecc);
            Error::bad("qrcode", "content", format!("{e} ({} bytes at ecc={level})", self.content.len()))
        })?;
        let dark = code.to_colors().into_iter().map(|c| c == qrcode::Color::Dark).collect();
        Ok(Modules { width: code.width(), dark })
    }

    /// Pixels per module: the largest whole number that fits the code and its margin.
    fn module_px(&self, m: &Modules) -> Result<u32> {
        let n = m.width as u32 + 2 * self.margin;
        if self.size < n {
            return Err(Error::bad(
                "qrcode",
                "size",
                format!("{} px is too small for {n} modules (code and margin); use at least {n}", self.size),
            ));
        }
        Ok(self.size / n)
    }

    /// Draws the code; `logo` is the decoded centre image when the step names one.
    pub fn render(&self, logo: Option<&DynamicImage>, limits: &Limits) -> Result<DynamicImage> {
        limits.check_output(self.size, self.size)?;
        let m = self.modules()?;
        let px = self.module_px(&m)? as usize;
        let side = px * m.width;
        let origin = (self.size as usize - side) / 2;
        let mut img = raster::canvas(self.size, self.size, self.background, !self.color.is_opaque());
        let ch = raster::channels(&img);
        let stride = self.size as usize * ch;
        let dark = &self.color.0[..ch];
        let buf = match &mut img {
            DynamicImage::ImageRgba8(b) => b.as_mut(),
            DynamicImage::ImageRgb8(b) => b.as_mut(),
            _ => unreachable!("canvas is RGB8 or RGBA8"),
        };
        for (my, row) in m.dark.chunks_exact(m.width).enumerate() {
            for (mx, _) in row.iter().enumerate().filter(|(_, d)| **d) {
                for y in 0..px {
                    let start = (origin + my * px + y) * stride + (origin + mx * px) * ch;
                    for p in buf[start..start + px * ch].chunks_exact_mut(ch) {
                        p.copy_from_slice(dark);
                    }
                }
            }
        }
        let Some(logo) = logo else { return Ok(img) };
        // The plate: the logo's box plus one module, in the background colour.
        let logo_w = ((side as f64 * self.logo_scale).round() as u32).max(1);
        let logo_h = ((f64::from(logo.height()) * f64::from(logo_w) / f64::from(logo.width().max(1))).round() as u32)
            .clamp(1, logo_w);
        let (plate_w, plate_h) = (logo_w + 2 * px as u32, logo_h + 2 * px as u32);
        let plate = raster::canvas(plate_w, plate_h, self.background.with_alpha(255), false);
        let c = self.size / 2;
        raster::paste(&mut img, &plate, c - plate_w / 2, c - plate_h / 2);
        let mark = Watermark {
            image: String::new(),
            gravity: Gravity::CENTER,
            offset: (0, 0),
            scale: Some(f64::from(logo_w) / f64::from(self.size)),
            opacity: 1.0,
            tile: false,
            spacing: 0,
            angle: 0.0,
        };
        mark.apply(img, logo, limits)
    }

    /// The code as an SVG document (crisp at any zoom), the same geometry as the raster.
    pub fn svg(&self) -> Result<String> {
        let m = self.modules()?;
        let n = m.width + 2 * self.margin as usize;
        let mut path = String::with_capacity(m.dark.len() * 4);
        for (my, row) in m.dark.chunks_exact(m.width).enumerate() {
            for (mx, _) in row.iter().enumerate().filter(|(_, d)| **d) {
                let (x, y) = (mx + self.margin as usize, my + self.margin as usize);
                path.push_str(&format!("M{x} {y}h1v1h-1z"));
            }
        }
        Ok(format!(
            concat!(
                r#"<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" viewBox="0 0 {n} {n}" shape-rendering="crispEdges">"#,
                r#"<rect width="{n}" height="{n}" {bg}/><path d="{path}" {fg}/></svg>"#
            ),
            size = self.size,
            n = n,
            bg = svg_fill(self.background),
            path = path,
            fg = svg_fill(self.color),
        ))
    }
}

fn svg_fill(c: Color) -> String {
    let [r, g, b, a] = c.0;
    format!(r##"fill="#{r:02x}{g:02x}{b:02x}" fill-opacity="{:.3}""##, f64::from(a) / 255.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::Op;

    fn parse(pairs: &[(&str, &str)]) -> Result<Qrcode> {
        match Op::parse("qrcode", pairs.iter().copied())? {
            Op::Qrcode(q) => Ok(q),
            other => panic!("{other:?}"),
        }
    }

    /// Reads the code back with an independent decoder (rqrr).
    fn decode(img: &DynamicImage) -> String {
        let luma = img.to_luma8();
        let mut prepared =
            rqrr::PreparedImage::prepare_from_greyscale(luma.width() as usize, luma.height() as usize, |x, y| {
                luma.get_pixel(x as u32, y as u32).0[0]
            });
        let grids = prepared.detect_grids();
        assert_eq!(grids.len(), 1, "one code expected");
        grids[0].decode().expect("decodable").1
    }

    #[test]
    fn decodes_back_to_its_content() {
        for (content, ecc) in [("https://example.com/p/42?utm=qr", "M"), ("你好，世界 — pixflow", "Q"), ("A", "L")]
        {
            let q = parse(&[("content", content), ("size", "300"), ("ecc", ecc)]).unwrap();
            let img = q.render(None, &Limits::default()).unwrap();
            assert_eq!((img.width(), img.height()), (300, 300));
            assert_eq!(decode(&img), content);
        }
    }

    #[test]
    fn colours_margin_and_whole_pixel_modules() {
        let q = parse(&[("content", "pixflow"), ("size", "100"), ("margin", "0"), ("color", "#003366")]).unwrap();
        let img = q.render(None, &Limits::default()).unwrap().to_rgb8();
        // Version 1 is 21 modules: 4 px each, 84 px centred in 100 (8 px of background each side).
        assert_eq!(img.get_pixel(8, 8).0, [0x00, 0x33, 0x66], "finder pattern's corner");
        assert_eq!(img.get_pixel(7, 7).0, [255, 255, 255]);
        assert_eq!(img.get_pixel(11, 11).0, [0x00, 0x33, 0x66]);
        assert_eq!(decode(&DynamicImage::ImageRgb8(img)), "pixflow");
    }

    #[test]
    fn centre_logo_forces_level_h_and_still_decodes() {
        let q = parse(&[("content", "https://example.com/a/long/path/for/a/version/4/code"), ("logo", "l")]).unwrap();
        assert_eq!(q.ecc, qrcode::EcLevel::H);
        let logo = raster::canvas(64, 64, Color([200, 30, 30, 255]), false);
        let img = q.render(Some(&logo), &Limits::default()).unwrap();
        let c = img.to_rgb8();
        assert_eq!(c.get_pixel(256, 256).0, [200, 30, 30], "logo in the centre");
        assert_eq!(decode(&img), q.content);
    }

    #[test]
    fn svg_has_one_square_per_dark_module() {
        let q = parse(&[("content", "svg"), ("background", "transparent")]).unwrap();
        let svg = q.svg().unwrap();
        let dark = q.modules().unwrap().dark.iter().filter(|d| **d).count();
        assert_eq!(svg.matches("h1v1h-1z").count(), dark);
        assert!(svg.contains(r#"viewBox="0 0 29 29""#) && svg.contains(r#"fill-opacity="0.000""#), "{svg}");
    }

    #[test]
    fn bad_requests_name_the_parameter() {
        let too_long = "x".repeat(3000);
        for (pairs, param) in [
            (vec![("size", "100")], "content"),
            (vec![("content", "")], "content"),
            (vec![("content", too_long.as_str()), ("ecc", "H")], "content"),
            (vec![("content", "abc"), ("size", "22")], "size"),
            (vec![("content", "abc"), ("ecc", "X")], "ecc"),
        ] {
            match parse(&pairs) {
                Err(Error::BadParameter { param: p, .. }) => assert_eq!(p, param, "{pairs:?}"),
                other => panic!("{pairs:?}: {other:?}"),
            }
        }
    }
}
