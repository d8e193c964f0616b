use super::*;

#[test]
fn an_rpc_in_flight_holds_off_the_idle_deadline() {
    let activity = Arc::new(ConnectionActivity::new());
    let timeout = Duration::from_secs(30);
    let first = activity.idle_deadline(timeout).unwrap();
    let guard = activity.start();
    let second = activity.start();
    assert_eq!(activity.idle_deadline(timeout), None);
    drop(guard);
    assert_eq!(activity.idle_deadline(timeout), None);
    drop(second);
    assert!(activity.idle_deadline(timeout).unwrap() >= first);
}
