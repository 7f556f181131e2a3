//! Operators' decisions with a fake clock: suppressions cover their network until they
//! end, events of suppressed hosts are marked and kept from the sinks (but for the end
//! of an alarm the sinks saw), acknowledgements follow their alarm and survive the file.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use super::*;

fn t(s: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
}

fn ip(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
}

fn cidr(s: &str) -> Cidr {
    s.parse().unwrap()
}

fn event(id: &str, host: IpAddr, state: AlarmState) -> AlarmEvent {
    AlarmEvent {
        id: id.into(),
        ..AlarmEvent::sample(host, state, 9.0)
    }
}

fn route(d: &mut Decisions, events: &mut [AlarmEvent], now: SystemTime) -> Vec<bool> {
    d.route(events, now)
}

fn suppress(d: &mut Decisions, net: &str, until: Option<u64>, now: u64) -> Suppression {
    d.suppress(
        cidr(net),
        until.map(t),
        "bob".into(),
        "mirror".into(),
        t(now),
    )
    .unwrap()
    .0
}

#[test]
fn a_suppression_covers_its_network_until_it_ends() {
    let mut d = Decisions::default();
    let s = suppress(&mut d, "10.0.0.7/24", Some(100), 0);
    assert_eq!(s.id, "s1");
    // Stored as its network.
    assert_eq!(cidr_text::text(&s.cidr), "10.0.0.0/24");
    assert_eq!(
        d.suppression_for(ip(5), t(99)).map(|s| &s.id[..]),
        Some("s1")
    );
    assert!(d.suppression_for(ip(256), t(99)).is_none(), "outside");
    assert!(d.suppression_for(ip(5), t(100)).is_none(), "over at until");
    assert_eq!(d.suppressions(t(50)).count(), 1);
    assert_eq!(d.suppressions(t(100)).count(), 0);
    // Expiry drops it, once.
    assert!(d.expire(t(99)).is_empty());
    let gone = d.expire(t(100));
    assert_eq!(gone.suppressions.len(), 1);
    assert!(d.expire(t(101)).is_empty());
    // For good never ends.
    suppress(&mut d, "10.0.0.5", None, 200);
    assert!(d.suppression_for(ip(5), t(1_000_000_000)).is_some());
    assert!(d.expire(t(1_000_000_000)).is_empty());
}

#[test]
fn the_longest_lasting_suppression_speaks_for_a_host() {
    let mut d = Decisions::default();
    suppress(&mut d, "10.0.0.0/8", Some(50), 0);
    suppress(&mut d, "10.0.0.5/32", Some(500), 0);
    suppress(&mut d, "10.0.0.0/24", Some(500), 0);
    assert_eq!(
        d.suppression_for(ip(5), t(10)).unwrap().id,
        "s2",
        "narrowest of the longest"
    );
    assert_eq!(d.suppression_for(ip(6), t(10)).unwrap().id, "s3");
    suppress(&mut d, "10.0.0.0/16", None, 0);
    assert_eq!(
        d.suppression_for(ip(5), t(10)).unwrap().id,
        "s4",
        "for good wins"
    );
}

#[test]
fn the_same_network_again_replaces_its_suppression() {
    let mut d = Decisions::default();
    suppress(&mut d, "10.0.0.5", Some(100), 0);
    let (s, replaced) = d
        .suppress(
            cidr("10.0.0.5/32"),
            None,
            "carol".into(),
            "for good".into(),
            t(10),
        )
        .unwrap();
    assert_eq!(replaced.unwrap().id, "s1");
    assert_eq!(s.id, "s2");
    assert_eq!(d.suppressions(t(10)).count(), 1);
    assert_eq!(d.suppression_for(ip(5), t(200)).unwrap().by, "carol");
}

#[test]
fn decisions_refused_say_what_to_fix() {
    let mut d = Decisions::default();
    let e = d
        .suppress(cidr("10.0.0.5"), Some(t(5)), "bob".into(), "n".into(), t(5))
        .unwrap_err();
    assert!(e.to_string().contains("not in the future"), "{e}");
    assert_eq!(
        d.remove("s9").unwrap_err(),
        DecisionError::NoSuppression("s9".into())
    );
    assert_eq!(
        d.acknowledge("abc", "bob".into(), String::new(), t(0))
            .unwrap_err(),
        DecisionError::NoAlarm("abc".into())
    );
    assert!(author_and_note(None, "why", true).is_err());
    assert!(author_and_note(Some("  "), "why", true).is_err());
    assert!(
        author_and_note(Some("bob"), " ", true).is_err(),
        "a note is needed"
    );
    assert!(author_and_note(Some("bob"), "", false).is_ok());
    assert!(author_and_note(Some(&"x".repeat(MAX_BY + 1)), "", false).is_err());
    assert!(author_and_note(Some("bob"), &"x".repeat(MAX_NOTE + 1), false).is_err());
    // One line each: control characters are spaces.
    assert_eq!(
        author_and_note(Some(" bob\n"), "a\nb\r\n", true).unwrap(),
        ("bob".to_string(), "a b".to_string())
    );
}

#[test]
fn events_of_a_suppressed_host_are_marked_and_kept_from_the_sinks() {
    let mut d = Decisions::default();
    let (a, b) = (ip(5), ip(6));
    // Raised before the suppression: sent.
    let mut ev = [event("A", a, AlarmState::Raised)];
    assert_eq!(route(&mut d, &mut ev, t(0)), [true]);
    assert!(ev[0].suppressed.is_none());
    suppress(&mut d, "10.0.0.5/32", Some(100), 5);
    // Its update while suppressed: marked, not sent; another host's event is.
    let mut ev = [
        event("A", a, AlarmState::Updated),
        event("B", b, AlarmState::Raised),
    ];
    assert_eq!(route(&mut d, &mut ev, t(10)), [false, true]);
    let mark = ev[0].suppressed.as_ref().unwrap();
    assert_eq!(
        (&mark.id[..], &mark.by[..], &mark.note[..]),
        ("s1", "bob", "mirror")
    );
    assert_eq!(mark.cidr, "10.0.0.5/32");
    assert!(mark.until.is_some());
    assert!(ev[1].suppressed.is_none());
    // Its end is sent (marked): the sinks saw it begin.
    let mut ev = [event("A", a, AlarmState::Cleared)];
    assert_eq!(route(&mut d, &mut ev, t(20)), [true]);
    assert!(ev[0].suppressed.is_some());
    // A new alarm of the host while suppressed: never sent, not even its end.
    let mut ev = [event("A2", a, AlarmState::Raised)];
    assert_eq!(route(&mut d, &mut ev, t(30)), [false]);
    assert_eq!(d.sent("A2"), Some(false));
    assert_eq!(d.sent("B"), Some(true));
    let mut ev = [event("A2", a, AlarmState::Updated)];
    assert_eq!(route(&mut d, &mut ev, t(40)), [false]);
    let mut ev = [event("A2", a, AlarmState::Cleared)];
    assert_eq!(route(&mut d, &mut ev, t(50)), [false]);
    // Once the suppression is over, the host's alarms go to the sinks again; an alarm
    // raised under it reaches them from its next event on, its end too.
    let mut ev = [event("A3", a, AlarmState::Raised)];
    assert_eq!(route(&mut d, &mut ev, t(60)), [false]);
    let mut ev = [event("A3", a, AlarmState::Updated)];
    assert_eq!(route(&mut d, &mut ev, t(100)), [true]);
    assert!(ev[0].suppressed.is_none());
    let mut ev = [event("A3", a, AlarmState::Cleared)];
    assert_eq!(route(&mut d, &mut ev, t(110)), [true]);
    let mut ev = [event("A4", a, AlarmState::Raised)];
    assert_eq!(route(&mut d, &mut ev, t(120)), [true]);
}

#[test]
fn removing_a_suppression_ends_it_at_once() {
    let mut d = Decisions::default();
    let s = suppress(&mut d, "10.0.0.0/24", None, 0);
    let mut ev = [event("A", ip(5), AlarmState::Raised)];
    assert_eq!(route(&mut d, &mut ev, t(1)), [false]);
    assert_eq!(d.remove(&s.id).unwrap().id, "s1");
    let mut ev = [event("B", ip(6), AlarmState::Raised)];
    assert_eq!(route(&mut d, &mut ev, t(2)), [true]);
}

#[test]
fn an_acknowledgement_follows_its_alarm_until_it_clears() {
    let mut d = Decisions::default();
    let mut ev = [event("A", ip(5), AlarmState::Raised)];
    route(&mut d, &mut ev, t(0));
    let ack = d
        .acknowledge("A", "alice".into(), "seen, ticket 7".into(), t(5))
        .unwrap();
    assert_eq!((ack.host, &ack.by[..]), (ip(5), "alice"));
    assert_eq!(d.acknowledged_open(), 1);
    // Acknowledged alarms stay open and are still sent; their events carry who and why.
    let mut ev = [event("A", ip(5), AlarmState::Updated)];
    assert_eq!(route(&mut d, &mut ev, t(10)), [true]);
    let mark = ev[0].acknowledged.as_ref().unwrap();
    assert_eq!((&mark.by[..], &mark.note[..]), ("alice", "seen, ticket 7"));
    // Again: the new note replaces the old.
    d.acknowledge("A", "bob".into(), String::new(), t(11))
        .unwrap();
    assert_eq!(d.ack("A").unwrap().by, "bob");
    let mut ev = [event("A", ip(5), AlarmState::Cleared)];
    assert_eq!(route(&mut d, &mut ev, t(20)), [true]);
    assert_eq!(ev[0].acknowledged.as_ref().unwrap().by, "bob");
    assert!(d.ack("A").is_none(), "forgotten when the alarm clears");
    assert_eq!(d.acknowledged_open(), 0);
    // A closed alarm cannot be acknowledged.
    assert!(
        d.acknowledge("A", "bob".into(), String::new(), t(21))
            .is_err()
    );
}

#[test]
fn decisions_survive_the_file_and_expire_after_it() {
    let mut d = Decisions::default();
    let mut ev = [event("A", ip(5), AlarmState::Raised)];
    route(&mut d, &mut ev, t(0));
    d.acknowledge("A", "alice".into(), "known".into(), t(1))
        .unwrap();
    suppress(&mut d, "10.0.0.5/32", None, 2);
    suppress(&mut d, "10.1.0.0/16", Some(30), 3);
    let s3 = suppress(&mut d, "10.2.0.0/16", Some(100), 4);
    d.remove(&s3.id).unwrap();
    let text = serde_json::to_string_pretty(&d.to_file()).unwrap();
    let file: DecisionsFile = serde_json::from_str(&text).unwrap();
    assert_eq!(file, d.to_file(), "{text}");
    assert_eq!(file.version, FILE_VERSION);
    assert!(text.contains("\"cidr\": \"10.0.0.5/32\""), "{text}");
    assert!(text.contains("\"until\": null"), "{text}");

    // Read back after the /16's time: it is left out; ids keep counting.
    let mut back = Decisions::from_file(file.clone(), t(40));
    let ids: Vec<&str> = back.suppressions(t(40)).map(|s| &s.id[..]).collect();
    assert_eq!(ids, ["s1"]);
    assert_eq!(suppress(&mut back, "10.3.0.0/16", None, 41).id, "s4");
    // The acknowledgement goes to the host's next alarm (ids change with a restart).
    let mut ev = [event("A-new", ip(5), AlarmState::Raised)];
    assert_eq!(
        route(&mut back, &mut ev, t(50)),
        [false],
        "still suppressed"
    );
    assert_eq!(ev[0].acknowledged.as_ref().unwrap().by, "alice");
    assert_eq!(back.ack("A-new").unwrap().note, "known");
    assert!(back.expire(t(50 + ACK_CARRY.as_secs())).acks.is_empty());

    // Read back again: no alarm of the host within ACK_CARRY, and it is dropped.
    let mut again = Decisions::from_file(file, t(40));
    let mut ev = [event("B", ip(6), AlarmState::Raised)];
    route(&mut again, &mut ev, t(41));
    assert!(ev[0].acknowledged.is_none(), "another host's alarm");
    assert!(again.expire(t(40 + ACK_CARRY.as_secs() - 1)).is_empty());
    let gone = again.expire(t(40 + ACK_CARRY.as_secs()));
    assert_eq!(gone.acks.len(), 1);
    assert!(again.to_file().acknowledgements.is_empty());

    // A file not ours is refused with its fault named.
    let e = serde_json::from_str::<DecisionsFile>(
        r#"{"version":1,"last_id":0,"suppressions":[{"id":"s1","cidr":"10.0.0.0/40","until":null,"note":"","by":"x","at":"2026-01-01T00:00:00Z"}],"acknowledgements":[]}"#,
    )
    .unwrap_err();
    assert!(e.to_string().contains("prefix length"), "{e}");
}
