//! The worker's policy against the real broker: each limit, each `on_error` mode, stop with
//! a message in hand, and what a stopped worker gives back.

use super::*;
use crate::core::connection::Connection;
use crate::core::consumer::ConsumerOptions;
use crate::core::testing::{connect, eventually, publish, ready, temp_queue};

/// A host whose application is a closure; memory grows by `memory_step` per delivery.
struct TestHost<F: FnMut(&Delivery) -> Result<()>> {
    application: F,
    memory: u64,
    memory_step: u64,
    failures: Vec<String>,
}

impl<F: FnMut(&Delivery) -> Result<()>> TestHost<F> {
    fn new(application: F) -> Self {
        Self {
            application,
            memory: 0,
            memory_step: 0,
            failures: Vec::new(),
        }
    }
}

impl<F: FnMut(&Delivery) -> Result<()>> Host for TestHost<F> {
    type Error = Error;

    fn handle(&mut self, delivery: Arc<Delivery>) -> Result<()> {
        self.memory += self.memory_step;
        (self.application)(&delivery)
    }

    fn take_failure(&mut self, failure: Error) -> String {
        self.failures.push(failure.message().to_string());
        failure.message().to_string()
    }

    fn warn(&mut self, warning: &str) -> Result<()> {
        panic!("unexpected warning: {warning}")
    }

    fn memory_usage(&mut self) -> u64 {
        self.memory
    }
}

/// A queue holding `n` messages, a consumer of it and a second connection to check with.
struct Setup {
    conn: Connection,
    check: Connection,
    queue: String,
    consumer: RefCell<Consumer>,
}

fn setup(prefix: &str, n: u8) -> Setup {
    let mut conn = connect();
    let queue = temp_queue(&mut conn, prefix);
    publish(&mut conn, &queue, n);
    let consumer = conn
        .consumer(std::slice::from_ref(&queue), &ConsumerOptions::default())
        .expect("consumer");
    Setup {
        conn,
        check: connect(),
        queue,
        consumer: RefCell::new(consumer),
    }
}

impl Setup {
    fn run<F: FnMut(&Delivery) -> Result<()>>(
        &self,
        control: &Control,
        options: &WorkerOptions,
        host: &mut TestHost<F>,
    ) -> Result<u64> {
        run(&self.consumer, control, options, host)
    }

    fn eventually_ready(&mut self, n: u32) {
        let queue = self.queue.clone();
        let check = &mut self.check;
        eventually(&format!("{n} ready in {queue}"), || {
            ready(check, &queue) == n
        });
    }

    fn finish(mut self) {
        drop(self.consumer);
        self.conn.close().expect("close");
        self.check
            .delete_queue(&self.queue, false, false)
            .expect("delete");
    }
}

fn limits(limits: Limits) -> WorkerOptions {
    WorkerOptions {
        limits,
        ..WorkerOptions::default()
    }
}

fn ok(_: &Delivery) -> Result<()> {
    Ok(())
}

fn fail(d: &Delivery) -> Result<()> {
    Err(Error::other(format!("cannot handle {:?}", d.body)))
}

#[test]
fn max_messages_ends_the_loop_and_the_unseen_rest_goes_back_at_once() {
    let mut s = setup("worker.max-messages", 5);
    let options = limits(Limits {
        max_messages: 3,
        ..Limits::default()
    });
    let handled = s.run(&Control::default(), &options, &mut TestHost::new(ok));
    assert_eq!(handled.expect("run"), 3);
    // All 5 were prefetched; the 2 never handed out are back while the consumer lives.
    s.eventually_ready(2);
    let options = limits(Limits {
        max_messages: 2,
        max_time: Some(Duration::from_secs(20)),
        ..Limits::default()
    });
    let handled = s.run(&Control::default(), &options, &mut TestHost::new(ok));
    assert_eq!(handled.expect("second run subscribes again"), 2);
    s.eventually_ready(0);
    s.finish();
}

#[test]
fn max_time_ends_a_loop_that_gets_nothing() {
    let s = setup("worker.max-time", 0);
    let options = limits(Limits {
        max_time: Some(Duration::from_millis(300)),
        ..Limits::default()
    });
    let started = Instant::now();
    let handled = s.run(&Control::default(), &options, &mut TestHost::new(ok));
    assert_eq!(handled.expect("run"), 0);
    assert!(started.elapsed() >= Duration::from_millis(300));
    s.finish();
}

#[test]
fn idle_timeout_ends_the_loop_once_deliveries_stop() {
    let mut s = setup("worker.idle", 4);
    let options = limits(Limits {
        idle_timeout: Some(Duration::from_millis(300)),
        ..Limits::default()
    });
    let handled = s.run(&Control::default(), &options, &mut TestHost::new(ok));
    assert_eq!(handled.expect("run"), 4);
    s.eventually_ready(0);
    s.finish();
}

#[test]
fn memory_limit_is_checked_after_each_delivery() {
    let mut s = setup("worker.memory", 5);
    let options = limits(Limits {
        memory_limit: 3000,
        ..Limits::default()
    });
    let mut host = TestHost::new(ok);
    host.memory_step = 1000;
    assert_eq!(
        s.run(&Control::default(), &options, &mut host)
            .expect("run"),
        3
    );
    s.eventually_ready(2);
    s.finish();
}

#[test]
fn a_failure_with_requeue_puts_the_message_back_and_ends_the_loop() {
    let mut s = setup("worker.requeue", 3);
    let options = WorkerOptions::default();
    let err = s
        .run(&Control::default(), &options, &mut TestHost::new(fail))
        .expect_err("the failure ends the loop");
    assert!(
        err.message().contains("cannot handle [0]"),
        "{}",
        err.message()
    );
    s.eventually_ready(3);
    let mut redelivered = Vec::new();
    let mut host = TestHost::new(|d: &Delivery| {
        redelivered.push((d.body.clone(), d.redelivered));
        Ok(())
    });
    let options = limits(Limits {
        max_messages: 3,
        ..Limits::default()
    });
    s.run(&Control::default(), &options, &mut host)
        .expect("run");
    assert!(redelivered.contains(&(vec![0], true)), "{redelivered:?}");
    s.finish();
}

#[test]
fn a_failure_with_reject_drops_the_message_and_ends_the_loop() {
    let mut s = setup("worker.reject", 3);
    let options = WorkerOptions {
        on_error: OnError::Reject,
        ..WorkerOptions::default()
    };
    s.run(&Control::default(), &options, &mut TestHost::new(fail))
        .expect_err("the failure ends the loop");
    // No dead-letter exchange on the queue: the rejected one is gone, the others are back.
    s.eventually_ready(2);
    s.finish();
}

#[test]
fn a_failure_with_retry_dead_letters_when_retries_are_spent_and_goes_on() {
    let mut s = setup("worker.retry", 2);
    let dead = format!("{}.dead", s.queue);
    let options = WorkerOptions {
        limits: Limits {
            max_messages: 2,
            ..Limits::default()
        },
        on_error: OnError::Retry(RetryPolicy {
            max_retries: 0,
            delay: Duration::ZERO,
            dead_letter: Some(dead.clone()),
        }),
        ..WorkerOptions::default()
    };
    let mut host = TestHost::new(fail);
    let handled = s.run(&Control::default(), &options, &mut host);
    assert_eq!(handled.expect("retry goes on"), 2);
    assert_eq!(
        host.failures.len(),
        2,
        "each failure was taken as the reason"
    );
    s.eventually_ready(0);
    assert_eq!(ready(&mut s.check, &dead), 2);
    s.check.delete_queue(&dead, false, false).expect("delete");
    s.finish();
}

#[test]
fn stop_with_a_message_in_hand_settles_it_and_gives_the_rest_to_another_consumer() {
    let mut s = setup("worker.stop", 5);
    let control = Control::default();
    let mut seen = Vec::new();
    let mut host = TestHost::new(|d: &Delivery| {
        seen.push(d.body.clone());
        control.stop();
        Ok(())
    });
    let handled = s.run(&control, &WorkerOptions::default(), &mut host);
    assert_eq!(handled.expect("run"), 1);
    assert_eq!(seen, vec![vec![0]]);
    s.eventually_ready(4);
    // The first consumer lives on, paused: a second one gets the four.
    let mut other = connect();
    let second = other
        .consumer(std::slice::from_ref(&s.queue), &ConsumerOptions::default())
        .expect("consumer");
    let options = limits(Limits {
        max_messages: 4,
        ..Limits::default()
    });
    let second = RefCell::new(second);
    let mut bodies = Vec::new();
    let mut host = TestHost::new(|d: &Delivery| {
        bodies.push(d.body[0]);
        Ok(())
    });
    run(&second, &Control::default(), &options, &mut host).expect("second");
    bodies.sort_unstable();
    assert_eq!(bodies, vec![1, 2, 3, 4]);
    drop(second);
    other.close().expect("close");
    s.eventually_ready(0);
    s.finish();
}

#[test]
fn a_message_the_application_settled_is_not_settled_again() {
    let mut s = setup("worker.settled", 2);
    let options = limits(Limits {
        max_messages: 2,
        ..Limits::default()
    });
    let mut host =
        TestHost::new(|d: &Delivery| d.settle(Settlement::Nack { requeue: false }, "nack"));
    assert_eq!(
        s.run(&Control::default(), &options, &mut host)
            .expect("run"),
        2
    );
    s.eventually_ready(0);
    s.finish();
}

#[test]
fn cancel_from_the_application_ends_the_loop_and_the_subscription() {
    let mut s = setup("worker.cancel", 3);
    let control = Control::default();
    let mut host = TestHost::new(|_: &Delivery| {
        control.request_cancel();
        Ok(())
    });
    assert_eq!(
        s.run(&control, &WorkerOptions::default(), &mut host)
            .expect("run"),
        1
    );
    s.eventually_ready(2);
    let err = s
        .run(
            &Control::default(),
            &WorkerOptions::default(),
            &mut TestHost::new(ok),
        )
        .expect_err("cancelled for good");
    assert!(err.message().contains("cancelled"), "{}", err.message());
    s.finish();
}
