//! The consumer against the real broker: delivery, batched acks, pause and cancel.

use super::*;
use crate::core::testing::{connect, eventually, publish, ready, temp_queue};

fn next_message(consumer: &mut Consumer, batched: bool) -> Option<Arc<Delivery>> {
    match consumer
        .next(Duration::from_millis(300), batched)
        .expect("next")
    {
        Some(Incoming::Message(delivery)) => Some(delivery),
        Some(Incoming::Poisoned(warning)) => panic!("{warning}"),
        None => None,
    }
}

#[test]
fn delivers_what_was_published_and_acks_it() {
    let mut conn = connect();
    let queue = temp_queue(&mut conn, "delivers");
    publish(&mut conn, &queue, 3);
    let mut consumer = conn
        .consumer(std::slice::from_ref(&queue), &ConsumerOptions::default())
        .expect("consumer");
    for i in 0..3u8 {
        let delivery = next_message(&mut consumer, false).expect("delivery");
        assert_eq!(delivery.body, vec![i]);
        assert_eq!(delivery.queue.as_deref(), Some(queue.as_str()));
        delivery.settle(Settlement::Ack, "ack").expect("ack");
        assert!(delivery.is_settled());
        let again = delivery.settle(Settlement::Ack, "ack").expect_err("twice");
        assert!(
            again.message().contains("settled already"),
            "{}",
            again.message()
        );
    }
    assert!(next_message(&mut consumer, false).is_none());
    consumer.cancel().expect("cancel");
    drop(consumer);
    conn.close().expect("close");
    let mut check = connect();
    assert_eq!(ready(&mut check, &queue), 0, "the acks went out");
    check.delete_queue(&queue, false, false).expect("delete");
}

#[test]
fn acks_are_held_during_a_burst_and_all_land_as_multiple_acks() {
    let mut conn = connect();
    let queue = temp_queue(&mut conn, "acks.batched");
    publish(&mut conn, &queue, 50);
    let options = ConsumerOptions {
        prefetch: 100,
        ..ConsumerOptions::default()
    };
    let mut consumer = conn
        .consumer(std::slice::from_ref(&queue), &options)
        .expect("consumer");
    // All 50 are sent first: then only the limit (25) or the end of the burst sends.
    let mut check = connect();
    eventually("all 50 delivered", || ready(&mut check, &queue) == 0);
    let mut handled = 0;
    while let Some(delivery) = next_message(&mut consumer, true) {
        delivery.settle(Settlement::Ack, "ack").expect("ack");
        handled += 1;
        if handled == 10 {
            let batch = consumer.batch.as_ref().expect("batch");
            assert_eq!(batch.state().held.len(), 10, "held, not sent one by one");
        }
    }
    assert_eq!(handled, 50);
    let batch = consumer.batch.as_ref().expect("batch");
    assert!(batch.state().held.is_empty());
    drop(consumer);
    conn.close().expect("close");
    assert_eq!(ready(&mut check, &queue), 0);
    check.delete_queue(&queue, false, false).expect("delete");
}

#[test]
fn a_multiple_ack_never_covers_a_delivery_not_handed_out() {
    let mut conn = connect();
    let first = temp_queue(&mut conn, "acks.first");
    let second = temp_queue(&mut conn, "acks.second");
    publish(&mut conn, &first, 5);
    publish(&mut conn, &second, 5);
    let mut consumer = conn
        .consumer(
            &[first.clone(), second.clone()],
            &ConsumerOptions::default(),
        )
        .expect("consumer");
    // Let both queues' deliveries arrive, then handle only those of the second.
    let mut check = connect();
    eventually("both queues delivered", || {
        ready(&mut check, &first) == 0 && ready(&mut check, &second) == 0
    });
    let mut acked = 0;
    let mut kept = Vec::new();
    while acked < 5 {
        let delivery = next_message(&mut consumer, true).expect("delivery");
        if delivery.routing_key == second {
            delivery.settle(Settlement::Ack, "ack").expect("ack");
            acked += 1;
        } else {
            kept.push(delivery);
        }
    }
    consumer.flush_settlements().expect("flushed");
    drop(kept);
    drop(consumer);
    conn.close().expect("close");
    assert_eq!(ready(&mut check, &first), 5);
    assert_eq!(ready(&mut check, &second), 0);
    check.delete_queue(&first, false, false).expect("delete");
    check.delete_queue(&second, false, false).expect("delete");
}

#[test]
fn pause_gives_the_prefetch_buffer_back_and_next_subscribes_again() {
    let mut conn = connect();
    let queue = temp_queue(&mut conn, "pause");
    publish(&mut conn, &queue, 10);
    let mut consumer = conn
        .consumer(std::slice::from_ref(&queue), &ConsumerOptions::default())
        .expect("consumer");
    let mut check = connect();
    eventually("all 10 prefetched", || ready(&mut check, &queue) == 0);
    let first = next_message(&mut consumer, true).expect("delivery");
    first.settle(Settlement::Ack, "ack").expect("ack");
    let in_hand = next_message(&mut consumer, true).expect("delivery");
    consumer.pause().expect("pause");
    // The 8 never handed out go back (their rejects are written without waiting, so the
    // broker counts them a moment later); the one in hand stays with us.
    eventually("the 8 never handed out are back in the queue", || {
        ready(&mut check, &queue) == 8
    });
    in_hand
        .settle(Settlement::Ack, "ack")
        .expect("ack after pause");
    let mut again = 0;
    while let Some(delivery) = next_message(&mut consumer, true) {
        delivery.settle(Settlement::Ack, "ack").expect("ack");
        again += 1;
    }
    assert_eq!(again, 8, "next() subscribed again");
    consumer.cancel().expect("cancel");
    drop(consumer);
    conn.close().expect("close");
    assert_eq!(ready(&mut check, &queue), 0);
    check.delete_queue(&queue, false, false).expect("delete");
}

#[test]
fn settlements_are_per_connection() {
    let mut busy = connect();
    let mut other = connect();
    assert!(!Arc::ptr_eq(
        busy.link_arc().settlements(),
        other.link_arc().settlements()
    ));
    let queue = temp_queue(&mut other, "own-settlements");
    publish(&mut other, &queue, 1);
    let mut consumer = other
        .consumer(std::slice::from_ref(&queue), &ConsumerOptions::default())
        .expect("consumer");
    let delivery = next_message(&mut consumer, false).expect("delivery");
    delivery.settle(Settlement::Ack, "ack").expect("ack");
    // Closing another connection flushes only its own (empty) list.
    busy.close().expect("close");
    drop(consumer);
    other.close().expect("close");
    let mut check = connect();
    assert_eq!(ready(&mut check, &queue), 0);
    check.delete_queue(&queue, false, false).expect("delete");
}

#[test]
fn deleting_the_queue_ends_consumption_with_an_error() {
    let mut conn = connect();
    let queue = temp_queue(&mut conn, "cancelled");
    let mut consumer = conn
        .consumer(std::slice::from_ref(&queue), &ConsumerOptions::default())
        .expect("consumer");
    conn.delete_queue(&queue, false, false).expect("delete");
    let err = consumer
        .next(Duration::from_secs(5), true)
        .err()
        .expect("cancelled");
    assert!(err.message().contains(&queue), "{}", err.message());
}

#[test]
fn a_blocking_take_leaves_the_readiness_stream() {
    let mut conn = connect();
    let queue = temp_queue(&mut conn, "readiness.leave");
    let mut consumer = conn
        .consumer(std::slice::from_ref(&queue), &ConsumerOptions::default())
        .expect("consumer");
    let readiness = consumer.link().readiness("test").expect("readiness");
    assert!(consumer
        .next(Duration::ZERO, false)
        .expect("join")
        .is_none());
    publish(&mut conn, &queue, 2);
    eventually("a delivery raises the stream", || readiness.is_readable());
    for _ in 0..2 {
        let delivery = next_message(&mut consumer, false).expect("delivery");
        delivery.settle(Settlement::Ack, "ack").expect("ack");
    }
    assert!(next_message(&mut consumer, false).is_none());
    assert!(
        !readiness.is_readable(),
        "the blocking takes left the stream: nothing keeps it readable"
    );
    publish(&mut conn, &queue, 1);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !readiness.is_readable(),
        "off the stream until a take that does not wait"
    );
    assert!(consumer
        .next(Duration::ZERO, false)
        .expect("rejoin")
        .is_some());
    consumer.cancel().expect("cancel");
    drop(consumer);
    conn.delete_queue(&queue, false, false).expect("delete");
}
