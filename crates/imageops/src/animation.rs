//! Whole animations (GIF, animated WebP, APNG): decoding every frame composited to the full
//! canvas (disposal and transparency handled by the decoders), and encoding frames back to an
//! animated GIF or WebP with their timing and loop count. Pipelines map their operations over
//! the frames in between.

use std::io::Cursor;

use image::{AnimationDecoder, DynamicImage, Frame};

use crate::encode::{EncodeOptions, OutFormat};
use crate::error::{Error, LimitKind, Result};
use crate::format::Format;
use crate::limits::Limits;

/// One displayed frame: the full canvas and how long it shows.
#[derive(Debug, Clone)]
pub struct AnimFrame {
    pub image: DynamicImage,
    pub delay_ms: u32,
}

#[derive(Debug, Clone)]
pub struct Animation {
    pub frames: Vec<AnimFrame>,
    /// `None` loops forever.
    pub loop_count: Option<u32>,
}

/// Decodes every frame of an animated GIF/WebP/PNG. `frames` is the count from the container,
/// checked with the canvas size against the limits before any frame is decoded: the frame
/// limit, and the source-pixel limit applied to the sum over all frames.
pub fn decode(format: Format, bytes: &[u8], frames: u64, limits: &Limits) -> Result<Animation> {
    limits.check_frames(frames)?;
    let header = crate::decode::read_header(bytes, limits)?;
    limits.check_source(header.width, header.height)?;
    let canvas = u64::from(header.width) * u64::from(header.height);
    // Checked against the declared count first, then again per frame: a container may hold
    // more frames than it declares.
    let budget = |n: u64| {
        let total = canvas.saturating_mul(n);
        if total > limits.max_source_pixels {
            return Err(Error::LimitExceeded {
                limit: LimitKind::SourcePixels,
                max: limits.max_source_pixels,
                actual: total,
            });
        }
        Ok(())
    };
    budget(frames)?;
    let fail = |e: image::ImageError| crate::decode::map_image_error(image_format(format), e);
    let (iter, loops) = match format {
        Format::Gif => {
            let d = image::codecs::gif::GifDecoder::new(Cursor::new(bytes)).map_err(fail)?;
            let loops = d.loop_count();
            (d.into_frames(), loops)
        }
        Format::Webp => {
            let d = image::codecs::webp::WebPDecoder::new(Cursor::new(bytes)).map_err(fail)?;
            let loops = d.loop_count();
            (d.into_frames(), loops)
        }
        Format::Png => {
            let d = image::codecs::png::PngDecoder::new(Cursor::new(bytes)).map_err(fail)?.apng().map_err(fail)?;
            let loops = d.loop_count();
            (d.into_frames(), loops)
        }
        other => return Err(Error::Unsupported { format: other.name().into(), hint: Some("not an animation".into()) }),
    };
    let mut out = Vec::new();
    for frame in iter {
        let frame = frame.map_err(fail)?;
        limits.check_frames(out.len() as u64 + 1)?;
        budget(out.len() as u64 + 1)?;
        let (num, den) = frame.delay().numer_denom_ms();
        let delay_ms = num.checked_div(den).unwrap_or(0);
        out.push(AnimFrame { image: DynamicImage::ImageRgba8(frame.into_buffer()), delay_ms });
    }
    let loop_count = match loops {
        image::metadata::LoopCount::Infinite => None,
        image::metadata::LoopCount::Finite(n) => Some(n.get()),
    };
    Ok(Animation { frames: out, loop_count })
}

fn image_format(f: Format) -> image::ImageFormat {
    match f {
        Format::Webp => image::ImageFormat::WebP,
        Format::Png => image::ImageFormat::Png,
        _ => image::ImageFormat::Gif,
    }
}

/// Encodes an animation as GIF or animated WebP; still formats cannot hold one.
pub fn encode(anim: &Animation, format: OutFormat, opts: &EncodeOptions) -> Result<Vec<u8>> {
    let Some(first) = anim.frames.first() else {
        return Err(Error::Encode { format: "animation", detail: "no frames".into() });
    };
    let (w, h) = (first.image.width(), first.image.height());
    match format {
        OutFormat::Gif => {
            let mut out = Vec::new();
            {
                // NeuQuant sampling factor: 1 best .. 30 fastest; 10 is gif's own default.
                let mut enc = image::codecs::gif::GifEncoder::new_with_speed(&mut out, 10);
                let repeat = match anim.loop_count {
                    None => image::codecs::gif::Repeat::Infinite,
                    Some(n) => image::codecs::gif::Repeat::Finite(u16::try_from(n).unwrap_or(u16::MAX)),
                };
                let fail = |e: image::ImageError| Error::Encode { format: "gif", detail: e.to_string() };
                enc.set_repeat(repeat).map_err(fail)?;
                for f in &anim.frames {
                    let delay = image::Delay::from_numer_denom_ms(f.delay_ms, 1);
                    enc.encode_frame(Frame::from_parts(f.image.to_rgba8(), 0, 0, delay)).map_err(fail)?;
                }
            }
            Ok(out)
        }
        OutFormat::Webp => {
            let mut config = webp::WebPConfig::new()
                .map_err(|()| Error::Encode { format: "webp", detail: "libwebp config".into() })?;
            config.lossless = i32::from(opts.lossless == Some(true));
            config.quality = f32::from(opts.quality.unwrap_or(80));
            let buffers: Vec<Vec<u8>> = anim.frames.iter().map(|f| f.image.to_rgba8().into_raw()).collect();
            let mut enc = webp::AnimEncoder::new(w, h, &config);
            enc.set_loop_count(anim.loop_count.map_or(0, |n| i32::try_from(n).unwrap_or(i32::MAX)));
            let mut t = 0i32;
            for (f, buf) in anim.frames.iter().zip(&buffers) {
                enc.add_frame(webp::AnimFrame::from_rgba(buf, w, h, t));
                t = t.saturating_add(i32::try_from(f.delay_ms).unwrap_or(i32::MAX));
            }
            let mem = enc.try_encode().map_err(|e| Error::Encode { format: "webp", detail: format!("{e:?}") })?;
            Ok(mem.to_vec())
        }
        other => Err(Error::Unsupported {
            format: format!("animated {}", other.extension()),
            hint: Some(format!(
                "{} frames cannot be stored as {}; write gif or webp",
                anim.frames.len(),
                other.extension()
            )),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gif(frames: u8, loops: image::codecs::gif::Repeat) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut enc = image::codecs::gif::GifEncoder::new(&mut out);
            enc.set_repeat(loops).unwrap();
            for i in 0..frames {
                let img = image::RgbaImage::from_pixel(20, 10, image::Rgba([i * 60, 255 - i * 60, 0, 255]));
                enc.encode_frame(Frame::from_parts(img, 0, 0, image::Delay::from_numer_denom_ms(70, 1))).unwrap();
            }
        }
        out
    }

    #[test]
    fn gif_round_trip_keeps_frames_timing_and_loops() {
        let src = gif(4, image::codecs::gif::Repeat::Finite(3));
        let anim = decode(Format::Gif, &src, 4, &Limits::default()).unwrap();
        assert_eq!(anim.frames.len(), 4);
        assert_eq!(anim.frames[1].delay_ms, 70);
        assert_eq!(anim.loop_count, Some(3));
        let back = encode(&anim, OutFormat::Gif, &EncodeOptions::default()).unwrap();
        let again = decode(Format::Gif, &back, 4, &Limits::default()).unwrap();
        assert_eq!((again.frames.len(), again.frames[3].delay_ms, again.loop_count), (4, 70, Some(3)));
        let px = again.frames[3].image.to_rgba8().get_pixel(5, 5).0;
        assert!(px[0] > 170 && px[1] < 80, "last frame's colour survives: {px:?}");
    }

    #[test]
    fn webp_animation_and_still_format_refusal() {
        let src = gif(3, image::codecs::gif::Repeat::Infinite);
        let anim = decode(Format::Gif, &src, 3, &Limits::default()).unwrap();
        assert_eq!(anim.loop_count, None);
        let webp = encode(&anim, OutFormat::Webp, &EncodeOptions::default()).unwrap();
        let p = crate::probe(&webp, &Limits::default(), None).unwrap();
        assert_eq!((p.kind, p.frames), (crate::MediaKind::Animated, Some(3)));
        let err = encode(&anim, OutFormat::Jpeg, &EncodeOptions::default()).unwrap_err();
        assert_eq!(err.code(), "unsupported_format");
        assert!(err.to_string().contains("3 frames"));
    }

    #[test]
    fn frame_and_pixel_budgets_apply_before_decoding() {
        let src = gif(4, image::codecs::gif::Repeat::Infinite);
        let few = Limits { max_frames: 3, ..Limits::default() };
        assert_eq!(decode(Format::Gif, &src, 4, &few).unwrap_err().code(), "limit_exceeded");
        let small = Limits { max_source_pixels: 20 * 10 * 3, ..Limits::default() };
        assert_eq!(decode(Format::Gif, &src, 4, &small).unwrap_err().code(), "limit_exceeded");
        // A container that under-declares its frames is still held to the budget while decoding.
        let err = decode(Format::Gif, &src, 1, &small).unwrap_err();
        assert!(matches!(err, Error::LimitExceeded { actual, .. } if actual == 20 * 10 * 4), "{err:?}");
    }
}
