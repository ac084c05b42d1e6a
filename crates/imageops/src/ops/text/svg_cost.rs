//! What rendering a parsed SVG tree will cost, estimated before resvg draws anything.
//!
//! resvg cannot be interrupted: a filter such as `feTurbulence numOctaves="1000"` or
//! `feMorphology radius="500"` over a large region keeps a CPU busy for minutes after the
//! request timed out. So every render of untrusted (or user-parameterised) SVG goes through
//! [`render`], which first walks the usvg tree the way resvg 0.49 will (`render.rs`,
//! `filter/mod.rs`): isolated groups and their layers (clipped to resvg's own 5x-canvas box),
//! filter regions in device pixels, masks, clip paths, pattern tiles, nested SVG images and
//! `feImage` subtrees. It adds up the per-pixel work and the pixels held at once, and refuses
//! the document when either exceeds a budget derived from [`Limits::max_output_pixels`].
//!
//! Costs are in "pixel passes": one simple pass over one pixel (a copy, a blend, a colour-space
//! conversion), a few nanoseconds at most. The per-primitive factors follow what resvg does:
//!
//! - every primitive copies its input, converts colour spaces and clips its result: [`PRIMITIVE`];
//! - `feGaussianBlur`/`feDropShadow`: a 5-pass box blur (deviation >= 2 device px) or a 4-step IIR
//!   blur; both are linear in the region and independent of the deviation: [`BOX_BLUR`],
//!   [`IIR_BLUR`];
//! - `feTurbulence`: 4 channels x `numOctaves` Perlin evaluations per pixel: [`OCTAVE`] each;
//! - `feMorphology`: naive, the whole window of `(2rx+1) x (2ry+1)` device pixels (clamped to
//!   the region) per pixel;
//! - `feConvolveMatrix`: `orderX x orderY` taps per pixel;
//! - lighting, displacement, composite, merge and the rest: small constants.
//!
//! `numOctaves` is counted, not refused: past ~10 octaves the extra ones change nothing at
//! 8 bits, but browsers render such documents, and counting makes a large count over a large
//! region cost what resvg would spend, so the work budget refuses it while a small swatch passes.

use std::cell::Cell;

use resvg::tiny_skia::{self, IntRect, NonZeroRect, Rect, Transform};
use resvg::usvg::{self, filter::Kind};

use crate::Limits;
use crate::error::{Error, LimitKind, Result};

/// Work budget per pixel of [`Limits::max_output_pixels`], in pixel passes: 64 x 50 MP (the
/// default limit) is 3.2 billion passes. resvg measured 4-8 ns per pass on the 2-core
/// reference machine (a 1000x1000 blur is ~50 million passes, ~0.3 s), so the default budget
/// is at most 15-25 s of uninterruptible work, inside the default `max_op_millis`. Three
/// shadows and blurs over nearly the whole canvas of a 4000x4000 poster need about 2.4 billion
/// (`a_poster_with_shadows_and_blurs_fits_at_4000_px`).
pub(crate) const WORK_PER_OUTPUT_PIXEL: u64 = 64;
/// Pixels resvg may hold at once (nested layers, mask and clip buffers, filter intermediates),
/// per pixel of [`Limits::max_output_pixels`]: 8 x 50 MP is 1.6 GB of RGBA.
pub(crate) const LIVE_PIXELS_PER_OUTPUT_PIXEL: u64 = 8;
/// Most nodes the walk visits: patterns and masks are re-rendered for every use, so the
/// rendered tree can be far larger than the document (which `compose` bounds separately).
pub(crate) const MAX_VISITS: u64 = 1_000_000;
/// Largest blur deviation in device pixels: far past any canvas (the result is flat), and past
/// ~1e9 resvg's box sizes overflow.
pub(crate) const MAX_BLUR_DEVIATION: f32 = 100_000.0;

/// Passes every filter primitive costs per region pixel besides its own work.
pub(crate) const PRIMITIVE: u64 = 6;
/// A box blur (deviation of 2 device pixels or more), per region pixel.
pub(crate) const BOX_BLUR: u64 = 24;
/// An IIR blur (smaller deviations: four channels in f64), per region pixel.
pub(crate) const IIR_BLUR: u64 = 48;
/// Turbulence's per-pixel setup for the four channels, per region pixel.
pub(crate) const TURBULENCE: u64 = 32;
/// One octave of turbulence for the four channels, per region pixel.
pub(crate) const OCTAVE: u64 = 12;
/// A lighting primitive (normals and light vectors in f32), per region pixel.
pub(crate) const LIGHTING: u64 = 16;
/// An isolated group's layer: allocated, drawn into and composited onto its parent.
pub(crate) const LAYER: u64 = 6;

/// What the SVG renders of one operation may still spend; the layers of a `compose` template
/// share one, so many cheap layers cannot add up to an expensive poster.
pub(crate) struct Budget {
    max_work: u64,
    max_live: u64,
    work: Cell<u64>,
    visits: Cell<u64>,
}

impl Budget {
    pub(crate) fn new(limits: &Limits) -> Self {
        Budget {
            max_work: limits.max_output_pixels.saturating_mul(WORK_PER_OUTPUT_PIXEL),
            max_live: limits.max_output_pixels.saturating_mul(LIVE_PIXELS_PER_OUTPUT_PIXEL),
            work: Cell::new(0),
            visits: Cell::new(0),
        }
    }

    /// Work counted so far, in pixel passes.
    #[cfg(test)]
    pub(crate) fn work(&self) -> u64 {
        self.work.get()
    }
}

/// Renders `tree` into `pixmap` with resvg after checking its cost against what is left of
/// `budget`; `blame` names the operation and parameter a refusal is reported against.
pub(crate) fn render(
    tree: &usvg::Tree,
    transform: Transform,
    pixmap: &mut tiny_skia::PixmapMut<'_>,
    budget: &Budget,
    blame: (&str, &str),
) -> Result<()> {
    check(tree, transform, (pixmap.width(), pixmap.height()), budget, blame)?;
    resvg::render(tree, transform, pixmap);
    Ok(())
}

/// Counts `resvg::render(tree, transform, <pixmap of size>)` against `budget` and refuses it
/// when it would need more work or memory than is left.
pub(crate) fn check(
    tree: &usvg::Tree,
    transform: Transform,
    (w, h): (u32, u32),
    budget: &Budget,
    blame: (&str, &str),
) -> Result<()> {
    let walk = Walk { budget, blame };
    let target = IntRect::from_xywh(0, 0, w.max(1), h.max(1)).ok_or_else(|| walk.bad("canvas size out of range"))?;
    walk.nodes(tree.root(), max_filter_bbox(w, h), transform, target, px(target))
}

fn px(r: IntRect) -> u64 {
    u64::from(r.width()) * u64::from(r.height())
}

/// resvg's `max_filter_bbox`: layers and filter regions never exceed 5x the canvas each way.
fn max_filter_bbox(w: u32, h: u32) -> IntRect {
    IntRect::from_xywh(
        i32::try_from(w).unwrap_or(i32::MAX).saturating_mul(-2),
        i32::try_from(h).unwrap_or(i32::MAX).saturating_mul(-2),
        w.saturating_mul(5),
        h.saturating_mul(5),
    )
    .or_else(|| IntRect::from_ltrb(i32::MIN / 2, i32::MIN / 2, i32::MAX / 2, i32::MAX / 2))
    .expect("a valid rectangle")
}

/// `NonZeroRect::to_int_rect` without its panic: `None` where resvg would unwrap a `None`.
fn to_int_rect(r: NonZeroRect) -> Option<IntRect> {
    IntRect::from_xywh(
        r.x().floor() as i32,
        r.y().floor() as i32,
        (r.width().ceil() as u32).max(1),
        (r.height().ceil() as u32).max(1),
    )
}

/// resvg's `fit_to_rect`.
fn fit_to_rect(r: IntRect, bounds: IntRect) -> Option<IntRect> {
    IntRect::from_ltrb(
        r.left().max(bounds.left()),
        r.top().max(bounds.top()),
        r.right().min(bounds.right()),
        r.bottom().min(bounds.bottom()),
    )
}

/// Device pixels of `rect` (user units under `ts`) that fall on `target`.
fn area(rect: Rect, ts: Transform, target: IntRect) -> u64 {
    rect.transform(ts).and_then(|r| r.round_out()).and_then(|r| r.intersect(&target)).map_or(0, px)
}

struct Walk<'b> {
    budget: &'b Budget,
    blame: (&'b str, &'b str),
}

impl Walk<'_> {
    fn bad(&self, reason: impl std::fmt::Display) -> Error {
        Error::bad(self.blame.0, self.blame.1, format!("svg: {reason}"))
    }

    fn add(&self, passes: u64) -> Result<()> {
        let b = self.budget;
        b.work.set(b.work.get().saturating_add(passes));
        if b.work.get() > b.max_work {
            return Err(Error::limit(LimitKind::SvgRenderWork, b.max_work, b.work.get()));
        }
        Ok(())
    }

    fn hold(&self, live: u64) -> Result<()> {
        if live > self.budget.max_live {
            return Err(Error::limit(LimitKind::SvgLayerPixels, self.budget.max_live, live));
        }
        Ok(())
    }

    fn visit(&self) -> Result<()> {
        let visits = &self.budget.visits;
        visits.set(visits.get() + 1);
        if visits.get() > MAX_VISITS {
            return Err(
                self.bad(format!("renders more than {MAX_VISITS} elements (patterns and masks count once per use)"))
            );
        }
        Ok(())
    }

    /// `render::render_nodes`: children drawn onto `target` (the current pixmap's bounds),
    /// `live` pixels being held already.
    fn nodes(&self, parent: &usvg::Group, max_bbox: IntRect, ts: Transform, target: IntRect, live: u64) -> Result<()> {
        for node in parent.children() {
            self.visit()?;
            match node {
                usvg::Node::Group(g) => self.group(g, max_bbox, ts, target, live)?,
                usvg::Node::Text(t) => self.group(t.flattened(), max_bbox, ts, target, live)?,
                usvg::Node::Path(p) => self.path(p, max_bbox, ts, target, live)?,
                usvg::Node::Image(i) => {
                    if let usvg::ImageKind::SVG(sub) = i.kind() {
                        // `image::render_vector`: a canvas-sized copy, rendered and drawn back.
                        let live = live.saturating_add(px(target));
                        self.hold(live)?;
                        self.add(px(target).saturating_mul(LAYER))?;
                        self.nodes(sub.root(), max_filter_bbox(target.width(), target.height()), ts, target, live)?;
                    } else {
                        self.add(area(i.bounding_box(), ts, target))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// `path::render`: fill and stroke over their device bounds; pattern tiles rendered anew.
    fn path(&self, p: &usvg::Path, max_bbox: IntRect, ts: Transform, target: IntRect, live: u64) -> Result<()> {
        if !p.is_visible() {
            return Ok(());
        }
        if let Some(fill) = p.fill() {
            self.add(area(p.bounding_box(), ts, target))?;
            self.paint(fill.paint(), max_bbox, ts, live)?;
        }
        if let Some(stroke) = p.stroke() {
            self.add(area(p.stroke_bounding_box(), ts, target))?;
            self.paint(stroke.paint(), max_bbox, ts, live)?;
        }
        Ok(())
    }

    /// `path::render_pattern_pixmap`: a tile of the pattern's size in device pixels.
    fn paint(&self, paint: &usvg::Paint, max_bbox: IntRect, ts: Transform, live: u64) -> Result<()> {
        let usvg::Paint::Pattern(pattern) = paint else { return Ok(()) };
        let (sx, sy) = ts.pre_concat(pattern.transform()).get_scale();
        let rect = pattern.rect();
        let (tw, th) = ((rect.width() * sx).round(), (rect.height() * sy).round());
        if !(tw >= 1.0 && th >= 1.0) {
            return Ok(());
        }
        let tile_px = (f64::from(tw) * f64::from(th)).min(u64::MAX as f64) as u64;
        let live = live.saturating_add(tile_px);
        self.hold(live)?;
        self.add(tile_px)?;
        let tile = IntRect::from_xywh(0, 0, tw.min(i32::MAX as f32) as u32, th.min(i32::MAX as f32) as u32)
            .ok_or_else(|| self.bad("pattern tile out of range"))?;
        self.nodes(pattern.root(), max_bbox, Transform::from_scale(sx, sy), tile, live)
    }

    /// `render::render_group` and `render_layer`.
    fn group(&self, g: &usvg::Group, max_bbox: IntRect, ts: Transform, target: IntRect, live: u64) -> Result<()> {
        let ts = ts.pre_concat(g.transform());
        if !g.should_isolate() {
            return self.nodes(g, max_bbox, ts, target, live);
        }
        let filtered = !g.filters().is_empty();
        let rest = if filtered {
            let sx = ts.sx.hypot(ts.ky);
            let sy = ts.kx.hypot(ts.sy);
            Transform::from_row(ts.sx / sx, ts.ky / sx, ts.kx / sy, ts.sy / sy, 0.0, 0.0)
        } else {
            Transform::identity()
        };
        // Wherever resvg gives up on a group (a degenerate transform or box), it draws nothing.
        let Some(inv_rest) = rest.invert() else { return Ok(()) };
        let Some(max_bbox) = max_bbox.to_rect().transform(inv_rest).and_then(|r| r.round_out()) else {
            return Ok(());
        };
        let ts = inv_rest.pre_concat(ts);
        let Some(bbox) = g.layer_bounding_box().transform(ts) else { return Ok(()) };
        let ibbox = if filtered {
            IntRect::from_xywh(
                bbox.x().floor() as i32,
                bbox.y().floor() as i32,
                bbox.width().ceil().max(1.0) as u32,
                bbox.height().ceil().max(1.0) as u32,
            )
        } else {
            IntRect::from_xywh(
                (bbox.x().floor() as i32).saturating_sub(2),
                (bbox.y().floor() as i32).saturating_sub(2),
                (bbox.width().ceil() as u32).saturating_add(4),
                (bbox.height().ceil() as u32).saturating_add(4),
            )
        };
        let Some(ibbox) = ibbox.and_then(|r| fit_to_rect(r, max_bbox)) else { return Ok(()) };
        let layer_px = px(ibbox);
        let live = live.saturating_add(layer_px);
        self.hold(live)?;
        self.add(layer_px.saturating_mul(LAYER))?;
        let shift = Transform::from_translate(-(ibbox.x() as f32), -(ibbox.y() as f32));
        let ts = shift.pre_concat(ts);
        let layer = IntRect::from_xywh(0, 0, ibbox.width(), ibbox.height()).expect("a layer from a valid rectangle");
        self.nodes(g, max_bbox, ts, layer, live)?;
        for filter in g.filters() {
            self.filter(filter, ts, layer, live)?;
        }
        if let Some(clip) = g.clip_path() {
            self.clip(clip, ts, layer, live)?;
        }
        if let Some(mask) = g.mask() {
            self.mask(mask, max_bbox, ts, layer, live)?;
        }
        Ok(())
    }

    /// `clip::apply`: a layer-sized buffer the clip's paths are drawn into.
    fn clip(&self, clip: &usvg::ClipPath, ts: Transform, layer: IntRect, live: u64) -> Result<()> {
        let live = live.saturating_add(px(layer));
        self.hold(live)?;
        self.add(px(layer).saturating_mul(LAYER))?;
        self.clip_children(clip.root(), ts.pre_concat(clip.transform()), layer, live)?;
        match clip.clip_path() {
            Some(inner) => self.clip(inner, ts, layer, live),
            None => Ok(()),
        }
    }

    fn clip_children(&self, parent: &usvg::Group, ts: Transform, layer: IntRect, live: u64) -> Result<()> {
        for node in parent.children() {
            self.visit()?;
            match node {
                usvg::Node::Path(p) => self.add(area(p.bounding_box(), ts, layer))?,
                usvg::Node::Text(t) => self.clip_children(t.flattened(), ts, layer, live)?,
                usvg::Node::Group(g) => {
                    let ts = ts.pre_concat(g.transform());
                    if let Some(clip) = g.clip_path() {
                        // `clip::clip_group`: another layer-sized buffer.
                        let live = live.saturating_add(px(layer));
                        self.hold(live)?;
                        self.add(px(layer).saturating_mul(LAYER))?;
                        self.clip_children(g, ts, layer, live)?;
                        self.clip(clip, ts, layer, live)?;
                    } else {
                        self.clip_children(g, ts, layer, live)?;
                    }
                }
                usvg::Node::Image(_) => {}
            }
        }
        Ok(())
    }

    /// `mask::apply`: a layer-sized buffer the mask's content is rendered into.
    fn mask(&self, mask: &usvg::Mask, max_bbox: IntRect, ts: Transform, layer: IntRect, live: u64) -> Result<()> {
        if mask.root().children().is_empty() {
            return Ok(());
        }
        let live = live.saturating_add(px(layer));
        self.hold(live)?;
        self.add(px(layer).saturating_mul(LAYER))?;
        self.nodes(mask.root(), max_bbox, ts, layer, live)?;
        match mask.mask() {
            Some(inner) => self.mask(inner, max_bbox, ts, layer, live),
            None => Ok(()),
        }
    }

    /// `filter::apply_inner`: every primitive works on the whole filter region (clipped to the
    /// layer), and every result is kept until the filter ends.
    fn filter(&self, filter: &usvg::filter::Filter, ts: Transform, layer: IntRect, live: u64) -> Result<()> {
        let Some(region) = filter.rect().transform(ts) else { return Ok(()) };
        let region = to_int_rect(region)
            .ok_or_else(|| self.bad(format_args!("filter `{}`: region out of range", filter.id())))?;
        let Some(region) = fit_to_rect(region, layer) else { return Ok(()) };
        let (w, h) = (u64::from(region.width()), u64::from(region.height()));
        let region_px = w * h;
        let (sx, sy) = ts.get_scale();
        let primitives = filter.primitives();
        let live = live.saturating_add(region_px.saturating_mul(primitives.len() as u64 + 2));
        self.hold(live)?;
        let local = ts.post_translate(-(region.x() as f32), -(region.y() as f32));
        for primitive in primitives {
            if primitive.rect().transform(local).is_some_and(|r| to_int_rect(r).is_none()) {
                return Err(self.bad(format!("filter `{}`: primitive subregion out of range", filter.id())));
            }
            let per_px = match primitive.kind() {
                Kind::GaussianBlur(fe) => self.blur(fe.std_dev_x().get() * sx, fe.std_dev_y().get() * sy, filter)?,
                Kind::DropShadow(fe) => self.blur(fe.std_dev_x().get() * sx, fe.std_dev_y().get() * sy, filter)? + 10,
                Kind::Turbulence(fe) => u64::from(fe.num_octaves()).saturating_mul(OCTAVE).saturating_add(TURBULENCE),
                Kind::Morphology(fe) => {
                    // `morphology::apply`: the radius rounded, clamped to the region.
                    let window = |r: f32, side: u64| {
                        let r = f64::from(r).round().clamp(0.0, (side - 1) as f64) as u64;
                        (2 * r + 1).min(side)
                    };
                    window(fe.radius_x().get() * sx, w).saturating_mul(window(fe.radius_y().get() * sy, h))
                }
                Kind::ConvolveMatrix(fe) => {
                    u64::from(fe.matrix().columns()).saturating_mul(u64::from(fe.matrix().rows())).saturating_mul(2)
                }
                Kind::DiffuseLighting(_) | Kind::SpecularLighting(_) => LIGHTING,
                Kind::Merge(fe) => 2 * fe.inputs().len() as u64,
                Kind::Image(fe) => {
                    let region_ts = Transform::from_row(sx, 0.0, 0.0, sy, 0.0, 0.0);
                    let whole = IntRect::from_xywh(0, 0, region.width(), region.height()).expect("a valid region");
                    self.nodes(fe.root(), whole, region_ts, whole, live)?;
                    1
                }
                Kind::Blend(_)
                | Kind::ColorMatrix(_)
                | Kind::ComponentTransfer(_)
                | Kind::Composite(_)
                | Kind::DisplacementMap(_)
                | Kind::Flood(_)
                | Kind::Offset(_)
                | Kind::Tile(_) => 4,
            };
            self.add(region_px.saturating_mul(per_px.saturating_add(PRIMITIVE)))?;
        }
        Ok(())
    }

    /// A blur's passes per pixel; deviations are in device pixels.
    fn blur(&self, dx: f32, dy: f32, filter: &usvg::filter::Filter) -> Result<u64> {
        if dx.is_nan() || dy.is_nan() || dx.max(dy) > MAX_BLUR_DEVIATION {
            return Err(self.bad(format!(
                "filter `{}`: blur deviation of {} device pixels; at most {MAX_BLUR_DEVIATION}",
                filter.id(),
                dx.max(dy)
            )));
        }
        // `filter::resolve_std_dev`: deviations under 0.05 are dropped, a box blur from 2 up.
        Ok(if dx.max(dy) >= 2.0 { BOX_BLUR } else { IIR_BLUR })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks an SVG body on a `size` x `size` canvas at the default limits; the work counted.
    fn cost(size: u32, body: &str) -> Result<u64> {
        let svg = format!(
            "<svg xmlns='http://www.w3.org/2000/svg' xmlns:xlink='http://www.w3.org/1999/xlink' width='{size}' height='{size}'>{body}</svg>"
        );
        let tree = super::super::Fonts::new(None).unwrap().parse_svg(svg.as_bytes()).unwrap();
        let budget = Budget::new(&Limits::default());
        check(&tree, Transform::identity(), (size, size), &budget, ("compose", "template"))?;
        Ok(budget.work())
    }

    fn filtered(filter: &str) -> String {
        format!("<filter id='f'>{filter}</filter><rect width='100%' height='100%' fill='red' filter='url(#f)'/>")
    }

    fn assert_over_work_budget(result: Result<u64>) {
        match result {
            Err(e @ Error::LimitExceeded { limit: LimitKind::SvgRenderWork, max, actual }) => {
                assert_eq!(max, Limits::default().max_output_pixels * WORK_PER_OUTPUT_PIXEL);
                assert!(actual > max);
                assert_eq!(e.code(), "limit_exceeded");
                assert!(e.to_string().contains("svg_render_work is 3200000000"), "{e}");
            }
            other => panic!("expected the render work limit, got {other:?}"),
        }
    }

    #[test]
    fn expensive_filters_are_refused_before_rendering() {
        assert_over_work_budget(cost(1000, &filtered("<feTurbulence baseFrequency='0.01' numOctaves='1000'/>")));
        assert_over_work_budget(cost(1000, &filtered("<feMorphology operator='dilate' radius='500'/>")));
        let kernel = vec!["1"; 40 * 40].join(" ");
        assert_over_work_budget(cost(
            1000,
            &filtered(&format!("<feConvolveMatrix order='40' kernelMatrix='{kernel}'/>")),
        ));
        // 10 000 filtered groups, each cheap alone: 100 uses of a group of 100 blurred rects.
        let group: String =
            (0..100).map(|_| "<rect width='100%' height='100%' filter='url(#f)'/>".to_owned()).collect();
        let uses: String = (0..100).map(|_| "<use xlink:href='#g'/>".to_owned()).collect();
        let body = format!(
            "<defs><filter id='f'><feGaussianBlur stdDeviation='4'/></filter><g id='g'>{group}</g></defs>{uses}"
        );
        assert_over_work_budget(cost(1000, &body));
    }

    #[test]
    fn cost_follows_what_resvg_does() {
        let base = cost(1000, &filtered("<feTurbulence baseFrequency='0.01' numOctaves='1'/>")).unwrap();
        let more = cost(1000, &filtered("<feTurbulence baseFrequency='0.01' numOctaves='9'/>")).unwrap();
        // The default filter region is the box plus 10% each side: 1200 x 1200 device pixels.
        assert_eq!(more - base, 1200 * 1200 * 8 * OCTAVE);
        // Morphology is naive: its window, clamped to the region, per pixel.
        let r1 = cost(1000, &filtered("<feMorphology radius='1'/>")).unwrap();
        let r2 = cost(1000, &filtered("<feMorphology radius='2'/>")).unwrap();
        assert_eq!(r2 - r1, 1200 * 1200 * (25 - 9));
        // A blur costs the same whatever its deviation (box blur from 2 device pixels up).
        let small = cost(1000, &filtered("<feGaussianBlur stdDeviation='3'/>")).unwrap();
        assert_eq!(small, cost(1000, &filtered("<feGaussianBlur stdDeviation='3000'/>")).unwrap());
        // The region is clipped to resvg's box of 5x the canvas: a huge region costs no more.
        let huge = "<filter id='f' filterUnits='userSpaceOnUse' x='-1e6' y='-1e6' width='2e6' height='2e6'><feFlood/></filter><rect width='10' height='10' filter='url(#f)'/>";
        let work = cost(100, huge).unwrap();
        assert!(work <= 500 * 500 * (LAYER + 4 + PRIMITIVE) + 100, "{work}");
    }

    #[test]
    fn nested_layers_and_absurd_deviations_are_refused() {
        // Every nested isolated group holds a layer up to 25x the canvas while its children draw.
        let depth = 20;
        let body = format!(
            "{}<rect x='-1e5' y='-1e5' width='2e5' height='2e5'/>{}",
            "<g opacity='0.9'>".repeat(depth),
            "</g>".repeat(depth)
        );
        match cost(1000, &body) {
            Err(e @ Error::LimitExceeded { limit: LimitKind::SvgLayerPixels, .. }) => {
                assert!(e.to_string().contains("svg_layer_pixels"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        assert!(cost(1000, &body.replace("opacity='0.9'", "")).is_ok(), "plain groups hold no layer");
        let err = cost(100, &filtered("<feGaussianBlur stdDeviation='1e12'/>")).unwrap_err();
        assert_eq!(err.code(), "bad_parameter");
        assert!(err.to_string().contains("blur deviation"), "{err}");
    }

    #[test]
    fn a_poster_with_shadows_and_blurs_fits_at_4000_px() {
        // Three filters over the whole 4000x4000 canvas, two blurred shapes and a shadowed text.
        let body = concat!(
            "<defs><filter id='s'><feDropShadow dx='8' dy='8' stdDeviation='12'/></filter>",
            "<filter id='b'><feGaussianBlur stdDeviation='20'/></filter></defs>",
            "<rect width='4000' height='4000' fill='#234' filter='url(#b)'/>",
            "<g filter='url(#s)'><rect x='200' y='200' width='3600' height='3600' fill='#fff' rx='40'/></g>",
            "<circle cx='2000' cy='2000' r='1800' fill='#f80' opacity='0.5' filter='url(#b)'/>",
            "<text x='400' y='800' font-size='300' filter='url(#s)'>SALE</text>",
        );
        let work = cost(4000, body).unwrap();
        assert!(work < Limits::default().max_output_pixels * WORK_PER_OUTPUT_PIXEL, "{work}");
    }
}
