//! The choice between a model's narrow and wide lone runs.

use cascade_host::model::wide_runs::{Width, WidthChooser};

/// Runs `lone_runs` lone runs whose cost per width is `cost`, as a model
/// would: asking for a width, then recording what it cost.
fn settle(
    chooser: &WidthChooser,
    lone_runs: usize,
    cost: impl Fn(Width, usize) -> f64,
) -> Vec<Width> {
    (0..lone_runs)
        .map(|run| {
            let width = chooser.choose();
            chooser.record(width, cost(width, run));
            width
        })
        .collect()
}

#[test]
fn both_widths_are_tried_then_the_faster_is_kept() {
    let chooser = WidthChooser::default();
    let widths = settle(&chooser, 40, |width, _| match width {
        Width::Wide => 60.0,
        Width::Narrow => 100.0,
    });
    assert_eq!(widths[..8].iter().filter(|w| **w == Width::Wide).count(), 4);
    assert!(widths[8..].iter().all(|w| *w == Width::Wide), "{widths:?}");

    let chooser = WidthChooser::default();
    let widths = settle(&chooser, 40, |width, _| match width {
        Width::Wide => 150.0,
        Width::Narrow => 100.0,
    });
    assert!(
        widths[8..].iter().all(|w| *w == Width::Narrow),
        "{widths:?}"
    );
}

#[test]
fn a_slow_first_run_does_not_condemn_a_width() {
    // The first wide run is cold (10x its usual cost); the best run decides.
    let chooser = WidthChooser::default();
    let widths = settle(&chooser, 20, |width, run| match (width, run) {
        (Width::Wide, 0) => 600.0,
        (Width::Wide, _) => 60.0,
        (Width::Narrow, _) => 100.0,
    });
    assert!(widths[8..].iter().all(|w| *w == Width::Wide), "{widths:?}");
}
