//! The diff lens: what an edit changed, layer by layer.
//!
//! Two versions of a prompt (*before* and *after*) are aligned by token identity: the shared
//! prefix, the changed span, the shared suffix ([`Alignment`]). At each aligned pair of
//! positions and each layer, the two versions' lens distributions are compared
//! ([`DiffCell`]): `KL(before ‖ after)`, both top-k, the probabilities of those tokens in both
//! versions, and whether the top-1 changed. Attention is causal, so the shared prefix has the
//! same states in both versions and a KL of 0 there (the tests hold the arithmetic to that);
//! the interesting part is the changed span and everything after it.

use std::ops::Range;

use crate::math::kl_rows;
use crate::{
    Backend, Error, HiddenStates, Lens, LensKind, Prediction, Site, SiteLogits, Stop, Translators,
};

/// Positions compared in one readout batch per version (each position's rows are
/// `layers × vocabulary` floats, ~6 MB for the default model).
const PAIRS_PER_BATCH: usize = 8;

/// Where an aligned pair of positions lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    /// Before the first changed token: the same token at the same position in both versions.
    Prefix,
    /// In the changed span, paired position by position (only when both versions' spans have
    /// the same length: a substitution).
    Changed,
    /// After the changed span: the same token, shifted by the change in length.
    Suffix,
}

impl Part {
    pub fn as_str(self) -> &'static str {
        match self {
            Part::Prefix => "prefix",
            Part::Changed => "changed",
            Part::Suffix => "suffix",
        }
    }
}

/// One position of the *before* version matched with one of the *after* version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pair {
    pub before: usize,
    pub after: usize,
    pub part: Part,
}

/// Two token sequences aligned: a shared prefix, a changed span in each, a shared suffix (the
/// longest of each; the suffix never overlaps the prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alignment {
    pub prefix: usize,
    pub suffix: usize,
    pub before_len: usize,
    pub after_len: usize,
}

impl Alignment {
    pub fn new(before: &[u32], after: &[u32]) -> Alignment {
        let prefix = before.iter().zip(after).take_while(|(a, b)| a == b).count();
        let room = before.len().min(after.len()) - prefix;
        let suffix = before[prefix..]
            .iter()
            .rev()
            .zip(after[prefix..].iter().rev())
            .take(room)
            .take_while(|(a, b)| a == b)
            .count();
        Alignment {
            prefix,
            suffix,
            before_len: before.len(),
            after_len: after.len(),
        }
    }

    /// The changed span of the *before* version.
    pub fn before_changed(&self) -> Range<usize> {
        self.prefix..self.before_len - self.suffix
    }

    /// The changed span of the *after* version.
    pub fn after_changed(&self) -> Range<usize> {
        self.prefix..self.after_len - self.suffix
    }

    /// Whether the two versions are the same tokens.
    pub fn is_identical(&self) -> bool {
        self.before_changed().is_empty() && self.after_changed().is_empty()
    }

    /// The aligned pairs, in order: the prefix, the changed span when both sides have the same
    /// length, the suffix.
    pub fn pairs(&self) -> Vec<Pair> {
        let (b, a) = (self.before_changed(), self.after_changed());
        let prefix = (0..self.prefix).map(|i| Pair {
            before: i,
            after: i,
            part: Part::Prefix,
        });
        let changed = (b.len() == a.len()).then(|| {
            b.clone().zip(a.clone()).map(|(before, after)| Pair {
                before,
                after,
                part: Part::Changed,
            })
        });
        let suffix = (0..self.suffix).map(|i| Pair {
            before: b.end + i,
            after: a.end + i,
            part: Part::Suffix,
        });
        prefix
            .chain(changed.into_iter().flatten())
            .chain(suffix)
            .collect()
    }

    /// The position of the *before* version aligned with `after`, if any.
    pub fn before_of(&self, after: usize) -> Option<Pair> {
        self.pairs().into_iter().find(|p| p.after == after)
    }
}

/// A token's probability in both versions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Change {
    pub id: u32,
    pub before: f32,
    pub after: f32,
}

/// One layer of one aligned pair.
#[derive(Debug, Clone, PartialEq)]
pub struct DiffCell {
    pub layer: usize,
    /// `KL(before ‖ after)` in nats (clamped at 0).
    pub kl: f64,
    pub before: Vec<Prediction>,
    pub after: Vec<Prediction>,
    /// The top-1 token differs between the versions.
    pub top1_changed: bool,
    /// Every token of either top-k (the after version's first), with its probability in both.
    pub changes: Vec<Change>,
}

/// Every compared layer at one aligned pair.
#[derive(Debug, Clone, PartialEq)]
pub struct PairDiff {
    pub pair: Pair,
    pub before_token: u32,
    pub after_token: u32,
    pub cells: Vec<DiffCell>,
}

/// The diff lens of two versions: which layers, how they align, and one [`PairDiff`] per
/// compared pair.
#[derive(Debug, Clone, PartialEq)]
pub struct Diff {
    pub kind: LensKind,
    pub top_k: usize,
    pub layers: Vec<usize>,
    pub alignment: Alignment,
    pub pairs: Vec<PairDiff>,
}

/// Compare `pairs` of `before` and `after` at `layers` (already validated by the caller:
/// [`crate::Query::diff`]).
pub(crate) fn compare(
    backend: &dyn Backend,
    (before, after): (&HiddenStates, &HiddenStates),
    pairs: &[Pair],
    layers: &[usize],
    (kind, top_k, translators): (LensKind, usize, Option<&Translators>),
    stop: &Stop,
) -> Result<Vec<PairDiff>, Error> {
    let sites: Vec<Site> = layers.iter().map(|&l| Site::Layer(l)).collect();
    let lens = |states| {
        Lens::new(backend, states, kind, top_k)
            .with_translators(translators)
            .with_stop(stop.clone())
    };
    let (lens_before, lens_after) = (lens(before), lens(after));
    let mut out = Vec::with_capacity(pairs.len());
    for batch in pairs.chunks(PAIRS_PER_BATCH) {
        let b: Vec<usize> = batch.iter().map(|p| p.before).collect();
        let a: Vec<usize> = batch.iter().map(|p| p.after).collect();
        let read_b = lens_before.positions_with_logits(&b, &sites)?;
        let read_a = lens_after.positions_with_logits(&a, &sites)?;
        for ((pair, (vb, lb)), (va, la)) in batch.iter().zip(read_b).zip(read_a) {
            let cells = (0..sites.len())
                .map(|i| {
                    cell(
                        layers[i],
                        i,
                        (&vb.cells[i].top, &lb),
                        (&va.cells[i].top, &la),
                    )
                })
                .collect();
            out.push(PairDiff {
                pair: *pair,
                before_token: vb.token,
                after_token: va.token,
                cells,
            });
        }
    }
    Ok(out)
}

/// Row `i` of both versions compared.
fn cell(
    layer: usize,
    i: usize,
    (top_b, rows_b): (&[Prediction], &SiteLogits),
    (top_a, rows_a): (&[Prediction], &SiteLogits),
) -> DiffCell {
    let (rb, ra) = (rows_b.row(i).unwrap_or(&[]), rows_a.row(i).unwrap_or(&[]));
    let log_z = |rows: &SiteLogits| rows.log_z.get(i).copied().unwrap_or(0.0);
    let kl = kl_rows(rb, log_z(rows_b), ra, log_z(rows_a));
    let mut ids: Vec<u32> = top_a.iter().chain(top_b).map(|p| p.id).collect();
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(*id));
    let prob = |rows: &SiteLogits, id: u32| rows.prob_and_rank(i, id).map_or(0.0, |(p, _)| p);
    let changes = ids
        .into_iter()
        .map(|id| Change {
            id,
            before: prob(rows_b, id),
            after: prob(rows_a, id),
        })
        .collect();
    DiffCell {
        layer,
        kl,
        before: top_b.to_vec(),
        after: top_a.to_vec(),
        top1_changed: top_b.first().map(|p| p.id) != top_a.first().map(|p| p.id),
        changes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `before` and `after` as space-separated token ids; `expect` is the pairs as
    /// `b:a` with a part letter (p, c, s), space-separated.
    fn check(before: &str, after: &str, expect: &str) {
        let ids = |s: &str| -> Vec<u32> {
            s.split_whitespace()
                .map(|t| t.parse().unwrap_or(u32::MAX))
                .collect()
        };
        let al = Alignment::new(&ids(before), &ids(after));
        let got: Vec<String> = al
            .pairs()
            .iter()
            .map(|p| {
                let part = &p.part.as_str()[..1];
                format!("{}:{}{part}", p.before, p.after)
            })
            .collect();
        assert_eq!(got.join(" "), expect, "{before:?} → {after:?}");
    }

    #[test]
    fn aligns_prefix_changed_span_and_suffix() {
        // A substitution: the changed span is paired.
        check("1 2 3 4 5", "1 2 3 9 5", "0:0p 1:1p 2:2p 3:3c 4:4s");
        // An insertion: no pairs in the changed span, the suffix shifts.
        check("1 2 5", "1 2 7 8 5", "0:0p 1:1p 2:4s");
        // A deletion.
        check("1 2 7 8 5", "1 2 5", "0:0p 1:1p 4:2s");
        // Appending at the end: everything before is prefix.
        check("1 2 3", "1 2 3 4", "0:0p 1:1p 2:2p");
        // Identical.
        check("1 2 3", "1 2 3", "0:0p 1:1p 2:2p");
        // Nothing shared.
        check("1 2", "3 4", "0:0c 1:1c");
        check("1", "3 4", "");
        // A repeated token: the suffix never overlaps the prefix.
        check("1 1", "1 1 1", "0:0p 1:1p");
        check("5 1", "5 1 1", "0:0p 1:1p");
        check("", "1", "");
    }

    #[test]
    fn spans_and_lookup() {
        let al = Alignment::new(&[1, 2, 5], &[1, 2, 7, 8, 5]);
        assert_eq!(al.before_changed(), 2..2);
        assert_eq!(al.after_changed(), 2..4);
        assert!(!al.is_identical());
        assert_eq!(al.before_of(4).map(|p| p.before), Some(2));
        assert_eq!(al.before_of(3), None);
        assert!(Alignment::new(&[1, 2], &[1, 2]).is_identical());
    }
}
