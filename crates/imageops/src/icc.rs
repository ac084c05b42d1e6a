//! Colour management: converting pixels from an embedded ICC profile to sRGB (moxcms, the CMS
//! already inside `image`), for `icc=srgb` outputs that must look right in viewers and browsers
//! that ignore profiles.

use image::DynamicImage;
use moxcms::{ColorProfile, DataColorSpace, Layout, TransformOptions};

use crate::error::{Error, Result};
use crate::raster;

/// Converts an RGB(A) raster described by `icc` to sRGB in place. Alpha is untouched.
pub fn to_srgb(img: &mut DynamicImage, icc: &[u8]) -> Result<()> {
    let bad = |detail: String| Error::Corrupt { format: "icc", detail };
    let src = ColorProfile::new_from_slice(icc).map_err(|e| bad(format!("unreadable profile: {e:?}")))?;
    if src.color_space != DataColorSpace::Rgb {
        return Err(bad(format!("profile describes {:?} data, not RGB", src.color_space)));
    }
    let layout = if raster::channels(img) == 4 { Layout::Rgba } else { Layout::Rgb };
    let transform = src
        .create_transform_8bit(layout, &ColorProfile::new_srgb(), layout, TransformOptions::default())
        .map_err(|e| bad(format!("cannot build transform: {e:?}")))?;
    let (w, h, ch) = (img.width(), img.height(), raster::channels(img));
    let src_px = std::mem::take(img).into_bytes();
    let mut dst = vec![0u8; src_px.len()];
    transform.transform(&src_px, &mut dst).map_err(|e| bad(format!("transform failed: {e:?}")))?;
    *img = raster::from_raw(w, h, ch, dst);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::color::Color;

    #[test]
    fn srgb_to_srgb_is_near_identity_and_garbage_is_an_error() {
        let srgb = ColorProfile::new_srgb().encode().unwrap();
        let mut img = raster::canvas(4, 4, Color([200, 100, 50, 255]), false);
        to_srgb(&mut img, &srgb).unwrap();
        let p = img.to_rgb8().get_pixel(0, 0).0;
        assert!(p.iter().zip([200u8, 100, 50]).all(|(a, b)| a.abs_diff(b) <= 1), "{p:?}");
        let mut img = raster::canvas(4, 4, Color::WHITE, false);
        assert_eq!(to_srgb(&mut img, b"not a profile").unwrap_err().code(), "corrupt_input");
    }

    #[test]
    fn wide_gamut_red_is_pulled_in() {
        // Display P3 red is outside sRGB: converted, it clips to pure red with green/blue near 0,
        // while a mid P3 colour changes visibly.
        let p3 = ColorProfile::new_display_p3().encode().unwrap();
        let mut img = raster::canvas(2, 2, Color([180, 60, 60, 255]), false);
        to_srgb(&mut img, &p3).unwrap();
        let p = img.to_rgb8().get_pixel(0, 0).0;
        assert!(p[0] > 190, "P3 red is more saturated than the same numbers in sRGB: {p:?}");
    }
}
