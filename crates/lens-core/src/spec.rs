//! The one parser of index selections: which layers (`--layers`, the daemon's `layers`) and
//! which token positions (`--tokens`, `--position`, the daemon's `positions`) to read.
//!
//! Grammar (whitespace around items is ignored):
//!
//! - `all` or `..`: everything;
//! - `A..B` (inclusive), `A..`, `..B`, each optionally with `:STEP` (a stride that always keeps
//!   the range's last index), or `:STEP` alone;
//! - `N` or a list `N,M,…` (sorted, duplicates dropped).
//!
//! Negative numbers count from the end (`-1` is the last layer or the last token). An empty
//! spec, an empty list item (`","`, `"1,,2"`) and a step of 0 are errors.

use std::fmt;
use std::str::FromStr;

/// A parsed selection, resolved against a size by [`IndexSpec::layers`] or
/// [`IndexSpec::positions`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexSpec {
    Range {
        start: Option<i64>,
        end: Option<i64>,
        step: usize,
    },
    List(Vec<i64>),
}

impl Default for IndexSpec {
    /// Everything.
    fn default() -> Self {
        IndexSpec::Range {
            start: None,
            end: None,
            step: 1,
        }
    }
}

/// What an [`IndexSpec`] selects from: it decides the size and the wording of errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    /// Lens layers `0..=n_layers` of a model with `n_layers` blocks.
    Layers { n_layers: usize },
    /// Positions of a prompt of `len` tokens.
    Positions { len: usize },
}

impl Axis {
    fn count(self) -> usize {
        match self {
            Axis::Layers { n_layers } => n_layers + 1,
            Axis::Positions { len } => len,
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Axis::Layers { .. } => "layer",
            Axis::Positions { .. } => "token position",
        }
    }

    fn outside(self, i: i64) -> String {
        match self {
            Axis::Layers { n_layers } => {
                format!("layer {i} does not exist: the model has layers 0..={n_layers}")
            }
            Axis::Positions { len } => {
                format!("token position {i} is outside the prompt of {len} tokens")
            }
        }
    }
}

impl FromStr for IndexSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty selection: use `all`, `A..B`, `:STEP` or a list `0,4,8`".into());
        }
        if s == "all" {
            return Ok(IndexSpec::default());
        }
        let num = |t: &str| -> Result<i64, String> {
            let t = t.trim();
            t.parse::<i64>()
                .map_err(|_| format!("`{t}` is not a number in `{s}`"))
        };
        if !s.contains("..") && !s.contains(':') {
            let items = s
                .split(',')
                .map(|t| match t.trim() {
                    "" => Err(format!("empty item in the list `{s}`")),
                    t => num(t),
                })
                .collect::<Result<Vec<i64>, String>>()?;
            return Ok(IndexSpec::List(items));
        }
        let (range, step) = match s.split_once(':') {
            Some((r, st)) => (r.trim(), num(st)?),
            None => (s, 1),
        };
        if step < 1 {
            return Err(format!("the step must be at least 1, not {step}"));
        }
        let (start, end) = match range.split_once("..") {
            Some((a, b)) => {
                let end = |t: &str| (!t.trim().is_empty()).then(|| num(t)).transpose();
                (end(a)?, end(b)?)
            }
            None if range.is_empty() => (None, None),
            None => {
                return Err(format!(
                    "expected `A..B`, `A..B:STEP`, `:STEP` or `0,4,8`, got `{s}`"
                ))
            }
        };
        Ok(IndexSpec::Range {
            start,
            end,
            step: step as usize,
        })
    }
}

impl fmt::Display for IndexSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IndexSpec::List(v) => {
                let items: Vec<String> = v.iter().map(i64::to_string).collect();
                f.write_str(&items.join(","))
            }
            IndexSpec::Range { start, end, step } => {
                let end_str = |e: &Option<i64>| e.map(|v| v.to_string()).unwrap_or_default();
                write!(f, "{}..{}", end_str(start), end_str(end))?;
                if *step != 1 {
                    write!(f, ":{step}")?;
                }
                Ok(())
            }
        }
    }
}

impl IndexSpec {
    /// A list of indices (negative from the end), e.g. the daemon's `positions`; an empty list
    /// is an error.
    pub fn list(items: Vec<i64>) -> Result<IndexSpec, String> {
        match items.is_empty() {
            true => Err("empty list".into()),
            false => Ok(IndexSpec::List(items)),
        }
    }

    /// The chosen lens layers of a model with `n_layers` blocks (layers `0..=n_layers`),
    /// ascending.
    pub fn layers(&self, n_layers: usize) -> Result<Vec<usize>, String> {
        self.resolve(Axis::Layers { n_layers })
    }

    /// The chosen positions of a prompt of `len` tokens, ascending.
    pub fn positions(&self, len: usize) -> Result<Vec<usize>, String> {
        self.resolve(Axis::Positions { len })
    }

    /// The chosen indices along `axis`, ascending and distinct.
    pub fn resolve(&self, axis: Axis) -> Result<Vec<usize>, String> {
        let n = axis.count() as i64;
        let at = |i: i64| -> Result<usize, String> {
            let idx = if i < 0 { n + i } else { i };
            if idx < 0 || idx >= n {
                Err(axis.outside(i))
            } else {
                Ok(idx as usize)
            }
        };
        match self {
            IndexSpec::List(v) => {
                if v.is_empty() {
                    return Err("empty list".into());
                }
                let mut out = v.iter().map(|&i| at(i)).collect::<Result<Vec<_>, _>>()?;
                out.sort_unstable();
                out.dedup();
                Ok(out)
            }
            IndexSpec::Range { start, end, step } => {
                if n == 0 {
                    return Err(format!("there is no {} to choose", axis.noun()));
                }
                let start = at(start.unwrap_or(0))?;
                let end = at(end.unwrap_or(n - 1))?;
                if start > end {
                    return Err(format!("empty {} range {start}..{end}", axis.noun()));
                }
                let mut v: Vec<usize> = (start..=end).step_by((*step).max(1)).collect();
                if v.last() != Some(&end) {
                    v.push(end);
                }
                Ok(v)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(spec: &str, axis: Axis, expect: &str) {
        let got = match spec.parse::<IndexSpec>().and_then(|s| s.resolve(axis)) {
            Ok(v) => format!("{v:?}"),
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(got, expect, "spec `{spec}`");
    }

    #[test]
    fn layer_specs() {
        let l = |n_layers| Axis::Layers { n_layers };
        check("all", l(4), "[0, 1, 2, 3, 4]");
        check("..", l(4), "[0, 1, 2, 3, 4]");
        check("1..3", l(4), "[1, 2, 3]");
        check("2..", l(4), "[2, 3, 4]");
        check("..1", l(4), "[0, 1]");
        check(":4", l(30), "[0, 4, 8, 12, 16, 20, 24, 28, 30]");
        check("10..30:7", l(30), "[10, 17, 24, 30]");
        check("0,30,5,5", l(30), "[0, 5, 30]");
        check("7", l(30), "[7]");
        check("-1", l(30), "[30]");
        check("-3..", l(30), "[28, 29, 30]");
        check(
            "0..31",
            l(30),
            "error: layer 31 does not exist: the model has layers 0..=30",
        );
        check("5..2", l(30), "error: empty layer range 5..2");
        check(":0", l(30), "error: the step must be at least 1, not 0");
        check(":-2", l(30), "error: the step must be at least 1, not -2");
        check("a..b", l(30), "error: `a` is not a number in `a..b`");
        check("3-4", l(30), "error: `3-4` is not a number in `3-4`");
        check("3.4", l(30), "error: `3.4` is not a number in `3.4`");
        check(
            "",
            l(30),
            "error: empty selection: use `all`, `A..B`, `:STEP` or a list `0,4,8`",
        );
        check(
            "  ",
            l(30),
            "error: empty selection: use `all`, `A..B`, `:STEP` or a list `0,4,8`",
        );
        check(",", l(30), "error: empty item in the list `,`");
        check(",,,", l(30), "error: empty item in the list `,,,`");
        check("1,,2", l(30), "error: empty item in the list `1,,2`");
        check(
            "1:2",
            l(30),
            "error: expected `A..B`, `A..B:STEP`, `:STEP` or `0,4,8`, got `1:2`",
        );
    }

    #[test]
    fn position_specs() {
        let p = |len| Axis::Positions { len };
        check("1..3", p(5), "[1, 2, 3]");
        check("3..", p(5), "[3, 4]");
        check("..1", p(5), "[0, 1]");
        check("-2..", p(5), "[3, 4]");
        check("2", p(5), "[2]");
        check("-1", p(5), "[4]");
        check("..", p(3), "[0, 1, 2]");
        check(
            "0..5",
            p(5),
            "error: token position 5 is outside the prompt of 5 tokens",
        );
        check(
            "-6",
            p(5),
            "error: token position -6 is outside the prompt of 5 tokens",
        );
        check("3..1", p(5), "error: empty token position range 3..1");
        check("a..", p(5), "error: `a` is not a number in `a..`");
        check("all", p(0), "error: there is no token position to choose");
    }

    #[test]
    fn lists_from_the_wire() {
        assert_eq!(
            IndexSpec::list(vec![-1, 0]).and_then(|s| s.positions(3)),
            Ok(vec![0, 2])
        );
        assert_eq!(IndexSpec::list(vec![]), Err("empty list".into()));
    }

    #[test]
    fn display_round_trips() {
        for s in ["1..3", "..", "-2..", "..5:2", "0,4,-1"] {
            let spec: IndexSpec = s.parse().expect("parse");
            assert_eq!(spec.to_string(), s);
            assert_eq!(spec.to_string().parse::<IndexSpec>(), Ok(spec));
        }
    }
}
