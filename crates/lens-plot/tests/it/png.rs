//! The PNG: decodes, has the size of the SVG times the scale, and shows the heatmap and text.

use std::collections::HashSet;

/// (width, height, RGBA pixels) of a PNG.
fn decode(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .expect("PNG header");
    let mut buf = vec![0; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut buf).expect("PNG data");
    assert_eq!(info.color_type, png::ColorType::Rgba);
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

fn svg_size(svg: &str) -> (f32, f32) {
    let attr = |name: &str| -> f32 {
        let start = svg.find(&format!(" {name}=\"")).expect("size attribute") + name.len() + 3;
        svg[start..]
            .split('"')
            .next()
            .and_then(|v| v.parse().ok())
            .expect("number")
    };
    (attr("width"), attr("height"))
}

/// The first heatmap cell's rectangle (x, y, w, h) and fill, from the SVG.
fn first_cell(svg: &str) -> ((u32, u32, u32, u32), [u8; 3]) {
    let g = svg.find("<g><title>").expect("a cell");
    let rect = &svg[g..][svg[g..].find("<rect").expect("rect")..];
    let attr = |name: &str| -> String {
        let start = rect.find(&format!(" {name}=\"")).expect("attribute") + name.len() + 3;
        rect[start..].split('"').next().expect("value").to_string()
    };
    let n = |name: &str| attr(name).parse::<u32>().expect("integer");
    let fill = attr("fill");
    let hex = |i: usize| u8::from_str_radix(&fill[i..i + 2], 16).expect("hex");
    (
        (n("x"), n("y"), n("width"), n("height")),
        [hex(1), hex(3), hex(5)],
    )
}

#[test]
fn png_has_the_expected_size_colours_and_text() {
    let run = crate::run("The capital of France is", 5);
    let plot = run.plot();
    let options = crate::options();
    let svg = lens_plot::svg(&plot, &options);
    let (w, h) = svg_size(&svg);
    for scale in [1.0_f32, 1.5] {
        let bytes = lens_plot::png(&plot, &options, scale).expect("png");
        let (pw, ph, px) = decode(&bytes);
        assert_eq!(
            (pw, ph),
            ((w * scale).ceil() as u32, (h * scale).ceil() as u32),
            "scale {scale}"
        );
        let at = |x: u32, y: u32| -> [u8; 3] {
            let i = ((y * pw + x) * 4) as usize;
            [px[i], px[i + 1], px[i + 2]]
        };
        // The heatmap area holds many distinct colours (cells, labels, outlines).
        let ((cx, cy, cw, ch), fill) = first_cell(&svg);
        let s = |v: u32| (v as f32 * scale) as u32;
        let grid_w = cw * run.tokens.len() as u32;
        let grid_h = ch * run.layers.len() as u32;
        let mut colours = HashSet::new();
        for y in s(cy)..s(cy + grid_h) {
            for x in s(cx)..s(cx + grid_w) {
                colours.insert(at(x, y));
            }
        }
        assert!(
            colours.len() > 30,
            "only {} colours in the cell area",
            colours.len()
        );
        // A cell's corner (away from its label and any outline) has the cell's own colour.
        assert_eq!(at(s(cx) + s(4), s(cy) + s(ch) / 2), fill, "scale {scale}");
        // The embedded font drew the title: dark pixels in its line.
        let dark = (s(2)..s(30))
            .flat_map(|y| (s(70)..s(300)).map(move |x| (x, y)))
            .filter(|&(x, y)| at(x, y).iter().all(|&c| c < 80))
            .count();
        assert!(
            dark > 100,
            "the title has only {dark} dark pixels: was the font loaded?"
        );
    }
}

#[test]
fn png_same_bytes_every_time() {
    let run = crate::run("The capital of France is", 5);
    let a = lens_plot::png(&run.plot(), &crate::options(), 1.0).expect("png");
    let b = lens_plot::png(&run.plot(), &crate::options(), 1.0).expect("png");
    assert_eq!(a, b);
}

#[test]
fn bad_scales_are_errors() {
    let run = crate::run("Hi", 5);
    for scale in [0.0_f32, -1.0, f32::NAN, 100.0] {
        let err = lens_plot::png(&run.plot(), &crate::options(), scale).expect_err("bad scale");
        assert!(err.to_string().contains("scale"), "{err}");
    }
    let wide = r#"<svg xmlns="http://www.w3.org/2000/svg" width="2000" height="10"></svg>"#;
    let err = lens_plot::rasterize(wide, 10.0).expect_err("too large");
    assert!(err.to_string().contains("20000×100 pixels"), "{err}");
    let err = lens_plot::rasterize("<svg", 1.0).expect_err("not SVG");
    assert!(
        err.to_string().contains("cannot read the generated SVG"),
        "{err}"
    );
}
