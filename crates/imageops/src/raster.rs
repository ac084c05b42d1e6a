//! Small pixel-buffer primitives shared by the operations: the 8-bit RGB/RGBA layouts the engine
//! works in, row-wise copies and fills, and alpha flattening.

use image::{DynamicImage, RgbImage, RgbaImage};

use crate::color::Color;

/// Bytes per pixel of a normalised raster (3 or 4).
pub fn channels(img: &DynamicImage) -> usize {
    if img.color().has_alpha() { 4 } else { 3 }
}

/// Builds a normalised raster from raw bytes with `ch` channels (3 or 4).
pub fn from_raw(w: u32, h: u32, ch: usize, buf: Vec<u8>) -> DynamicImage {
    debug_assert_eq!(buf.len(), w as usize * h as usize * ch);
    if ch == 4 {
        DynamicImage::ImageRgba8(RgbaImage::from_raw(w, h, buf).expect("buffer sized for RGBA"))
    } else {
        DynamicImage::ImageRgb8(RgbImage::from_raw(w, h, buf).expect("buffer sized for RGB"))
    }
}

/// A canvas filled with `color`; RGBA when the colour is not opaque or `force_alpha`.
pub fn canvas(w: u32, h: u32, color: Color, force_alpha: bool) -> DynamicImage {
    let ch = if force_alpha || !color.is_opaque() { 4 } else { 3 };
    let px = &color.0[..ch];
    let mut buf = Vec::with_capacity(w as usize * h as usize * ch);
    for _ in 0..(w as usize * h as usize) {
        buf.extend_from_slice(px);
    }
    from_raw(w, h, ch, buf)
}

/// Copies the `w x h` rectangle at (`x`, `y`) out of `img` (row by row, no per-pixel calls).
pub fn crop(img: &DynamicImage, x: u32, y: u32, w: u32, h: u32) -> DynamicImage {
    let ch = channels(img);
    let stride = img.width() as usize * ch;
    let src = img.as_bytes();
    let mut out = Vec::with_capacity(w as usize * h as usize * ch);
    for row in y..y + h {
        let start = row as usize * stride + x as usize * ch;
        out.extend_from_slice(&src[start..start + w as usize * ch]);
    }
    from_raw(w, h, ch, out)
}

/// Rotates by a quarter turn clockwise (`clockwise`) or anticlockwise, walking the source in
/// 32x32 tiles so both buffers stay in cache (several times faster than per-pixel access).
pub fn rotate_quarter(img: &DynamicImage, clockwise: bool) -> DynamicImage {
    let ch = channels(img);
    let (w, h) = (img.width() as usize, img.height() as usize);
    let out = if ch == 4 {
        transpose_px::<4>(img.as_bytes(), w, h, clockwise)
    } else {
        transpose_px::<3>(img.as_bytes(), w, h, clockwise)
    };
    from_raw(h as u32, w as u32, ch, out)
}

/// The quarter turn on whole pixels (`[u8; C]` moves, no per-pixel slice copies), in tiles of
/// `TILE` source rows: each source column of a tile becomes one contiguous run of an output row.
fn transpose_px<const C: usize>(src: &[u8], w: usize, h: usize, clockwise: bool) -> Vec<u8> {
    const TILE: usize = 16;
    let (src, _) = src.as_chunks::<C>();
    let mut out = vec![[0u8; C]; w * h];
    let mut rows: [&[[u8; C]]; TILE] = [&[]; TILE];
    // Output is h wide and w tall.
    for ty in (0..h).step_by(TILE) {
        let n = TILE.min(h - ty);
        for (i, row) in rows[..n].iter_mut().enumerate() {
            *row = &src[(ty + i) * w..(ty + i + 1) * w];
        }
        let rows = &rows[..n];
        // Clockwise, source row y lands in output column h-1-y (so the run is reversed).
        let (start, end) = if clockwise { (h - ty - n, h - ty) } else { (ty, ty + n) };
        for x in 0..w {
            let oy = if clockwise { x } else { w - 1 - x };
            let run = &mut out[oy * h + start..oy * h + end];
            if clockwise {
                for (o, row) in run.iter_mut().zip(rows.iter().rev()) {
                    *o = row[x];
                }
            } else {
                for (o, row) in run.iter_mut().zip(rows) {
                    *o = row[x];
                }
            }
        }
    }
    out.into_flattened()
}

/// Draws `src` onto `dst` at (`x`, `y`) with plain copy (same channel count) or source-over.
pub fn paste(dst: &mut DynamicImage, src: &DynamicImage, x: u32, y: u32) {
    if channels(dst) == 3 && channels(src) == 4 {
        *dst = DynamicImage::ImageRgba8(dst.to_rgba8());
    }
    image::imageops::overlay(dst, &ensure_channels(src, channels(dst)), i64::from(x), i64::from(y));
}

/// Converts to the given channel count (3 flattens onto white only if asked via `flatten`).
pub fn ensure_channels(img: &DynamicImage, ch: usize) -> DynamicImage {
    match (channels(img), ch) {
        (3, 4) => DynamicImage::ImageRgba8(img.to_rgba8()),
        (4, 3) => flatten(img, Color::WHITE),
        _ => img.clone(),
    }
}

/// Composites an RGBA image over an opaque background, giving RGB.
pub fn flatten(img: &DynamicImage, bg: Color) -> DynamicImage {
    let DynamicImage::ImageRgba8(rgba) = img else {
        return img.clone();
    };
    let [br, bgc, bb, _] = bg.0;
    let bgpx = [u32::from(br), u32::from(bgc), u32::from(bb)];
    let mut out = Vec::with_capacity(rgba.width() as usize * rgba.height() as usize * 3);
    for p in rgba.as_raw().chunks_exact(4) {
        let a = u32::from(p[3]);
        for c in 0..3 {
            out.push(((u32::from(p[c]) * a + bgpx[c] * (255 - a) + 127) / 255) as u8);
        }
    }
    from_raw(rgba.width(), rgba.height(), 3, out)
}

/// True when every alpha value is 255 (the alpha channel can be dropped losslessly).
pub fn is_opaque(img: &DynamicImage) -> bool {
    match img {
        DynamicImage::ImageRgba8(rgba) => rgba.as_raw().chunks_exact(4).all(|p| p[3] == 255),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_copies_the_right_rows() {
        let mut im = RgbImage::new(4, 3);
        for (x, y, p) in im.enumerate_pixels_mut() {
            *p = image::Rgb([x as u8, y as u8, 0]);
        }
        let c = crop(&DynamicImage::ImageRgb8(im), 1, 1, 2, 2).to_rgb8();
        assert_eq!(c.dimensions(), (2, 2));
        assert_eq!(c.get_pixel(0, 0).0, [1, 1, 0]);
        assert_eq!(c.get_pixel(1, 1).0, [2, 2, 0]);
    }

    #[test]
    fn quarter_turns_match_the_reference() {
        let mut im = RgbaImage::new(67, 35);
        for (x, y, p) in im.enumerate_pixels_mut() {
            *p = image::Rgba([x as u8, y as u8, (x * y) as u8, 255]);
        }
        let img = DynamicImage::ImageRgba8(im);
        assert_eq!(rotate_quarter(&img, true).as_bytes(), img.rotate90().as_bytes());
        assert_eq!(rotate_quarter(&img, false).as_bytes(), img.rotate270().as_bytes());
    }

    #[test]
    fn flatten_blends_alpha() {
        let im = RgbaImage::from_raw(2, 1, vec![0, 0, 0, 0, 0, 0, 0, 255]).unwrap();
        let f = flatten(&DynamicImage::ImageRgba8(im), Color::WHITE).to_rgb8();
        assert_eq!(f.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(f.get_pixel(1, 0).0, [0, 0, 0]);
    }
}
