//! `text`: captions and text watermarks. The text is laid out as SVG and rendered by resvg, so
//! it is shaped (rustybuzz: ligatures, Arabic joining, combining marks) rather than drawn glyph
//! by glyph, and missing glyphs fall back to any other loaded font. Noto Sans (OFL) is built in;
//! a `font` input (e.g. a CJK font file) is tried first. The rendered block is placed like a
//! watermark logo: gravity and offset, opacity, or tiled with spacing; `angle` rotates the text
//! as vectors before it is rasterised.

use std::sync::{Arc, OnceLock};

use image::{DynamicImage, RgbaImage};
use resvg::{tiny_skia, usvg};

use super::geometry::{Gravity, OVERLAY_GRAVITY, OVERLAY_X, OVERLAY_Y};
use super::watermark::Watermark;
use crate::Limits;
use crate::color::Color;
use crate::error::{Error, Result};
use crate::params::{Args, OpSpec, boolean, choice, color, float, int, text};

pub(crate) mod svg_cost;

/// The built-in font: Noto Sans Regular, SIL Open Font License 1.1 (see assets/fonts/OFL.txt).
static NOTO_SANS: &[u8] = include_bytes!("../../assets/fonts/NotoSans-Regular.ttf");
const BUILTIN_FAMILY: &str = "Noto Sans";

pub static SPEC: OpSpec = OpSpec {
    name: "text",
    doc: "Draw shaped text (caption or text watermark): font, size, colour, stroke, shadow, alignment, wrapping, rotation, tiling.",
    params: &[
        text("text", 4000, None, "The text; a newline or the two characters `\\n` start a new line. Required."),
        text(
            "font",
            1024,
            None,
            "Name of a font input (TrueType/OpenType; the CLI reads it as a file path), used before the built-in Noto Sans; e.g. a CJK font.",
        ),
        float("size", 1.0, 1000.0, Some("48"), "Font size in pixels."),
        color("color", Some("white"), "Text colour (alpha allowed)."),
        color("stroke", None, "Outline colour (drawn under the fill)."),
        float("stroke_width", 0.0, 100.0, Some("2"), "Outline width in pixels (with `stroke`)."),
        color("shadow", None, "Drop-shadow colour (alpha allowed)."),
        int("shadow_x", -1000, 1000, Some("2"), "Shadow offset to the right in pixels."),
        int("shadow_y", -1000, 1000, Some("2"), "Shadow offset downwards in pixels."),
        float("shadow_blur", 0.0, 100.0, Some("2"), "Shadow blur (Gaussian standard deviation) in pixels."),
        choice("align", &["left", "center", "right"], Some("left"), "Alignment of the lines within the block."),
        int("width", 1, 65_535, None, "Wrap lines to this width in pixels (at spaces, and between CJK characters)."),
        float("line_height", 0.5, 5.0, Some("1.25"), "Distance between baselines, in multiples of the size."),
        OVERLAY_GRAVITY,
        OVERLAY_X,
        OVERLAY_Y,
        float("angle", -360.0, 360.0, Some("0"), "Clockwise rotation of the text in degrees."),
        float("opacity", 0.0, 1.0, Some("1.0"), "Multiplies the text's alpha."),
        choice(
            "missing",
            &["error", "skip", "box"],
            Some("error"),
            "Characters no loaded font has: refuse (naming them), leave them out, or draw the font's empty box.",
        ),
        boolean("tile", "false", "Repeat the text over the whole image."),
        int("spacing", 0, 10_000, Some("0"), "Gap between tiles in pixels."),
    ],
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Center,
    Right,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Text {
    pub text: String,
    pub font: Option<String>,
    pub size: f64,
    pub color: Color,
    pub stroke: Option<(Color, f64)>,
    pub shadow: Option<Shadow>,
    pub align: Align,
    pub width: Option<u32>,
    pub line_height: f64,
    pub gravity: Gravity,
    pub offset: (i64, i64),
    pub angle: f64,
    pub opacity: f64,
    pub tile: bool,
    pub spacing: u32,
    pub missing: Missing,
}

/// What to do with characters that no loaded font covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    Error,
    Skip,
    Box,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shadow {
    pub color: Color,
    pub dx: i64,
    pub dy: i64,
    pub blur: f64,
}

impl Text {
    pub fn from_args(a: &Args) -> Result<Self> {
        let raw = a.text("text").ok_or_else(|| a.invalid("text", "required"))?;
        // XML 1.0 cannot carry most control characters; tabs become spaces, newlines stay.
        let text: String = raw
            .replace("\\n", "\n")
            .chars()
            .filter_map(|c| match c {
                '\n' => Some('\n'),
                '\t' => Some(' '),
                c if c.is_control() => None,
                c => Some(c),
            })
            .collect();
        if text.trim().is_empty() {
            return Err(a.invalid("text", "must contain something to draw"));
        }
        Ok(Text {
            text,
            font: a.text("font").map(str::to_owned),
            size: a.float("size").unwrap_or(48.0),
            color: a.color("color").unwrap_or(Color::WHITE),
            stroke: a.color("stroke").map(|c| (c, a.float("stroke_width").unwrap_or(2.0))),
            shadow: a.color("shadow").map(|color| Shadow {
                color,
                dx: a.int("shadow_x").unwrap_or(2),
                dy: a.int("shadow_y").unwrap_or(2),
                blur: a.float("shadow_blur").unwrap_or(2.0),
            }),
            align: match a.choice("align") {
                Some("center") => Align::Center,
                Some("right") => Align::Right,
                _ => Align::Left,
            },
            width: a.u32("width"),
            line_height: a.float("line_height").unwrap_or(1.25),
            gravity: Gravity::from_args(a)?,
            offset: (a.int("x").unwrap_or(0), a.int("y").unwrap_or(0)),
            angle: a.float("angle").unwrap_or(0.0),
            opacity: a.float("opacity").unwrap_or(1.0),
            tile: a.boolean("tile"),
            spacing: a.u32("spacing").unwrap_or(0),
            missing: match a.choice("missing") {
                Some("skip") => Missing::Skip,
                Some("box") => Missing::Box,
                _ => Missing::Error,
            },
        })
    }

    /// Draws the text onto `base`; `font` is the font input's bytes when the step names one.
    pub fn apply(&self, base: DynamicImage, font: Option<&[u8]>, limits: &Limits) -> Result<DynamicImage> {
        let layer = self.render(font, limits)?;
        let mark = Watermark {
            image: String::new(),
            gravity: self.gravity,
            offset: self.offset,
            scale: None,
            opacity: self.opacity,
            tile: self.tile,
            spacing: self.spacing,
            angle: 0.0,
        };
        mark.apply(base, &DynamicImage::ImageRgba8(layer), limits)
    }

    /// The text block alone, cropped to its ink (stroke and shadow included), straight alpha.
    pub fn render(&self, font: Option<&[u8]>, limits: &Limits) -> Result<RgbaImage> {
        self.render_within(font, limits, &svg_cost::Budget::new(limits))
    }

    /// [`Text::render`] spending from a budget the caller shares between several renders.
    pub(crate) fn render_within(
        &self,
        font: Option<&[u8]>,
        limits: &Limits,
        budget: &svg_cost::Budget,
    ) -> Result<RgbaImage> {
        let fonts = Fonts::new(font)?;
        let text = fonts.cover(&self.text, self.missing)?;
        let lines = match self.width {
            Some(w) => text.split('\n').flat_map(|l| fonts.wrap(l, self.size, f64::from(w))).collect(),
            None => text.split('\n').map(str::to_owned).collect::<Vec<_>>(),
        };
        let tree = fonts.parse(&self.svg(&lines, &fonts.family_list()))?;
        let bbox = tree.root().abs_layer_bounding_box();
        // Sizes in f64 first: a huge stroke or thousands of lines must be a limit error, not an
        // overflowing cast.
        let side = |v: f32| {
            let v = f64::from(v).ceil() + 2.0;
            if v.is_finite() && v <= f64::from(u32::MAX) { v as u32 } else { u32::MAX }
        };
        let (w, h) = (side(bbox.width()), side(bbox.height()));
        limits.check_output(w, h)?;
        let mut pixmap = tiny_skia::Pixmap::new(w, h)
            .ok_or_else(|| Error::bad("text", "size", "the text block is empty or too large"))?;
        let to_origin = tiny_skia::Transform::from_translate(1.0 - bbox.x(), 1.0 - bbox.y());
        svg_cost::render(&tree, to_origin, &mut pixmap.as_mut(), budget, ("text", "text"))?;
        Ok(straight(pixmap))
    }

    fn svg(&self, lines: &[String], families: &str) -> String {
        let anchor = match self.align {
            Align::Left => "start",
            Align::Center => "middle",
            Align::Right => "end",
        };
        let mut body = String::new();
        for (i, line) in lines.iter().enumerate() {
            let y = i as f64 * self.size * self.line_height;
            body.push_str(&format!(r#"<tspan x="0" y="{y:.2}">{}</tspan>"#, escape(line)));
        }
        let (fill, fill_opacity) = paint(self.color);
        let stroke = self.stroke.map_or(String::new(), |(c, w)| {
            let (c, o) = paint(c);
            format!(
                r#" stroke="{c}" stroke-opacity="{o}" stroke-width="{w}" stroke-linejoin="round" paint-order="stroke""#
            )
        });
        let (filter_def, filter_use) = self.shadow.map_or((String::new(), String::new()), |s| {
            let (c, o) = paint(s.color);
            (
                format!(
                    r#"<filter id="shadow" x="-50%" y="-50%" width="200%" height="200%" color-interpolation-filters="sRGB"><feDropShadow dx="{}" dy="{}" stdDeviation="{}" flood-color="{c}" flood-opacity="{o}"/></filter>"#,
                    s.dx, s.dy, s.blur
                ),
                r#" filter="url(#shadow)""#.to_owned(),
            )
        });
        format!(
            concat!(
                r#"<svg xmlns="http://www.w3.org/2000/svg" width="1" height="1"><defs>{defs}</defs>"#,
                r#"<g transform="rotate({angle})"{filter}><text xml:space="preserve" font-family="{families}" font-size="{size}" "#,
                r#"text-anchor="{anchor}" fill="{fill}" fill-opacity="{fill_opacity}"{stroke}>{body}</text></g></svg>"#
            ),
            defs = filter_def,
            angle = self.angle,
            filter = filter_use,
            families = escape(families),
            size = self.size,
            anchor = anchor,
            fill = fill,
            fill_opacity = fill_opacity,
            stroke = stroke,
            body = body,
        )
    }
}

/// The fonts one `text` step may use: the step's own font first, then the built-in one.
pub(crate) struct Fonts {
    db: Arc<usvg::fontdb::Database>,
    user_family: Option<String>,
}

fn builtin_db() -> Arc<usvg::fontdb::Database> {
    static DB: OnceLock<Arc<usvg::fontdb::Database>> = OnceLock::new();
    DB.get_or_init(|| {
        let mut db = usvg::fontdb::Database::new();
        db.load_font_data(NOTO_SANS.to_vec());
        Arc::new(db)
    })
    .clone()
}

impl Fonts {
    pub(crate) fn new(user: Option<&[u8]>) -> Result<Self> {
        let mut db = builtin_db();
        let mut user_family = None;
        if let Some(bytes) = user {
            let db = Arc::make_mut(&mut db);
            let before = db.len();
            db.load_font_data(bytes.to_vec());
            let face = db.faces().nth(before).ok_or_else(|| {
                Error::bad("text", "font", "not a TrueType/OpenType font (or a collection holding none)")
            })?;
            user_family = face.families.first().map(|(name, _)| name.clone());
        }
        Ok(Fonts { db, user_family })
    }

    /// Checks every character against the loaded fonts' character maps.
    fn cover(&self, text: &str, missing: Missing) -> Result<String> {
        use skrifa::MetadataProvider;
        let charmaps_hit = |c: char| {
            self.db.faces().any(|face| {
                self.db
                    .with_face_data(face.id, |data, index| {
                        skrifa::FontRef::from_index(data, index).is_ok_and(|f| f.charmap().map(c).is_some())
                    })
                    .unwrap_or(false)
            })
        };
        let needs_glyph = |c: char| !c.is_whitespace() && !is_format_char(c);
        if missing == Missing::Box {
            return Ok(text.to_owned());
        }
        let mut absent: Vec<char> = Vec::new();
        let mut seen = std::collections::BTreeMap::new();
        let kept: String = text
            .chars()
            .filter(|&c| {
                let covered = !needs_glyph(c) || *seen.entry(c).or_insert_with(|| charmaps_hit(c));
                if !covered && !absent.contains(&c) {
                    absent.push(c);
                }
                covered
            })
            .collect();
        if absent.is_empty() || missing == Missing::Skip {
            return Ok(kept);
        }
        let list: Vec<String> = absent.iter().take(8).map(|c| format!("'{c}' (U+{:04X})", *c as u32)).collect();
        Err(Error::bad(
            "text",
            "text",
            format!(
                "no loaded font has {}{}; supply one with font=FILE, or set missing=skip or missing=box",
                list.join(", "),
                if absent.len() > 8 { format!(" and {} more", absent.len() - 8) } else { String::new() }
            ),
        ))
    }

    /// CSS font-family list: the step's font, then Noto Sans.
    fn family_list(&self) -> String {
        match &self.user_family {
            Some(f) => format!("'{}', '{BUILTIN_FAMILY}'", f.replace(['\'', '"'], "")),
            None => format!("'{BUILTIN_FAMILY}'"),
        }
    }

    fn parse(&self, svg: &str) -> Result<usvg::Tree> {
        self.parse_svg(svg.as_bytes()).map_err(|e| Error::bad("text", "text", format!("cannot lay out: {e}")))
    }

    /// Parses an SVG document (ours or a user's) with these fonts. Nothing outside the document
    /// is ever read: image references to files or data URLs resolve to nothing.
    pub(crate) fn parse_svg(&self, svg: &[u8]) -> std::result::Result<usvg::Tree, usvg::Error> {
        let opts = usvg::Options {
            fontdb: self.db.clone(),
            font_family: BUILTIN_FAMILY.to_owned(),
            image_href_resolver: usvg::ImageHrefResolver {
                resolve_data: Box::new(|_, _, _| None),
                resolve_string: Box::new(|_, _| None),
            },
            ..usvg::Options::default()
        };
        usvg::Tree::from_data(svg, &opts)
    }

    /// Advance-free ink width of one line at `size` pixels.
    fn measure(&self, line: &str, size: f64) -> f64 {
        let svg = format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="1" height="1"><text xml:space="preserve" font-family="{}" font-size="{size}">{}</text></svg>"#,
            escape(&self.family_list()),
            escape(line)
        );
        self.parse(&svg).map_or(0.0, |t| f64::from(t.root().abs_stroke_bounding_box().width()))
    }

    /// Greedy line breaking: as many tokens per line as fit in `width` (found by binary search),
    /// at least one; a single token wider than the line is broken between characters.
    fn wrap(&self, line: &str, size: f64, width: f64) -> Vec<String> {
        let tokens = tokens(line);
        let mut out = Vec::new();
        let mut i = 0;
        while i < tokens.len() {
            // Leading spaces of a wrapped line are dropped.
            while i < tokens.len() && tokens[i].trim().is_empty() && !out.is_empty() {
                i += 1;
            }
            if i == tokens.len() {
                break;
            }
            let fits = |n: usize| self.measure(tokens[i..i + n].concat().trim_end(), size) <= width;
            let (mut lo, mut hi) = (1, tokens.len() - i);
            if fits(hi) {
                lo = hi;
            } else {
                while lo + 1 < hi {
                    let mid = (lo + hi) / 2;
                    if fits(mid) { lo = mid } else { hi = mid }
                }
            }
            if lo == 1 && !fits(1) {
                // One token too wide: split it between characters.
                let chars: Vec<char> = tokens[i].chars().collect();
                let mut start = 0;
                while start < chars.len() {
                    let mut end = start + 1;
                    while end < chars.len()
                        && self.measure(&chars[start..=end].iter().collect::<String>(), size) <= width
                    {
                        end += 1;
                    }
                    out.push(chars[start..end].iter().collect());
                    start = end;
                }
                i += 1;
                continue;
            }
            out.push(tokens[i..i + lo].concat().trim_end().to_owned());
            i += lo;
        }
        if out.is_empty() {
            out.push(String::new());
        }
        out
    }
}

/// Splits a line at its break opportunities: after runs of spaces, and around every CJK
/// ideograph, kana or full-width form (those scripts break between characters).
fn tokens(line: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut prev_space = false;
    for (i, c) in line.char_indices() {
        let cjk = is_cjk(c);
        if i > start && (cjk || (prev_space && !c.is_whitespace())) {
            out.push(&line[start..i]);
            start = i;
        }
        if cjk {
            let end = i + c.len_utf8();
            out.push(&line[start..end]);
            start = end;
        }
        prev_space = c.is_whitespace();
    }
    if start < line.len() {
        out.push(&line[start..]);
    }
    out
}

/// Invisible formatting characters (joiners, marks, variation selectors) that shaping uses
/// without needing a glyph of their own.
fn is_format_char(c: char) -> bool {
    matches!(c as u32, 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x2064 | 0xFE00..=0xFE0F | 0xFEFF | 0xE0100..=0xE01EF)
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x2E80..=0x2FDF | 0x3000..=0x30FF | 0x3100..=0x31FF | 0x3400..=0x4DBF | 0x4E00..=0x9FFF
        | 0xF900..=0xFAFF | 0xFF00..=0xFFEF | 0x20000..=0x2FA1F)
}

/// A tiny-skia pixmap (premultiplied) as a straight-alpha RGBA image, as the blenders expect.
pub(crate) fn straight(pixmap: tiny_skia::Pixmap) -> RgbaImage {
    let (w, h) = (pixmap.width(), pixmap.height());
    let mut px = pixmap.take();
    for p in px.chunks_exact_mut(4) {
        let a = u32::from(p[3]);
        if a != 0 && a != 255 {
            for c in &mut p[..3] {
                *c = ((u32::from(*c) * 255 + a / 2) / a).min(255) as u8;
            }
        }
    }
    RgbaImage::from_raw(w, h, px).expect("pixmap is w*h*4")
}

/// A straight-alpha RGBA image as a premultiplied tiny-skia pixmap (`None` when empty).
pub(crate) fn premultiplied(img: &RgbaImage) -> Option<tiny_skia::Pixmap> {
    let mut px = img.as_raw().clone();
    for p in px.chunks_exact_mut(4) {
        let a = u32::from(p[3]);
        if a != 255 {
            for c in &mut p[..3] {
                *c = ((u32::from(*c) * a + 127) / 255) as u8;
            }
        }
    }
    tiny_skia::Pixmap::from_vec(px, tiny_skia::IntSize::from_wh(img.width(), img.height())?)
}

pub(crate) fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&apos;")
}

fn paint(c: Color) -> (String, String) {
    let [r, g, b, a] = c.0;
    (format!("#{r:02x}{g:02x}{b:02x}"), format!("{:.3}", f64::from(a) / 255.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::Op;
    use crate::raster;

    fn parse(pairs: &[(&str, &str)]) -> Result<Text> {
        match Op::parse("text", pairs.iter().copied())? {
            Op::Text(t) => Ok(*t),
            other => panic!("{other:?}"),
        }
    }

    fn layer(pairs: &[(&str, &str)]) -> RgbaImage {
        parse(pairs).unwrap().render(None, &Limits::default()).unwrap()
    }

    /// Bounding box of pixels with any alpha: (x0, y0, x1, y1).
    fn ink(img: &RgbaImage) -> (u32, u32, u32, u32) {
        let mut b = (u32::MAX, u32::MAX, 0, 0);
        for (x, y, _) in img.enumerate_pixels().filter(|(_, _, p)| p.0[3] > 0) {
            b = (b.0.min(x), b.1.min(y), b.2.max(x + 1), b.3.max(y + 1));
        }
        b
    }

    #[test]
    fn tokens_break_at_spaces_and_between_cjk_characters() {
        assert_eq!(tokens("ab cd  ef"), ["ab ", "cd  ", "ef"]);
        assert_eq!(tokens("你好a b"), ["你", "好", "a ", "b"]);
        assert_eq!(tokens("x"), ["x"]);
    }

    #[test]
    fn draws_solid_colour_and_crops_to_ink() {
        let img = layer(&[("text", "HI"), ("size", "100"), ("color", "#ff0000")]);
        let solid = img.pixels().filter(|p| p.0 == [255, 0, 0, 255]).count();
        assert!(solid > 1000, "{solid} solid red pixels");
        let (x0, y0, x1, y1) = ink(&img);
        assert!(x0 <= 2 && y0 <= 2 && x1 + 2 >= img.width() && y1 + 2 >= img.height(), "cropped to ink");
        // Stroke and shadow grow the block.
        let stroked = layer(&[("text", "HI"), ("size", "100"), ("stroke", "black"), ("stroke_width", "10")]);
        assert!(stroked.width() >= img.width() + 8 && stroked.height() >= img.height() + 8);
        let shadowed =
            layer(&[("text", "HI"), ("size", "100"), ("shadow", "black"), ("shadow_x", "20"), ("shadow_y", "0")]);
        assert!(shadowed.width() >= img.width() + 18);
    }

    #[test]
    fn wraps_to_the_width_and_aligns_lines() {
        let t = parse(&[("text", "one two three four five six seven"), ("size", "30"), ("width", "150")]).unwrap();
        let fonts = Fonts::new(None).unwrap();
        let lines = fonts.wrap(&t.text, 30.0, 150.0);
        assert!(lines.len() >= 3, "{lines:?}");
        assert_eq!(lines.join(" "), t.text, "no word lost or split");
        assert!(lines.iter().all(|l| fonts.measure(l, 30.0) <= 150.0), "{lines:?}");
        let wrapped = t.render(None, &Limits::default()).unwrap();
        assert!(wrapped.width() <= 152 && wrapped.height() > 90, "{}x{}", wrapped.width(), wrapped.height());
        // A word longer than the line is split between characters.
        let long = fonts.wrap("incomprehensibilities", 30.0, 60.0);
        assert!(long.len() > 2 && long.concat() == "incomprehensibilities", "{long:?}");
        // Right alignment puts a short last line's ink at the right edge.
        let right = layer(&[("text", "a long first line\nend"), ("size", "30"), ("align", "right")]);
        let left = layer(&[("text", "a long first line\nend"), ("size", "30")]);
        let last_row_ink = |img: &RgbaImage| {
            let y = img.height() - 8;
            (0..img.width()).filter(|&x| img.get_pixel(x, y).0[3] > 0).max().unwrap_or(0)
        };
        assert!(last_row_ink(&right) > last_row_ink(&left) + 100);
    }

    #[test]
    fn text_is_shaped_not_drawn_glyph_by_glyph() {
        // Shaping composes e + COMBINING ACUTE into the font's "é"; drawn glyph by glyph, the
        // accent would sit after the "e" instead of on it.
        let composed = layer(&[("text", "café"), ("size", "60"), ("color", "black")]);
        let combining = layer(&[("text", "cafe\u{0301}"), ("size", "60"), ("color", "black")]);
        assert_eq!((combining.width(), combining.height()), (composed.width(), composed.height()));
        assert!(combining.as_raw() == composed.as_raw(), "same pixels");
    }

    #[test]
    fn rotation_and_placement() {
        let flat = layer(&[("text", "pixflow"), ("size", "40")]);
        let turned = layer(&[("text", "pixflow"), ("size", "40"), ("angle", "90")]);
        assert!(turned.height() > turned.width() && turned.height().abs_diff(flat.width()) <= 3);
        let base = raster::canvas(400, 200, Color::BLACK, false);
        let t = parse(&[("text", "X"), ("size", "40"), ("gravity", "northwest"), ("x", "10"), ("y", "10")]).unwrap();
        let out = t.apply(base.clone(), None, &Limits::default()).unwrap().to_rgb8();
        let lit: Vec<(u32, u32)> =
            out.enumerate_pixels().filter(|(_, _, p)| p.0[0] > 128).map(|(x, y, _)| (x, y)).collect();
        assert!(!lit.is_empty() && lit.iter().all(|&(x, y)| (10..60).contains(&x) && (10..60).contains(&y)));
        let t = parse(&[("text", "X"), ("size", "40"), ("gravity", "southeast")]).unwrap();
        let out = t.apply(base, None, &Limits::default()).unwrap().to_rgb8();
        assert!(out.enumerate_pixels().filter(|(_, _, p)| p.0[0] > 128).all(|(x, y, _)| x > 340 && y > 140));
    }

    #[test]
    fn missing_glyphs_and_bad_fonts_are_named() {
        let t = parse(&[("text", "hi 你")]).unwrap();
        let err = t.render(None, &Limits::default()).unwrap_err();
        assert!(err.to_string().contains("U+4F60"), "{err}");
        let skip = layer(&[("text", "hi 你"), ("missing", "skip")]);
        assert_eq!(skip.as_raw(), layer(&[("text", "hi ")]).as_raw());
        assert!(layer(&[("text", "你"), ("missing", "box")]).pixels().any(|p| p.0[3] > 0), "the empty box is drawn");
        let t = parse(&[("text", "hi"), ("font", "f")]).unwrap();
        match t.render(Some(b"not a font"), &Limits::default()) {
            Err(Error::BadParameter { param, .. }) => assert_eq!(param, "font"),
            other => panic!("{other:?}"),
        }
        for (pairs, param) in [(vec![("text", " \n ")], "text"), (vec![("size", "10")], "text")] {
            match parse(&pairs) {
                Err(Error::BadParameter { param: p, .. }) => assert_eq!(p, param),
                other => panic!("{other:?}"),
            }
        }
        // Markup in the text is text, not SVG.
        let markup = layer(&[("text", "<tspan>&amp;</tspan>"), ("size", "20")]);
        assert!(markup.width() > 100, "all characters drawn: {}", markup.width());
    }

    #[test]
    fn shadow_filters_count_against_the_render_budget() {
        // The block is the shadow's filter region, blurred whole: its work is counted before
        // resvg runs, from the budget a caller (a compose template) shares between layers.
        let spent = |pairs: &[(&str, &str)]| {
            let budget = svg_cost::Budget::new(&Limits::default());
            let block = parse(pairs).unwrap().render_within(None, &Limits::default(), &budget).unwrap();
            (u64::from(block.width()) * u64::from(block.height()), budget.work())
        };
        let (px, shadowed) = spent(&[("text", "HI"), ("size", "100"), ("shadow", "black"), ("shadow_blur", "8")]);
        assert!(shadowed >= px * (svg_cost::BOX_BLUR + svg_cost::PRIMITIVE), "{shadowed} for {px} px");
        let (_, plain) = spent(&[("text", "HI"), ("size", "100")]);
        assert!(plain > 0 && plain < shadowed / 4, "{plain}");
        // A budget smaller than the shadow's work refuses it before anything is drawn.
        let tight = svg_cost::Budget::new(&Limits {
            max_output_pixels: shadowed / svg_cost::WORK_PER_OUTPUT_PIXEL - 1,
            ..Limits::default()
        });
        let t = parse(&[("text", "HI"), ("size", "100"), ("shadow", "black"), ("shadow_blur", "8")]).unwrap();
        let err = t.render_within(None, &Limits::default(), &tight).unwrap_err();
        assert!(err.to_string().contains("svg_render_work"), "{err}");
    }
}
