//! Leader election on a `coordination.k8s.io/v1` Lease, so that exactly one
//! controller replica compacts at a time.
//!
//! Owns: reading, creating and replacing one Lease object, and deciding from
//! what it read whether this replica leads. Does not own what the leader
//! does (`mod.rs` starts and stops the reconcile loop on its answers).
//!
//! Every write is conditional: a create fails with 409 if another replica
//! created the Lease first, a replace carries the `resourceVersion` that was
//! read and fails with 409 if anyone wrote in between. So two candidates
//! can never both believe they acquired the same term.
//!
//! Expiry is judged on this replica's own monotonic clock, never by
//! comparing the holder's `renewTime` with local wall time (the holder's
//! clock may be skewed): a Lease is expired when its record has not changed
//! for `leaseDurationSeconds` since this replica first saw it as it is. A
//! leader steps down when it has not renewed for `renew_deadline`, which is
//! shorter than the lease duration, so it has stopped before anyone else
//! may take over.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::time::Instant;

/// Timing of the election.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTiming {
    /// Written into the Lease: how long others wait after its last renewal.
    pub duration: Duration,
    /// A leader that could not renew for this long stops leading.
    pub renew_deadline: Duration,
    /// How often a leader renews and a candidate retries.
    pub retry_period: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What one election round found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Round {
    /// This replica holds the Lease (created, renewed or taken over).
    Leading,
    /// Another replica holds it and it has not expired.
    Following { holder: String },
    /// A conditional write lost a race; retry after the retry period.
    Conflict,
}

/// The Lease record as last observed, and when this replica first saw it so.
#[derive(Debug, Clone)]
struct Observed {
    record: (Option<String>, Option<String>, Option<i32>),
    since: Instant,
}

/// One candidate for one Lease.
#[derive(Debug)]
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: LeaseTiming,
    observed: Option<Observed>,
    /// When this replica last wrote the Lease as its holder.
    renewed: Option<Instant>,
}

impl LeaseLock {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, timing: LeaseTiming) -> Self {
        Self { api, name: name.to_string(), identity: identity.to_string(), timing, observed: None, renewed: None }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn timing(&self) -> LeaseTiming {
        self.timing
    }

    /// Until when a leader may act without another renewal (`None`: it
    /// never renewed).
    pub fn leading_until(&self) -> Option<Instant> {
        self.renewed.map(|r| r + self.timing.renew_deadline)
    }

    /// Whether a leader that last renewed at some point may still act at
    /// `now`: false once the renew deadline has passed without a renewal.
    pub fn still_leading(&self, now: Instant) -> bool {
        self.renewed.is_some_and(|r| now.duration_since(r) < self.timing.renew_deadline)
    }

    /// One round: read the Lease, then create, renew or take it over when
    /// allowed. `now` is this replica's monotonic time (injected so tests
    /// can step it).
    pub async fn try_acquire_or_renew(&mut self, now: Instant) -> Result<Round, kube::Error> {
        let current = match self.api.get_opt(&self.name).await? {
            Some(l) => l,
            None => return self.create(now).await,
        };
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let record = (holder.clone(), spec.renew_time.as_ref().map(|t| t.0.to_string()), spec.lease_transitions);
        let since = match &self.observed {
            Some(o) if o.record == record => o.since,
            _ => now,
        };
        self.observed = Some(Observed { record, since });
        let ours = holder.as_deref() == Some(self.identity.as_str());
        let duration = spec.lease_duration_seconds.map(|s| Duration::from_secs(s.max(0) as u64));
        let expired = holder.is_none() || now.duration_since(since) >= duration.unwrap_or(self.timing.duration);
        if !ours && !expired {
            self.renewed = None;
            return Ok(Round::Following { holder: holder.unwrap_or_default() });
        }
        let mut next = current;
        let wall = MicroTime(Timestamp::now());
        let s = next.spec.get_or_insert_with(LeaseSpec::default);
        if !ours {
            s.holder_identity = Some(self.identity.clone());
            s.acquire_time = Some(wall.clone());
            s.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        s.renew_time = Some(wall);
        s.lease_duration_seconds = Some(self.timing.duration.as_secs() as i32);
        // `next` still carries the resourceVersion read above: the replace
        // is conditional on nobody having written since.
        match self.api.replace(&self.name, &PostParams::default(), &next).await {
            Ok(_) => {
                if !ours {
                    tracing::info!(lease = %self.name, identity = %self.identity, previous = ?holder, "took over the lease");
                }
                self.renewed = Some(now);
                Ok(Round::Leading)
            }
            Err(e) if is_conflict(&e) => {
                self.renewed = None;
                Ok(Round::Conflict)
            }
            Err(e) => Err(e),
        }
    }

    /// Hand the Lease back at a graceful shutdown, so another replica takes
    /// over at its next round instead of after a whole lease duration: the
    /// holder is cleared, conditional on the record still being ours as
    /// read. True when it was released; false when it was not ours (any
    /// more) or another write won.
    pub async fn release(&mut self) -> Result<bool, kube::Error> {
        self.renewed = None;
        let Some(mut current) = self.api.get_opt(&self.name).await? else { return Ok(false) };
        let s = current.spec.get_or_insert_with(LeaseSpec::default);
        if s.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(false);
        }
        s.holder_identity = None;
        s.renew_time = Some(MicroTime(Timestamp::now()));
        s.lease_duration_seconds = Some(1);
        match self.api.replace(&self.name, &PostParams::default(), &current).await {
            Ok(_) => {
                tracing::info!(lease = %self.name, identity = %self.identity, "released the lease");
                Ok(true)
            }
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn create(&mut self, now: Instant) -> Result<Round, kube::Error> {
        let wall = MicroTime(Timestamp::now());
        let lease = Lease {
            metadata: ObjectMeta { name: Some(self.name.clone()), ..ObjectMeta::default() },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                acquire_time: Some(wall.clone()),
                renew_time: Some(wall),
                lease_duration_seconds: Some(self.timing.duration.as_secs() as i32),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        match self.api.create(&PostParams::default(), &lease).await {
            Ok(_) => {
                tracing::info!(lease = %self.name, identity = %self.identity, "created the lease and leads");
                self.renewed = Some(now);
                Ok(Round::Leading)
            }
            Err(e) if is_conflict(&e) => Ok(Round::Conflict),
            Err(e) => Err(e),
        }
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}
