//! The plots against their input checks, and PNG files written for real (set
//! `DRLLM_TEST_PLOT_DIR` to keep copies to look at).

use drllm_plots::{self as plots, PlotError, Point};
use std::path::{Path, PathBuf};

fn assert_png(p: &Path) {
    let bytes = std::fs::read(p).unwrap();
    assert!(bytes.len() > 1000, "{}: {} bytes", p.display(), bytes.len());
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert!(!p.with_extension("tmp.png").exists());
    if let Some(keep) = std::env::var_os("DRLLM_TEST_PLOT_DIR") {
        let keep = PathBuf::from(keep);
        std::fs::create_dir_all(&keep).unwrap();
        std::fs::copy(p, keep.join(p.file_name().unwrap())).unwrap();
    }
}

/// Decisions of a made-up router: early blocks executed, middle ones sometimes skipped,
/// late ones sometimes repeated.
fn fake_decisions(n_q: usize, n_b: usize) -> Vec<Vec<u8>> {
    (0..n_q)
        .map(|q| {
            (0..n_b)
                .map(|b| {
                    let h = (q * 31 + b * 17 + q * b) % 11;
                    if b > n_b / 3 && b < 2 * n_b / 3 && h < 3 {
                        0
                    } else if b >= 2 * n_b / 3 && h == 0 {
                        2
                    } else {
                        1
                    }
                })
                .collect()
        })
        .collect()
}

#[test]
fn plots_write_pngs() {
    if let Err(e) = plots::ensure_font() {
        panic!("{e}");
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("heatmap.png");
    plots::decision_heatmap(
        &p,
        "SmolLM2 routed, ARC-Easy (test)",
        &fake_decisions(60, 30),
    )
    .unwrap();
    assert_png(&p);
    let p = dir.path().join("heatmap_bars.png");
    plots::decision_heatmap(
        &p,
        "Gemma-3 routed, ARC-Easy (test)",
        &fake_decisions(500, 18),
    )
    .unwrap();
    assert_png(&p);
    let p = dir.path().join("accuracy.png");
    let points = vec![
        Point {
            label: "plain".into(),
            passes: 30.0,
            accuracy: 47.9,
            stderr: 2.1,
        },
        Point {
            label: "routed".into(),
            passes: 27.4,
            accuracy: 48.6,
            stderr: 2.1,
        },
        Point {
            label: "routed bias +1".into(),
            passes: 29.1,
            accuracy: 48.2,
            stderr: 2.0,
        },
        Point {
            label: "static skip 13".into(),
            passes: 29.0,
            accuracy: 46.3,
            stderr: 2.1,
        },
        Point {
            label: "no error bar".into(),
            passes: 28.0,
            accuracy: 45.0,
            stderr: 0.0,
        },
    ];
    plots::accuracy_vs_passes(&p, "SmolLM2-135M, ARC-Easy test", &points).unwrap();
    assert_png(&p);
    // one point only
    let p = dir.path().join("single.png");
    plots::accuracy_vs_passes(&p, "one", &points[..1]).unwrap();
    assert_png(&p);
}

#[test]
fn plots_reject_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.png");
    let input = |r: Result<(), PlotError>| matches!(r, Err(PlotError::Input { .. }));
    assert!(input(plots::decision_heatmap(&p, "t", &[])));
    assert!(input(plots::decision_heatmap(&p, "t", &[vec![]])));
    assert!(input(plots::decision_heatmap(
        &p,
        "t",
        &[vec![1, 1], vec![1]]
    )));
    assert!(input(plots::decision_heatmap(&p, "t", &[vec![1, 3]])));
    assert!(input(plots::decision_heatmap(
        &dir.path().join("x.jpg"),
        "t",
        &[vec![1, 1]]
    )));
    assert!(input(plots::accuracy_vs_passes(&p, "t", &[])));
    let nan = Point {
        label: "x".into(),
        passes: f64::NAN,
        accuracy: 1.0,
        stderr: 0.0,
    };
    assert!(input(plots::accuracy_vs_passes(&p, "t", &[nan])));
    let neg = Point {
        label: "x".into(),
        passes: 1.0,
        accuracy: 1.0,
        stderr: -1.0,
    };
    assert!(input(plots::accuracy_vs_passes(&p, "t", &[neg])));
    assert!(!p.exists());
    // a folder that does not exist: an error, not a panic
    let r = plots::decision_heatmap(&dir.path().join("no/such/x.png"), "t", &[vec![1]]);
    assert!(matches!(r, Err(PlotError::Draw { .. })), "{r:?}");
}

#[test]
fn block_intervals_draw_and_check_their_input() {
    use drllm_plots::BlockEstimate;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("auc.png");
    let rows: Vec<BlockEstimate> = (0..30)
        .map(|b| BlockEstimate {
            block: b,
            value: (b % 7 != 0).then(|| {
                let e = 0.5 + 0.01 * b as f64;
                (e, e - 0.08, e + 0.08)
            }),
        })
        .collect();
    plots::block_intervals(&p, "AUC of skip safety", "AUC", &rows, 0.5, (0.0, 1.0)).unwrap();
    assert_png(&p);
    let bad = [BlockEstimate {
        block: 0,
        value: Some((0.5, 0.6, 0.7)),
    }];
    let e = plots::block_intervals(&p, "t", "y", &bad, 0.5, (0.0, 1.0)).unwrap_err();
    assert!(matches!(e, PlotError::Input { .. }), "{e}");
    assert!(plots::block_intervals(&p, "t", "y", &[], 0.5, (0.0, 1.0)).is_err());
    assert!(plots::block_intervals(&p, "t", "y", &rows, 0.5, (1.0, 0.0)).is_err());
    assert!(
        plots::block_intervals(&dir.path().join("x.jpg"), "t", "y", &rows, 0.5, (0.0, 1.0))
            .is_err()
    );
}
