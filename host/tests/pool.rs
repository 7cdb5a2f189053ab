//! The instance pool's policies: which idle instances to drop, and the
//! admission gate's bounds. (Integration tests of the library, so the
//! library itself needs no unit-test build of its own — see host/Cargo.toml.)

use cascade_host::pool::{Gate, surplus};
use prometheus::IntGauge;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[test]
fn surplus_keeps_the_minimum_and_the_fresh() {
    let now = Instant::now();
    let old = now - Duration::from_secs(60);
    let fresh = now - Duration::from_secs(1);
    let timeout = Duration::from_secs(30);
    assert_eq!(surplus(&[old, old, fresh], 3, 0, now, timeout), 2);
    assert_eq!(surplus(&[old, old, fresh], 3, 2, now, timeout), 1);
    assert_eq!(surplus(&[fresh], 1, 0, now, timeout), 0);
    // Busy instances count as live but are not in the idle list.
    assert_eq!(surplus(&[old], 4, 3, now, timeout), 1);
    assert_eq!(surplus(&[old], 3, 3, now, timeout), 0);
}

#[tokio::test]
async fn the_gate_bounds_concurrency_and_queue() {
    let gate = Arc::new(Gate::new(1, 1, IntGauge::new("q", "q").expect("gauge")));
    let first = gate.enter(Duration::from_secs(1)).await.expect("free slot");
    let waiter = {
        let gate = gate.clone();
        tokio::spawn(async move { gate.enter(Duration::from_secs(5)).await.is_ok() })
    };
    tokio::task::yield_now().await;
    assert_eq!(gate.waiting(), 1);
    // The queue holds one: a third request is refused at once.
    assert!(gate.enter(Duration::from_secs(5)).await.is_err());
    drop(first);
    assert!(waiter.await.expect("joins"));
    // A full gate refuses after the wait runs out.
    let _held = gate
        .enter(Duration::from_secs(1))
        .await
        .expect("free again");
    assert!(gate.enter(Duration::from_millis(100)).await.is_err());
}
