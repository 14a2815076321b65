//! The `--layers` selection: `all`, `A..B` (inclusive), `A..`, `..B`, an optional `:STEP`
//! (a stride that always keeps the range's last layer), or a list `0,4,30`.

use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerSpec {
    Range {
        start: Option<usize>,
        end: Option<usize>,
        step: usize,
    },
    List(Vec<usize>),
}

impl Default for LayerSpec {
    fn default() -> Self {
        LayerSpec::Range {
            start: None,
            end: None,
            step: 1,
        }
    }
}

impl FromStr for LayerSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let num = |t: &str| -> Result<usize, String> {
            t.trim()
                .parse::<usize>()
                .map_err(|_| format!("`{t}` is not a layer number in `{s}`"))
        };
        if s == "all" || s.is_empty() {
            return Ok(LayerSpec::default());
        }
        if s.contains(',') || s.chars().all(|c| c.is_ascii_digit()) {
            let mut v: Vec<usize> = s
                .split(',')
                .filter(|t| !t.trim().is_empty())
                .map(num)
                .collect::<Result<_, _>>()?;
            v.sort_unstable();
            v.dedup();
            return Ok(LayerSpec::List(v));
        }
        let (range, step) = match s.split_once(':') {
            Some((r, st)) => (r, num(st)?),
            None => (s, 1),
        };
        if step == 0 {
            return Err("the layer step must be at least 1".into());
        }
        let (start, end) = match range.split_once("..") {
            Some((a, b)) => (
                if a.is_empty() { None } else { Some(num(a)?) },
                if b.is_empty() { None } else { Some(num(b)?) },
            ),
            None if range.is_empty() => (None, None),
            None => {
                return Err(format!(
                    "expected `A..B`, `A..B:STEP`, `:STEP` or `0,4,8`, got `{s}`"
                ))
            }
        };
        Ok(LayerSpec::Range { start, end, step })
    }
}

impl LayerSpec {
    /// The chosen layers of a model with `n_layers` blocks (layers `0..=n_layers`), ascending.
    pub fn resolve(&self, n_layers: usize) -> Result<Vec<usize>, String> {
        let check = |l: usize| {
            if l > n_layers {
                Err(format!(
                    "layer {l} does not exist: the model has layers 0..={n_layers}"
                ))
            } else {
                Ok(l)
            }
        };
        match self {
            LayerSpec::List(v) => v.iter().map(|&l| check(l)).collect(),
            LayerSpec::Range { start, end, step } => {
                let start = check(start.unwrap_or(0))?;
                let end = check(end.unwrap_or(n_layers))?;
                if start > end {
                    return Err(format!("empty layer range {start}..{end}"));
                }
                let mut v: Vec<usize> = (start..=end).step_by(*step).collect();
                if v.last() != Some(&end) {
                    v.push(end);
                }
                Ok(v)
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(spec: &str, n_layers: usize, expect: &str) {
        let got = match spec.parse::<LayerSpec>().and_then(|s| s.resolve(n_layers)) {
            Ok(v) => format!("{v:?}"),
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(got, expect, "spec `{spec}`");
    }

    #[test]
    fn layer_specs() {
        check("all", 4, "[0, 1, 2, 3, 4]");
        check("1..3", 4, "[1, 2, 3]");
        check("2..", 4, "[2, 3, 4]");
        check("..1", 4, "[0, 1]");
        check(":4", 30, "[0, 4, 8, 12, 16, 20, 24, 28, 30]");
        check("10..30:7", 30, "[10, 17, 24, 30]");
        check("0,30,5,5", 30, "[0, 5, 30]");
        check("7", 30, "[7]");
        check(
            "0..31",
            30,
            "error: layer 31 does not exist: the model has layers 0..=30",
        );
        check("5..2", 30, "error: empty layer range 5..2");
        check(":0", 30, "error: the layer step must be at least 1");
        check("a..b", 30, "error: `a` is not a layer number in `a..b`");
        check(
            "3-4",
            30,
            "error: expected `A..B`, `A..B:STEP`, `:STEP` or `0,4,8`, got `3-4`",
        );
    }
}
