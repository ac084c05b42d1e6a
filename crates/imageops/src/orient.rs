//! EXIF orientation (values 1-8): reading it from EXIF data and applying it to pixels, so every
//! output is upright and carries no orientation tag.

use image::DynamicImage;
use image::metadata::Orientation as ImgOrientation;
use serde::Serialize;

/// The eight EXIF orientations, named by what must be done to display the image upright.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(into = "u8")]
pub enum Orientation {
    #[default]
    Normal,
    FlipH,
    Rotate180,
    FlipV,
    Transpose,
    Rotate90,
    Transverse,
    Rotate270,
}

impl From<Orientation> for u8 {
    fn from(o: Orientation) -> u8 {
        o.exif_value()
    }
}

impl Orientation {
    pub fn from_exif_value(v: u32) -> Self {
        match v {
            2 => Orientation::FlipH,
            3 => Orientation::Rotate180,
            4 => Orientation::FlipV,
            5 => Orientation::Transpose,
            6 => Orientation::Rotate90,
            7 => Orientation::Transverse,
            8 => Orientation::Rotate270,
            _ => Orientation::Normal,
        }
    }

    pub fn exif_value(self) -> u8 {
        match self {
            Orientation::Normal => 1,
            Orientation::FlipH => 2,
            Orientation::Rotate180 => 3,
            Orientation::FlipV => 4,
            Orientation::Transpose => 5,
            Orientation::Rotate90 => 6,
            Orientation::Transverse => 7,
            Orientation::Rotate270 => 8,
        }
    }

    /// Reads the orientation tag from raw EXIF (TIFF-structured) data; anything unreadable
    /// counts as "normal", as every viewer treats it.
    pub fn from_exif(tiff: &[u8]) -> Self {
        let Ok(exif) = exif::Reader::new().read_raw(tiff.to_vec()) else {
            return Orientation::Normal;
        };
        exif.get_field(exif::Tag::Orientation, exif::In::PRIMARY)
            .and_then(|f| f.value.get_uint(0))
            .map_or(Orientation::Normal, Self::from_exif_value)
    }

    pub(crate) fn from_image(o: ImgOrientation) -> Self {
        Self::from_exif_value(u32::from(o.to_exif()))
    }

    /// Whether applying this orientation swaps width and height.
    pub fn swaps_axes(self) -> bool {
        matches!(
            self,
            Orientation::Transpose | Orientation::Rotate90 | Orientation::Transverse | Orientation::Rotate270
        )
    }

    pub fn apply(self, mut image: DynamicImage) -> DynamicImage {
        if let Some(o) = ImgOrientation::from_exif(self.exif_value()) {
            image.apply_orientation(o);
        }
        image
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, RgbImage};

    /// 2x1 image: red at (0,0), blue at (1,0).
    fn sample() -> DynamicImage {
        let mut im = RgbImage::new(2, 1);
        im.put_pixel(0, 0, Rgb([255, 0, 0]));
        im.put_pixel(1, 0, Rgb([0, 0, 255]));
        DynamicImage::ImageRgb8(im)
    }

    #[test]
    fn every_orientation_lands_upright() {
        // (orientation, expected size, where red ends up)
        let cases = [
            (1, (2, 1), (0, 0)),
            (2, (2, 1), (1, 0)),
            (3, (2, 1), (1, 0)),
            (4, (2, 1), (0, 0)),
            (5, (1, 2), (0, 0)),
            (6, (1, 2), (0, 0)),
            (7, (1, 2), (0, 1)),
            (8, (1, 2), (0, 1)),
        ];
        for (v, size, red) in cases {
            let o = Orientation::from_exif_value(v);
            assert_eq!(o.exif_value() as u32, v);
            assert_eq!(o.swaps_axes(), size == (1, 2));
            let out = o.apply(sample()).to_rgb8();
            assert_eq!(out.dimensions(), size, "orientation {v}");
            assert_eq!(out.get_pixel(red.0, red.1), &Rgb([255, 0, 0]), "orientation {v}");
        }
    }

    #[test]
    fn garbage_exif_is_normal() {
        assert_eq!(Orientation::from_exif(b"not tiff"), Orientation::Normal);
        assert_eq!(Orientation::from_exif(&[]), Orientation::Normal);
    }
}
