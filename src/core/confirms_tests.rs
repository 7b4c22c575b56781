//! The in-flight window without a broker: publishes whose confirms the tests release by hand.

use super::*;

/// A publish whose confirm the test releases by hand.
#[derive(Clone, Default)]
struct Gate(Arc<std::sync::Mutex<(bool, Option<Waker>)>>);

impl Gate {
    fn open(&self) {
        let mut state = self.0.lock().expect("gate");
        state.0 = true;
        if let Some(waker) = state.1.take() {
            waker.wake();
        }
    }

    /// A publish the broker will nack once the gate opens (failures are what settle_front
    /// hands back, so the tests can see their order).
    fn in_flight(&self, id: &str) -> InFlight {
        self.resolving_to(id, Confirmation::Nack(None))
    }

    fn resolving_to(&self, id: &str, confirmation: Confirmation) -> InFlight {
        let gate = self.clone();
        let mut confirmation = Some(confirmation);
        InFlight {
            future: Box::pin(std::future::poll_fn(move |cx| {
                let mut state = gate.0.lock().expect("gate");
                if state.0 {
                    Poll::Ready(Ok(confirmation.take().expect("polled once ready")))
                } else {
                    state.1 = Some(cx.waker().clone());
                    Poll::Pending
                }
            })),
            meta: Meta {
                channel: 1,
                exchange: String::new(),
                routing_key: String::new(),
                message_id: Some(id.to_string()),
            },
            outcome: None,
            copy: None,
            bytes: 0,
        }
    }
}

/// Counts wake-ups of the waiting (PHP) thread.
struct CountingWaker(std::sync::atomic::AtomicUsize);

impl std::task::Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn a_batch_wait_is_woken_by_its_last_confirm_and_settles_in_publish_order() {
    let gates: Vec<Gate> = (0..3).map(|_| Gate::default()).collect();
    let mut in_flight: VecDeque<InFlight> = gates
        .iter()
        .enumerate()
        .map(|(i, g)| g.in_flight(&i.to_string()))
        .collect();
    let counter = Arc::new(CountingWaker(Default::default()));
    let waker = Waker::from(counter.clone());
    let mut cx = Context::from_waker(&waker);
    let mut done = Vec::new();
    let woken = || counter.0.load(std::sync::atomic::Ordering::SeqCst);

    assert!(settle_front(&mut in_flight, 0, &mut cx, &mut done, &mut 0).is_pending());
    gates[0].open();
    gates[1].open();
    assert_eq!(woken(), 0, "earlier confirms do not wake a wait for all");
    gates[2].open();
    assert_eq!(woken(), 1);
    assert!(settle_front(&mut in_flight, 0, &mut cx, &mut done, &mut 0).is_ready());
    let ids: Vec<_> = done.iter().map(|p| p.meta.message_id.clone()).collect();
    assert_eq!(ids, ["0", "1", "2"].map(|s| Some(s.to_string())));
}

#[test]
fn a_confirm_out_of_order_moves_the_wait_to_the_oldest() {
    let gates: Vec<Gate> = (0..2).map(|_| Gate::default()).collect();
    let mut in_flight: VecDeque<InFlight> = gates.iter().map(|g| g.in_flight("x")).collect();
    let counter = Arc::new(CountingWaker(Default::default()));
    let waker = Waker::from(counter.clone());
    let mut cx = Context::from_waker(&waker);
    let mut done = Vec::new();

    assert!(settle_front(&mut in_flight, 0, &mut cx, &mut done, &mut 0).is_pending());
    gates[1].open();
    assert!(settle_front(&mut in_flight, 0, &mut cx, &mut done, &mut 0).is_pending());
    assert!(done.is_empty(), "nothing settles before the oldest");
    gates[0].open();
    assert_eq!(counter.0.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert!(settle_front(&mut in_flight, 0, &mut cx, &mut done, &mut 0).is_ready());
    assert_eq!(done.len(), 2);
}

#[test]
fn acked_publishes_are_settled_without_being_collected() {
    let gate = Gate::default();
    let mut in_flight: VecDeque<InFlight> = (0..3)
        .map(|i| gate.resolving_to(&i.to_string(), Confirmation::Ack(None)))
        .chain([gate.in_flight("nacked")])
        .collect();
    let mut done = Vec::new();
    gate.open();
    let mut cx = Context::from_waker(Waker::noop());
    assert!(settle_front(&mut in_flight, 0, &mut cx, &mut done, &mut 0).is_ready());
    assert!(in_flight.is_empty());
    let ids: Vec<_> = done.iter().map(|p| p.meta.message_id.clone()).collect();
    assert_eq!(ids, [Some("nacked".to_string())]);
}
