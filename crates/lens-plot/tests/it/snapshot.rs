//! The SVG of fixed prompts on the tiny-llama fixture, as committed snapshots (`*.svg` under
//! tests/snapshots: open them in a browser). `UPDATE_EXPECT=1 cargo test -p lens-plot` updates.

use expect_test::{expect_file, ExpectFile};
use lens_plot::{Metric, Options};

/// Numbers with decimals rounded to 2 places, so that a last-bit difference in a probability
/// does not change the snapshot.
fn normalize(svg: &str) -> String {
    let mut out = String::with_capacity(svg.len());
    let b = svg.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit()
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'#'))
        {
            let start = i;
            while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
                i += 1;
            }
            let num = &svg[start..i];
            match num.split_once('.') {
                Some((_, frac)) if frac.len() > 2 && num.parse::<f64>().is_ok() => {
                    out.push_str(&format!("{:.2}", num.parse::<f64>().unwrap_or(0.0)));
                }
                _ => out.push_str(num),
            }
        } else {
            let c = svg[i..].chars().next().unwrap_or(' ');
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

#[track_caller]
fn check(prompt: &str, options: Options, expect: ExpectFile) {
    let run = crate::run(prompt, 5);
    let svg = lens_plot::svg(&run.plot(), &options);
    // Every (layer, position) has a cell, and the document is well-formed enough for resvg.
    assert_eq!(
        svg.matches("<title>").count(),
        run.layers.len() * run.tokens.len()
    );
    lens_plot::rasterize(&svg, 0.25).expect("the SVG parses");
    expect.assert_eq(&normalize(&svg));
}

#[test]
fn normalize_rounds_only_long_decimals() {
    assert_eq!(
        normalize(r##"x="1.75" p=0.12345 fill="#3b528b" 12.5 L30"##),
        r##"x="1.75" p=0.12 fill="#3b528b" 12.5 L30"##
    );
}

#[test]
fn capital_of_france_top1_probability() {
    check(
        "The capital of France is",
        Options::default(),
        expect_file!["../snapshots/tiny-prob.svg"],
    );
}

#[test]
fn code_with_markup_and_whitespace_flipped_wrapped_by_entropy() {
    check(
        "if a < b && c > 'd':\n\treturn  x",
        Options {
            metric: Metric::Entropy,
            flip: true,
            max_columns: 6,
        },
        expect_file!["../snapshots/tiny-entropy-flip-wrap.svg"],
    );
}

#[test]
fn next_token_rank() {
    check(
        "Hello, world!",
        Options {
            metric: Metric::Rank,
            ..Options::default()
        },
        expect_file!["../snapshots/tiny-rank.svg"],
    );
}
