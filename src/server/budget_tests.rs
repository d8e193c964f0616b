use super::*;

fn budget(limit: u64) -> Arc<MemoryBudget> {
    MemoryBudget::new(limit, Arc::default())
}

/// A body that yields the given data frames.
struct Frames(std::collections::VecDeque<Bytes>);

impl Body for Frames {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

fn grpc_message(payload_len: usize) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend_from_slice(&(payload_len as u32).to_be_bytes());
    out.extend(std::iter::repeat_n(7u8, payload_len));
    out
}

/// Polls the body to its end; `Err` with the refusal if it was refused.
fn drain<B: Body<Data = Bytes> + Unpin>(body: &mut B) -> Result<usize, String>
where
    B::Error: std::fmt::Display,
{
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let mut frames = 0;
    loop {
        match Pin::new(&mut *body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(_))) => frames += 1,
            Poll::Ready(Some(Err(e))) => return Err(e.to_string()),
            Poll::Ready(None) => return Ok(frames),
            Poll::Pending => unreachable!("test bodies are always ready"),
        }
    }
}

fn body_of(chunks: Vec<Vec<u8>>, r: &Arc<Reservation>, hold: Hold) -> CountingBody<Frames> {
    let frames = Frames(chunks.into_iter().map(Bytes::from).collect());
    CountingBody::new(frames, Arc::clone(r), Framing::Grpc, hold)
}

#[test]
fn reservations_add_up_and_go_back_when_dropped() {
    let b = budget(100);
    let first = b.reservation();
    first.grow(60).unwrap();
    let second = b.reservation();
    let refused = second.grow(41).unwrap_err();
    assert_eq!(
        refused,
        BudgetExceeded {
            requested: 41,
            limit: 100,
            in_flight: 60
        }
    );
    assert!(refused.to_string().contains("--max-inflight-bytes 100"));
    second.grow(40).unwrap();
    assert_eq!(b.in_flight(), 100);
    drop(first);
    assert_eq!(b.in_flight(), 40);
    second.shrink(1000);
    assert_eq!((b.in_flight(), second.bytes()), (0, 0));
    assert_eq!(b.gauges.refused.load(Ordering::Relaxed), 1);
    assert_eq!(b.gauges.peak.load(Ordering::Relaxed), 100);
}

#[test]
fn zero_means_unlimited() {
    let b = budget(0);
    let r = b.reservation();
    r.grow(u64::MAX / 2).unwrap();
    assert_eq!(b.in_flight(), u64::MAX / 2);
}

#[test]
fn a_grpc_message_is_reserved_whole_when_its_header_arrives() {
    let b = budget(1000);
    let r = Arc::new(b.reservation());
    let message = grpc_message(600);
    // The header and 10 payload bytes arrive first: the whole message is reserved already.
    let chunks = vec![message[..15].to_vec(), message[15..].to_vec()];
    let mut body = body_of(chunks, &r, Hold::UntilDropped);
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    assert!(matches!(
        Pin::new(&mut body).poll_frame(&mut cx),
        Poll::Ready(Some(Ok(_)))
    ));
    assert_eq!(b.in_flight(), 605);
    assert_eq!(drain(&mut body), Ok(1));
    drop(body);
    assert_eq!(b.in_flight(), 605, "held until the reservation is dropped");
    drop(r);
    assert_eq!(b.in_flight(), 0);
}

#[test]
fn an_oversized_message_is_refused_before_its_payload() {
    let b = budget(1000);
    let r = Arc::new(b.reservation());
    // Only the header of a 1 MiB message: refused at once.
    let header = grpc_message(1 << 20)[..5].to_vec();
    let mut body = body_of(vec![header, vec![0; 100]], &r, Hold::UntilDropped);
    let error = drain(&mut body).unwrap_err();
    assert!(error.contains("memory budget exceeded"), "{error}");
    assert!(error.contains("1048581 more bytes"), "{error}");
    assert!(body.is_end_stream());
    assert_eq!(b.in_flight(), 0);
}

#[test]
fn streamed_messages_are_given_back_once_complete() {
    let b = budget(700);
    let r = Arc::new(b.reservation());
    // Three 600-byte messages, split at odd places: each fits alone, never two together.
    let all: Vec<u8> = (0..3).flat_map(|_| grpc_message(600)).collect();
    let chunks = all.chunks(97).map(|c| c.to_vec()).collect();
    let mut body = body_of(chunks, &r, Hold::PerMessage);
    assert!(drain(&mut body).is_ok());
    assert_eq!(b.in_flight(), 0);
    // Held until dropped, the second message would not fit.
    let r = Arc::new(b.reservation());
    let chunks = all.chunks(97).map(|c| c.to_vec()).collect();
    let mut body = body_of(chunks, &r, Hold::UntilDropped);
    assert!(drain(&mut body).is_err());
}

#[test]
fn raw_framing_counts_every_data_frame() {
    let b = budget(10);
    let r = Arc::new(b.reservation());
    let frames = Frames(vec![Bytes::from_static(b"12345"), Bytes::from_static(b"123456")].into());
    let mut body = CountingBody::new(frames, Arc::clone(&r), Framing::Raw, Hold::UntilDropped);
    assert!(drain(&mut body).unwrap_err().contains("6 more bytes"));
    assert_eq!(r.bytes(), 5);
}

#[test]
fn cgroup_limits_are_read_as_the_kernel_writes_them() {
    assert_eq!(parse_cgroup_limit("max\n"), None);
    assert_eq!(parse_cgroup_limit("9223372036854771712\n"), None);
    assert_eq!(parse_cgroup_limit("2147483648\n"), Some(2 << 30));
    assert!(default_budget_bytes() > 0);
}
