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
const WHOLE_AT_MOST: f64 = 4.0;

/// Weight of a new sample in the running means.
const WEIGHT: f64 = 0.125;

/// Every this many decisions for ranged, one is taken whole anyway, so
/// that the whole-chunk figure follows the store when nothing else
/// fetches whole chunks.
const PROBE_EVERY: u64 = 64;

#[derive(Debug, Default)]
pub(super) struct FetchCosts {
    inner: Mutex<Means>,
}

#[derive(Debug, Default)]
struct Means {
    /// Mean seconds of a ranged fetch of blocks, and of a whole chunk.
    ranged: Option<f64>,
    whole: Option<f64>,
    ranged_decisions: u64,
}

fn update(mean: &mut Option<f64>, d: Duration) {
    let s = d.as_secs_f64();
    *mean = Some(match *mean {
        None => s,
        Some(m) => m + WEIGHT * (s - m),
    });
}

impl FetchCosts {
    fn means(&self) -> std::sync::MutexGuard<'_, Means> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn ranged_took(&self, d: Duration) {
        update(&mut self.means().ranged, d);
    }

    pub(super) fn whole_took(&self, d: Duration) {
        update(&mut self.means().whole, d);
    }

    /// A chunk some of whose blocks are cached misses again: fetch it
    /// whole? Yes while no whole chunk has been measured (one fetch
    /// measures it), then when a whole chunk costs at most
    /// [`WHOLE_AT_MOST`] ranged fetches.
    pub(super) fn whole_on_second_miss(&self) -> bool {
        let mut m = self.means();
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
        // A local directory: 30 µs for blocks, 600 µs for a chunk.
        let c = FetchCosts::default();
        c.ranged_took(Duration::from_micros(30));
        c.whole_took(Duration::from_micros(600));
        let decisions: Vec<bool> = (0..PROBE_EVERY * 2).map(|_| c.whole_on_second_miss()).collect();
        // Ranged, but for one probe in every PROBE_EVERY.
        assert_eq!(decisions.iter().filter(|w| **w).count(), 2);
        assert!(!decisions[0]);
    }

    #[test]
    fn the_means_follow_the_store() {
        let c = FetchCosts::default();
        c.ranged_took(ms(1));
        c.whole_took(ms(100));
        assert!(!c.whole_on_second_miss());
        // The store slows down per request (a network in between): the
        // ranged mean catches up within a few dozen fetches.
        for _ in 0..40 {
            c.ranged_took(ms(30));
        }
        assert!(c.whole_on_second_miss());
    }
}
