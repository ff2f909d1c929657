//! A simulated object store for the deterministic simulation
//! (`tests/simulation.rs`): one in-memory bucket shared by several actors,
//! each reaching it through its own [`SimStore`] handle with its own
//! seeded fault plan.
//!
//! Every call goes through the same steps, all on tokio's clock (the
//! simulation runs a paused, single-threaded runtime, so time moves only
//! when every task waits, and always in the same order):
//!
//! 1. The call's fate is drawn from a random generator seeded by the
//!    world's seed, the actor, the operation, the key (chunk generations
//!    and probe names blanked out) and how many such calls came before.
//!    Fates therefore do not depend on the order in which one actor starts
//!    calls that are concurrent (the engine starts uploads in hash-map
//!    order).
//! 2. The request travels (a drawn delay) as an event of the world's
//!    schedule, then is applied, unless the caller has given up meanwhile
//!    (a retry timeout, a cancelled future, a crashed process): then it
//!    lands or not, as drawn. A call can fail before reaching the bucket
//!    (transient error), reach it and lose its answer, or hang past any
//!    timeout (and land or not). Concurrent calls complete in the order
//!    their delays say; events due in the same timer tick run in an order
//!    drawn from the seed.
//! 3. Outage windows (a partitioned actor) fail or black-hole every call
//!    that starts inside them; brownout windows (a latency spike) make
//!    every call that starts inside them take seconds. An outage can also
//!    be armed to begin at a PUT ([`SimStore::trip_at_put`]), which fails
//!    with it or lands just before the link goes.
//!
//! [`SimGate`], put in front of the retry layer, makes calls started in
//! one instant proceed in a seeded order, so the retry layer's timeouts
//! are armed (and fire) in an order that does not depend on the engine's
//! hash maps.
//!
//! Conditional PUTs behave like S3's `If-None-Match: *` (412 when the key
//! exists); listed objects carry a `LastModified` from the simulated clock.
//! [`SimStore::crash`] makes a handle fail every later call.

use std::collections::BTreeMap;
use std::hash::Hasher;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use super::memory::list_sorted;
use super::{ListPage, ListRequest, ObjectStore, PutMode, StoreError, StoreResult, apply_range};
use crate::clock::Clock;

/// Unix time at which every simulation starts (2025-01-01T00:00:00Z).
pub const SIM_START_UNIX: i64 = 1_735_689_600;

/// What can go wrong with one actor's calls.
#[derive(Debug, Clone)]
pub struct FaultPlan {
    /// Fails before reaching the bucket (a 500 or 503).
    pub error_rate: f64,
    /// Applied, then the answer is lost (a reset after the request landed).
    pub lost_answer_rate: f64,
    /// Never answers; lands or not (as an abandoned call).
    pub hang_rate: f64,
    /// When a hung call lands, if it does.
    pub hang_delay: Range<Duration>,
    /// Ordinary latency of a call.
    pub delay: Range<Duration>,
    /// A share of calls is slow: this latency instead.
    pub slow_rate: f64,
    pub slow_delay: Range<Duration>,
    /// A call whose caller gave up before it was applied still lands.
    pub abandoned_lands_rate: f64,
    /// Windows (since the start of the simulation) in which every call fails.
    pub outages: Vec<Outage>,
    /// Windows in which every call is slow (a store's latency spike):
    /// latencies drawn from `brownout_delay`.
    pub brownouts: Vec<Range<Duration>>,
    pub brownout_delay: Range<Duration>,
}

/// A window in which one actor cannot reach the store.
#[derive(Debug, Clone)]
pub struct Outage {
    pub window: Range<Duration>,
    /// Calls hang (packets dropped) rather than fail fast (connection refused).
    pub black_hole: bool,
}

impl FaultPlan {
    /// Small latencies, no faults.
    pub fn calm() -> Self {
        Self {
            error_rate: 0.0,
            lost_answer_rate: 0.0,
            hang_rate: 0.0,
            hang_delay: Duration::from_secs(31)..Duration::from_secs(120),
            delay: Duration::from_micros(500)..Duration::from_millis(20),
            slow_rate: 0.0,
            slow_delay: Duration::from_millis(100)..Duration::from_secs(2),
            abandoned_lands_rate: 0.5,
            outages: Vec::new(),
            brownouts: Vec::new(),
            brownout_delay: Duration::from_secs(1)..Duration::from_secs(10),
        }
    }
}

/// One call, as the trace records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimOp {
    Get,
    Put,
    PutIfAbsent,
    Delete,
    List,
    Head,
}

/// What became of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Applied, answered.
    Normal,
    /// Not applied; a transient error comes back.
    Error,
    /// Applied; a transient error comes back.
    LostAnswer,
    /// No answer, ever; applied or not.
    Hang,
    /// In a black-hole outage: never applied, never answered.
    Void,
}

type Objects = BTreeMap<String, (Bytes, i64)>;

#[derive(Debug, Default)]
struct WorldState {
    objects: Objects,
    /// Calls so far per (actor, op, blanked key): the last input of a call's fate.
    counters: BTreeMap<(String, SimOp, String), u64>,
    trace_hash: u64,
    trace_len: u64,
    /// Every event: its hash and its line (printed at once when verbose).
    events: Vec<(u64, String)>,
    verbose: bool,
}

/// Something that happens at a simulated instant.
type Event = Box<dyn FnOnce() + Send>;

/// Events by (instant, seeded tie-break, arrival): several events due in
/// the same timer tick run in an order the seed decides, not in the order
/// their calls happened to start.
#[derive(Default)]
struct Schedule {
    queue: BTreeMap<(Instant, u64, u64), Event>,
    arrivals: u64,
}

/// The bucket and the clock every handle shares.
pub struct SimWorld {
    seed: u64,
    start: Instant,
    state: Mutex<WorldState>,
    schedule: Mutex<Schedule>,
    wake: tokio::sync::Notify,
}

impl std::fmt::Debug for SimWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimWorld").field("seed", &self.seed).finish()
    }
}

impl SimWorld {
    /// A world starting now (on tokio's clock), with the task that runs its
    /// events. Call inside the runtime.
    pub fn new(seed: u64, verbose: bool) -> Arc<Self> {
        let state = WorldState { trace_hash: 0xcbf2_9ce4_8422_2325, verbose, ..WorldState::default() };
        let world = Arc::new(Self {
            seed,
            start: Instant::now(),
            state: Mutex::new(state),
            schedule: Mutex::new(Schedule::default()),
            wake: tokio::sync::Notify::new(),
        });
        tokio::spawn(world.clone().drive());
        world
    }

    fn schedule(&self, at: Instant, tie: u64, event: Event) {
        {
            let mut s = self.schedule.lock().unwrap_or_else(|p| p.into_inner());
            s.arrivals += 1;
            let n = s.arrivals;
            s.queue.insert((at, tie, n), event);
        }
        self.wake.notify_one();
    }

    /// Run events in order as their instants come.
    async fn drive(self: Arc<Self>) {
        loop {
            let next = {
                let mut s = self.schedule.lock().unwrap_or_else(|p| p.into_inner());
                match s.queue.first_key_value().map(|(k, _)| k.0) {
                    Some(at) if at <= Instant::now() => Ok(s.queue.pop_first().map(|(_, e)| e)),
                    other => Err(other),
                }
            };
            match next {
                Ok(Some(event)) => event(),
                Ok(None) => {}
                Err(Some(at)) => {
                    tokio::select! {
                        biased;
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                Err(None) => self.wake.notified().await,
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, WorldState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Time since the world started.
    pub fn elapsed(&self) -> Duration {
        Instant::now().saturating_duration_since(self.start)
    }

    /// The store's clock, in seconds since the Unix epoch.
    pub fn now_unix(&self) -> i64 {
        SIM_START_UNIX + self.elapsed().as_secs() as i64
    }

    /// A handle for one actor, with its own faults.
    pub fn handle(self: &Arc<Self>, actor: &str, plan: FaultPlan) -> SimStore {
        SimStore {
            world: self.clone(),
            actor: actor.to_string(),
            plan: Arc::new(Mutex::new(plan)),
            crashed: Arc::new(AtomicBool::new(false)),
            trip: Arc::new(Mutex::new(None)),
            outage_trip: Arc::new(Mutex::new(None)),
        }
    }

    /// Keys under a prefix, as they are now (the simulation's view from above).
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.lock()
            .objects
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// When the object at `key` was last written (the store's clock, Unix seconds).
    pub fn modified_unix(&self, key: &str) -> Option<i64> {
        self.lock().objects.get(key).map(|(_, t)| *t)
    }

    /// Fold an event into the trace hash (with names that differ from run
    /// to run blanked) and the event log.
    pub fn trace(&self, event: &str) {
        self.trace_shown(&blank_names(event), event)
    }

    /// Fold `event` into the trace hash; log `shown` (which may name what
    /// differs from run to run, such as chunk generations).
    fn trace_shown(&self, event: &str, shown: &str) {
        let t = self.elapsed();
        let mut st = self.lock();
        let mut one = Fnv::default();
        one.write_u128(t.as_nanos());
        one.write(event.as_bytes());
        let mut h = Fnv(st.trace_hash);
        h.write_u64(one.finish());
        st.trace_hash = h.finish();
        st.trace_len += 1;
        let line = format!("{:>10.6}s {shown}", t.as_secs_f64());
        if st.verbose {
            println!("{line}");
        }
        st.events.push((one.finish(), line));
    }

    /// The hash of every event so far: equal for equal seeds.
    pub fn trace_hash(&self) -> (u64, u64) {
        let st = self.lock();
        (st.trace_hash, st.trace_len)
    }

    /// Every event so far, oldest first: its hash (to find where two runs
    /// part) and its line.
    pub fn events(&self) -> Vec<(u64, String)> {
        self.lock().events.clone()
    }

    /// The generator that decides one call's fate.
    fn call_rng(&self, actor: &str, op: SimOp, key: &str) -> SmallRng {
        let blank = blank_key(key);
        let mut st = self.lock();
        let n = st.counters.entry((actor.to_string(), op, blank.clone())).or_insert(0);
        let count = *n;
        *n += 1;
        drop(st);
        let mut h = Fnv::default();
        h.write_u64(self.seed);
        h.write(actor.as_bytes());
        h.write_u8(0xff);
        h.write_u8(op as u8);
        h.write(blank.as_bytes());
        h.write_u8(0xff);
        h.write_u64(count);
        SmallRng::seed_from_u64(h.finish())
    }
}

/// The key with what the engine draws at random (probe names) or numbers in
/// the order it happens to start uploads (chunk generations) blanked out.
fn blank_key(key: &str) -> String {
    blank_names(key)
}

/// Object names the engine draws at random: a hex nonce follows these.
const RANDOM_NAMES: [&str; 2] = [".s3blk-probe-", ".s3blk-clock-"];

/// Any text with random object names (conditional-write probes, compaction's
/// clock probes) and chunk generations blanked out: engine messages name
/// them, and they differ between runs of one seed.
pub fn blank_names(text: &str) -> String {
    let hex_run = |s: &str| s.bytes().take_while(u8::is_ascii_hexdigit).count();
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let probe = RANDOM_NAMES.iter().filter_map(|name| rest.find(name).map(|p| (p, p + name.len()))).min();
        let chunk = rest.find("chunks/").and_then(|p| {
            let after = p + "chunks/".len();
            let index = hex_run(&rest[after..]);
            (index == 16 && rest[after + index..].starts_with('/')).then_some((p, after + index + 1))
        });
        // A split checkpoint's part: `checkpoints/<seq>.<tag>.<n>`, its
        // writer's tag drawn at random.
        let part = rest.find("checkpoints/").and_then(|p| {
            let after = p + "checkpoints/".len();
            let seq = hex_run(&rest[after..]);
            (seq == 20 && rest[after + seq..].starts_with('.')).then_some((p, after + seq + 1))
        });
        let next = [probe, chunk, part].into_iter().flatten().min();
        let Some((_, name_start)) = next else {
            out.push_str(rest);
            return out;
        };
        out.push_str(&rest[..name_start]);
        let n = hex_run(&rest[name_start..]);
        if n > 0 {
            out.push('*');
        }
        rest = &rest[name_start + n..];
    }
}

/// FNV-1a: a hash that is the same in every process (std's is seeded).
#[derive(Debug, Clone, Copy)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= *b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// One actor's view of the simulated bucket.
#[derive(Debug, Clone)]
pub struct SimStore {
    world: Arc<SimWorld>,
    actor: String,
    plan: Arc<Mutex<FaultPlan>>,
    crashed: Arc<AtomicBool>,
    /// Crash as the n-th delete of a key containing the text is sent.
    trip: Arc<Mutex<Option<(String, u64)>>>,
    /// Lose the store as a PUT of a key containing the text is sent.
    outage_trip: Arc<Mutex<Option<PutTrip>>>,
}

/// The store lost as one PUT is sent ([`SimStore::trip_at_put`]).
#[derive(Debug, Clone)]
pub struct PutTrip {
    /// The first PUT of a key containing this text...
    pub contains: String,
    /// ...sent at or after this moment (since the simulation started).
    pub not_before: Duration,
    /// That PUT fails with the outage (`None`), or lands first, its answer
    /// lost (`Some(true)`) or given (`Some(false)`), the outage beginning
    /// as it is sent (the calls after it fail).
    pub lands: Option<bool>,
    /// The outage: its window's length counts from the trip.
    pub outage: Outage,
}

/// A call's drawn fate and timing.
#[derive(Debug, Clone, Copy)]
struct CallPlan {
    fate: Fate,
    /// Until the request is applied (or found abandoned).
    travel: Duration,
    /// Until the answer is back, after it was applied.
    answer: Duration,
    lands_if_abandoned: bool,
    /// Orders events due in the same instant.
    tie: u64,
}

fn draw(rng: &mut SmallRng, r: &Range<Duration>) -> Duration {
    if r.start >= r.end {
        return r.start;
    }
    Duration::from_micros(rng.random_range(r.start.as_micros() as u64..r.end.as_micros() as u64))
}

impl SimStore {
    pub fn world(&self) -> &Arc<SimWorld> {
        &self.world
    }

    pub fn actor(&self) -> &str {
        &self.actor
    }

    /// The process dies: every later call fails; calls in flight land or not, as drawn.
    pub fn crash(&self) {
        self.crashed.store(true, Ordering::SeqCst);
        self.world.trace(&format!("{} store handle crashed", self.actor));
    }

    pub fn is_crashed(&self) -> bool {
        self.crashed.load(Ordering::SeqCst)
    }

    /// The process dies as it sends its `nth` (from 1) delete of a key
    /// containing `contains`: that delete and every call in flight land or
    /// not, as drawn for calls whose caller went away. `None` disarms.
    pub fn crash_at_delete(&self, trip: Option<(&str, u64)>) {
        *self.trip.lock().unwrap_or_else(|p| p.into_inner()) = trip.map(|(k, n)| (k.to_string(), n));
    }

    /// The actor loses the store as it sends its next PUT of a key
    /// containing `contains`: that PUT and every call in the outage's
    /// window (measured from that moment, its length the window's) fail.
    pub fn outage_at_put(&self, contains: &str, outage: Outage) {
        self.trip_at_put(PutTrip { contains: contains.to_string(), not_before: Duration::ZERO, lands: None, outage });
    }

    /// Arm a [`PutTrip`] (replacing one armed before).
    pub fn trip_at_put(&self, trip: PutTrip) {
        *self.outage_trip.lock().unwrap_or_else(|p| p.into_inner()) = Some(trip);
    }

    /// Replace the fault plan (e.g. a calm one for the final checks).
    pub fn set_plan(&self, plan: FaultPlan) {
        *self.plan.lock().unwrap_or_else(|p| p.into_inner()) = plan;
    }

    /// Cut this actor off from the store for a while (from now on).
    pub fn add_outage(&self, outage: Outage) {
        self.plan.lock().unwrap_or_else(|p| p.into_inner()).outages.push(outage);
    }

    /// Draw a call's fate and timing (`forced`: this fate instead of the drawn one).
    fn plan_call(&self, op: SimOp, key: &str, forced: Option<Fate>) -> CallPlan {
        let mut rng = self.world.call_rng(&self.actor, op, key);
        let plan = self.plan.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let now = self.world.elapsed();
        let outage = plan.outages.iter().find(|o| o.window.contains(&now));
        let slow = rng.random_bool(plan.slow_rate.clamp(0.0, 1.0));
        let latency = if plan.brownouts.iter().any(|b| b.contains(&now)) {
            draw(&mut rng, &plan.brownout_delay)
        } else if slow {
            draw(&mut rng, &plan.slow_delay)
        } else {
            draw(&mut rng, &plan.delay)
        };
        let travel = latency / 2;
        let answer = latency - travel;
        let lands_if_abandoned = rng.random_bool(plan.abandoned_lands_rate.clamp(0.0, 1.0));
        let roll: f64 = rng.random();
        let fate = match outage {
            Some(o) if o.black_hole => Fate::Void,
            Some(_) => Fate::Error,
            None if roll < plan.error_rate => Fate::Error,
            None if roll < plan.error_rate + plan.lost_answer_rate => Fate::LostAnswer,
            None if roll < plan.error_rate + plan.lost_answer_rate + plan.hang_rate => Fate::Hang,
            None => Fate::Normal,
        };
        let fate = forced.unwrap_or(fate);
        let travel = if fate == Fate::Hang { draw(&mut rng, &plan.hang_delay) } else { travel };
        CallPlan { fate, travel, answer, lands_if_abandoned, tie: rng.random() }
    }

    /// Run one call through its fate. `apply` changes or reads the bucket
    /// at the moment the request arrives.
    async fn call<T, F>(&self, op: SimOp, key: &str, apply: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Objects, i64) -> StoreResult<T> + Send + 'static,
    {
        let what = format!("{} {op:?} {}", self.actor, blank_key(key));
        let shown = format!("{} {op:?} {key}", self.actor);
        if self.is_crashed() {
            return Err(StoreError::Permanent(format!("{what}: process crashed")));
        }
        let mut forced = None;
        if matches!(op, SimOp::Put | SimOp::PutIfAbsent) {
            let now = self.world.elapsed();
            let mut trip = self.outage_trip.lock().unwrap_or_else(|p| p.into_inner());
            if trip.as_ref().is_some_and(|t| key.contains(t.contains.as_str()) && now >= t.not_before)
                && let Some(t) = trip.take()
            {
                let len = t.outage.window.end - t.outage.window.start;
                let how = match t.lands {
                    None => "",
                    Some(true) => "; it lands, its answer lost",
                    Some(false) => "; it lands and is answered",
                };
                self.world.trace(&format!("{} cut off for {len:?} (sending {op:?} {key}{how})", self.actor));
                let outage = Outage { window: now..now + len, black_hole: t.outage.black_hole };
                match t.lands {
                    None => self.add_outage(outage),
                    // On its way before the link goes.
                    Some(lost) => forced = Some((if lost { Fate::LostAnswer } else { Fate::Normal }, outage)),
                }
            }
        }
        let plan = self.plan_call(op, key, forced.as_ref().map(|f| f.0));
        if let Some((_, outage)) = forced {
            self.add_outage(outage);
        }
        if op == SimOp::Delete {
            let mut trip = self.trip.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((contains, n)) = trip.as_mut().filter(|(c, _)| key.contains(c.as_str())) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    let _ = contains;
                    *trip = None;
                    drop(trip);
                    // Dies as the request leaves: it is in flight, like the others.
                    self.crashed.store(true, Ordering::SeqCst);
                    self.world.trace(&format!("{} store handle crashed (sending {op:?} {key})", self.actor));
                }
            }
        }
        // Noted as an event of its own: calls that start in the same
        // instant are noted in the seed's order, not the order they started.
        let silent = match plan.fate {
            Fate::Hang => Some("will never answer"),
            Fate::Void => Some("lost in an outage"),
            _ => None,
        };
        if let Some(outcome) = silent {
            let (world, event, line) =
                (self.world.clone(), format!("{what} -> {outcome}"), format!("{shown} -> {outcome}"));
            self.world.schedule(Instant::now(), plan.tie, Box::new(move || world.trace_shown(&event, &line)));
        }
        let (tx, rx) = tokio::sync::oneshot::channel::<StoreResult<T>>();
        let world = self.world.clone();
        let crashed = self.crashed.clone();
        let (event, event_shown) = (what.clone(), shown);
        let arrive = Instant::now() + plan.travel;
        self.world.schedule(
            arrive,
            plan.tie,
            Box::new(move || {
                let abandoned = tx.is_closed() || crashed.load(Ordering::SeqCst);
                let lands = match plan.fate {
                    Fate::Error | Fate::Void => false,
                    Fate::Hang => plan.lands_if_abandoned,
                    Fate::Normal | Fate::LostAnswer => !abandoned || plan.lands_if_abandoned,
                };
                let answer_at = arrive + plan.answer;
                if !lands {
                    let note = |outcome: &str| {
                        world.trace_shown(&format!("{event} -> {outcome}"), &format!("{event_shown} -> {outcome}"))
                    };
                    if plan.fate == Fate::Error {
                        note("transient error");
                        let err = Err(StoreError::Transient(format!("{event}: injected 503 SlowDown")));
                        world.schedule(answer_at, plan.tie, Box::new(move || drop(tx.send(err))));
                    } else if plan.fate != Fate::Void {
                        note("abandoned, not applied");
                    }
                    return;
                }
                let r = {
                    let now = world.now_unix();
                    let mut st = world.lock();
                    apply(&mut st.objects, now)
                };
                let outcome = match (&r, plan.fate) {
                    (_, Fate::Hang) => "hung, applied".to_string(),
                    (_, _) if abandoned => "abandoned, applied".to_string(),
                    (Ok(_), Fate::LostAnswer) => "applied, answer lost".to_string(),
                    (Ok(_), _) => "ok".to_string(),
                    (Err(StoreError::NotFound(_)), _) => "not found".to_string(),
                    (Err(StoreError::PreconditionFailed(_)), _) => "412".to_string(),
                    (Err(e), _) => format!("error {e}"),
                };
                world.trace_shown(&format!("{event} -> {outcome}"), &format!("{event_shown} -> {outcome}"));
                if matches!(plan.fate, Fate::Normal | Fate::LostAnswer) {
                    world.schedule(answer_at, plan.tie, Box::new(move || drop(tx.send(r))));
                }
            }),
        );
        match plan.fate {
            Fate::Hang | Fate::Void => {
                // No answer: the retry layer's attempt timeout gives up.
                tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
                Err(StoreError::Transient(format!("{what}: no answer")))
            }
            fate => {
                let r = rx.await.unwrap_or_else(|_| Err(StoreError::Permanent(format!("{what}: process crashed"))));
                if self.is_crashed() {
                    return Err(StoreError::Permanent(format!("{what}: process crashed")));
                }
                match (fate, r) {
                    (Fate::LostAnswer, Ok(_)) => Err(StoreError::Transient(format!("{what}: answer lost"))),
                    (_, r) => r,
                }
            }
        }
    }
}

#[async_trait]
impl ObjectStore for SimStore {
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> StoreResult<Bytes> {
        let k = key.to_string();
        self.call(SimOp::Get, key, move |objects, _| {
            let data = objects.get(&k).map(|(b, _)| b.clone()).ok_or_else(|| StoreError::NotFound(k.clone()))?;
            apply_range(&data, range, &k)
        })
        .await
    }

    async fn put(&self, key: &str, body: Bytes, mode: PutMode) -> StoreResult<()> {
        let k = key.to_string();
        let op = if mode == PutMode::IfAbsent { SimOp::PutIfAbsent } else { SimOp::Put };
        self.call(op, key, move |objects, now| {
            if mode == PutMode::IfAbsent && objects.contains_key(&k) {
                return Err(StoreError::PreconditionFailed(k));
            }
            objects.insert(k, (body, now));
            Ok(())
        })
        .await
    }

    async fn get_tagged(&self, key: &str) -> StoreResult<(Bytes, String)> {
        let k = key.to_string();
        self.call(SimOp::Get, key, move |objects, _| {
            let data = objects.get(&k).map(|(b, _)| b.clone()).ok_or_else(|| StoreError::NotFound(k.clone()))?;
            let tag = super::content_tag(&data);
            Ok((data, tag))
        })
        .await
    }

    async fn put_if_match(&self, key: &str, body: Bytes, tag: &str) -> StoreResult<()> {
        let (k, tag) = (key.to_string(), tag.to_string());
        self.call(SimOp::Put, key, move |objects, now| match objects.get(&k) {
            None => Err(StoreError::NotFound(k)),
            Some((b, _)) if super::content_tag(b) != tag => Err(StoreError::PreconditionFailed(k)),
            Some(_) => {
                objects.insert(k, (body, now));
                Ok(())
            }
        })
        .await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        let k = key.to_string();
        self.call(SimOp::Delete, key, move |objects, _| {
            objects.remove(&k);
            Ok(())
        })
        .await
    }

    async fn list(&self, req: ListRequest<'_>) -> StoreResult<ListPage> {
        let prefix = req.prefix.to_string();
        let start_after = req.start_after.map(str::to_string);
        let (delimiter, mut max_keys) = (req.delimiter, req.max_keys);
        // A quarter of listings end after 1 to 3 keys, as S3 may: every
        // walk over a listing must carry on across pages that end anywhere
        // (between two generations of one chunk, say).
        let mut rng = self.world.call_rng(&self.actor, SimOp::List, &format!("page size {}", req.prefix));
        if rng.random_bool(0.25) {
            max_keys = max_keys.min(rng.random_range(1..=3));
        }
        self.call(SimOp::List, req.prefix, move |objects, _| {
            let req = ListRequest { prefix: &prefix, start_after: start_after.as_deref(), delimiter, max_keys };
            let keys = objects.iter().map(|(k, (v, _))| (k.as_str(), v.len() as u64));
            Ok(list_sorted(keys, &req, |k| objects.get(k).map(|(_, t)| *t)))
        })
        .await
    }

    async fn head(&self, key: &str) -> StoreResult<Option<u64>> {
        let k = key.to_string();
        self.call(SimOp::Head, key, move |objects, _| Ok(objects.get(&k).map(|(b, _)| b.len() as u64))).await
    }

    /// The one simulated bucket, the same from every actor (as every
    /// client of one S3 bucket names it the same way: what the engine
    /// keys a host's write-back logs to).
    fn describe(&self) -> String {
        format!("sim://{:016x}", self.world.seed)
    }
}

/// Put in front of a store stack (the retry layer around a [`SimStore`]):
/// calls that start in the same instant go on in the order the seed
/// decides, not the order the engine started them in. The retry layer
/// then arms its attempt timeouts in that order too, so timeouts due in the
/// same tick fire in an order that does not depend on the engine's hash
/// maps.
#[derive(Debug, Clone)]
pub struct SimGate {
    world: Arc<SimWorld>,
    actor: String,
    inner: super::DynStore,
}

impl SimGate {
    pub fn new(world: Arc<SimWorld>, actor: &str, inner: super::DynStore) -> Self {
        Self { world, actor: format!("{actor}/gate"), inner }
    }

    async fn pass(&self, op: SimOp, key: &str) {
        let tie = self.world.call_rng(&self.actor, op, key).random();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        self.world.schedule(
            Instant::now(),
            tie,
            Box::new(move || {
                let _ = tx.send(());
            }),
        );
        let _ = rx.await;
    }
}

#[async_trait]
impl ObjectStore for SimGate {
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> StoreResult<Bytes> {
        self.pass(SimOp::Get, key).await;
        self.inner.get(key, range).await
    }
    async fn put(&self, key: &str, body: Bytes, mode: PutMode) -> StoreResult<()> {
        self.pass(if mode == PutMode::IfAbsent { SimOp::PutIfAbsent } else { SimOp::Put }, key).await;
        self.inner.put(key, body, mode).await
    }
    async fn get_tagged(&self, key: &str) -> StoreResult<(Bytes, String)> {
        self.pass(SimOp::Get, key).await;
        self.inner.get_tagged(key).await
    }
    async fn put_if_match(&self, key: &str, body: Bytes, tag: &str) -> StoreResult<()> {
        self.pass(SimOp::Put, key).await;
        self.inner.put_if_match(key, body, tag).await
    }
    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.pass(SimOp::Delete, key).await;
        self.inner.delete(key).await
    }
    async fn list(&self, req: ListRequest<'_>) -> StoreResult<ListPage> {
        self.pass(SimOp::List, req.prefix).await;
        self.inner.list(req).await
    }
    async fn head(&self, key: &str) -> StoreResult<Option<u64>> {
        self.pass(SimOp::Head, key).await;
        self.inner.head(key).await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// One actor's clock: the simulation's, off by a fixed skew.
#[derive(Debug, Clone)]
pub struct SimClock {
    world: Arc<SimWorld>,
    skew_secs: i64,
}

impl SimClock {
    pub fn new(world: Arc<SimWorld>, skew_secs: i64) -> Self {
        Self { world, skew_secs }
    }
}

#[async_trait]
impl Clock for SimClock {
    async fn sleep(&self, d: Duration) {
        tokio::time::sleep(d).await
    }
    fn now_unix(&self) -> i64 {
        self.world.now_unix() + self.skew_secs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blanked_keys_hide_generations_and_probe_names() {
        assert_eq!(blank_key("v/chunks/0000000000000003/0000001000000002"), "v/chunks/0000000000000003/*");
        assert_eq!(blank_key("v/.s3blk-probe-00ab"), "v/.s3blk-probe-*");
        assert_eq!(blank_key("v/journal/00000000000000000001"), "v/journal/00000000000000000001");
        assert_eq!(
            blank_names(
                "object v/.s3blk-probe-9f0e exists; chunk object v/chunks/0000000000000001/000000100000000e is missing"
            ),
            "object v/.s3blk-probe-* exists; chunk object v/chunks/0000000000000001/* is missing"
        );
        assert_eq!(blank_names("chunks/12 and chunks/"), "chunks/12 and chunks/");
        assert_eq!(blank_names("v/.s3blk-clock-7426e97c6180d50d -> ok"), "v/.s3blk-clock-* -> ok");
        assert_eq!(
            blank_names("v/checkpoints/0000000000000000000a.7426e97c6180d50d.000001 -> ok"),
            "v/checkpoints/0000000000000000000a.*.000001 -> ok"
        );
        assert_eq!(blank_names("v/checkpoints/0000000000000000000a -> ok"), "v/checkpoints/0000000000000000000a -> ok");
    }
}
