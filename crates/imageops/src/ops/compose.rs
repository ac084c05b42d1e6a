//! `compose`: a poster from a declarative template. The template (JSON or YAML, or a whole SVG
//! document) gives the canvas size and background (colour, linear gradient or image), then
//! layers drawn in order: images (named inputs, fitted to a box, optional rounded corners),
//! text boxes (shaped, wrapped), QR codes, rectangles (rounded, stroked) and inline SVG; each
//! with a position, opacity and blend mode. Layers are composited with tiny-skia, vectors
//! rendered by resvg; the same template and inputs always give the same pixels.
//!
//! Templates are untrusted: unknown fields are refused with their line and column, sizes are
//! checked against the output limit before anything is allocated, and SVG never reads files.

use std::collections::BTreeMap;

use image::DynamicImage;
use resvg::{tiny_skia, usvg};
use serde::Deserialize;

use super::Op;
use super::qrcode::Qrcode;
use super::text::svg_cost::{self, Budget};
use super::text::{Align, Fonts, Missing, Shadow, Text, premultiplied, straight};
use crate::Limits;
use crate::color::Color;
use crate::error::{Error, Result};
use crate::params::{OpSpec, text};

pub static SPEC: OpSpec = OpSpec {
    name: "compose",
    doc: "Render a poster from a template (JSON/YAML layers, or an SVG document) and named inputs (starts a pipeline; no input image).",
    params: &[text(
        "template",
        1024,
        None,
        "Name of the template input (the CLI reads it as a file path; images and fonts it names are read the same way). Required.",
    )],
};

/// Largest template accepted, in bytes.
pub const MAX_TEMPLATE_BYTES: usize = 1 << 20;
/// Most layers in one template.
pub const MAX_LAYERS: usize = 256;

#[derive(Debug, Clone, PartialEq)]
pub struct Compose {
    /// Input name of the template.
    pub template: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Template {
    width: u32,
    height: u32,
    #[serde(default)]
    background: Option<Background>,
    #[serde(default)]
    layers: Vec<Layer>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Background {
    Color(String),
    Spec(BackgroundSpec),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackgroundSpec {
    color: Option<String>,
    gradient: Option<Gradient>,
    /// Input name of a background image (covers the canvas).
    image: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Gradient {
    from: String,
    to: String,
    /// Direction in degrees, clockwise from left-to-right.
    #[serde(default)]
    angle: f64,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Layer {
    Image(ImageLayer),
    Text(TextLayer),
    Qrcode(QrLayer),
    Rect(RectLayer),
    Svg(SvgLayer),
}

fn one() -> f32 {
    1.0
}
fn normal() -> String {
    "normal".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageLayer {
    input: String,
    #[serde(default)]
    x: i32,
    #[serde(default)]
    y: i32,
    width: Option<u32>,
    height: Option<u32>,
    /// cover (default), contain, fill, inside.
    fit: Option<String>,
    #[serde(default)]
    radius: u32,
    #[serde(default = "one")]
    opacity: f32,
    #[serde(default = "normal")]
    blend: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TextLayer {
    text: String,
    font: Option<String>,
    #[serde(default)]
    x: i32,
    #[serde(default)]
    y: i32,
    /// Box width: lines wrap to it and align within it.
    width: Option<u32>,
    size: Option<f64>,
    color: Option<String>,
    align: Option<String>,
    line_height: Option<f64>,
    stroke: Option<String>,
    stroke_width: Option<f64>,
    shadow: Option<String>,
    #[serde(default)]
    angle: f64,
    #[serde(default = "one")]
    opacity: f32,
    #[serde(default = "normal")]
    blend: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QrLayer {
    content: String,
    #[serde(default)]
    x: i32,
    #[serde(default)]
    y: i32,
    size: u32,
    margin: Option<u32>,
    ecc: Option<String>,
    color: Option<String>,
    background: Option<String>,
    #[serde(default = "one")]
    opacity: f32,
    #[serde(default = "normal")]
    blend: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RectLayer {
    #[serde(default)]
    x: i32,
    #[serde(default)]
    y: i32,
    width: u32,
    height: u32,
    color: Option<String>,
    #[serde(default)]
    radius: f64,
    stroke: Option<String>,
    #[serde(default)]
    stroke_width: f64,
    #[serde(default = "one")]
    opacity: f32,
    #[serde(default = "normal")]
    blend: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SvgLayer {
    /// The SVG document inline...
    svg: Option<String>,
    /// ...or the name of an input holding it.
    input: Option<String>,
    #[serde(default)]
    x: i32,
    #[serde(default)]
    y: i32,
    width: Option<u32>,
    height: Option<u32>,
    #[serde(default = "one")]
    opacity: f32,
    #[serde(default = "normal")]
    blend: String,
}

fn bad(reason: impl Into<String>) -> Error {
    Error::bad("compose", "template", reason)
}

fn is_svg(bytes: &[u8]) -> bool {
    let head = bytes.iter().skip_while(|b| b.is_ascii_whitespace() || **b == 0xEF || **b == 0xBB || **b == 0xBF);
    head.take(1).any(|b| *b == b'<')
}

fn parse_template(bytes: &[u8]) -> Result<Template> {
    if bytes.len() > MAX_TEMPLATE_BYTES {
        return Err(bad(format!("{} bytes; templates are limited to {MAX_TEMPLATE_BYTES}", bytes.len())));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| bad(format!("not UTF-8: {e}")))?;
    // YAML is a superset of JSON, so one parser reads both, with line and column on errors.
    let t: Template = yaml_serde::from_str(text).map_err(|e| bad(e.to_string()))?;
    if t.layers.len() > MAX_LAYERS {
        return Err(bad(format!("{} layers; at most {MAX_LAYERS}", t.layers.len())));
    }
    Ok(t)
}

/// The input names a template refers to (images, fonts, SVG files), so a front end can supply
/// them; an SVG template refers to none.
pub fn referenced_inputs(template: &[u8]) -> Result<Vec<String>> {
    if is_svg(template) {
        return Ok(Vec::new());
    }
    let t = parse_template(template)?;
    let mut names = Vec::new();
    if let Some(Background::Spec(BackgroundSpec { image: Some(name), .. })) = &t.background {
        names.push(name.clone());
    }
    for layer in &t.layers {
        match layer {
            Layer::Image(l) => names.push(l.input.clone()),
            Layer::Text(l) => names.extend(l.font.clone()),
            Layer::Svg(l) => names.extend(l.input.clone()),
            Layer::Qrcode(_) | Layer::Rect(_) => {}
        }
    }
    names.sort();
    names.dedup();
    Ok(names)
}

fn color(s: Option<&str>, default: Color, what: &str) -> Result<Color> {
    s.map_or(Ok(default), |s| Color::parse(s).map_err(|e| bad(format!("{what}: {e}"))))
}

fn blend_mode(name: &str, layer: usize) -> Result<tiny_skia::BlendMode> {
    use tiny_skia::BlendMode as B;
    Ok(match name {
        "normal" => B::SourceOver,
        "multiply" => B::Multiply,
        "screen" => B::Screen,
        "overlay" => B::Overlay,
        "darken" => B::Darken,
        "lighten" => B::Lighten,
        "color-dodge" => B::ColorDodge,
        "color-burn" => B::ColorBurn,
        "hard-light" => B::HardLight,
        "soft-light" => B::SoftLight,
        "difference" => B::Difference,
        "exclusion" => B::Exclusion,
        "hue" => B::Hue,
        "saturation" => B::Saturation,
        "color" => B::Color,
        "luminosity" => B::Luminosity,
        other => return Err(bad(format!("layer {layer}: unknown blend mode `{other}`"))),
    })
}

/// Everything a render needs from outside the template.
struct Sources<'a> {
    raw: Option<&'a BTreeMap<String, Vec<u8>>>,
    limits: &'a Limits,
}

impl Sources<'_> {
    fn bytes(&self, name: &str) -> Result<&[u8]> {
        self.raw
            .and_then(|m| m.get(name))
            .map(Vec::as_slice)
            .ok_or_else(|| bad(format!("no input named `{name}` was supplied")))
    }

    fn image(&self, name: &str) -> Result<DynamicImage> {
        let opts = crate::decode::DecodeOptions { limits: *self.limits, ..Default::default() };
        Ok(crate::decode::decode(self.bytes(name)?, &opts)?.image)
    }
}

impl Compose {
    /// Renders the poster; `raw` holds the template and every input it names, as bytes.
    pub fn render(&self, raw: Option<&BTreeMap<String, Vec<u8>>>, limits: &Limits) -> Result<DynamicImage> {
        let src = Sources { raw, limits };
        let bytes = src.bytes(&self.template)?;
        if is_svg(bytes) {
            return render_svg_document(bytes, limits);
        }
        // Every vector drawn for this poster (gradients, rectangles, text, SVG layers) spends
        // from one budget.
        let budget = Budget::new(limits);
        let t = parse_template(bytes)?;
        if t.width == 0 || t.height == 0 {
            return Err(bad("width and height must be at least 1"));
        }
        limits.check_output(t.width, t.height)?;
        let mut canvas = tiny_skia::Pixmap::new(t.width, t.height).ok_or_else(|| bad("canvas size"))?;
        let fonts = Fonts::new(None)?;
        match &t.background {
            None => {}
            Some(Background::Color(c)) => canvas.fill(skia_color(color(Some(c), Color::WHITE, "background")?)),
            Some(Background::Spec(spec)) => {
                if let Some(c) = &spec.color {
                    canvas.fill(skia_color(color(Some(c), Color::WHITE, "background.color")?));
                }
                if let Some(g) = &spec.gradient {
                    let from = color(Some(&g.from), Color::WHITE, "background.gradient.from")?;
                    let to = color(Some(&g.to), Color::WHITE, "background.gradient.to")?;
                    let svg = gradient_svg(t.width, t.height, from, to, g.angle);
                    let layer = svg_pixmap(&fonts, svg.as_bytes(), (t.width, t.height), limits, &budget)?;
                    draw(&mut canvas, &layer, 0, 0, 1.0, tiny_skia::BlendMode::SourceOver);
                }
                if let Some(name) = &spec.image {
                    let img = fit_image(src.image(name)?, t.width, t.height, "cover", limits)?;
                    if let Some(p) = premultiplied(&img.to_rgba8()) {
                        draw(&mut canvas, &p, 0, 0, 1.0, tiny_skia::BlendMode::SourceOver);
                    }
                }
            }
        }
        for (i, layer) in t.layers.iter().enumerate() {
            let (pixmap, x, y, opacity, blend) = match layer {
                Layer::Image(l) => {
                    let img = src.image(&l.input)?;
                    let (w, h) = (l.width.unwrap_or(img.width()), l.height.unwrap_or(img.height()));
                    let mut img = fit_image(img, w, h, l.fit.as_deref().unwrap_or("cover"), limits)?;
                    if l.radius > 0 {
                        img = super::border::round(img, l.radius, false);
                    }
                    (premultiplied(&img.to_rgba8()), l.x, l.y, l.opacity, &l.blend)
                }
                Layer::Text(l) => {
                    let font = l.font.as_deref().map(|n| src.bytes(n)).transpose()?;
                    let text = text_of(l, i)?;
                    let img = text.render_within(font, limits, &budget)?;
                    let dx = match (text.align, l.width) {
                        (Align::Center, Some(w)) => (i64::from(w) - i64::from(img.width())) / 2,
                        (Align::Right, Some(w)) => i64::from(w) - i64::from(img.width()),
                        _ => 0,
                    };
                    (premultiplied(&img), l.x.saturating_add(dx as i32), l.y, l.opacity, &l.blend)
                }
                Layer::Qrcode(l) => {
                    let mut pairs = vec![("content", l.content.clone()), ("size", l.size.to_string())];
                    pairs.extend(l.margin.map(|m| ("margin", m.to_string())));
                    pairs.extend(l.ecc.clone().map(|e| ("ecc", e)));
                    pairs.extend(l.color.clone().map(|c| ("color", c)));
                    pairs.extend(l.background.clone().map(|c| ("background", c)));
                    let q = match Op::parse("qrcode", pairs.iter().map(|(k, v)| (*k, v.as_str()))) {
                        Ok(Op::Qrcode(q)) => q,
                        Ok(_) => unreachable!("qrcode parses to Op::Qrcode"),
                        Err(e) => return Err(bad(format!("layer {i} (qrcode): {e}"))),
                    };
                    let img = Qrcode::render(&q, None, limits)?;
                    (premultiplied(&img.to_rgba8()), l.x, l.y, l.opacity, &l.blend)
                }
                Layer::Rect(l) => {
                    limits.check_output(l.width, l.height)?;
                    let fill = color(l.color.as_deref(), Color::BLACK, &format!("layer {i} color"))?;
                    let stroke = l
                        .stroke
                        .as_deref()
                        .map(|s| color(Some(s), Color::BLACK, &format!("layer {i} stroke")))
                        .transpose()?;
                    let svg = rect_svg(l, fill, stroke);
                    let p = svg_pixmap(&fonts, svg.as_bytes(), (l.width, l.height), limits, &budget)?;
                    (Some(p), l.x, l.y, l.opacity, &l.blend)
                }
                Layer::Svg(l) => {
                    let doc: &[u8] = match (&l.svg, &l.input) {
                        (Some(s), None) => s.as_bytes(),
                        (None, Some(name)) => src.bytes(name)?,
                        _ => return Err(bad(format!("layer {i} (svg): give exactly one of `svg` or `input`"))),
                    };
                    check_svg_budget(doc).map_err(|e| bad(format!("layer {i} (svg): {e}")))?;
                    let tree = fonts.parse_svg(doc).map_err(|e| bad(format!("layer {i} (svg): {e}")))?;
                    let natural = tree.size();
                    let w = l.width.unwrap_or(natural.width().ceil() as u32);
                    let h = l.height.unwrap_or(natural.height().ceil() as u32);
                    (Some(tree_pixmap(&tree, (w, h), limits, &budget)?), l.x, l.y, l.opacity, &l.blend)
                }
            };
            if !(0.0..=1.0).contains(&opacity) {
                return Err(bad(format!("layer {i}: opacity {opacity} is not between 0 and 1")));
            }
            let mode = blend_mode(blend, i)?;
            if let Some(p) = pixmap {
                draw(&mut canvas, &p, x, y, opacity, mode);
            }
        }
        let out = straight(canvas);
        let img = DynamicImage::ImageRgba8(out);
        Ok(if crate::raster::is_opaque(&img) { DynamicImage::ImageRgb8(img.to_rgb8()) } else { img })
    }
}

fn text_of(l: &TextLayer, i: usize) -> Result<Text> {
    let at = |what: &str| format!("layer {i} {what}");
    let align = match l.align.as_deref().unwrap_or("left") {
        "left" => Align::Left,
        "center" => Align::Center,
        "right" => Align::Right,
        other => return Err(bad(format!("layer {i}: align `{other}` is not left, center or right"))),
    };
    // The same ranges as the `text` operation's schema.
    let in_range = |what: &str, v: f64, lo: f64, hi: f64| {
        if (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            Err(bad(format!("layer {i}: {what} {v} is not between {lo} and {hi}")))
        }
    };
    let size = in_range("size", l.size.unwrap_or(48.0), 1.0, 1000.0)?;
    let stroke_width = in_range("stroke_width", l.stroke_width.unwrap_or(2.0), 0.0, 100.0)?;
    let line_height = in_range("line_height", l.line_height.unwrap_or(1.25), 0.5, 5.0)?;
    let angle = in_range("angle", l.angle, -360.0, 360.0)?;
    Ok(Text {
        text: l.text.clone(),
        font: l.font.clone(),
        size,
        color: color(l.color.as_deref(), Color::BLACK, &at("color"))?,
        stroke: l
            .stroke
            .as_deref()
            .map(|s| Ok::<_, Error>((color(Some(s), Color::BLACK, &at("stroke"))?, stroke_width)))
            .transpose()?,
        shadow: l
            .shadow
            .as_deref()
            .map(|s| {
                Ok::<_, Error>(Shadow { color: color(Some(s), Color::BLACK, &at("shadow"))?, dx: 2, dy: 2, blur: 2.0 })
            })
            .transpose()?,
        align,
        width: l.width,
        line_height,
        gravity: super::geometry::Gravity::CENTER,
        offset: (0, 0),
        angle,
        opacity: 1.0,
        tile: false,
        spacing: 0,
        missing: Missing::Error,
    })
}

fn fit_image(img: DynamicImage, w: u32, h: u32, fit: &str, limits: &Limits) -> Result<DynamicImage> {
    if (img.width(), img.height()) == (w, h) {
        return Ok(img);
    }
    let (w, h) = (w.to_string(), h.to_string());
    let pairs = [("width", w.as_str()), ("height", h.as_str()), ("fit", fit), ("enlarge", "true")];
    let op = Op::parse("resize", pairs).map_err(|e| bad(format!("image layer: {e}")))?;
    op.apply(img, &super::Context { limits: *limits, images: &BTreeMap::new(), raw: None, deadline: None })
}

fn skia_color(c: Color) -> tiny_skia::Color {
    let [r, g, b, a] = c.0;
    tiny_skia::Color::from_rgba8(r, g, b, a)
}

fn draw(
    canvas: &mut tiny_skia::Pixmap,
    layer: &tiny_skia::Pixmap,
    x: i32,
    y: i32,
    opacity: f32,
    blend: tiny_skia::BlendMode,
) {
    let paint = tiny_skia::PixmapPaint { opacity, blend_mode: blend, quality: tiny_skia::FilterQuality::Nearest };
    canvas.draw_pixmap(x, y, layer.as_ref(), &paint, tiny_skia::Transform::identity(), None);
}

fn paint(c: Color) -> String {
    let [r, g, b, a] = c.0;
    format!(r##"fill="#{r:02x}{g:02x}{b:02x}" fill-opacity="{:.3}""##, f64::from(a) / 255.0)
}

fn gradient_svg(w: u32, h: u32, from: Color, to: Color, angle: f64) -> String {
    let stop = |offset: u8, c: Color| {
        let [r, g, b, a] = c.0;
        format!(
            r##"<stop offset="{offset}" stop-color="#{r:02x}{g:02x}{b:02x}" stop-opacity="{:.3}"/>"##,
            f64::from(a) / 255.0
        )
    };
    format!(
        concat!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}"><defs>"#,
            r#"<linearGradient id="g" gradientTransform="rotate({angle} 0.5 0.5)">{a}{b}</linearGradient></defs>"#,
            r#"<rect width="{w}" height="{h}" fill="url(#g)"/></svg>"#
        ),
        w = w,
        h = h,
        angle = angle,
        a = stop(0, from),
        b = stop(1, to)
    )
}

fn rect_svg(l: &RectLayer, fill: Color, stroke: Option<Color>) -> String {
    let finite = |v: f64| if v.is_finite() { v } else { 0.0 };
    let sw = if stroke.is_some() { finite(l.stroke_width).clamp(0.0, 1000.0) } else { 0.0 };
    let stroke_attr = stroke.map_or(String::new(), |c| {
        let [r, g, b, a] = c.0;
        format!(
            r##" stroke="#{r:02x}{g:02x}{b:02x}" stroke-opacity="{:.3}" stroke-width="{sw}""##,
            f64::from(a) / 255.0
        )
    });
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}"><rect x="{o}" y="{o}" width="{iw}" height="{ih}" rx="{r}" {fill}{stroke}/></svg>"#,
        w = l.width,
        h = l.height,
        o = sw / 2.0,
        iw = (f64::from(l.width) - sw).max(0.0),
        ih = (f64::from(l.height) - sw).max(0.0),
        r = finite(l.radius).clamp(0.0, 1e6),
        fill = paint(fill),
        stroke = stroke_attr,
    )
}

/// Most elements an untrusted SVG may expand to once every `<use>` is resolved, and the deepest
/// nesting: `<use>` chains grow exponentially (ten levels of ten copies are ten billion nodes)
/// and every nested group may hold a canvas-sized layer while rendering.
const MAX_SVG_NODES: u64 = 200_000;
const MAX_SVG_DEPTH: usize = 128;
/// Largest `feConvolveMatrix` order on either axis. Refused before usvg parses the document,
/// whose `orderX * orderY` overflows past 65 535; the taps per pixel are counted against the
/// render budget after parsing (`svg_cost`), so this only stops the nonsensical.
const MAX_CONVOLVE_ORDER: f64 = 64.0;

/// Refuses an SVG whose expanded size or depth is past the bounds above, before usvg builds it.
fn check_svg_budget(svg: &[u8]) -> Result<()> {
    let text = std::str::from_utf8(svg).map_err(|e| bad(format!("svg: not UTF-8: {e}")))?;
    let doc = roxmltree::Document::parse(text).map_err(|e| bad(format!("svg: {e}")))?;
    let by_id: BTreeMap<&str, roxmltree::Node<'_, '_>> =
        doc.descendants().filter_map(|n| n.attribute("id").map(|id| (id, n))).collect();
    // Expanded size of each node, memoised by position; a reference cycle counts once (usvg
    // refuses cycles itself).
    fn expand<'a, 'i>(
        n: roxmltree::Node<'a, 'i>,
        by_id: &BTreeMap<&str, roxmltree::Node<'a, 'i>>,
        memo: &mut BTreeMap<usize, u64>,
        active: &mut Vec<usize>,
        depth: usize,
    ) -> Result<u64> {
        if depth > MAX_SVG_DEPTH {
            return Err(bad(format!("svg: nested deeper than {MAX_SVG_DEPTH} elements")));
        }
        let key = n.range().start;
        if let Some(v) = memo.get(&key) {
            return Ok(*v);
        }
        if active.contains(&key) {
            return Ok(1);
        }
        active.push(key);
        let mut total = 1u64;
        for child in n.children().filter(roxmltree::Node::is_element) {
            total = total.saturating_add(expand(child, by_id, memo, active, depth + 1)?);
        }
        if n.tag_name().name() == "feConvolveMatrix"
            && let Some(order) = n.attribute("order")
            && order
                .split(|c: char| c.is_ascii_whitespace() || c == ',')
                .filter_map(|v| v.parse::<f64>().ok())
                .any(|v| v.is_nan() || v > MAX_CONVOLVE_ORDER)
        {
            return Err(bad(format!("svg: feConvolveMatrix order `{order}`; at most {MAX_CONVOLVE_ORDER} each way")));
        }
        if n.tag_name().name() == "use" {
            let href = n.attribute(("http://www.w3.org/1999/xlink", "href")).or_else(|| n.attribute("href"));
            if let Some(target) = href.and_then(|h| h.strip_prefix('#')).and_then(|id| by_id.get(id)) {
                total = total.saturating_add(expand(*target, by_id, memo, active, depth + 1)?);
            }
        }
        active.pop();
        if total > MAX_SVG_NODES {
            return Err(bad(format!("svg: expands to more than {MAX_SVG_NODES} elements")));
        }
        memo.insert(key, total);
        Ok(total)
    }
    expand(doc.root_element(), &by_id, &mut BTreeMap::new(), &mut Vec::new(), 0).map(|_| ())
}

/// Renders SVG bytes scaled to fit `size` (aspect kept, centred).
fn svg_pixmap(
    fonts: &Fonts,
    svg: &[u8],
    size: (u32, u32),
    limits: &Limits,
    budget: &Budget,
) -> Result<tiny_skia::Pixmap> {
    let tree = fonts.parse_svg(svg).map_err(|e| bad(format!("svg: {e}")))?;
    tree_pixmap(&tree, size, limits, budget)
}

/// Renders a parsed tree scaled to fit `size`, after its cost passed the budget
/// (`svg_cost`: filters, layers, masks and patterns counted before resvg starts).
fn tree_pixmap(tree: &usvg::Tree, (w, h): (u32, u32), limits: &Limits, budget: &Budget) -> Result<tiny_skia::Pixmap> {
    limits.check_output(w, h)?;
    let mut pixmap = tiny_skia::Pixmap::new(w.max(1), h.max(1)).ok_or_else(|| bad("svg layer size"))?;
    let natural = tree.size();
    let scale = (w as f32 / natural.width()).min(h as f32 / natural.height());
    let (dx, dy) = ((w as f32 - natural.width() * scale) / 2.0, (h as f32 - natural.height() * scale) / 2.0);
    let ts = tiny_skia::Transform::from_row(scale, 0.0, 0.0, scale, dx, dy);
    svg_cost::render(tree, ts, &mut pixmap.as_mut(), budget, ("compose", "template"))?;
    Ok(pixmap)
}

/// A whole SVG document as the poster, at its own size.
fn render_svg_document(bytes: &[u8], limits: &Limits) -> Result<DynamicImage> {
    if bytes.len() > MAX_TEMPLATE_BYTES {
        return Err(bad(format!("{} bytes; templates are limited to {MAX_TEMPLATE_BYTES}", bytes.len())));
    }
    check_svg_budget(bytes)?;
    let fonts = Fonts::new(None)?;
    let tree = fonts.parse_svg(bytes).map_err(|e| bad(format!("svg: {e}")))?;
    let size = tree.size().to_int_size();
    let pixmap = tree_pixmap(&tree, (size.width(), size.height()), limits, &Budget::new(limits))?;
    Ok(DynamicImage::ImageRgba8(straight(pixmap)))
}

/// For tests: a straight RGBA image from a template string with inputs.
#[cfg(test)]
fn compose(template: &str, extra: &[(&str, Vec<u8>)]) -> Result<image::RgbaImage> {
    let mut raw = BTreeMap::new();
    raw.insert("t".to_owned(), template.as_bytes().to_vec());
    for (k, v) in extra {
        raw.insert((*k).to_owned(), v.clone());
    }
    Ok(Compose { template: "t".into() }.render(Some(&raw), &Limits::default())?.to_rgba8())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::{EncodeOptions, OutFormat, encode};

    fn png(img: &DynamicImage) -> Vec<u8> {
        encode(img, OutFormat::Png, &EncodeOptions::default(), None).unwrap()
    }

    #[test]
    fn layers_draw_in_order_with_opacity_and_blend() {
        let photo = png(&crate::raster::canvas(40, 20, Color([0, 0, 255, 255]), false));
        let t = r##"
width: 200
height: 100
background: "#ffffff"
layers:
  - {type: image, input: photo, x: 10, y: 10, width: 80, height: 80, fit: fill}
  - {type: rect, x: 100, y: 10, width: 50, height: 50, color: "#ff0000"}
  - {type: rect, x: 120, y: 30, width: 50, height: 50, color: "#00ff00", opacity: 0.5}
  - {type: rect, x: 160, y: 70, width: 30, height: 20, color: "#808080", blend: multiply}
"##;
        let img = compose(t, &[("photo", photo)]).unwrap();
        assert_eq!(img.dimensions(), (200, 100));
        assert_eq!(img.get_pixel(5, 5).0, [255, 255, 255, 255], "background");
        assert_eq!(img.get_pixel(50, 50).0, [0, 0, 255, 255], "image stretched to its box");
        assert_eq!(img.get_pixel(105, 15).0, [255, 0, 0, 255], "red rect");
        let mixed = img.get_pixel(130, 40).0;
        assert!(mixed[0].abs_diff(128) <= 2 && mixed[1].abs_diff(128) <= 2, "half green over red: {mixed:?}");
        let mult = img.get_pixel(175, 80).0;
        assert!(mult[0].abs_diff(128) <= 2, "grey multiplied over white stays grey: {mult:?}");
    }

    #[test]
    fn gradient_text_qr_and_svg_layers() {
        let t = r##"{
          "width": 300, "height": 300,
          "background": {"gradient": {"from": "#000000", "to": "#ffffff", "angle": 0}},
          "layers": [
            {"type": "qrcode", "content": "https://example.com/poster", "x": 150, "y": 150, "size": 140},
            {"type": "text", "text": "SALE", "x": 10, "y": 10, "width": 280, "size": 60, "color": "#ff0000", "align": "center"},
            {"type": "svg", "svg": "<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'><circle cx='5' cy='5' r='5' fill='#00ff00'/></svg>", "x": 10, "y": 200, "width": 80, "height": 80}
          ]
        }"##;
        let img = compose(t, &[]).unwrap();
        let (left, right) = (img.get_pixel(2, 150).0[0], img.get_pixel(140, 150).0[0]);
        assert!(left < 10 && right > 100, "gradient left to right: {left} {right}");
        assert_eq!(img.get_pixel(50, 240).0, [0, 255, 0, 255], "svg circle scaled to its box");
        let red: Vec<u32> =
            img.enumerate_pixels().filter(|(_, _, p)| p.0 == [255, 0, 0, 255]).map(|(x, _, _)| x).collect();
        let centre = (red.iter().min().unwrap() + red.iter().max().unwrap()) / 2;
        assert!(centre.abs_diff(150) <= 3, "text centred in its box at {centre}");
        let code = DynamicImage::ImageRgba8(image::imageops::crop_imm(&img, 150, 150, 140, 140).to_image());
        let luma = code.to_luma8();
        let mut prepared =
            rqrr::PreparedImage::prepare_from_greyscale(140, 140, |x, y| luma.get_pixel(x as u32, y as u32).0[0]);
        assert_eq!(prepared.detect_grids()[0].decode().unwrap().1, "https://example.com/poster");
    }

    #[test]
    fn same_template_same_pixels_and_svg_templates() {
        let t = "width: 64\nheight: 64\nbackground: {color: '#123456'}\nlayers:\n  - {type: text, text: 'a b c', size: 20, color: white}\n";
        assert_eq!(compose(t, &[]).unwrap().as_raw(), compose(t, &[]).unwrap().as_raw());
        let svg = "<svg xmlns='http://www.w3.org/2000/svg' width='30' height='20'><rect width='30' height='20' fill='#0000ff'/></svg>";
        let img = compose(svg, &[]).unwrap();
        assert_eq!((img.dimensions(), img.get_pixel(15, 10).0), ((30, 20), [0, 0, 255, 255]));
        assert_eq!(referenced_inputs(svg.as_bytes()).unwrap(), Vec::<String>::new());
        let names = "width: 1\nheight: 1\nbackground: {image: bg}\nlayers: [{type: image, input: a}, {type: text, text: x, font: f}]";
        assert_eq!(referenced_inputs(names.as_bytes()).unwrap(), ["a", "bg", "f"]);
    }

    #[test]
    fn untrusted_templates_fail_clearly() {
        let cases: &[(&str, &str)] = &[
            (
                "width: 10\nheight: 10\nlayers: [{type: rect, width: 5, height: 5, colour: red}]",
                "unknown field `colour`",
            ),
            ("width: 10\nheight: 10\nlayers: [{type: blob}]", "unknown variant `blob`"),
            ("width: 10\nheight: 10\nlayers: [{type: image, input: nope}]", "no input named `nope`"),
            ("width: 10\nheight: 10\nlayers: [{type: rect, width: 5, height: 5, blend: glow}]", "blend mode `glow`"),
            ("width: 10\nheight: 10\nlayers: [{type: rect, width: 5, height: 5, color: '#zz'}]", "layer 0 color"),
            ("width: 100000\nheight: 100000", "max_output_pixels"),
            ("width: 10\nheight: 10\nlayers: [{type: svg, svg: '<svg'}]", "layer 0 (svg)"),
            ("width: 10\nheight: 10\nlayers: [{type: qrcode, content: '', size: 30}]", "layer 0 (qrcode)"),
            ("[1, 2", "template"),
            (
                "width: 10\nheight: 10\nlayers: [{type: text, text: hi, stroke: red, stroke_width: 1e12}]",
                "stroke_width",
            ),
            ("width: 10\nheight: 10\nlayers: [{type: text, text: hi, line_height: .nan}]", "line_height"),
        ];
        for (t, expect) in cases {
            let err = compose(t, &[]).unwrap_err();
            assert!(err.to_string().contains(expect), "{t}: {err}");
        }
        // A `<use>` bomb: ten levels of ten references each.
        let mut bomb = String::from(
            "<svg xmlns='http://www.w3.org/2000/svg' xmlns:xlink='http://www.w3.org/1999/xlink' width='8' height='8'><defs><rect id='l0' width='1' height='1'/>",
        );
        for level in 1..10 {
            bomb.push_str(&format!("<g id='l{level}'>"));
            for _ in 0..10 {
                bomb.push_str(&format!("<use xlink:href='#l{}'/>", level - 1));
            }
            bomb.push_str("</g>");
        }
        bomb.push_str("</defs><use xlink:href='#l9'/></svg>");
        assert!(compose(&bomb, &[]).unwrap_err().to_string().contains("expands to more than"));
        let deep = format!(
            "<svg xmlns='http://www.w3.org/2000/svg' width='8' height='8'>{}{}</svg>",
            "<g>".repeat(200),
            "</g>".repeat(200)
        );
        assert!(compose(&deep, &[]).unwrap_err().to_string().contains("nested deeper"));
        let huge = "x".repeat(MAX_TEMPLATE_BYTES + 1);
        assert!(compose(&huge, &[]).unwrap_err().to_string().contains("limited"));
        let kernel = vec!["1"; 1000].join(" ");
        let conv = format!(
            "<svg xmlns='http://www.w3.org/2000/svg' width='8' height='8'><filter id='f'><feConvolveMatrix order='1000 1' kernelMatrix='{kernel}'/></filter><rect width='8' height='8' filter='url(#f)'/></svg>"
        );
        assert!(compose(&conv, &[]).unwrap_err().to_string().contains("feConvolveMatrix order `1000 1`"));
        // SVG image references never reach the file system.
        let svg = "<svg xmlns='http://www.w3.org/2000/svg' xmlns:xlink='http://www.w3.org/1999/xlink' width='8' height='8'><image href='/etc/passwd' width='8' height='8'/></svg>";
        assert!(compose(svg, &[]).unwrap().pixels().all(|p| p.0[3] == 0));
    }

    /// The render budget's refusal, as `compose` reports it.
    fn assert_over_render_budget(result: Result<image::RgbaImage>) {
        match result {
            Err(e @ Error::LimitExceeded { limit: crate::error::LimitKind::SvgRenderWork, .. }) => {
                assert_eq!(e.code(), "limit_exceeded");
                assert!(e.to_string().contains("svg_render_work"), "{e}");
            }
            other => panic!("expected the render work limit, got {:?}", other.map(|i| i.dimensions())),
        }
    }

    #[test]
    fn expensive_svg_is_refused_before_resvg_starts() {
        // Layers share one budget: 40 blurred layers, each affordable alone (a smaller output
        // limit keeps the layers drawn before the refusal quick).
        let blurred = "<svg xmlns='http://www.w3.org/2000/svg' width='500' height='500'><filter id='b'><feGaussianBlur stdDeviation='9'/></filter><rect width='500' height='500' filter='url(#b)'/></svg>";
        let one = serde_json::json!({"type": "svg", "svg": blurred});
        let many = serde_json::json!({"width": 500, "height": 500, "layers": vec![one.clone(); 40]});
        let limits = Limits { max_output_pixels: 1_000_000, ..Limits::default() };
        let render = |t: serde_json::Value| {
            let raw = BTreeMap::from([("t".to_owned(), t.to_string().into_bytes())]);
            Compose { template: "t".into() }.render(Some(&raw), &limits).map(|i| i.to_rgba8())
        };
        assert_over_render_budget(render(many));
        assert!(render(serde_json::json!({"width": 500, "height": 500, "layers": vec![one; 2]})).is_ok());
        // The probe: turbulence with 1000 octaves over 1000x1000 ran for minutes inside resvg.
        let turbulence = "<svg xmlns='http://www.w3.org/2000/svg' width='1000' height='1000'><filter id='t'><feTurbulence baseFrequency='0.02' numOctaves='1000'/></filter><rect width='1000' height='1000' filter='url(#t)'/></svg>";
        assert_over_render_budget(compose(turbulence, &[]));
        // The same filter in an SVG layer of a template.
        let layer = serde_json::json!({"width": 1000, "height": 1000, "layers": [{"type": "svg", "svg": turbulence}]});
        assert_over_render_budget(compose(&layer.to_string(), &[]));
    }

    #[test]
    fn a_poster_with_a_drop_shadow_and_a_blur_renders_at_2000_px() {
        let svg = concat!(
            "<svg xmlns='http://www.w3.org/2000/svg' width='2000' height='2000'>",
            "<defs><filter id='s'><feDropShadow dx='20' dy='20' stdDeviation='15' flood-color='#000'/></filter>",
            "<filter id='b'><feGaussianBlur stdDeviation='30'/></filter></defs>",
            "<rect width='2000' height='2000' fill='#204060' filter='url(#b)'/>",
            "<rect x='400' y='400' width='1200' height='1200' fill='#ffffff' filter='url(#s)'/></svg>"
        );
        let img = compose(svg, &[]).unwrap();
        assert_eq!(img.get_pixel(1000, 1000).0, [255, 255, 255, 255], "the card");
        let shadow = img.get_pixel(1610, 1000).0;
        assert!(shadow[0] < 20 && shadow[3] == 255, "its shadow: {shadow:?}");
        let template = serde_json::json!({
            "width": 2000, "height": 2000, "background": "#204060",
            "layers": [
                {"type": "svg", "svg": svg},
                {"type": "text", "text": "SUMMER SALE", "x": 100, "y": 100, "size": 200, "color": "#ffffff", "shadow": "#000000"}
            ]
        });
        assert_eq!(compose(&template.to_string(), &[]).unwrap().dimensions(), (2000, 2000));
    }
}
