//! The query slots against a real store: a read that holds the only slot,
//! the queries that find it taken, and the slot coming back.

use std::sync::Arc;
use std::time::Duration;

use tonic::Code;

use super::Slots;
use crate::service::settings::QueryLimits;
use crate::store::{Reader, Store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_slot_makes_queries_wait_then_refuses_them_and_a_slow_read_is_answered_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let reader = store.reader().unwrap();
    let timeout = Duration::from_millis(300);
    let slots = Arc::new(Slots::new(QueryLimits {
        max_concurrent: 1,
        timeout,
    }));

    // A read that blocks until released: it holds the only slot.
    let (started, is_started) = tokio::sync::oneshot::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let blocked = {
        let (slots, reader) = (slots.clone(), reader.clone());
        tokio::spawn(async move {
            slots
                .read(&reader, move |r: &Reader| {
                    let _ = started.send(());
                    let _ = released.recv();
                    r.job("a")
                })
                .await
        })
    };
    is_started.await.unwrap();

    let quick = |slots: Arc<Slots>, reader: Reader| async move { slots.read(&reader, |r| r.job("a")).await };
    let refused = quick(slots.clone(), reader.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("max_concurrent_queries") && refused.message().contains("300ms"),
        "{refused:?}"
    );

    // The blocked read's caller is answered at its deadline...
    let slow = blocked.await.unwrap().unwrap_err();
    assert_eq!(slow.code(), Code::DeadlineExceeded, "{slow:?}");
    assert!(slow.message().contains("query_timeout (300ms)"), "{slow:?}");
    // ... but the read keeps its slot until it really ends.
    let still = quick(slots.clone(), reader.clone()).await.unwrap_err();
    assert_eq!(still.code(), Code::ResourceExhausted, "{still:?}");

    release.send(()).unwrap();
    assert_eq!(quick(slots.clone(), reader.clone()).await.unwrap(), None);
}

#[tokio::test]
async fn a_read_that_cannot_finish_in_time_is_deadline_exceeded() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let reader = store.reader().unwrap();
    let slots = Slots::new(QueryLimits {
        max_concurrent: 2,
        timeout: Duration::from_nanos(1),
    });
    // The deadline has passed when the read would start: it does not.
    let status = slots.read(&reader, |r| r.job("a")).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
}
