//! The tuned lens from the command line, on the oracle's tiny models: `tune` (and resuming),
//! `eval-lens`, `--lens tuned:PATH` with our file and the Python package's, and a lens refused
//! on another model.

use crate::{data_dir, logit_lens};

fn model(name: &str) -> String {
    data_dir().join("oracle").join(name).display().to_string()
}

#[test]
fn tune_resumes_and_eval_lens_puts_the_tuned_lens_below_the_norm_lens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = dir.path().join("train.txt");
    std::fs::write(
        &text,
        "The capital of France is Paris. The capital of Germany is Berlin. Once upon a time, \
         there was a little cat that sat on the mat and looked at the sky.",
    )
    .expect("write");
    let (text, lens) = (
        text.display().to_string(),
        dir.path().join("lens.safetensors").display().to_string(),
    );
    let llama = model("tiny-llama");
    let tune = |steps: &str| {
        logit_lens(&[
            "tune",
            "--model",
            &llama,
            "--text",
            &text,
            "--out",
            &lens,
            "--steps",
            steps,
            "--lr",
            "0.01",
            "--tokens",
            "32",
            "--seq",
            "16",
            "--save-every",
            "2",
        ])
    };
    let first = tune("3");
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert!(
        first.stderr.contains("done: 3 steps, 96 tokens"),
        "{}",
        first.stderr
    );
    // The optimiser's moments are saved beside the lens, and the resumed run takes them.
    assert!(dir.path().join("lens.adam.safetensors").is_file());
    let second = tune("12");
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert!(
        !second.stderr.contains("moments start again"),
        "{}",
        second.stderr
    );
    assert!(second.stderr.contains("steps 3..12"), "{}", second.stderr);
    assert!(
        second.stderr.contains("step 4/12 tokens 128"),
        "{}",
        second.stderr
    );
    assert!(
        second.stderr.contains("done: 12 steps"),
        "{}",
        second.stderr
    );

    let svg = dir.path().join("kl.svg");
    let tuned = format!("tuned:{lens}");
    let eval = logit_lens(&[
        "eval-lens",
        "--model",
        &llama,
        "--text",
        &text,
        "--lens",
        &tuned,
        "--plot",
        &svg.display().to_string(),
    ]);
    assert_eq!(eval.code, 0, "{}", eval.stderr);
    let mean = |label: &str| -> f64 {
        let prefix = format!("mean KL over layers 1..N-1, {label}: ");
        eval.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in {}", eval.stdout))
    };
    assert!(mean(&tuned) < mean("norm"), "{}", eval.stdout);
    let svg = std::fs::read_to_string(svg).expect("plot");
    assert_eq!(svg.matches("<polyline").count(), 3, "norm, raw, tuned");

    // The lens belongs to the tiny Llama: the tiny GPT-2 refuses it, naming why.
    let other = logit_lens(&[
        "run",
        "--model",
        &model("tiny-gpt2"),
        "--lens",
        &tuned,
        "hi",
    ]);
    assert_eq!(other.code, 1);
    assert!(
        other.stderr.contains("tuned lens for another model"),
        "{}",
        other.stderr
    );
}

#[test]
fn run_reads_a_lens_of_the_python_package() {
    let lens = format!("tuned:{}", data_dir().join("tuned-lens").display());
    let r = logit_lens(&[
        "run",
        "--model",
        &model("tiny-llama"),
        "--lens",
        &lens,
        "--format",
        "json",
        "--layers",
        "0",
        "--position",
        "0",
        "The capital of France is",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let report: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
    assert_eq!(report["lens"], "tuned");
    // Layer 0 at "The": the package's top-1 (tests/data/tuned-lens/golden.json).
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data_dir().join("tuned-lens/golden.json")).expect("golden"),
    )
    .expect("golden json");
    let want = &golden["prompts"][0]["layers"][0]["top5_ids"][0][0];
    assert_eq!(
        &report["positions"][0]["cells"][0]["top"][0]["id"], want,
        "{}",
        r.stdout
    );
    let bare = logit_lens(&[
        "run",
        "--model",
        &model("tiny-llama"),
        "--lens",
        "tuned",
        "hi",
    ]);
    assert_eq!(bare.code, 2, "{}", bare.stderr);
}
