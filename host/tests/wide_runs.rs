//! The choice between a model's narrow and wide lone runs.

use cascade_host::model::wide_runs::{Width, WidthChooser};

/// Elements of a 32-token `embed` input (ids and mask).
const ELEMENTS: usize = 64;

/// Runs `lone_runs` lone runs whose cost per width is `cost`, as a model
/// would: asking for a width, then recording what it cost.
fn settle(
    chooser: &WidthChooser,
    lone_runs: usize,
    cost: impl Fn(Width, usize) -> f64,
) -> Vec<Width> {
    (0..lone_runs)
        .map(|run| {
            let width = chooser.choose(ELEMENTS);
            chooser.record(width, ELEMENTS, cost(width, run));
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

#[test]
fn each_size_class_keeps_the_width_that_was_faster_for_it() {
    let chooser = WidthChooser::default();
    // Small inputs: waking a second thread costs more than it saves.
    for _ in 0..8 {
        let width = chooser.choose(6);
        let cost = if width == Width::Wide { 40.0 } else { 10.0 };
        chooser.record(width, 6, cost);
    }
    assert_eq!(chooser.choose(6), Width::Narrow);
    // Larger ones have not run wide yet: they are explored, not judged by
    // the small ones' cost per element.
    assert_eq!(chooser.choose(ELEMENTS), Width::Wide);
    let widths = settle(&chooser, 20, |width, _| match width {
        Width::Wide => 18.0,
        Width::Narrow => 30.0,
    });
    assert!(widths[8..].iter().all(|w| *w == Width::Wide), "{widths:?}");
    assert_eq!(chooser.choose(100), Width::Wide, "100 is in 64's class");
    assert_eq!(chooser.choose(6), Width::Narrow);
}

#[test]
fn alternating_sizes_while_exploring_do_not_decide_for_each_other() {
    // What a host saw: its first lone runs alternated a 3-token text (the
    // wide runs, dear per element) and a 32-token one (the narrow runs);
    // it kept one thread for good and served 32-token texts at 325
    // req/s where two threads served 472.
    let chooser = WidthChooser::default();
    for _ in 0..4 {
        chooser.record(Width::Wide, 6, 40.0);
        chooser.record(Width::Narrow, ELEMENTS, 30.0);
    }
    assert_eq!(
        chooser.choose(ELEMENTS),
        Width::Wide,
        "32 tokens never ran wide"
    );
}
