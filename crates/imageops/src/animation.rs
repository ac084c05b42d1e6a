//! Whole animations (GIF, animated WebP, APNG): decoding every frame composited to the full
//! canvas (disposal and transparency handled by the decoders), and encoding frames back to an
//! animated GIF or WebP with their timing and loop count. Pipelines map their operations over
//! the frames in between.

use std::io::Cursor;

use image::{AnimationDecoder, DynamicImage};

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

/// Animated GIF with inter-frame optimisation: after the first frame, an opaque frame is
/// stored as the rectangle that changed since the previous one, with unchanged pixels inside
/// it transparent (they show the previous frame), which shrinks files and encode time. Frames
/// with transparency are stored whole and cleared after display, so transparent areas never
/// show an older frame.
fn encode_gif(anim: &Animation, (w, h): (u32, u32)) -> Result<Vec<u8>> {
    let fail = |e: gif::EncodingError| Error::Encode { format: "gif", detail: e.to_string() };
    let too_big = || Error::Encode { format: "gif", detail: format!("{w}x{h} exceeds GIF's 65535 pixel sides") };
    let (gw, gh) = (u16::try_from(w).map_err(|_| too_big())?, u16::try_from(h).map_err(|_| too_big())?);
    let mut out = Vec::new();
    {
        let mut enc = gif::Encoder::new(&mut out, gw, gh, &[]).map_err(fail)?;
        enc.set_repeat(match anim.loop_count {
            None => gif::Repeat::Infinite,
            Some(n) => gif::Repeat::Finite(u16::try_from(n).unwrap_or(u16::MAX)),
        })
        .map_err(fail)?;
        let mut prev: Option<image::RgbaImage> = None;
        for f in &anim.frames {
            let cur = f.image.to_rgba8();
            if cur.dimensions() != (w, h) {
                return Err(Error::Encode { format: "gif", detail: "frames differ in size".into() });
            }
            let opaque = cur.pixels().all(|p| p.0[3] == 255);
            let (x, y, mut px, rw, rh) = match (&prev, opaque) {
                (Some(before), true) => changed_rect(before, &cur),
                _ => (0, 0, cur.as_raw().clone(), w, h),
            };
            // NeuQuant sampling factor: 1 best .. 30 fastest; 10 is gif's own default.
            let mut frame = gif::Frame::from_rgba_speed(rw as u16, rh as u16, &mut px, 10);
            frame.left = x as u16;
            frame.top = y as u16;
            frame.delay = u16::try_from(f.delay_ms.saturating_add(5) / 10).unwrap_or(u16::MAX);
            frame.dispose = if opaque { gif::DisposalMethod::Keep } else { gif::DisposalMethod::Background };
            enc.write_frame(&frame).map_err(fail)?;
            prev = opaque.then_some(cur);
        }
    }
    Ok(out)
}

/// The smallest rectangle holding every pixel that differs between two same-sized opaque
/// frames, as RGBA with the unchanged pixels transparent: (x, y, pixels, width, height). An
/// identical frame gives one transparent pixel (the frame is kept for its delay).
fn changed_rect(before: &image::RgbaImage, cur: &image::RgbaImage) -> (u32, u32, Vec<u8>, u32, u32) {
    let (w, h) = cur.dimensions();
    let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0, 0);
    for (y, (a, b)) in before.rows().zip(cur.rows()).enumerate() {
        for (x, (p, q)) in a.zip(b).enumerate() {
            if p != q {
                x0 = x0.min(x as u32);
                x1 = x1.max(x as u32 + 1);
                y0 = y0.min(y as u32);
                y1 = y1.max(y as u32 + 1);
            }
        }
    }
    if x0 >= x1 {
        return (0, 0, vec![0, 0, 0, 0], 1, 1);
    }
    let mut px = Vec::with_capacity(((x1 - x0) * (y1 - y0) * 4) as usize);
    for y in y0..y1 {
        for x in x0..x1 {
            let q = cur.get_pixel(x, y);
            px.extend_from_slice(if before.get_pixel(x, y) == q { &[0, 0, 0, 0] } else { &q.0 });
        }
    }
    (x0, y0, px, x1 - x0, y1 - y0)
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
        OutFormat::Gif => encode_gif(anim, (w, h)),
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
                enc.encode_frame(image::Frame::from_parts(img, 0, 0, image::Delay::from_numer_denom_ms(70, 1)))
                    .unwrap();
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

    /// A 64x48 animation: a 6x6 square moving right over a background that is grey, or
    /// transparent.
    fn moving_square(frames: u32, transparent: bool) -> Animation {
        let bg = if transparent { image::Rgba([0, 0, 0, 0]) } else { image::Rgba([90, 90, 90, 255]) };
        let frames = (0..frames)
            .map(|i| {
                let mut img = image::RgbaImage::from_pixel(64, 48, bg);
                for y in 20..26 {
                    for x in 4 + i * 8..10 + i * 8 {
                        img.put_pixel(x, y, image::Rgba([250, 30, 30, 255]));
                    }
                }
                AnimFrame { image: DynamicImage::ImageRgba8(img), delay_ms: 50 }
            })
            .collect();
        Animation { frames, loop_count: None }
    }

    #[test]
    fn gif_frames_after_the_first_store_only_what_changed() {
        let anim = moving_square(6, false);
        let bytes = encode(&anim, OutFormat::Gif, &EncodeOptions::default()).unwrap();
        let mut opts = gif::DecodeOptions::new();
        opts.set_color_output(gif::ColorOutput::Indexed);
        let mut dec = opts.read_info(bytes.as_slice()).unwrap();
        let mut rects = Vec::new();
        while let Some(f) = dec.read_next_frame().unwrap() {
            rects.push((f.left, f.top, f.width, f.height));
        }
        assert_eq!(rects[0], (0, 0, 64, 48));
        assert!(rects[1..].iter().all(|&(_, top, w, h)| top == 20 && w == 14 && h == 6), "{rects:?}");
        // Played back, every frame is the source frame.
        let back = decode(Format::Gif, &bytes, 6, &Limits::default()).unwrap();
        for (a, b) in anim.frames.iter().zip(&back.frames) {
            let (a, b) = (a.image.to_rgba8(), b.image.to_rgba8());
            let worst = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
            assert!(worst <= 8, "frame differs by up to {worst}");
        }
    }

    #[test]
    fn gif_transparency_never_shows_an_older_frame() {
        let anim = moving_square(3, true);
        let bytes = encode(&anim, OutFormat::Gif, &EncodeOptions::default()).unwrap();
        let back = decode(Format::Gif, &bytes, 3, &Limits::default()).unwrap();
        let last = back.frames[2].image.to_rgba8();
        assert_eq!(last.get_pixel(6, 22).0[3], 0, "where the square was in frame 0 is transparent again");
        assert_eq!(last.get_pixel(22, 22).0[3], 255, "the square is where frame 2 puts it");
    }
}
