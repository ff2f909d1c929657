//! What fetching from the store costs this volume, as measured: a ranged
//! fetch of a few blocks against a whole chunk. Decides whether a chunk
//! that misses the cache again is fetched whole.
//!
//! A ranged fetch moves little, but each one is a request. On a store
//! where a request's latency dwarfs moving a chunk (S3 across a network),
//! a chunk read twice at random is likely read again, and fetching it
//! whole serves those reads from the cache for little more than one
//! ranged fetch costs. On a store where moving bytes dominates (the local
//! directory), a whole chunk costs many times a few blocks, and ranged
//! fetches stay cheaper.

use std::sync::Mutex;
use std::time::Duration;

/// Fetch whole when a whole chunk costs at most this many ranged fetches.
const WHOLE_AT_MOST: f64 = 3.0;

/// A figure follows the cheapest recent fetches: each fetch lowers it to
/// its own cost, or else lets it rise by this fraction, so that fetches
/// queued behind others (many reads at once) do not pass for what the
/// store costs, and a store that became ten times slower is followed
/// within about 80 fetches.
const RISE: f64 = 0.03;

/// Every this many decisions for ranged, one is taken whole anyway, so
/// that the whole-chunk figure follows the store when nothing else
/// fetches whole chunks.
const PROBE_EVERY: u64 = 1024;

#[derive(Debug, Default)]
pub(super) struct FetchCosts {
    inner: Mutex<Figures>,
}

#[derive(Debug, Default)]
struct Figures {
    /// Seconds a ranged fetch of blocks takes, and a whole chunk, each
    /// fetched and checked: near the cheapest recent ones.
    ranged: Option<f64>,
    whole: Option<f64>,
    ranged_decisions: u64,
}

fn update(figure: &mut Option<f64>, d: Duration) {
    let s = d.as_secs_f64();
    *figure = Some(match *figure {
        Some(m) => s.min(m * (1.0 + RISE)),
        None => s,
    });
}

impl FetchCosts {
    fn figures(&self) -> std::sync::MutexGuard<'_, Figures> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn ranged_took(&self, d: Duration) {
        update(&mut self.figures().ranged, d);
    }

    pub(super) fn whole_took(&self, d: Duration) {
        update(&mut self.figures().whole, d);
    }

    /// A chunk some of whose blocks are cached misses again: fetch it
    /// whole? Yes while no whole chunk has been measured (one fetch
    /// measures it), then when a whole chunk costs at most
    /// [`WHOLE_AT_MOST`] ranged fetches (each fetched and checked: bytes
    /// cost their checksum too).
    pub(super) fn whole_on_second_miss(&self) -> bool {
        let mut m = self.figures();
        let whole = match (m.ranged, m.whole) {
            (Some(r), Some(w)) => w <= WHOLE_AT_MOST * r,
            _ => true,
        };
        if whole {
            return true;
        }
        m.ranged_decisions += 1;
        m.ranged_decisions.is_multiple_of(PROBE_EVERY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn latency_bound_stores_fetch_whole_and_byte_bound_ones_ranged() {
        // Nothing measured: one whole fetch measures it.
        let c = FetchCosts::default();
        assert!(c.whole_on_second_miss());
        c.ranged_took(ms(20));
        assert!(c.whole_on_second_miss());
        // S3 behind a network: 20 ms a request, 28 ms a whole chunk.
        c.whole_took(ms(28));
        assert!(c.whole_on_second_miss());
        // A local directory: 30 µs for blocks, 300 µs for a chunk.
        let c = FetchCosts::default();
        c.ranged_took(Duration::from_micros(30));
        c.whole_took(Duration::from_micros(300));
        let decisions: Vec<bool> = (0..PROBE_EVERY * 2).map(|_| c.whole_on_second_miss()).collect();
        // Ranged, but for one probe in every PROBE_EVERY.
        assert_eq!(decisions.iter().filter(|w| **w).count(), 2);
        assert!(!decisions[0]);
    }

    #[test]
    fn the_figures_follow_the_store_not_the_queue() {
        let c = FetchCosts::default();
        c.ranged_took(ms(1));
        c.whole_took(ms(100));
        assert!(!c.whole_on_second_miss());
        // Ranged fetches queued behind others now and then: the figure
        // stays near the cheap ones.
        for n in 0..40 {
            c.ranged_took(ms(if n % 4 == 0 { 80 } else { 1 }));
        }
        assert!(!c.whole_on_second_miss());
        // The store slows down per request (a network in between): the
        // ranged figure catches up.
        for _ in 0..200 {
            c.ranged_took(ms(60));
        }
        assert!(c.whole_on_second_miss());
    }
}
