//! Operators' decisions on alarms: an alarm acknowledged (with a note; it stays open until
//! it clears), a host or network suppressed for a time or for good (its hosts are still
//! profiled and shown; their alarm events are marked and kept from the sinks).
//!
//! Pure: every call takes `now`; persistence, logging and counters are the caller's
//! (`crate::status::decisions`). [`Decisions::route`] marks an evaluation's events and
//! says which go to the sinks:
//! - an event of a suppressed host is marked `suppressed` and not sent, except the
//!   `cleared` event of an alarm whose earlier events were sent, so that whatever took
//!   the alarm up (a webhook's incident) sees it end;
//! - an event of an acknowledged alarm carries the acknowledgement; it is forgotten when
//!   the alarm clears. Alarm ids do not survive a restart, so an acknowledgement read
//!   from the file is given to the next alarm raised on its host within [`ACK_CARRY`],
//!   then dropped.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::{AlarmEvent, AlarmState};
use crate::flow::Cidr;

/// Suppressions held at most.
pub const MAX_SUPPRESSIONS: usize = 10_000;
/// Longest note and author name, in characters.
pub const MAX_NOTE: usize = 1_000;
pub const MAX_BY: usize = 100;
/// How long an acknowledgement read from the file waits for its host's alarm.
pub const ACK_CARRY: Duration = Duration::from_secs(600);
/// The version of the file format.
pub const FILE_VERSION: u32 = 1;

/// A host or network whose alarms are kept from the sinks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suppression {
    pub id: String,
    #[serde(with = "cidr_text")]
    pub cidr: Cidr,
    /// None: for good.
    #[serde(with = "rfc_opt")]
    pub until: Option<SystemTime>,
    pub note: String,
    pub by: String,
    /// When it was decided.
    #[serde(with = "rfc")]
    pub at: SystemTime,
}

impl Suppression {
    pub fn active(&self, now: SystemTime) -> bool {
        self.until.is_none_or(|u| now < u)
    }

    pub fn covers(&self, host: IpAddr, now: SystemTime) -> bool {
        self.active(now) && self.cidr.contains(host)
    }

    /// What an alarm event carries of it.
    pub fn mark(&self) -> Suppressed {
        Suppressed {
            id: self.id.clone(),
            cidr: cidr_text::text(&self.cidr),
            by: self.by.clone(),
            note: self.note.clone(),
            at: crate::flow::rfc3339(self.at),
            until: self.until.map(crate::flow::rfc3339),
        }
    }

    /// `10.0.0.0/24 for good` or `10.0.0.5/32 until 2026-...`.
    pub fn describe(&self) -> String {
        format!(
            "{} {}",
            cidr_text::text(&self.cidr),
            match self.until {
                None => "for good".to_string(),
                Some(u) => format!("until {}", crate::flow::rfc3339(u)),
            }
        )
    }
}

/// The suppression an alarm event is marked with (`suppressed` in its JSON).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Suppressed {
    pub id: String,
    pub cidr: String,
    pub by: String,
    pub note: String,
    pub at: String,
    /// None: for good.
    pub until: Option<String>,
}

/// An alarm acknowledged by an operator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    /// The alarm's id.
    pub alarm: String,
    pub host: IpAddr,
    pub note: String,
    pub by: String,
    #[serde(with = "rfc")]
    pub at: SystemTime,
    /// Read from the file and not yet given to an alarm of this run: since when.
    #[serde(skip)]
    pub orphan_since: Option<SystemTime>,
}

impl Ack {
    pub fn mark(&self) -> Acknowledged {
        Acknowledged {
            by: self.by.clone(),
            note: self.note.clone(),
            at: crate::flow::rfc3339(self.at),
        }
    }
}

/// The acknowledgement an alarm event carries (`acknowledged` in its JSON).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Acknowledged {
    pub by: String,
    pub note: String,
    pub at: String,
}

/// Why a decision was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum DecisionError {
    /// The request is wrong (the message says what to fix).
    #[error("{0}")]
    Invalid(String),
    #[error("no open alarm has id {0}")]
    NoAlarm(String),
    #[error("no suppression has id {0}")]
    NoSuppression(String),
}

/// The decisions file (`decisions.json`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionsFile {
    pub version: u32,
    /// The number of the last suppression id given.
    pub last_id: u64,
    pub suppressions: Vec<Suppression>,
    pub acknowledgements: Vec<Ack>,
}

/// An alarm open in this run: its host, and whether any of its events went to the sinks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Open {
    host: IpAddr,
    delivered: bool,
}

/// Every decision in force, and the open alarms they apply to.
#[derive(Clone, Debug, Default)]
pub struct Decisions {
    suppressions: Vec<Suppression>,
    acks: BTreeMap<String, Ack>,
    last_id: u64,
    open: BTreeMap<String, Open>,
}

/// What [`Decisions::expire`] dropped.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Expired {
    pub suppressions: Vec<Suppression>,
    pub acks: Vec<Ack>,
}

impl Expired {
    pub fn is_empty(&self) -> bool {
        self.suppressions.is_empty() && self.acks.is_empty()
    }
}

/// An author and a note, trimmed and checked: control characters become spaces (each
/// decision is logged on one line).
pub fn author_and_note(
    by: Option<&str>,
    note: &str,
    note_required: bool,
) -> Result<(String, String), DecisionError> {
    let clean = |s: &str| -> String {
        s.trim()
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect()
    };
    let by = clean(by.unwrap_or(""));
    let note = clean(note);
    if by.is_empty() {
        return Err(DecisionError::Invalid(
            "who decides: give `by` (your name)".into(),
        ));
    }
    if by.chars().count() > MAX_BY {
        return Err(DecisionError::Invalid(format!(
            "`by` is longer than {MAX_BY} characters"
        )));
    }
    if note_required && note.is_empty() {
        return Err(DecisionError::Invalid(
            "why: give a `note` (e.g. \"sanctioned Linux mirror, ticket 42\")".into(),
        ));
    }
    if note.chars().count() > MAX_NOTE {
        return Err(DecisionError::Invalid(format!(
            "`note` is longer than {MAX_NOTE} characters"
        )));
    }
    Ok((by, note))
}

/// `cidr` with its host bits cleared (`10.1.2.3/16` is `10.1.0.0/16`).
fn network(cidr: Cidr) -> Cidr {
    let addr = match cidr.addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - cidr.len as u32).unwrap_or(0);
            IpAddr::V4((u32::from(a) & mask).into())
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - cidr.len as u32).unwrap_or(0);
            IpAddr::V6((u128::from(a) & mask).into())
        }
    };
    Cidr {
        addr,
        len: cidr.len,
    }
}

impl Decisions {
    /// The decisions of a file at `now`: suppressions over by then are left out, and
    /// acknowledgements wait for their host's next alarm.
    pub fn from_file(f: DecisionsFile, now: SystemTime) -> Self {
        let numbered = f
            .suppressions
            .iter()
            .filter_map(|s| s.id.strip_prefix('s')?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        Self {
            suppressions: f
                .suppressions
                .into_iter()
                .filter(|s| s.active(now))
                .collect(),
            acks: f
                .acknowledgements
                .into_iter()
                .map(|mut a| {
                    a.orphan_since = Some(now);
                    (a.alarm.clone(), a)
                })
                .collect(),
            last_id: f.last_id.max(numbered),
            open: BTreeMap::new(),
        }
    }

    pub fn to_file(&self) -> DecisionsFile {
        DecisionsFile {
            version: FILE_VERSION,
            last_id: self.last_id,
            suppressions: self.suppressions.clone(),
            acknowledgements: self.acks.values().cloned().collect(),
        }
    }

    /// Suppresses `cidr` until `until` (None: for good). A suppression of the same
    /// network in force is replaced (returned second).
    pub fn suppress(
        &mut self,
        cidr: Cidr,
        until: Option<SystemTime>,
        by: String,
        note: String,
        now: SystemTime,
    ) -> Result<(Suppression, Option<Suppression>), DecisionError> {
        if let Some(u) = until
            && u <= now
        {
            return Err(DecisionError::Invalid(format!(
                "`until` {} is not in the future",
                crate::flow::rfc3339(u)
            )));
        }
        let cidr = network(cidr);
        let replaced = self
            .suppressions
            .iter()
            .position(|s| s.cidr == cidr)
            .map(|i| self.suppressions.remove(i));
        if self.suppressions.len() >= MAX_SUPPRESSIONS {
            if let Some(r) = replaced {
                self.suppressions.push(r);
            }
            return Err(DecisionError::Invalid(format!(
                "{MAX_SUPPRESSIONS} suppressions already: remove some, or suppress a network that covers them"
            )));
        }
        self.last_id += 1;
        let s = Suppression {
            id: format!("s{}", self.last_id),
            cidr,
            until,
            note,
            by,
            at: now,
        };
        self.suppressions.push(s.clone());
        Ok((s, replaced))
    }

    /// Ends a suppression before its time.
    pub fn remove(&mut self, id: &str) -> Result<Suppression, DecisionError> {
        let i = self
            .suppressions
            .iter()
            .position(|s| s.id == id)
            .ok_or_else(|| DecisionError::NoSuppression(id.to_string()))?;
        Ok(self.suppressions.remove(i))
    }

    /// Acknowledges the open alarm `id` (again: the new note replaces the old one).
    pub fn acknowledge(
        &mut self,
        id: &str,
        by: String,
        note: String,
        now: SystemTime,
    ) -> Result<Ack, DecisionError> {
        let open = self
            .open
            .get(id)
            .ok_or_else(|| DecisionError::NoAlarm(id.to_string()))?;
        let ack = Ack {
            alarm: id.to_string(),
            host: open.host,
            note,
            by,
            at: now,
            orphan_since: None,
        };
        self.acks.insert(id.to_string(), ack.clone());
        Ok(ack)
    }

    /// Drops the suppressions over at `now`, and the acknowledgements read from the
    /// file that found no alarm within [`ACK_CARRY`].
    pub fn expire(&mut self, now: SystemTime) -> Expired {
        let (over, kept) = std::mem::take(&mut self.suppressions)
            .into_iter()
            .partition(|s| !s.active(now));
        self.suppressions = kept;
        let stale: Vec<String> = self
            .acks
            .iter()
            .filter(|(_, a)| {
                a.orphan_since
                    .is_some_and(|t| now.duration_since(t).unwrap_or_default() >= ACK_CARRY)
            })
            .map(|(k, _)| k.clone())
            .collect();
        Expired {
            suppressions: over,
            acks: stale.iter().filter_map(|k| self.acks.remove(k)).collect(),
        }
    }

    /// The suppression in force for `host` at `now`: of those covering it, the one that
    /// lasts longest (then the narrowest network, then the first decided).
    pub fn suppression_for(&self, host: IpAddr, now: SystemTime) -> Option<&Suppression> {
        self.suppressions
            .iter()
            .filter(|s| s.covers(host, now))
            .min_by(|a, b| {
                let end = |s: &Suppression| s.until.map_or(u128::MAX, nanos);
                end(b)
                    .cmp(&end(a))
                    .then(b.cidr.len.cmp(&a.cidr.len))
                    .then(a.at.cmp(&b.at))
            })
    }

    /// The suppressions in force at `now`, in the order decided.
    pub fn suppressions(&self, now: SystemTime) -> impl Iterator<Item = &Suppression> {
        self.suppressions.iter().filter(move |s| s.active(now))
    }

    /// The acknowledgement of alarm `id`.
    pub fn ack(&self, id: &str) -> Option<&Ack> {
        self.acks.get(id)
    }

    /// Whether any event of the open alarm `id` went to the sinks.
    pub fn sent(&self, id: &str) -> Option<bool> {
        self.open.get(id).map(|o| o.delivered)
    }

    /// Acknowledgements given to an alarm open now.
    pub fn acknowledged_open(&self) -> usize {
        self.acks
            .keys()
            .filter(|k| self.open.contains_key(*k))
            .count()
    }

    /// Marks an evaluation's events with the suppression of their host and the
    /// acknowledgement of their alarm, and says of each whether it goes to the sinks.
    pub fn route(&mut self, events: &mut [AlarmEvent], now: SystemTime) -> Vec<bool> {
        let mut deliver = Vec::with_capacity(events.len());
        for e in events.iter_mut() {
            e.suppressed = self.suppression_for(e.host, now).map(Suppression::mark);
            let free = e.suppressed.is_none();
            let send = match e.state {
                AlarmState::Raised => {
                    self.carry_ack(&e.id, e.host);
                    self.open.insert(
                        e.id.clone(),
                        Open {
                            host: e.host,
                            delivered: free,
                        },
                    );
                    free
                }
                AlarmState::Updated => {
                    let o = self.open.entry(e.id.clone()).or_insert(Open {
                        host: e.host,
                        delivered: false,
                    });
                    o.delivered |= free;
                    free
                }
                AlarmState::Cleared => match self.open.remove(&e.id) {
                    Some(o) => o.delivered,
                    None => free,
                },
            };
            e.acknowledged = self.acks.get(&e.id).map(Ack::mark);
            if e.state == AlarmState::Cleared {
                self.acks.remove(&e.id);
            }
            deliver.push(send);
        }
        deliver
    }

    /// An acknowledgement read from the file goes to its host's new alarm.
    fn carry_ack(&mut self, id: &str, host: IpAddr) {
        if self.acks.contains_key(id) {
            return;
        }
        let carried = self
            .acks
            .iter()
            .find(|(_, a)| a.orphan_since.is_some() && a.host == host)
            .map(|(k, _)| k.clone());
        if let Some(mut a) = carried.and_then(|k| self.acks.remove(&k)) {
            a.alarm = id.to_string();
            a.orphan_since = None;
            self.acks.insert(id.to_string(), a);
        }
    }
}

fn nanos(t: SystemTime) -> u128 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// A time as RFC 3339 in the file.
mod rfc {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::SystemTime;

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::flow::rfc3339(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&text).map_err(serde::de::Error::custom)
    }
}

mod rfc_opt {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::SystemTime;

    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&crate::flow::rfc3339(*t)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|t| humantime::parse_rfc3339_weak(&t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// A network as `ADDR/LEN`.
pub mod cidr_text {
    use crate::flow::Cidr;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn text(c: &Cidr) -> String {
        format!("{}/{}", c.addr, c.len)
    }

    pub fn serialize<S: Serializer>(c: &Cidr, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&text(c))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests;
