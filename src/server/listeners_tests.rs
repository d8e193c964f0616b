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

#[test]
fn the_cap_admits_up_to_its_limit_and_frees_slots_on_drop() {
    let limits = ConnectionLimits::new(0, 0, 2);
    let a = limits.admit().expect("first");
    let b = limits.admit().expect("second");
    assert!(limits.admit().is_none());
    drop(a);
    assert!(limits.admit().is_some());
    drop(b);
    assert!(ConnectionLimits::new(0, 0, 0).admit().is_some());
}
