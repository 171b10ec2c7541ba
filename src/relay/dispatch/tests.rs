use super::*;
use crate::config::RouteConfig;
use crate::envelope::sample_event;
use crate::publisher::PublishError;
use chrono::Utc;

fn dispatcher(max_attempts: u32) -> Dispatcher {
    let router = Router::new(
        &[RouteConfig {
            topic: "orders.*".into(),
            backend: "m".into(),
            format: BodyFormat::Raw,
        }],
        &["m".to_string()],
    );
    Dispatcher::new(
        Arc::new(router),
        Backoff::new(Duration::from_millis(100), Duration::from_secs(10)),
        max_attempts,
        1024,
    )
}

fn row(id: i64, agg: &str, prev: Option<i64>) -> Claimed {
    Claimed {
        event: Arc::new(sample_event(id, agg)),
        invalid: None,
        prev: prev.map(|p| Prev {
            id: p,
            status: RowStatus::Pending,
            next_attempt_at: Utc::now() - chrono::Duration::seconds(1),
        }),
    }
}

fn ack(h: &Handoff, outcome: Result<(), PublishError>) -> AckResult {
    AckResult {
        row_id: h.event.id,
        token: h.token,
        outcome,
        at: Utc::now(),
        handed_at: Utc::now(),
        backend: h.backend,
        occurred_at: Some(h.event.occurred_at),
    }
}

fn ids(h: &[Handoff]) -> Vec<i64> {
    h.iter().map(|h| h.event.id).collect()
}

fn chain_of(first: i64, n: i64, agg: &str) -> Vec<Claimed> {
    (first..first + n)
        .map(|id| row(id, agg, (id > first).then_some(id - 1)))
        .collect()
}

#[test]
fn pipelined_rows_go_up_to_the_window_behind_the_oldest_unacknowledged() {
    let mut d = dispatcher(5).pipelined(3, vec![true]);
    let (out, _) = d.add_batch(1, 1, chain_of(1, 10, "a"));
    assert_eq!(ids(&out), vec![1, 2, 3]);
    // A later row acknowledged first moves nothing: the window counts from the oldest.
    let (more, _) = d.on_result(ack(&out[1], Ok(())));
    assert!(more.is_empty());
    // The oldest acknowledged: 2 is acknowledged too, so the window moves by two.
    let (more, _) = d.on_result(ack(&out[0], Ok(())));
    assert_eq!(ids(&more), vec![4, 5]);
    // Rows of a later claim join the same chain and the same window.
    let (later, _) = d.add_batch(2, 2, chain_of(11, 2, "a"));
    assert!(later.is_empty());
    let mut queue: VecDeque<Handoff> = more.into();
    queue.push_front(out.into_iter().nth(2).unwrap());
    let mut order = Vec::new();
    while let Some(h) = queue.pop_front() {
        order.push(h.event.id);
        let (next, _) = d.on_result(ack(&h, Ok(())));
        queue.extend(next);
    }
    assert_eq!(order, vec![3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
}

#[test]
fn a_waiting_row_goes_when_its_predecessor_left_memory_before_the_oldest_was_acked() {
    // Row 2's claim completes (2 acknowledged) while row 1 is still in flight; row 3 waits
    // behind the full window. Row 1's acknowledgement must still let row 3 go.
    let mut d = dispatcher(5).pipelined(2, vec![true]);
    let (h1, _) = d.add_batch(1, 1, vec![row(1, "a", None)]);
    let (h2, _) = d.add_batch(2, 2, vec![row(2, "a", Some(1))]);
    assert_eq!(ids(&h2), vec![2]);
    let (h3, _) = d.add_batch(3, 3, vec![row(3, "a", Some(2))]);
    assert!(h3.is_empty(), "window of 2 is full");
    let (none, done) = d.on_result(ack(&h2[0], Ok(())));
    assert!(none.is_empty());
    assert_eq!(done.len(), 1, "row 2's claim completes");
    d.finished(2, true, 3);
    let (h3, _) = d.on_result(ack(&h1[0], Ok(())));
    assert_eq!(ids(&h3), vec![3]);
}

fn moved_to(mut c: Claimed, topic: &str) -> Claimed {
    Arc::make_mut(&mut c.event).topic = topic.into();
    c
}

#[test]
fn a_row_on_another_topic_waits_for_everything_before_it_even_across_a_hole() {
    // Rows 1-3 in flight on one topic, each in its own claim; row 4 (another topic) may
    // overlap none of them. Row 3's claim ends early, leaving a hole before row 4.
    let mut d = dispatcher(5).pipelined(3, vec![true]);
    let (h1, _) = d.add_batch(1, 1, vec![row(1, "a", None)]);
    let (h2, _) = d.add_batch(2, 2, vec![row(2, "a", Some(1))]);
    let (h3, _) = d.add_batch(3, 3, vec![row(3, "a", Some(2))]);
    let (h4, _) = d.add_batch(4, 4, vec![moved_to(row(4, "a", Some(3)), "orders.other")]);
    assert!(h4.is_empty());
    let (none, done) = d.on_result(ack(&h3[0], Ok(())));
    assert!(none.is_empty());
    assert_eq!(done.len(), 1);
    d.finished(3, true, 4);
    let (none, _) = d.on_result(ack(&h2[0], Ok(())));
    assert!(
        none.is_empty(),
        "row 1 is still in flight on the other topic"
    );
    let (h4, _) = d.on_result(ack(&h1[0], Ok(())));
    assert_eq!(ids(&h4), vec![4]);
}

#[test]
fn a_row_that_cannot_overlap_goes_once_everything_before_it_is_published_despite_a_hole() {
    let mut d = dispatcher(5).pipelined(4, vec![true]);
    let (h1, _) = d.add_batch(1, 1, vec![row(1, "a", None)]);
    let (h2, _) = d.add_batch(2, 2, vec![row(2, "a", Some(1))]);
    let (h3, _) = d.add_batch(
        3,
        3,
        vec![
            row(3, "a", Some(2)),
            moved_to(row(4, "a", Some(3)), "orders.other"),
        ],
    );
    assert_eq!(ids(&h3), vec![3]);
    let (_, done) = d.on_result(ack(&h2[0], Ok(())));
    assert_eq!(done.len(), 1);
    d.on_result(ack(&h3[0], Ok(())));
    d.finished(2, true, 4);
    let (h4, _) = d.on_result(ack(&h1[0], Ok(())));
    assert_eq!(
        ids(&h4),
        vec![4],
        "not left waiting until released as stale"
    );
}

#[test]
fn a_row_behind_one_sent_past_a_failure_is_deferred_even_after_the_failure_left_memory() {
    let mut d = dispatcher(5).pipelined(2, vec![true]);
    let (h1, _) = d.add_batch(1, 1, vec![row(1, "a", None)]);
    let (h2, _) = d.add_batch(2, 2, vec![row(2, "a", Some(1))]);
    assert_eq!(ids(&h2), vec![2]);
    let (_, done) = d.on_result(ack(&h1[0], Err(PublishError::retryable("try again"))));
    assert_eq!(done.len(), 1);
    d.finished(1, true, 2);
    // Row 2 was sent before row 1's retry: published, but tainted.
    d.on_result(ack(&h2[0], Ok(())));
    let (h3, done) = d.add_batch(3, 3, vec![row(3, "a", Some(1))]);
    assert!(h3.is_empty(), "row 3 must not overtake row 1's retry");
    assert_eq!(done.len(), 1);
    let deferred: Vec<i64> = done[0].marks.deferred.iter().map(|(id, _)| *id).collect();
    assert_eq!(deferred, vec![3]);
}

#[test]
fn rows_claimed_again_leave_no_chain_behind() {
    let mut d = dispatcher(5);
    let (h, _) = d.add_batch(1, 1, vec![row(1, "a", None), row(2, "a", Some(1))]);
    let (_, done) = d.on_result(ack(&h[0], Err(PublishError::retryable("try again"))));
    assert_eq!(
        done.len(),
        1,
        "row 2 deferred behind row 1: the claim completes"
    );
    // Claimed again before the first claim's end is heard of.
    let (h, _) = d.add_batch(2, 2, vec![row(1, "a", None), row(2, "a", Some(1))]);
    assert_eq!(ids(&h), vec![1]);
    d.finished(1, true, 2);
    let (h2, _) = d.on_result(ack(&h[0], Ok(())));
    let (_, done) = d.on_result(ack(&h2[0], Ok(())));
    assert_eq!(done.len(), 1);
    d.finished(2, true, 3);
    assert_eq!(d.in_flight(), 0);
    assert!(d.chains.is_empty(), "{:?}", d.chains);
    assert!(d.by_aggregate.is_empty());
}

#[test]
fn a_pipelined_failure_taints_what_is_in_flight_and_defers_what_waits() {
    let mut d = dispatcher(5).pipelined(2, vec![true]);
    let (out, _) = d.add_batch(1, 1, chain_of(1, 4, "a"));
    assert_eq!(ids(&out), vec![1, 2]);
    let (more, _) = d.on_result(ack(
        &out[0],
        Err(PublishError::permanent("too large".to_string())),
    ));
    assert!(more.is_empty());
    // Row 2 was in flight: its success hands nothing behind the failed row.
    let (more, done) = d.on_result(ack(&out[1], Ok(())));
    assert!(more.is_empty());
    assert_eq!(done.len(), 1);
    let m = &done[0].marks;
    assert_eq!(m.failed.len(), 1);
    assert_eq!(m.published, vec![2]);
    let deferred: Vec<i64> = m.deferred.iter().map(|(id, _)| *id).collect();
    assert_eq!(deferred, vec![3, 4]);
    assert!(matches!(
        m.deferred[0].1,
        DeferUntil::Predecessor(Prev { id: 1, .. })
    ));
}

#[test]
fn heads_go_at_once_and_followers_wait_for_the_predecessor_ack() {
    let mut d = dispatcher(5);
    let (out, done) = d.add_batch(
        1,
        1,
        vec![row(1, "a", None), row(2, "a", Some(1)), row(3, "b", None)],
    );
    assert_eq!(ids(&out), vec![1, 3]);
    assert!(done.is_empty());
    let (out2, _) = d.on_result(ack(&out[0], Ok(())));
    assert_eq!(ids(&out2), vec![2]);
    let (_, done) = d.on_result(ack(&out[1], Ok(())));
    assert!(done.is_empty());
    let (_, done) = d.on_result(ack(&out2[0], Ok(())));
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].marks.published.len(), 3);
}

#[test]
fn a_completed_batch_counts_its_verdicts_per_topic_and_backend() {
    let mut d = dispatcher(5);
    let mut other = row(3, "c", None);
    Arc::make_mut(&mut other.event).topic = "orders.paid".into();
    let mut unrouted = row(4, "d", None);
    Arc::make_mut(&mut unrouted.event).topic = "nowhere".into();
    let (out, _) = d.add_batch(
        1,
        1,
        vec![row(1, "a", None), row(2, "b", None), other, unrouted],
    );
    d.on_result(ack(&out[0], Ok(())));
    d.on_result(ack(&out[1], Err(PublishError::retryable("slow"))));
    let (_, done) = d.on_result(ack(&out[2], Err(PublishError::permanent("no"))));
    let mut by: Vec<_> = done[0]
        .by_topic
        .iter()
        .map(|t| {
            (
                t.topic.as_str(),
                t.backend,
                t.published,
                t.retried,
                t.failed,
            )
        })
        .collect();
    by.sort();
    let first = out[0].event.topic.as_str();
    assert_eq!(
        by,
        vec![
            ("nowhere", None, 0, 0, 1),
            (first, Some(0), 1, 1, 0),
            ("orders.paid", Some(0), 0, 0, 1),
        ]
    );
}

#[test]
fn a_retry_defers_the_followers_instead_of_publishing_them() {
    let mut d = dispatcher(5);
    let (out, _) = d.add_batch(
        1,
        1,
        vec![
            row(1, "a", None),
            row(2, "a", Some(1)),
            row(3, "a", Some(2)),
        ],
    );
    assert_eq!(ids(&out), vec![1]);
    let (more, done) = d.on_result(ack(&out[0], Err(PublishError::retryable("timeout"))));
    assert!(more.is_empty());
    let m = &done[0].marks;
    assert_eq!(m.retry.len(), 1);
    assert_eq!(m.deferred.len(), 2);
    assert!(m.published.is_empty());
}

#[test]
fn a_permanent_failure_holds_the_next_event_behind_it() {
    let mut d = dispatcher(5);
    let (out, _) = d.add_batch(1, 1, vec![row(1, "a", None), row(2, "a", Some(1))]);
    let (_, done) = d.on_result(ack(&out[0], Err(PublishError::permanent("too large"))));
    let m = &done[0].marks;
    assert_eq!(m.failed[0].0, 1);
    assert!(
        matches!(&m.deferred[0], (2, DeferUntil::Predecessor(p)) if p.id == 1 && p.status == RowStatus::Failed)
    );
}

#[test]
fn retryable_errors_fail_the_row_after_max_attempts() {
    let mut d = dispatcher(2);
    let mut r = row(1, "a", None);
    Arc::make_mut(&mut r.event).attempts = 1;
    let (out, _) = d.add_batch(1, 1, vec![r]);
    let (_, done) = d.on_result(ack(&out[0], Err(PublishError::retryable("down"))));
    let (_, attempted, reason) = &done[0].marks.failed[0];
    assert!(attempted);
    assert!(
        reason.contains("2 attempts") && reason.contains("down"),
        "{reason}"
    );
}

#[test]
fn an_unavailable_broker_never_uses_attempts_up() {
    let mut d = dispatcher(2);
    let mut r = row(1, "a", None);
    Arc::make_mut(&mut r.event).attempts = 7;
    let (out, _) = d.add_batch(1, 1, vec![r]);
    let (_, done) = d.on_result(ack(
        &out[0],
        Err(PublishError::unavailable("not connected")),
    ));
    let m = &done[0].marks;
    assert!(m.failed.is_empty());
    let (id, delay, reason, counted) = &m.retry[0];
    assert_eq!(*id, 1);
    assert!(!counted, "no attempt counted");
    assert!(*delay <= OUTAGE_RETRY_MAX.as_secs_f64());
    assert!(reason.contains("waiting for the broker"), "{reason}");
}

/// Backend "n" takes `orders.*`, backend "k" everything else.
fn two_backends(backoff: Backoff) -> Dispatcher {
    let route = |topic: &str, backend: &str| RouteConfig {
        topic: topic.into(),
        backend: backend.into(),
        format: BodyFormat::Raw,
    };
    let router = Router::new(
        &[route("orders.*", "n"), route("*", "k")],
        &["n".to_string(), "k".to_string()],
    );
    Dispatcher::new(Arc::new(router), backoff, 3, 1024)
}

/// Two backends, "n" down: its first event (row 1, aggregate "down") was answered
/// "unavailable".
fn with_n_down(backoff: Backoff) -> Dispatcher {
    let mut d = two_backends(backoff);
    let (out, _) = d.add_batch(1, 1, vec![on_topic(1, "down", "orders.x")]);
    d.on_result(ack(
        &out[0],
        Err(PublishError::unavailable("not connected")),
    ));
    d
}

fn on_topic(id: i64, agg: &str, topic: &str) -> Claimed {
    let mut r = row(id, agg, None);
    Arc::make_mut(&mut r.event).topic = topic.into();
    r
}

#[test]
fn a_backend_that_is_down_is_not_asked_again_until_its_probe_while_others_flow() {
    let mut d = with_n_down(Backoff::new(
        Duration::from_secs(1),
        Duration::from_secs(10),
    ));
    assert!(
        !d.brokers_unavailable(),
        "the other backend was never asked"
    );
    // Within the outage delay: backend n's rows are rescheduled without an attempt and
    // without a hand-off; backend k's go.
    let (out, done) = d.add_batch(
        2,
        2,
        vec![
            on_topic(2, "b", "orders.x"),
            on_topic(3, "c", "payments.x"),
            on_topic(4, "d", "orders.y"),
        ],
    );
    assert_eq!(ids(&out), vec![3]);
    assert_eq!(out[0].backend, 1);
    assert_eq!(d.held_back(), 2);
    assert!(done.is_empty(), "row 3 is still in flight");
    let (_, done) = d.on_result(ack(&out[0], Ok(())));
    let m = &done[0].marks;
    assert_eq!(m.published, vec![3]);
    let mut held: Vec<_> = m.retry.iter().map(|r| (r.0, r.3)).collect();
    held.sort();
    assert_eq!(held, vec![(2, false), (4, false)], "held back uncounted");
    assert!(m
        .retry
        .iter()
        .all(|r| r.2.contains("backend n is unavailable")));
    // The other backend's success says nothing about n: its rows still wait.
    let (out, _) = d.add_batch(3, 3, vec![on_topic(5, "e", "orders.x")]);
    assert!(out.is_empty());
    // Both down: the relay spaces its claims.
    let (out, _) = d.add_batch(4, 4, vec![on_topic(6, "f", "payments.x")]);
    d.on_result(ack(
        &out[0],
        Err(PublishError::unavailable("all brokers down")),
    ));
    assert!(d.brokers_unavailable());
}

#[test]
fn after_the_outage_delay_one_probe_goes_and_its_success_ends_the_outage() {
    // No delay at all: every claim may probe.
    let mut d = with_n_down(Backoff::new(Duration::ZERO, Duration::ZERO));
    let (out, _) = d.add_batch(2, 2, vec![on_topic(2, "b", "orders.x")]);
    assert_eq!(ids(&out), vec![2], "the probe");
    d.on_result(ack(&out[0], Ok(())));
    let (out, _) = d.add_batch(
        3,
        3,
        vec![on_topic(3, "c", "orders.x"), on_topic(4, "d", "orders.x")],
    );
    assert_eq!(ids(&out), vec![3, 4], "back: everything goes");
    assert_eq!(d.held_back(), 0);
}

#[test]
fn in_flight_only_to_a_backend_that_is_down_is_known() {
    let mut d = with_n_down(Backoff::new(Duration::ZERO, Duration::ZERO));
    let none: &[String] = &[];
    let quiet = Duration::from_secs(2);
    let later = Instant::now() + quiet;
    assert!(
        !d.only_unreachable_in_flight(none, later, quiet),
        "nothing in flight"
    );
    // The probe to n, which is down, and an event to k, which is not.
    let (out, _) = d.add_batch(
        2,
        2,
        vec![on_topic(2, "b", "orders.x"), on_topic(3, "c", "payments.x")],
    );
    assert_eq!(ids(&out), vec![2, 3]);
    assert!(
        !d.only_unreachable_in_flight(none, later, quiet),
        "k's answer may still come"
    );
    assert!(
        d.only_unreachable_in_flight(&["k".to_string()], later, quiet),
        "k's health probe failed and k never answered: nothing is coming"
    );
    let k_answered = Instant::now();
    d.on_result_at(ack(&out[1], Ok(())), k_answered);
    assert!(
        d.only_unreachable_in_flight(none, later, quiet),
        "only the probe to n is left"
    );
    // n answers: it is back.
    d.on_result(ack(&out[0], Ok(())));
    assert!(!d.only_unreachable_in_flight(none, later, quiet));
    // A failed probe says nothing while the backend delivered lately (the probe is older,
    // or timed out on something else): only a silence of `quiet` counts.
    let (out, _) = d.add_batch(3, 3, vec![on_topic(4, "e", "payments.x")]);
    assert_eq!(ids(&out), vec![4]);
    let k = ["k".to_string()];
    assert!(!d.only_unreachable_in_flight(&k, k_answered, quiet));
    assert!(d.only_unreachable_in_flight(&k, k_answered + quiet, quiet));
}

#[test]
fn a_held_back_row_defers_the_rest_of_its_chain() {
    let mut d = with_n_down(Backoff::new(
        Duration::from_secs(1),
        Duration::from_secs(10),
    ));
    let mut second = on_topic(3, "a", "orders.x");
    second.prev = Some(Prev {
        id: 2,
        status: RowStatus::Pending,
        next_attempt_at: Utc::now() - chrono::Duration::seconds(1),
    });
    let (out, done) = d.add_batch(2, 2, vec![on_topic(2, "a", "orders.x"), second]);
    assert!(out.is_empty());
    let m = &done[0].marks;
    assert_eq!(m.retry.len(), 1);
    assert_eq!(m.retry[0].0, 2);
    assert_eq!(m.deferred.len(), 1);
    assert_eq!(m.deferred[0].0, 3);
}

#[test]
fn a_row_without_a_probe_still_waits_behind_its_aggregates_rows_in_memory() {
    // The claim skipped the probe (prev None), but an earlier row of the aggregate is in
    // flight from an earlier claim, and another waits in this one.
    let mut d = dispatcher(5);
    let (out, _) = d.add_batch(1, 1, vec![row(1, "a", None)]);
    assert_eq!(ids(&out), vec![1]);
    let (out2, _) = d.add_batch(
        2,
        2,
        vec![row(5, "a", None), row(7, "a", None), row(6, "b", None)],
    );
    assert_eq!(ids(&out2), vec![6], "5 and 7 wait behind 1");
    let (more, _) = d.on_result(ack(&out[0], Ok(())));
    assert_eq!(ids(&more), vec![5]);
    let (more, _) = d.on_result(ack(&more[0], Ok(())));
    assert_eq!(ids(&more), vec![7]);
    // A failure of the head defers what waits behind it, as with a probed predecessor.
    let (out3, _) = d.add_batch(3, 3, vec![row(10, "c", None)]);
    let (_, _) = d.add_batch(4, 4, vec![row(11, "c", None)]);
    let (_, done) = d.on_result(ack(&out3[0], Err(PublishError::permanent("no"))));
    let held: Vec<i64> = done
        .iter()
        .flat_map(|c| c.marks.deferred.iter().map(|(id, _)| *id))
        .collect();
    assert_eq!(held, vec![11]);
}

#[test]
fn followers_in_a_later_batch_chain_behind_rows_in_flight() {
    let mut d = dispatcher(5);
    let (out, _) = d.add_batch(1, 1, vec![row(1, "a", None)]);
    let (out2, _) = d.add_batch(2, 2, vec![row(2, "a", Some(1)), row(5, "b", None)]);
    assert_eq!(ids(&out2), vec![5]);
    let (out3, done) = d.on_result(ack(&out[0], Ok(())));
    assert_eq!(ids(&out3), vec![2]);
    assert_eq!(done[0].batch, 1);
    // Heard of batch 1's commit while claim 3 was already running.
    d.finished(1, true, 3);
    // Claim 3 still saw row 1: it is known as published.
    let (out4, _) = d.add_batch(3, 3, vec![row(9, "c", Some(1))]);
    assert_eq!(ids(&out4), vec![9]);
    assert_eq!(d.recent_len(), 1);
    // Claim 4 started after the commit was heard of: the entry is no longer needed.
    d.add_batch(4, 4, vec![]);
    assert_eq!(d.recent_len(), 0);
}

#[test]
fn a_predecessor_held_elsewhere_defers_the_row() {
    let mut d = dispatcher(5);
    let (out, done) = d.add_batch(1, 1, vec![row(4, "a", Some(3))]);
    assert!(out.is_empty());
    assert!(matches!(done[0].marks.deferred[0].1, DeferUntil::Soon));
    let mut failed = row(6, "b", Some(5));
    failed.prev.as_mut().unwrap().status = RowStatus::Failed;
    let (_, done) = d.add_batch(2, 2, vec![failed]);
    assert!(matches!(
        done[0].marks.deferred[0].1,
        DeferUntil::Predecessor(_)
    ));
}

#[test]
fn invalid_rows_fail_without_a_hand_off_and_unrouted_topics_name_the_topic() {
    let mut d = dispatcher(5);
    let mut bad = row(1, "a", None);
    Arc::make_mut(&mut bad.event).topic = "orders.ünicode".into();
    let mut unrouted = row(2, "b", None);
    Arc::make_mut(&mut unrouted.event).topic = "billing.x".into();
    let (out, done) = d.add_batch(1, 1, vec![bad, unrouted, row(3, "c", None)]);
    assert_eq!(ids(&out), vec![3]);
    assert!(done.is_empty());
    let (_, done) = d.on_result(ack(&out[0], Ok(())));
    let f = &done[0].marks.failed;
    assert!(f[0].2.contains("position 8"), "{}", f[0].2);
    assert!(
        f[1].2.contains("billing.x") && f[1].2.contains("no route"),
        "{}",
        f[1].2
    );
    assert!(!f[0].1);
}

#[test]
fn timeouts_count_as_retryable_and_late_results_are_ignored() {
    let mut d = dispatcher(5);
    let (out, _) = d.add_batch(1, 1, vec![row(1, "a", None)]);
    let (_, done) = d.expire(Duration::ZERO);
    assert_eq!(done[0].marks.retry.len(), 1);
    let (more, done) = d.on_result(ack(&out[0], Ok(())));
    assert!(more.is_empty() && done.is_empty());
}

#[test]
fn a_commit_heard_after_the_row_was_claimed_again_leaves_the_new_claim_alone() {
    let mut d = dispatcher(5);
    let (_, done) = d.add_batch(1, 1, vec![row(4, "a", Some(3))]);
    assert_eq!(done.len(), 1, "deferred at once");
    // Batch 1 committed; a new claim took row 4 again before the loop heard of the commit.
    let (out, _) = d.add_batch(2, 2, vec![row(4, "a", None)]);
    d.finished(1, true, 2);
    assert_eq!(d.in_flight(), 1, "row 4 still tracked for batch 2");
    let (_, done) = d.on_result(ack(&out[0], Ok(())));
    assert_eq!(done[0].batch, 2);
    assert_eq!(done[0].marks.published, vec![4]);
}

#[test]
fn release_all_completes_open_batches_without_handing_successors() {
    let mut d = dispatcher(5);
    let (out, _) = d.add_batch(
        1,
        1,
        vec![row(1, "a", None), row(2, "a", Some(1)), row(3, "b", None)],
    );
    d.on_result(ack(&out[1], Ok(())));
    let done = d.release_all();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].marks.published, vec![3]);
    assert_eq!(done[0].tally.released, 2);
}
